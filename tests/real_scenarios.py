"""What each saga of issue #15 needs for the triad on real processes (``tests/real_triad.py``):
its inputs, the ``nexusctl`` command that starts it, and what it leaves.

Uuids are read as SQLite stores them (32 hex digits); the agents' keys are uuids.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from nexus.sagas import (
    disk_create_from_snapshot,
    region_replacement,
    snapshot_create,
    snapshot_delete,
)
from nexus.sagas.disk_create import REPLICAS
from tests.processes import Crucible
from tests.real_triad import (
    PROJECT,
    Rack,
    RealScenario,
    World,
    as_before,
    assert_changed_only,
    changed,
)

SIZE = "64MiB"


def by_name(world: World, table: str, name: str) -> dict[str, Any]:
    (row,) = [r for r in world[table].values() if r["name"] == name and r["project"] == PROJECT]
    return dict(row)


def parts(world: World, snapshot_id: str) -> dict[Any, Any]:
    return {k: r for k, r in world["region_snapshots"].items() if r["snapshot_id"] == snapshot_id}


def agent_keys(rows: Mapping[Any, Any], snapshot_id: str) -> set[tuple[uuid.UUID, str]]:
    """The (region, name) the agents know a snapshot's parts by."""
    name = str(uuid.UUID(snapshot_id))
    return {(uuid.UUID(r["region_id"]), name) for r in rows.values()}


async def disk_with_instance(rack: Rack, disk: str, instance: str) -> None:
    await rack.ok("disk", "create", disk, "--size", SIZE, "-p", PROJECT, "--wait")
    await rack.ok("instance", "create", instance, "--disk", disk, "-p", PROJECT, "--wait")


# snapshot_create: of a disk attached to a running instance, so that the sled agent's
# VMM flushes it first. Every case snapshots the same disk under a name of its own.

SC_DISK = "sc-disk"


async def snapshot_create_prepare(rack: Rack, cases: Sequence[str]) -> Mapping[str, Any]:
    await disk_with_instance(rack, SC_DISK, "sc-vm")
    return {case: f"sc-{index}" for index, case in enumerate(cases)}


def snapshot_create_start(name: str) -> Sequence[str]:
    return ["snapshot", "create", name, "--disk", SC_DISK, "-p", PROJECT]


async def snapshot_create_done(rack: Rack, name: str, before: World, after: World) -> None:
    """Ready, a part per region of the disk, each taken and served at its agent; nothing
    else changed (the VMM runs on)."""
    snapshot = by_name(after, "snapshots", name)
    disk = by_name(after, "disks", SC_DISK)
    assert (snapshot["state"], snapshot["disk_id"]) == ("ready", disk["id"]), snapshot
    made = parts(after, snapshot["id"])
    assert len(made) == REPLICAS
    regions = {k for k, r in after["regions"].items() if r["disk_id"] == disk["id"]}
    assert {r["region_id"] for r in made.values()} == regions
    for part in made.values():
        assert (part["snapshot_state"], part["running_state"]) == ("created", "created"), part
        assert part["snapshot_addr"].endswith(f":{part['port_number']}"), part
    keys = agent_keys(made, snapshot["id"])
    assert_changed_only(
        before,
        after,
        {
            "snapshots": {snapshot["id"]},
            "region_snapshots": set(made),
            "held:snapshots": keys,
            "held:running_snapshots": keys,
        },
    )
    for key in keys:
        assert after["held:running_snapshots"][key][0] == "created"


SNAPSHOT_CREATE = RealScenario(
    snapshot_create.DEFINITION,
    snapshot_create_prepare,
    snapshot_create_start,
    snapshot_create_done,
)


# snapshot_delete: each case deletes a snapshot of its own, all taken of one detached
# disk beforehand.

SD_DISK = "sd-disk"


async def snapshot_delete_prepare(rack: Rack, cases: Sequence[str]) -> Mapping[str, Any]:
    await rack.ok("disk", "create", SD_DISK, "--size", SIZE, "-p", PROJECT, "--wait")
    names = {case: f"sd-{index}" for index, case in enumerate(cases)}
    await asyncio.gather(
        *(
            rack.ok("snapshot", "create", name, "--disk", SD_DISK, "-p", PROJECT, "--wait")
            for name in names.values()
        )
    )
    return names


def snapshot_delete_start(name: str) -> Sequence[str]:
    return ["snapshot", "delete", name, "-p", PROJECT]


async def snapshot_delete_done(rack: Rack, name: str, before: World, after: World) -> None:
    """Destroyed: its row stays, its parts' rows are gone, and no agent holds anything
    of it."""
    snapshot = by_name(after, "snapshots", name)
    assert snapshot["state"] == "destroyed", snapshot
    gone = parts(before, snapshot["id"])
    assert len(gone) == REPLICAS and parts(after, snapshot["id"]) == {}
    keys = agent_keys(gone, snapshot["id"])
    assert_changed_only(
        before,
        after,
        {
            "snapshots": {snapshot["id"]},
            "region_snapshots": set(gone),
            "held:snapshots": keys,
            "held:running_snapshots": keys,
        },
    )


async def snapshot_delete_unwound(
    rack: Rack, name: str, before: World, after: World, node: str
) -> None:
    """Before any running snapshot is stopped the snapshot is ready as before. After, it
    is ``faulted`` (its parts cannot all be read), which the doctor reports and nothing
    else: deleting it again, on a Nexus without faults, finishes the job."""
    if node in ("snapshot_mark_deleting", "running_stop"):
        await as_before(rack, name, before, after, node)
        return
    snapshot = by_name(after, "snapshots", name)
    assert snapshot["state"] == "faulted", snapshot
    ours = parts(before, snapshot["id"])
    keys = agent_keys(ours, snapshot["id"])
    # Its running snapshots are stopped (and, failed later, its snapshots deleted).
    assert not keys & set(after["held:running_snapshots"])
    for kind, changes in changed(before, after).items():
        allowed = {
            "snapshots": {snapshot["id"]},
            "region_snapshots": set(ours),
            "held:snapshots": keys,
            "held:running_snapshots": keys,
        }.get(kind, set())
        assert changes <= allowed, f"{kind} changed beyond the snapshot's own: {changes}"
    report = await rack.doctor()
    assert report.code == 1, report.output
    findings = {(f["kind"], f["object_id"]) for f in report.document["findings"]}
    assert findings == {("snapshot_faulted", str(uuid.UUID(snapshot["id"])))}, findings
    await rack.nexus_with(())
    again = await rack.ctl(*snapshot_delete_start(name), "--wait")
    assert again.code == 0, again.output
    await snapshot_delete_done(rack, name, before, await rack.world())
    await rack.healthy()


SNAPSHOT_DELETE = RealScenario(
    snapshot_delete.DEFINITION,
    snapshot_delete_prepare,
    snapshot_delete_start,
    snapshot_delete_done,
    snapshot_delete_unwound,
)


# disk_create_from_snapshot: each case makes a disk of its own from one ready snapshot,
# taken of a detached disk beforehand.

FS_DISK, FS_SNAPSHOT = "fs-disk", "fs-snap"


async def from_snapshot_prepare(rack: Rack, cases: Sequence[str]) -> Mapping[str, Any]:
    await rack.ok("disk", "create", FS_DISK, "--size", SIZE, "-p", PROJECT, "--wait")
    await rack.ok("snapshot", "create", FS_SNAPSHOT, "--disk", FS_DISK, "-p", PROJECT, "--wait")
    return {case: f"fs-{index}" for index, case in enumerate(cases)}


def from_snapshot_start(name: str) -> Sequence[str]:
    return ["disk", "create", name, "--from-snapshot", FS_SNAPSHOT, "-p", PROJECT]


async def from_snapshot_done(rack: Rack, name: str, before: World, after: World) -> None:
    """Detached, with six created regions: three fresh and three read-only clones (each
    group on three sleds), held by their agents; the space of all six reserved, the
    snapshot's references given back. Nothing else changed."""
    disk = by_name(after, "disks", name)
    snapshot = by_name(after, "snapshots", FS_SNAPSHOT)
    assert (disk["state"], disk["create_snapshot_id"]) == ("detached", snapshot["id"]), disk
    made = {k: r for k, r in after["regions"].items() if r["disk_id"] == disk["id"]}
    assert len(made) == 2 * REPLICAS
    clones = [r for r in made.values() if r["read_only"]]
    fresh = [r for r in made.values() if not r["read_only"]]
    assert len(clones) == len(fresh) == REPLICAS
    for group in (clones, fresh):
        assert len({r["dataset_id"] for r in group}) == REPLICAS, group
    assert {r["state"] for r in made.values()} == {"created"}
    held = {uuid.UUID(k) for k in made}
    for region_id in held:
        assert after["held:regions"][region_id][1] == "created"
    assert {after["held:regions"][uuid.UUID(r["id"])][2] for r in clones} == {True}
    assert all(r["volume_references"] == 0 for r in parts(after, snapshot["id"]).values())
    assert_changed_only(
        before,
        after,
        {
            "disks": {disk["id"]},
            "regions": set(made),
            "held:regions": held,
            "datasets": {r["dataset_id"] for r in made.values()},
        },
    )


FROM_SNAPSHOT = RealScenario(
    disk_create_from_snapshot.DEFINITION,
    from_snapshot_prepare,
    from_snapshot_start,
    from_snapshot_done,
)


# region_replacement, started by ``nexusctl sled expunge``. Each case adds a crucible agent
# on a sled of its own, with more capacity than any before it, so that the case's disk
# (placed by most free space) has a region there and no other disk does; expunging that
# sled then files exactly one replacement: of this case's region. The agent is counted
# lost before the world is taken (Nexus asks a lost agent nothing, and neither do we).


@dataclass(frozen=True)
class Replacing:
    index: int
    # Attached to a running instance: the sled agent repairs the volume live.
    attached: bool = False
    disk: str = ""
    agent: Crucible | None = None

    @property
    def lost(self) -> Crucible:
        assert self.agent is not None
        return self.agent


async def region_replacement_prepare(rack: Rack, cases: Sequence[str]) -> Mapping[str, Any]:
    return {case: Replacing(index) for index, case in enumerate(cases)}


async def attached_replacement_prepare(rack: Rack, cases: Sequence[str]) -> Mapping[str, Any]:
    return {case: Replacing(index, attached=True) for index, case in enumerate(cases)}


async def region_replacement_setup(rack: Rack, item: Replacing) -> Replacing:
    await rack.stop_lost()
    # More capacity than every agent before it (the rack's list only grows).
    agent = await rack.add_agent(capacity_bytes=(1 << 40) + (len(rack.agents) << 36))
    if item.attached:
        disk = f"rra-{item.index}"
        await disk_with_instance(rack, disk, f"rra-vm-{item.index}")
    else:
        disk = f"rr-{item.index}"
        await rack.ok("disk", "create", disk, "--size", SIZE, "-p", PROJECT, "--wait")
    (disk_id,) = rack.query("SELECT id FROM disks WHERE project = ? AND name = ?", PROJECT, disk)[0]
    on_agent = rack.query(
        "SELECT id FROM regions WHERE disk_id = ? AND dataset_id = ?", disk_id, agent.agent_id.hex
    )
    assert len(on_agent) == 1, f"disk {disk} has no region on the new agent's dataset"
    rack.lost.add(agent.agent_id)
    return replace(item, disk=disk, agent=agent)


def region_replacement_start(item: Replacing) -> Sequence[str]:
    return ["sled", "expunge", str(item.lost.sled_id), "--yes"]


def replacement_saga(document: Any) -> uuid.UUID:
    (saga,) = document["replacement_sagas"]
    return uuid.UUID(saga)


def replacement_of(world: World, disk_id: str) -> dict[str, Any]:
    (request,) = [r for r in world["region_replacement"].values() if r["disk_id"] == disk_id]
    return dict(request)


async def region_replacement_done(rack: Rack, item: Replacing, before: World, after: World) -> None:
    """The request is complete: the lost region's row is destroyed, a new region is
    created on a live sled the disk did not use, held by its agent; the lost dataset is
    expunged, the new one's space reserved. Nothing else changed."""
    disk = by_name(after, "disks", item.disk)
    request = replacement_of(after, disk["id"])
    lost_dataset = item.lost.agent_id.hex
    assert (request["state"], request["old_dataset_id"]) == ("complete", lost_dataset), request
    assert request["repair_mode"] == ("live" if item.attached else "nexus"), request
    old, new = request["old_region_id"], request["new_region_id"]
    assert after["regions"][old]["state"] == "destroyed", after["regions"][old]
    added = after["regions"][new]
    assert (added["state"], added["disk_id"]) == ("created", disk["id"]), added
    used = {r["dataset_id"] for k, r in before["regions"].items() if r["disk_id"] == disk["id"]}
    assert added["dataset_id"] not in used, "the new region is on a sled the disk used"
    assert after["held:regions"][uuid.UUID(new)][:2] == (
        uuid.UUID(added["dataset_id"]),
        "created",
    )
    assert after["datasets"][lost_dataset]["state"] == "expunged"
    assert_changed_only(
        before,
        after,
        {
            "datasets": {lost_dataset, added["dataset_id"]},
            "regions": {old, new},
            "region_replacement": {request["id"]},
            "held:regions": {uuid.UUID(new)},
        },
    )


async def region_replacement_unwound(
    rack: Rack, item: Replacing, before: World, after: World, node: str
) -> None:
    """The request is ``requested`` again, operated by no saga, its failure recorded, to
    be tried again (by the sweeper, after a backoff: ``after_all`` shows it); the new
    region is gone from its agent and its row, its space given back. What the expunge
    did stays: the lost dataset is expunged and its region lost, which the doctor
    accepts while a replacement of it is in flight (a request not complete)."""
    disk = by_name(after, "disks", item.disk)
    request = replacement_of(after, disk["id"])
    lost_dataset = item.lost.agent_id.hex
    assert (request["state"], request["operating_saga_id"]) == ("requested", None), request
    if node == "claim":
        # Failed before it claimed the request: no undo of its runs, and the request is
        # as the expunge filed it (a claim that fails for real finds it someone else's).
        assert request["last_failure"] is None, request
    else:
        assert node in (request["last_failure"] or ""), request
    assert after["datasets"][lost_dataset]["state"] == "expunged"
    assert_changed_only(
        before,
        after,
        {"datasets": {lost_dataset}, "region_replacement": {request["id"]}},
    )
    await rack.healthy()


async def region_replacement_retried(rack: Rack) -> None:
    """Every request left ``requested`` by an unwind is tried again by a replica
    without faults, after its backoff, and completes; then the doctor finds nothing."""
    await rack.nexus_with(())
    deadline = time.monotonic() + 120
    while pending := rack.query(
        "SELECT id, state FROM region_replacement WHERE state != 'complete'"
    ):
        assert time.monotonic() < deadline, f"not complete after 120 s: {pending}"
        await asyncio.sleep(0.5)
    await rack.healthy()
    await rack.stop_lost()


REGION_REPLACEMENT = RealScenario(
    region_replacement.DEFINITION,
    region_replacement_prepare,
    region_replacement_start,
    region_replacement_done,
    region_replacement_unwound,
    setup_case=region_replacement_setup,
    saga_of=replacement_saga,
    failing_flags=("--replacement-retry", "3600"),
    after_all=region_replacement_retried,
)


# The same on a disk attached to a running instance: the plan is a live repair by the
# VMM's sled agent (started, progress, finished by event). Failures only where it differs
# from the detached disk's run: the live repair and the swap after it (every node took
# 94 s here, over the module's budget; the detached scenario fails every node).
ATTACHED_REPLACEMENT = dataclasses.replace(
    REGION_REPLACEMENT,
    prepare=attached_replacement_prepare,
    variant="attached",
    failing_nodes=("repair", "swap"),
)


SCENARIOS: tuple[RealScenario, ...] = (
    SNAPSHOT_CREATE,
    SNAPSHOT_DELETE,
    FROM_SNAPSHOT,
    REGION_REPLACEMENT,
    ATTACHED_REPLACEMENT,
)
