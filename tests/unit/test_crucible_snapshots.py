"""Snapshots, running snapshots and clones in the crucible agent: the pure rules
(``crucible_agent.snapshots``, ``regions.delete``) and the service on its real SQLite
store and real files, with no broker (the outbox is read back from the database)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from crucible_agent import regions, snapshots
from crucible_agent.files import MANIFEST, SNAPSHOT_MANIFEST
from schemas.common import CommandRejected
from schemas.region import Region, RegionDelete, RegionEnsure, RegionRef, RegionState
from schemas.snapshot import (
    RegionSnapshotCreate,
    RegionSnapshotDelete,
    RegionSnapshotGet,
    RegionSnapshotList,
    RegionSnapshotsInfo,
    RegionSnapshotStateChanged,
    RunningSnapshot,
    RunningSnapshotRun,
    RunningSnapshotStateChanged,
    RunningSnapshotStop,
    Snapshot,
    SnapshotRef,
    SnapshotState,
)
from tests.unit.test_crucible_service import (
    SOURCE,
    Agent,
    BuildAgent,
    agents,
    delivery,
    region_spec,
    settle,
)

__all__ = ["agents"]  # a fixture, used by name

NOW = datetime(2026, 1, 1, tzinfo=UTC)
REQUESTED, CREATED, TOMBSTONED, DESTROYED, FAILED = (
    RegionState.REQUESTED,
    RegionState.CREATED,
    RegionState.TOMBSTONED,
    RegionState.DESTROYED,
    RegionState.FAILED,
)


def a_region(state: RegionState = CREATED) -> Region:
    spec = region_spec()
    return Region(**spec.model_dump(), port_number=19000, state=state, generation=2)


def a_snapshot(region: Region, state: SnapshotState = SnapshotState.CREATED) -> Snapshot:
    return Snapshot(region_id=region.id, name="snap-1", created=NOW, state=state, generation=1)


def running(region: Region, state: RegionState) -> RunningSnapshot:
    return RunningSnapshot(
        id=region.id, name="snap-1", port_number=19001, state=state, generation=1
    )


# The rules.


def test_only_a_created_region_is_snapshotted_and_taking_it_again_changes_nothing() -> None:
    region = a_region()
    ref = SnapshotRef(region_id=region.id, name="snap-1")
    taken = snapshots.create(region, None, ref, now=NOW)
    assert isinstance(taken, snapshots.SnapshotChanged)
    assert (taken.snapshot.state, taken.snapshot.generation) == (SnapshotState.CREATED, 1)
    assert snapshots.create(region, taken.snapshot, ref, now=NOW) == snapshots.Unchanged()
    for state in (REQUESTED, TOMBSTONED, DESTROYED, FAILED):
        refused = snapshots.create(a_region(state), None, ref, now=NOW)
        assert isinstance(refused, regions.Refused)
        assert refused.code == snapshots.REGION_NOT_CREATED
    assert isinstance(snapshots.create(None, None, ref, now=NOW), regions.NotFound)
    # Deleted, then a take of the same name: a stale command (a re-send that crossed the
    # delete), refused, so no snapshot is left that no record accounts for.
    gone = a_snapshot(region, SnapshotState.DESTROYED).model_copy(update={"generation": 2})
    again = snapshots.create(region, gone, ref, now=NOW)
    assert isinstance(again, regions.Refused)
    assert again.code == snapshots.SNAPSHOT_DELETED


def test_a_snapshot_is_deleted_only_once_its_running_snapshot_is_destroyed() -> None:
    region = a_region()
    snap = a_snapshot(region)
    for state in (REQUESTED, CREATED, TOMBSTONED, FAILED):
        refused = snapshots.delete(region, snap, running(region, state))
        assert isinstance(refused, regions.Refused)
        assert refused.code == snapshots.SNAPSHOT_IN_USE
    for last in (None, running(region, DESTROYED)):
        deleted = snapshots.delete(region, snap, last)
        assert isinstance(deleted, snapshots.SnapshotChanged)
        assert (deleted.snapshot.state, deleted.snapshot.generation) == (
            SnapshotState.DESTROYED,
            2,
        )
    assert snapshots.delete(region, None, None) == snapshots.Unchanged()
    gone = a_snapshot(region, SnapshotState.DESTROYED)
    assert snapshots.delete(region, gone, None) == snapshots.Unchanged()


def test_running_snapshots_follow_the_region_states() -> None:
    region = a_region()
    snap = a_snapshot(region)
    ref = SnapshotRef(region_id=region.id, name=snap.name)
    started = snapshots.run(region, snap, None, ref, free_port=19001)
    assert isinstance(started, snapshots.RunningChanged)
    assert (started.running.state, started.running.port_number) == (REQUESTED, 19001)
    assert started.running.id == region.id, "named by its region, as the real agent's"
    # Again, whatever its state: answered as it is.
    for state in RegionState:
        assert snapshots.run(region, snap, running(region, state), ref, free_port=None) == (
            snapshots.Unchanged()
        )
    missing = snapshots.run(region, None, None, ref, free_port=19001)
    assert isinstance(missing, regions.NotFound)
    no_port = snapshots.run(region, snap, None, ref, free_port=None)
    assert isinstance(no_port, regions.Refused) and no_port.code == regions.NO_FREE_PORT

    up = snapshots.start_finished(started.running, None)
    assert isinstance(up, snapshots.RunningChanged) and up.running.state is CREATED
    down = snapshots.stop(region, up.running)
    assert isinstance(down, snapshots.RunningChanged) and down.running.state is TOMBSTONED
    assert snapshots.start_finished(down.running, None) == snapshots.Unchanged()
    gone = snapshots.stop_finished(down.running)
    assert isinstance(gone, snapshots.RunningChanged)
    assert (gone.running.state, gone.running.generation) == (DESTROYED, 4)
    assert snapshots.stop(region, gone.running) == snapshots.Unchanged()
    assert snapshots.stop(region, None) == snapshots.Unchanged()
    refused = snapshots.stop(region, running(region, FAILED))
    assert isinstance(refused, regions.Refused)
    assert refused.code == snapshots.RUNNING_SNAPSHOT_FAILED


def test_a_region_with_snapshots_or_being_cloned_is_not_deleted() -> None:
    region = a_region()
    refused = regions.delete(region, snapshots=["snap-1"])
    assert isinstance(refused, regions.Refused)
    assert refused.code == regions.HAS_SNAPSHOTS
    assert refused.message.startswith("must delete snapshots first")
    cloning = regions.delete(a_region(REQUESTED), cloning=True)
    assert isinstance(cloning, regions.Refused) and cloning.code == regions.CLONING
    tombstoned = regions.delete(region)
    assert isinstance(tombstoned, regions.Changed) and tombstoned.region.state is TOMBSTONED


# The service.


async def created_region(agent: Agent) -> uuid.UUID:
    spec = region_spec()
    await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=spec)))
    await settle(agent)
    region = await agent.store.region(spec.id)
    assert region is not None and region.state is CREATED
    return spec.id


async def outbox_of(agent: Agent, kind: type[object]) -> list[object]:
    return [message for message in await agent.outbox() if isinstance(message, kind)]


async def test_a_snapshot_is_a_copy_of_the_extents_that_keeps_their_holes(
    agents: BuildAgent,
) -> None:
    agent = await agents()
    region_id = await created_region(agent)
    extent = agent.files.extent_paths(region_id)[0]
    with extent.open("r+b") as written:
        written.seek(1024)
        written.write(b"data")
    ref = SnapshotRef(region_id=region_id, name="snap-1")
    command = RegionSnapshotCreate(source=SOURCE, payload=ref)
    await agent.service.handle(delivery(command, reply_to="reply.test"))
    await agent.service.handle(delivery(command, reply_to="reply.test"))

    directory = agent.files.snapshot_directory(region_id, "snap-1")
    assert sorted(path.name for path in directory.iterdir()) == [
        "00000.extent",
        "00001.extent",
        "00002.extent",
        MANIFEST,
        SNAPSHOT_MANIFEST,
    ]
    copy = directory / "00000.extent"
    assert copy.read_bytes() == extent.read_bytes()
    assert copy.stat().st_size == 8 * 512
    # Writing to the region afterwards leaves the snapshot as it was.
    with extent.open("r+b") as written:
        written.write(b"later")
    assert copy.read_bytes()[:5] == bytes(5)
    events = await outbox_of(agent, RegionSnapshotStateChanged)
    assert len(events) == 1, "taken twice, changed once"
    infos = await outbox_of(agent, RegionSnapshotsInfo)
    assert len(infos) == 2
    for info in infos:
        assert isinstance(info, RegionSnapshotsInfo)
        assert [s.name for s in info.payload.snapshots] == ["snap-1"]


async def test_snapshot_list_get_and_delete_and_the_region_delete_they_refuse(
    agents: BuildAgent,
) -> None:
    agent = await agents()
    region_id = await created_region(agent)
    for name in ("a", "b"):
        ref = SnapshotRef(region_id=region_id, name=name)
        await agent.service.handle(delivery(RegionSnapshotCreate(source=SOURCE, payload=ref)))

    refused = RegionDelete(source=SOURCE, payload=RegionRef(id=region_id))
    await agent.service.handle(delivery(refused))
    (rejection,) = await outbox_of(agent, CommandRejected)
    assert isinstance(rejection, CommandRejected)
    assert rejection.payload.code == "has_snapshots"
    assert (
        rejection.payload.message == f"must delete snapshots first: region {region_id} has 2 (a, b)"
    )
    region = await agent.store.region(region_id)
    assert region is not None and (region.state, region.generation) == (CREATED, 2)

    await agent.service.handle(
        delivery(RegionSnapshotList(source=SOURCE, payload=RegionRef(id=region_id)), reply_to="r")
    )
    await agent.service.handle(
        delivery(
            RegionSnapshotGet(source=SOURCE, payload=SnapshotRef(region_id=region_id, name="b")),
            reply_to="r",
        )
    )
    listed, got = agent.replier.replies
    assert isinstance(listed, RegionSnapshotsInfo) and isinstance(got, RegionSnapshotsInfo)
    assert [s.name for s in listed.payload.snapshots] == ["a", "b"]
    assert [s.name for s in got.payload.snapshots] == ["b"]
    assert listed.payload.region_state is CREATED

    for name in ("a", "b", "b"):
        ref = SnapshotRef(region_id=region_id, name=name)
        await agent.service.handle(delivery(RegionSnapshotDelete(source=SOURCE, payload=ref)))
    assert agent.files.snapshot_names(region_id) == []
    states = [
        (e.payload.snapshot.name, e.payload.snapshot.state, e.payload.snapshot.generation)
        for e in await outbox_of(agent, RegionSnapshotStateChanged)
        if isinstance(e, RegionSnapshotStateChanged)
    ]
    assert states == [
        ("a", SnapshotState.CREATED, 1),
        ("b", SnapshotState.CREATED, 1),
        ("a", SnapshotState.DESTROYED, 2),
        ("b", SnapshotState.DESTROYED, 2),
    ]
    await agent.service.handle(
        delivery(RegionDelete(source=SOURCE, payload=RegionRef(id=region_id)))
    )
    await settle(agent)
    region = await agent.store.region(region_id)
    assert region is not None and region.state is DESTROYED
    assert not agent.files.directory(region_id).exists()


async def test_a_running_snapshot_gets_a_port_of_its_own_and_is_stopped_by_the_worker(
    agents: BuildAgent,
) -> None:
    agent = await agents()
    region_id = await created_region(agent)
    ref = SnapshotRef(region_id=region_id, name="snap-1")
    await agent.service.handle(delivery(RegionSnapshotCreate(source=SOURCE, payload=ref)))
    run = RunningSnapshotRun(source=SOURCE, payload=ref)
    await agent.service.handle(delivery(run))
    await agent.service.handle(delivery(run))
    await settle(agent)
    up = await running_now(agent, ref)
    assert (up.state, up.port_number, up.generation) == (CREATED, 19001, 2)
    assert agent.files.service(up).exists()

    # The snapshot cannot go while its downstairs runs; a new region skips its port.
    await agent.service.handle(delivery(RegionSnapshotDelete(source=SOURCE, payload=ref)))
    rejections = await outbox_of(agent, CommandRejected)
    assert [r.payload.code for r in rejections if isinstance(r, CommandRejected)] == [
        "snapshot_in_use"
    ]
    other = region_spec()
    await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=other)))
    placed = await agent.store.region(other.id)
    assert placed is not None and placed.port_number == 19002

    stop = RunningSnapshotStop(source=SOURCE, payload=ref)
    await agent.service.handle(delivery(stop))
    await agent.service.handle(delivery(stop))
    await settle(agent)
    down = await running_now(agent, ref)
    assert (down.state, down.generation) == (DESTROYED, 4)
    assert not agent.files.service(up).exists()
    changes = [
        (e.payload.running_snapshot.state, e.payload.running_snapshot.generation)
        for e in await outbox_of(agent, RunningSnapshotStateChanged)
        if isinstance(e, RunningSnapshotStateChanged)
    ]
    assert changes == [(REQUESTED, 1), (CREATED, 2), (TOMBSTONED, 3), (DESTROYED, 4)]
    await agent.service.handle(delivery(RegionSnapshotDelete(source=SOURCE, payload=ref)))
    assert agent.files.snapshot_names(region_id) == []


async def running_now(agent: Agent, ref: SnapshotRef) -> RunningSnapshot:
    async with agent.store.transaction() as tx:
        found = await tx.running_snapshot(ref.region_id, ref.name)
    assert found is not None
    return found


async def test_a_clone_is_read_only_and_its_manifest_names_its_source(
    agents: BuildAgent,
) -> None:
    agent = await agents()
    clone = region_spec().model_copy(update={"source": "127.0.0.1:19001"})
    await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=clone)))
    await settle(agent)
    region = await agent.store.region(clone.id)
    assert region is not None
    assert (region.state, region.read_only) == (CREATED, True)
    manifest = (agent.files.directory(clone.id) / MANIFEST).read_text()
    assert '"source": "127.0.0.1:19001"' in manifest
    assert '"read_only": true' in manifest
