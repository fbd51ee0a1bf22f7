"""A scenario for every saga in ``nexus.sagas.ALL_SAGAS``, for the triad (tests/saga_triad.py).

One section per saga, in the order of ALL_SAGAS: what it acts on (built through the
sagas that build it in production), its end state, and, for a saga whose failure leaves
something visible, what a clean slate is.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select, update

from nexus.db.models import Dataset, Disk, Region, RegionReplacement, RegionSnapshot
from nexus.db.states import (
    AgentSnapshotState,
    DatasetState,
    DiskState,
    InstanceState,
    RegionState,
    ReplacementState,
    SnapshotState,
    VmmState,
)
from nexus.replacements import file_request
from nexus.sagas import (
    disk_create,
    disk_create_from_snapshot,
    disk_delete,
    instance_create,
    instance_delete,
    instance_power,
    instance_start,
    region_replacement,
    snapshot_create,
    snapshot_delete,
)
from schemas.instance import VmmDiskSnapshot
from schemas.region import reservation_bytes
from tests.saga_support import add_sleds
from tests.saga_triad import Scenario, Snapshot, World, as_before, assert_same

DISK_BYTES = 3 << 30
BLOCK_SIZE = 512


_EXTENT_SIZE, _EXTENT_COUNT = disk_create.region_geometry(DISK_BYTES, BLOCK_SIZE)
REGION_BYTES = _EXTENT_SIZE * _EXTENT_COUNT * BLOCK_SIZE


# disk_create


def disk_params() -> disk_create.Params:
    disk_id = uuid.uuid4()
    return disk_create.Params(
        disk_id=disk_id,
        project="triad",
        name=f"disk-{disk_id.hex[:8]}",
        size_bytes=DISK_BYTES,
        block_size=BLOCK_SIZE,
    )


async def disk_create_prepare(world: World) -> disk_create.Params:
    await world.database.add_datasets(4)
    return disk_params()


async def disk_create_done(world: World, p: disk_create.Params, before: Snapshot) -> None:
    """The disk is ready; three regions, created on three datasets, hold their space."""
    after = await world.snapshot()
    assert after.row("disks", p.disk_id)["state"] == DiskState.DETACHED
    regions = [r for r in after.rows["regions"].values() if r["disk_id"] == p.disk_id]
    assert [r["state"] for r in regions] == [RegionState.CREATED] * disk_create.REPLICAS
    assert {after.held["regions"][r["id"]] for r in regions} == {"created"}
    used = {
        dataset_id: before.row("datasets", dataset_id)["free_bytes"] - dataset["free_bytes"]
        for dataset_id, dataset in after.rows["datasets"].items()
    }
    # Each takes what its agent reserves for it (1.25 times its size).
    reserved = reservation_bytes(REGION_BYTES)
    assert [used[r["dataset_id"]] for r in regions] == [reserved] * disk_create.REPLICAS
    assert sum(used.values()) == reserved * disk_create.REPLICAS


DISK_CREATE = Scenario(disk_create.DEFINITION, disk_create_prepare, disk_create_done)


# disk_create_from_snapshot


async def ready_snapshot(world: World) -> uuid.UUID:
    """A ready snapshot of a new disk, made by ``snapshot_create``."""
    return await new_snapshot(world, await new_disk(world))


async def snapshot_references(world: World, snapshot_id: uuid.UUID) -> list[int]:
    async with world.database.sessions() as session:
        return list(
            (
                await session.execute(
                    select(RegionSnapshot.volume_references).where(
                        RegionSnapshot.snapshot_id == snapshot_id
                    )
                )
            ).scalars()
        )


async def from_snapshot_prepare(world: World) -> disk_create_from_snapshot.Params:
    await world.database.add_datasets(4)
    snapshot_id = await ready_snapshot(world)
    disk_id = uuid.uuid4()
    return disk_create_from_snapshot.Params(
        disk_id=disk_id,
        project="triad",
        name=f"disk-{disk_id.hex[:8]}",
        size_bytes=DISK_BYTES,
        block_size=BLOCK_SIZE,
        snapshot_id=snapshot_id,
    )


async def from_snapshot_done(
    world: World, p: disk_create_from_snapshot.Params, before: Snapshot
) -> None:
    """Ready, with three fresh regions and three read-only clones, one of each running
    snapshot, each group on three sleds; every region created at its agent and holding
    its space; the snapshot's references given back."""
    after = await world.snapshot()
    assert after.row("disks", p.disk_id)["state"] == DiskState.DETACHED
    assert after.row("disks", p.disk_id)["create_snapshot_id"] == p.snapshot_id
    regions = [r for r in after.rows["regions"].values() if r["disk_id"] == p.disk_id]
    assert [r["state"] for r in regions] == [RegionState.CREATED] * 6
    assert {after.held["regions"][r["id"]] for r in regions} == {"created"}
    sled_of = {d["id"]: d["sled_id"] for d in after.rows["datasets"].values()}
    async with world.database.sessions() as session:
        addresses = set(
            (
                await session.execute(
                    select(RegionSnapshot.snapshot_addr).where(
                        RegionSnapshot.snapshot_id == p.snapshot_id
                    )
                )
            ).scalars()
        )
    for read_only in (False, True):
        group = [r for r in regions if r["read_only"] is read_only]
        assert len({sled_of[r["dataset_id"]] for r in group}) == 3
        assert {r["source"] for r in group} == (addresses if read_only else {None})
        for region in group:
            ensure, _ = world.agents.regions[region["id"]]
            assert ensure.payload.source == region["source"]
    used = sum(
        before.row("datasets", dataset_id)["free_bytes"] - dataset["free_bytes"]
        for dataset_id, dataset in after.rows["datasets"].items()
    )
    assert used == reservation_bytes(REGION_BYTES) * 6
    assert await snapshot_references(world, p.snapshot_id) == [0, 0, 0]


async def from_snapshot_unwound(
    world: World, p: disk_create_from_snapshot.Params, before: Snapshot, failed_node: str
) -> None:
    """As before, the snapshot's references too."""
    await as_before(world, p, before, failed_node)
    assert await snapshot_references(world, p.snapshot_id) == [0, 0, 0]


DISK_CREATE_FROM_SNAPSHOT = Scenario(
    disk_create_from_snapshot.DEFINITION,
    from_snapshot_prepare,
    from_snapshot_done,
    from_snapshot_unwound,
)


# disk_delete


async def new_disk(world: World) -> uuid.UUID:
    p = disk_params()
    await world.run_to_done(disk_create.DEFINITION, p)
    return p.disk_id


async def disk_delete_prepare(world: World) -> disk_delete.Params:
    await world.database.add_datasets(3)
    return disk_delete.Params(disk_id=await new_disk(world))


async def disk_delete_done(world: World, p: disk_delete.Params, before: Snapshot) -> None:
    """The disk is deleted, its regions destroyed, and every dataset has its space back."""
    after = await world.snapshot()
    assert after.row("disks", p.disk_id)["state"] == DiskState.DELETED
    regions = [r for r in after.rows["regions"].values() if r["disk_id"] == p.disk_id]
    assert {r["state"] for r in regions} == {RegionState.DESTROYED}
    assert not after.held["regions"]
    assert all(d["free_bytes"] == d["capacity_bytes"] for d in after.rows["datasets"].values())


async def disk_delete_unwound(
    world: World, p: disk_delete.Params, before: Snapshot, failed_node: str
) -> None:
    """A deleted region cannot come back: once the disk is marked deleting, a failure
    leaves it faulted, for an operator to delete again, and that delete finishes the job."""
    if failed_node == "disk_mark_deleting":
        await as_before(world, p, before, failed_node)
        return
    assert (await world.snapshot()).row("disks", p.disk_id)["state"] == DiskState.FAULTED
    await world.run_to_done(disk_delete.DEFINITION, p)
    await disk_delete_done(world, p, before)


DISK_DELETE = Scenario(
    disk_delete.DEFINITION, disk_delete_prepare, disk_delete_done, disk_delete_unwound
)


# instance_create


def instance_params(disk_ids: list[uuid.UUID]) -> instance_create.Params:
    instance_id = uuid.uuid4()
    return instance_create.Params(
        instance_id=instance_id,
        project="triad",
        name=f"vm-{instance_id.hex[:8]}",
        ncpus=4,
        memory_bytes=8 << 30,
        disk_ids=disk_ids,
    )


async def instance_create_prepare(world: World) -> instance_create.Params:
    await world.database.add_datasets(3)
    await add_sleds(world.database, 2)
    return instance_params([await new_disk(world)])


async def instance_create_done(world: World, p: instance_create.Params, before: Snapshot) -> None:
    """The instance runs as a VMM on a sled, with its disk attached."""
    after = await world.snapshot()
    instance = after.row("instances", p.instance_id)
    assert instance["state"] == InstanceState.RUNNING
    vmm = after.row("vmms", instance["active_vmm_id"])
    assert (vmm["state"], vmm["instance_id"]) == (VmmState.RUNNING, p.instance_id)
    assert vmm["sled_id"] in after.rows["sleds"]
    (disk_id,) = p.disk_ids
    disk = after.row("disks", disk_id)
    assert (disk["state"], disk["attached_instance_id"]) == (DiskState.ATTACHED, p.instance_id)
    spec, state = world.agents.vmms[vmm["id"]]
    assert (state.value, spec.instance_id, spec.disk_ids) == ("running", p.instance_id, (disk_id,))


INSTANCE_CREATE = Scenario(
    instance_create.DEFINITION, instance_create_prepare, instance_create_done
)


# instance_start, instance_stop, instance_reboot


async def running_instance(world: World) -> uuid.UUID:
    await world.database.add_datasets(3)
    await add_sleds(world.database, 2)
    p = instance_params([await new_disk(world)])
    await world.run_to_done(instance_create.DEFINITION, p)
    return p.instance_id


async def stopped_instance(world: World) -> uuid.UUID:
    instance_id = await running_instance(world)
    await world.run_to_done(instance_power.STOP, instance_power.Params(instance_id=instance_id))
    return instance_id


async def start_prepare(world: World) -> instance_start.Params:
    return instance_start.Params(instance_id=await stopped_instance(world))


async def power_prepare_running(world: World) -> instance_power.Params:
    return instance_power.Params(instance_id=await running_instance(world))


def but_its_runs(snapshot: Snapshot, instance_id: uuid.UUID) -> Snapshot:
    """Everything but where the instance is in its life and its VMMs, at Nexus and on
    the sleds."""
    rows = snapshot.without("instances", instance_id, "state", "generation", "active_vmm_id").rows
    vmms = {i: v for i, v in rows["vmms"].items() if v["instance_id"] != instance_id}
    held = {i: s for i, s in snapshot.held["vmms"].items() if i not in snapshot.rows["vmms"]}
    return Snapshot({**rows, "vmms": vmms}, {**snapshot.held, "vmms": held})


async def start_done(world: World, p: instance_start.Params, before: Snapshot) -> None:
    """A new VMM runs the instance; the one before it stays destroyed."""
    after = await world.snapshot()
    instance = after.row("instances", p.instance_id)
    assert instance["state"] == InstanceState.RUNNING
    vmm_id = instance["active_vmm_id"]
    assert vmm_id not in before.rows["vmms"]
    assert after.row("vmms", vmm_id)["state"] == VmmState.RUNNING
    assert after.held["vmms"][vmm_id] == "running"
    assert {v["state"] for i, v in after.rows["vmms"].items() if i != vmm_id} == {
        VmmState.DESTROYED
    }
    assert_same(but_its_runs(before, p.instance_id), but_its_runs(after, p.instance_id))


async def start_unwound(
    world: World, p: instance_start.Params, before: Snapshot, failed_node: str
) -> None:
    """The instance is stopped with no VMM again, and the VMM the start made has ended,
    at Nexus and on its sled (the sled's room is free)."""
    after = await world.snapshot()
    instance = after.row("instances", p.instance_id)
    assert (instance["state"], instance["active_vmm_id"]) == (InstanceState.STOPPED, None)
    for vmm_id in after.rows["vmms"].keys() - before.rows["vmms"].keys():
        assert after.row("vmms", vmm_id)["state"] == VmmState.SAGA_UNWOUND
        assert vmm_id not in after.held["vmms"]
    assert_same(but_its_runs(before, p.instance_id), but_its_runs(after, p.instance_id))


INSTANCE_START = Scenario(instance_start.DEFINITION, start_prepare, start_done, start_unwound)


async def stop_done(world: World, p: instance_power.Params, before: Snapshot) -> None:
    """The VMM is destroyed, its sled's room free, and the instance stopped with no VMM."""
    after = await world.snapshot()
    instance = after.row("instances", p.instance_id)
    assert (instance["state"], instance["active_vmm_id"]) == (InstanceState.STOPPED, None)
    vmm_id = before.row("instances", p.instance_id)["active_vmm_id"]
    assert after.row("vmms", vmm_id)["state"] == VmmState.DESTROYED
    assert vmm_id not in after.held["vmms"]
    assert_same(but_its_runs(before, p.instance_id), but_its_runs(after, p.instance_id))


async def reboot_done(world: World, p: instance_power.Params, before: Snapshot) -> None:
    """The same VMM runs again, at a newer generation."""
    after = await world.snapshot()
    vmm_id = before.row("instances", p.instance_id)["active_vmm_id"]
    instance = after.row("instances", p.instance_id)
    assert (instance["state"], instance["active_vmm_id"]) == (InstanceState.RUNNING, vmm_id)
    vmm = after.row("vmms", vmm_id)
    assert vmm["state"] == VmmState.RUNNING
    assert vmm["generation"] > before.row("vmms", vmm_id)["generation"]
    assert_same(but_its_runs(before, p.instance_id), but_its_runs(after, p.instance_id))


async def power_unwound(
    world: World, p: instance_power.Params, before: Snapshot, failed_node: str
) -> None:
    """Nothing to undo: the VMM is wherever its sled put it, and Nexus's record says so."""
    after = await world.snapshot()
    vmm_id = before.row("instances", p.instance_id)["active_vmm_id"]
    held = after.held["vmms"].get(vmm_id, "destroyed")
    assert after.row("vmms", vmm_id)["state"] == held
    assert_same(but_its_runs(before, p.instance_id), but_its_runs(after, p.instance_id))


INSTANCE_STOP = Scenario(instance_power.STOP, power_prepare_running, stop_done, power_unwound)
INSTANCE_REBOOT = Scenario(instance_power.REBOOT, power_prepare_running, reboot_done, power_unwound)


# instance_delete


async def instance_delete_prepare(world: World) -> instance_delete.Params:
    return instance_delete.Params(instance_id=await stopped_instance(world))


async def instance_delete_done(world: World, p: instance_delete.Params, before: Snapshot) -> None:
    """The instance is deleted and its disk is detached; no sled was asked anything."""
    after = await world.snapshot()
    assert after.row("instances", p.instance_id)["state"] == InstanceState.DELETED
    disks = before.rows["disks"].values()
    (disk_id,) = [d["id"] for d in disks if d["attached_instance_id"] == p.instance_id]
    disk = after.row("disks", disk_id)
    assert (disk["state"], disk["attached_instance_id"]) == (DiskState.DETACHED, None)
    assert after.held == before.held


async def instance_delete_unwound(
    world: World, p: instance_delete.Params, before: Snapshot, failed_node: str
) -> None:
    """The instance is as it was (its record's generation aside)."""
    assert_same(
        before.without("instances", p.instance_id, "generation"),
        (await world.snapshot()).without("instances", p.instance_id, "generation"),
    )


INSTANCE_DELETE = Scenario(
    instance_delete.DEFINITION,
    instance_delete_prepare,
    instance_delete_done,
    instance_delete_unwound,
)


# snapshot_create: of a disk attached to a running instance, so that its VMM flushes it


def snapshot_params(disk_id: uuid.UUID) -> snapshot_create.Params:
    snapshot_id = uuid.uuid4()
    return snapshot_create.Params(
        snapshot_id=snapshot_id,
        project="triad",
        name=f"snap-{snapshot_id.hex[:8]}",
        disk_id=disk_id,
    )


async def snapshot_create_prepare(world: World) -> snapshot_create.Params:
    await world.database.add_datasets(3)
    await add_sleds(world.database, 2)
    p = instance_params([await new_disk(world)])
    await world.run_to_done(instance_create.DEFINITION, p)
    return snapshot_params(p.disk_ids[0])


def parts_of(snapshot: Snapshot, snapshot_id: uuid.UUID) -> list[Any]:
    return [
        r for r in snapshot.rows["region_snapshots"].values() if r["snapshot_id"] == snapshot_id
    ]


async def snapshot_create_done(world: World, p: snapshot_create.Params, before: Snapshot) -> None:
    """The snapshot is ready: the VMM flushed the disk first, and each of its three regions
    has a snapshot served by a running snapshot whose address is recorded."""
    after = await world.snapshot()
    snapshot = after.row("snapshots", p.snapshot_id)
    assert (snapshot["state"], snapshot["disk_id"]) == (SnapshotState.READY, p.disk_id)
    parts = parts_of(after, p.snapshot_id)
    regions = {r["id"] for r in after.rows["regions"].values() if r["disk_id"] == p.disk_id}
    assert {part["region_id"] for part in parts} == regions
    assert len(parts) == disk_create.REPLICAS
    for part in parts:
        assert (part["snapshot_state"], part["running_state"]) == (
            AgentSnapshotState.CREATED,
            RegionState.CREATED,
        )
        assert part["snapshot_addr"] == f"sled-of-{part['dataset_id']}:{part['port_number']}" or (
            part["snapshot_addr"].endswith(f":{part['port_number']}")
        )
    name = str(p.snapshot_id)
    assert set(after.held["snapshots"]) == {(r, name) for r in regions}
    assert set(after.held["running_snapshots"]) == {(r, name) for r in regions}
    flushes = [m for m in await world.database.outbox() if isinstance(m, VmmDiskSnapshot)]
    assert [(f.payload.disk_id, f.payload.snapshot_id) for f in flushes] == [
        (p.disk_id, p.snapshot_id)
    ]


SNAPSHOT_CREATE = Scenario(
    snapshot_create.DEFINITION, snapshot_create_prepare, snapshot_create_done
)


# snapshot_delete


async def new_snapshot(world: World, disk_id: uuid.UUID) -> uuid.UUID:
    p = snapshot_params(disk_id)
    await world.run_to_done(snapshot_create.DEFINITION, p)
    return p.snapshot_id


async def snapshot_delete_prepare(world: World) -> snapshot_delete.Params:
    await world.database.add_datasets(3)
    return snapshot_delete.Params(snapshot_id=await new_snapshot(world, await new_disk(world)))


async def snapshot_delete_done(world: World, p: snapshot_delete.Params, before: Snapshot) -> None:
    """The snapshot is destroyed, its parts' rows gone, and no agent holds anything of it."""
    after = await world.snapshot()
    assert after.row("snapshots", p.snapshot_id)["state"] == SnapshotState.DESTROYED
    assert parts_of(after, p.snapshot_id) == []
    assert after.held["snapshots"] == {}
    assert after.held["running_snapshots"] == {}


async def snapshot_delete_unwound(
    world: World, p: snapshot_delete.Params, before: Snapshot, failed_node: str
) -> None:
    """Nothing torn down yet: the snapshot is ready as before. Once a running snapshot is
    stopped it cannot be read: faulted, and deleting it again finishes the job."""
    if failed_node in ("snapshot_mark_deleting", "running_stop"):
        await as_before(world, p, before, failed_node)
        return
    assert (await world.snapshot()).row("snapshots", p.snapshot_id)["state"] == (
        SnapshotState.FAULTED
    )
    await world.run_to_done(snapshot_delete.DEFINITION, p)
    await snapshot_delete_done(world, p, before)


SNAPSHOT_DELETE = Scenario(
    snapshot_delete.DEFINITION,
    snapshot_delete_prepare,
    snapshot_delete_done,
    snapshot_delete_unwound,
)


# region_replacement


async def lose_a_region(world: World, disk_id: uuid.UUID) -> region_replacement.Params:
    """Expunge the dataset of one of the disk's regions and file its replacement (the
    saga is the one under test), as ``nexus.replacements`` does on an expunge."""
    async with world.database.sessions.begin() as session:
        region = (
            await session.execute(
                select(Region).where(Region.disk_id == disk_id).order_by(Region.id).limit(1)
            )
        ).scalar_one()
        await session.execute(
            update(Dataset)
            .where(Dataset.id == region.dataset_id)
            .values(state=DatasetState.EXPUNGED)
        )
        request_id = await file_request(session, region, world.clock.now())
    assert request_id is not None
    return region_replacement.Params(
        request_id=request_id, disk_id=disk_id, old_region_id=region.id
    )


async def replacement_prepare_attached(world: World) -> region_replacement.Params:
    """A disk attached to a running instance (live repair), with a fourth dataset free."""
    instance_id = await running_instance(world)
    await world.database.add_datasets(1)
    async with world.database.sessions() as session:
        disk_id = await session.scalar(
            select(Disk.id).where(Disk.attached_instance_id == instance_id)
        )
    assert disk_id is not None
    return await lose_a_region(world, disk_id)


async def replacement_prepare_detached(world: World) -> region_replacement.Params:
    await world.database.add_datasets(4)
    return await lose_a_region(world, await new_disk(world))


async def replacement_done(world: World, p: region_replacement.Params, before: Snapshot) -> None:
    """Complete: the new region is created on a live dataset of a sled the disk did not
    use, the disk's three live regions are on three sleds, none on the lost dataset, and
    the old region is gone."""
    after = await world.snapshot()
    request = await replacement_request(world, p.request_id)
    assert (request.state, request.operating_saga_id) == (ReplacementState.COMPLETE, None)
    assert request.new_region_id is not None
    assert [h[0] for h in request.history][-1] == "complete"
    live = [
        r
        for r in after.rows["regions"].values()
        if r["disk_id"] == p.disk_id and r["state"] != RegionState.DESTROYED
    ]
    assert {r["state"] for r in live} == {RegionState.CREATED}
    sleds = {after.row("datasets", r["dataset_id"])["sled_id"] for r in live}
    assert len(live) == len(sleds) == disk_create.REPLICAS
    assert all(after.row("datasets", r["dataset_id"])["state"] == DatasetState.ACTIVE for r in live)
    assert after.row("regions", p.old_region_id)["state"] == RegionState.DESTROYED
    assert after.held["regions"][request.new_region_id] == "created"
    new = after.row("regions", request.new_region_id)
    used = (
        before.row("datasets", new["dataset_id"])["free_bytes"]
        - after.row("datasets", new["dataset_id"])["free_bytes"]
    )
    assert used == reservation_bytes(REGION_BYTES)


async def replacement_unwound(
    world: World, p: region_replacement.Params, before: Snapshot, failed_node: str
) -> None:
    """A clean slate: the request is requested again with no saga and no new region;
    the new region is deleted at its agent, and every row is as it was."""
    await as_before(world, p, before, failed_node)
    request = await replacement_request(world, p.request_id)
    assert (request.state, request.operating_saga_id, request.new_region_id) == (
        ReplacementState.REQUESTED,
        None,
        None,
    )
    if failed_node != "claim":
        assert request.last_failure is not None and failed_node in request.last_failure


async def replacement_request(world: World, request_id: uuid.UUID) -> RegionReplacement:
    async with world.database.sessions() as session:
        request = await session.get(RegionReplacement, request_id)
    assert request is not None
    return request


REGION_REPLACEMENT = Scenario(
    region_replacement.DEFINITION,
    replacement_prepare_attached,
    replacement_done,
    replacement_unwound,
)
# The same saga on a detached disk: Nexus's own repair step.
REGION_REPLACEMENT_DETACHED = Scenario(
    region_replacement.DEFINITION,
    replacement_prepare_detached,
    replacement_done,
    replacement_unwound,
)


SCENARIOS: tuple[Scenario[Any], ...] = (
    DISK_CREATE,
    DISK_CREATE_FROM_SNAPSHOT,
    DISK_DELETE,
    INSTANCE_CREATE,
    INSTANCE_START,
    INSTANCE_STOP,
    INSTANCE_REBOOT,
    INSTANCE_DELETE,
    SNAPSHOT_CREATE,
    SNAPSHOT_DELETE,
    REGION_REPLACEMENT,
)
