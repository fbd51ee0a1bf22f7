"""disk_create_from_snapshot beyond the triad every saga gets (tests/unit/test_saga_triad.py),
on SQLite and PostgreSQL with agents played by the test: a snapshot that cannot be a
source is refused before anything is created; the snapshot is held (referenced) while
its clones copy, and one being deleted meanwhile fails the placement; an unwind waits
for a clone still copying (its delete refused) and deletes it once copied; disk_delete
deletes all six regions.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import replace

from sqlalchemy import func, select, update
from typer.testing import CliRunner

from nexus.cli.main import app
from nexus.db.models import Disk, Region, RegionSnapshot
from nexus.db.models import Snapshot as SnapshotRow
from nexus.db.states import DiskState, SagaLogEvent, SagaState, SnapshotState
from nexus.db.states import RegionState as RowRegionState
from nexus.doctor import DiskRecord, RegionRecord
from nexus.saga.definition import Ctx
from nexus.sagas import disk_create_from_snapshot, disk_delete, snapshot_delete
from schemas.region import CLONING_REFUSAL, RegionEnsure, RegionState
from schemas.region import RegionState as WireRegionState
from tests.saga_scenarios import from_snapshot_prepare, snapshot_references
from tests.saga_support import Agents, Database, FakeCrucible, Replica
from tests.saga_triad import World, assert_saga
from tests.unit.test_doctor import BLOCK, COUNT, EXTENT
from tests.unit.test_doctor import Rack as DoctorRack
from tests.unit.test_doctor import wire as doctor_wire

DEFINITION = disk_create_from_snapshot.DEFINITION


async def prepared(database: Database) -> tuple[World, disk_create_from_snapshot.Params]:
    world = World.for_saga(database, DEFINITION)
    return world, await from_snapshot_prepare(world)


async def regions_of(database: Database, disk_id: uuid.UUID) -> int:
    async with database.sessions() as session:
        found = await session.scalar(
            select(func.count()).select_from(Region).where(Region.disk_id == disk_id)
        )
        return int(found or 0)


async def set_snapshot_state(
    database: Database, snapshot_id: uuid.UUID, state: SnapshotState
) -> None:
    async with database.sessions.begin() as session:
        await session.execute(
            update(SnapshotRow).where(SnapshotRow.id == snapshot_id).values(state=state)
        )


async def test_a_snapshot_not_ready_is_refused_before_anything_is_created(
    database: Database,
) -> None:
    world, p = await prepared(database)
    await set_snapshot_state(database, p.snapshot_id, SnapshotState.CREATING)
    before = await world.snapshot()

    saga_id = await world.run(DEFINITION, p)

    saga = await assert_saga(database, saga_id, SagaState.UNDONE)
    assert "is creating; only a ready snapshot can be a disk's source" in (saga.error or "")
    failed = [e.node_name for e in await database.log(saga_id) if e.event == SagaLogEvent.FAILED]
    assert failed == ["source_get"]
    assert (await world.snapshot()).rows == before.rows


async def test_an_unknown_snapshot_is_refused(database: Database) -> None:
    world, p = await prepared(database)
    saga_id = await world.run(DEFINITION, p.model_copy(update={"snapshot_id": uuid.uuid4()}))
    saga = await assert_saga(database, saga_id, SagaState.UNDONE)
    assert "no snapshot" in (saga.error or "")


async def test_a_snapshot_deleted_before_placement_fails_it_and_takes_no_reference(
    database: Database,
) -> None:
    # The snapshot is looked at (source_get), then its delete begins before placement.
    async def then_deleted(
        ctx: Ctx[disk_create_from_snapshot.Params],
    ) -> disk_create_from_snapshot.Source:
        found = await disk_create_from_snapshot.source_get(ctx)
        # As a snapshot_delete committing in between would leave it.
        await ctx.session.execute(
            update(SnapshotRow)
            .where(SnapshotRow.id == ctx.params.snapshot_id)
            .values(state=SnapshotState.DELETING)
        )
        return found

    stages = tuple(
        tuple(replace(n, action=then_deleted) if n.name == "source_get" else n for n in stage)
        for stage in DEFINITION.stages
    )
    racing = replace(DEFINITION, stages=stages)
    world = World.for_saga(database, racing)
    p = await from_snapshot_prepare(world)

    saga_id = await world.run(racing, p)

    saga = await assert_saga(database, saga_id, SagaState.UNDONE)
    assert "no longer ready" in (saga.error or "")
    assert await snapshot_references(world, p.snapshot_id) == [0, 0, 0]
    assert await regions_of(database, p.disk_id) == 0


async def test_the_snapshot_is_referenced_while_its_clones_copy(database: Database) -> None:
    world, p = await prepared(database)
    replica = Replica(database, "a", clock=world.clock, definitions=world.definitions)
    crucible = FakeCrucible.new(database)
    saga_id = await replica.executor.start(DEFINITION, p)
    assert await snapshot_references(world, p.snapshot_id) == [1, 1, 1]

    ensures = [e for e in await crucible.ensures() if await owned(database, e, p.disk_id)]
    assert len(ensures) == 6
    for event in await crucible.created_events(ensures):
        await replica.deliver(event)

    await assert_saga(database, saga_id, SagaState.DONE)
    assert await snapshot_references(world, p.snapshot_id) == [0, 0, 0]


async def owned(database: Database, ensure: RegionEnsure, disk_id: uuid.UUID) -> bool:
    async with database.sessions() as session:
        region = await session.get(Region, ensure.payload.id)
        return region is not None and region.disk_id == disk_id


async def test_an_unwind_waits_for_a_clone_still_copying_then_deletes_it(
    database: Database,
) -> None:
    world, p = await prepared(database)
    replica = Replica(database, "a", clock=world.clock, definitions=world.definitions)
    crucible = FakeCrucible.new(database)
    saga_id = await replica.executor.start(DEFINITION, p)
    ensures = [e for e in await crucible.ensures() if await owned(database, e, p.disk_id)]
    fresh = [e for e in ensures if e.payload.source is None]
    clones = [e for e in ensures if e.payload.source is not None]
    assert len(fresh) == len(clones) == 3

    # The fresh regions are created, then one fails: the saga unwinds while every clone
    # is still copying, and each clone's agent refuses its delete.
    for event in await crucible.created_events(fresh[1:]):
        await replica.deliver(event)
    await replica.deliver(crucible.event(fresh[0], RegionState.FAILED))
    first = {d.payload.id: d for d in await crucible.deletes()}
    assert set(first) == {e.payload.id for e in ensures}
    queue_of = {m.id: q for q, m in await database.sent()}
    for clone in clones:
        delete = first[clone.payload.id]
        await replica.deliver(Agents._rejected(queue_of[delete.id], delete, CLONING_REFUSAL))
    for ensure in fresh:
        await replica.deliver(crucible.deleted(ensure))
    assert (await database.saga(saga_id)).state == SagaState.WAITING
    assert len(await crucible.deletes()) == 6, "no clone asked again while it copies"

    # Each clone, once copied, is deleted again under a new id (the unwind waits for one
    # region at a time), and the unwind ends when all are gone.
    answered = {d.id for d in await crucible.deletes()}
    for clone in clones:
        await replica.deliver(crucible.event(clone, RegionState.CREATED))
    by_id = {e.payload.id: e for e in ensures}
    while (await database.saga(saga_id)).state == SagaState.WAITING:
        new = [d for d in await crucible.deletes() if d.id not in answered]
        assert new, "the unwind waits with no delete left to answer"
        for delete in new:
            answered.add(delete.id)
            await replica.deliver(crucible.deleted(by_id[delete.payload.id]))
    sent = [d.payload.id for d in await crucible.deletes()]
    assert sorted(sent) == sorted([*by_id, *(c.payload.id for c in clones)])

    saga = await assert_saga(database, saga_id, SagaState.UNDONE)
    assert "failed" in (saga.error or "")
    assert await regions_of(database, p.disk_id) == 0
    assert await snapshot_references(world, p.snapshot_id) == [0, 0, 0]
    async with database.sessions() as session:
        assert await session.get(Disk, p.disk_id) is None


async def test_disk_delete_deletes_the_clones_too(database: Database) -> None:
    world, p = await prepared(database)
    await world.run_to_done(DEFINITION, p)

    await world.run_to_done(disk_delete.DEFINITION, disk_delete.Params(disk_id=p.disk_id))

    after = await world.snapshot()
    assert after.row("disks", p.disk_id)["state"] == DiskState.DELETED
    regions = [r for r in after.rows["regions"].values() if r["disk_id"] == p.disk_id]
    assert len(regions) == 6 and {r["state"] for r in regions} == {RegionState.DESTROYED}
    assert not set(after.held["regions"]) & {r["id"] for r in regions}
    # Only the source disk's three regions still hold space.
    async with database.sessions() as session:
        held = await session.scalar(
            select(func.count())
            .select_from(RegionSnapshot)
            .where(RegionSnapshot.snapshot_id == p.snapshot_id)
        )
    assert held == 3


async def test_a_snapshot_being_copied_is_not_deleted_until_its_disk_is_made(
    database: Database,
) -> None:
    """Refused, not waited for (docs/omicron.md): snapshot_delete fails at its first node
    while a disk's clones copy; once the disk is ready, the snapshot can go."""
    world, p = await prepared(database)
    replica = Replica(database, "a", clock=world.clock, definitions=world.definitions)
    crucible = FakeCrucible.new(database)
    saga_id = await replica.executor.start(DEFINITION, p)
    delete_params = snapshot_delete.Params(snapshot_id=p.snapshot_id)

    refused = await replica.executor.start(snapshot_delete.DEFINITION, delete_params)

    saga = await assert_saga(database, refused, SagaState.UNDONE)
    assert "being copied by 1 disk(s) being made from it" in (saga.error or "")
    ensures = [e for e in await crucible.ensures() if await owned(database, e, p.disk_id)]
    for event in await crucible.created_events(ensures):
        await replica.deliver(event)
    await assert_saga(database, saga_id, SagaState.DONE)
    world.agents.taken |= {m.id for m in await database.outbox() if m.IS_COMMAND}
    for ensure in ensures:
        world.agents.regions[ensure.payload.id] = (ensure, RegionState.CREATED)
    await world.run_to_done(snapshot_delete.DEFINITION, delete_params)
    assert (await world.snapshot()).row("snapshots", p.snapshot_id)["state"] == "destroyed"


# The doctor knows clones (nexus.doctor.region_findings, no I/O).


def clone_rack() -> tuple[DoctorRack, DiskRecord, list[RegionRecord]]:
    """A disk made from a snapshot: its three regions on the first three datasets (each
    sled its own), its three clones on the last three."""
    rack = DoctorRack.with_datasets(4)
    plain = rack.disk()
    disk = dataclasses.replace(plain, snapshot_id=uuid.uuid4())
    rack.disks[disk.id] = disk
    clones = []
    for index, dataset_id in enumerate(rack.datasets[1:]):
        record = RegionRecord(
            id=uuid.uuid4(),
            disk_id=disk.id,
            dataset_id=dataset_id,
            state=RowRegionState.CREATED,
            generation=2,
            block_size=BLOCK,
            extent_size=EXTENT,
            extent_count=COUNT,
            read_only=True,
            source=f"[fd00::{index}]:19500",
        )
        rack.regions.append(record)
        held = doctor_wire(record.id, WireRegionState.CREATED, 2)
        rack.held[dataset_id].append(
            held.model_copy(update={"read_only": True, "source": record.source})
        )
        clones.append(record)
    return rack, disk, clones


def test_the_doctor_finds_nothing_wrong_with_three_regions_and_three_clones() -> None:
    rack, _, _ = clone_rack()
    assert rack.findings() == []


def test_the_doctor_counts_clones_apart() -> None:
    rack, disk, clones = clone_rack()
    rack.regions.remove(clones[0])
    assert rack.findings() == sorted(
        [("disk_region_count", str(disk.id)), ("region_unknown", str(clones[0].id))]
    )
    blank = rack.disk()
    rack.regions.append(dataclasses.replace(clones[1], id=uuid.uuid4(), disk_id=blank.id))
    assert ("disk_region_count", str(blank.id)) in rack.findings()


def test_the_doctor_finds_two_clones_on_one_sled_and_a_clone_not_read_only() -> None:
    rack, disk, clones = clone_rack()
    # The last dataset holds only a clone: on the first clone's sled, only clones share.
    rack.sled_of_dataset[clones[2].dataset_id] = rack.sled_of_dataset[clones[0].dataset_id]
    at_agent = rack.held[clones[1].dataset_id]
    at_agent[-1] = at_agent[-1].model_copy(update={"read_only": False, "source": None})
    assert rack.findings() == [
        ("disk_regions_share_sled", str(disk.id)),
        ("region_spec_mismatch", str(clones[1].id)),
    ]


# nexusctl disk create --from-snapshot: checked before anything is sent.


def test_a_blank_disk_needs_a_size() -> None:
    result = CliRunner().invoke(app, ["disk", "create", "data", "--amqp-url", "amqp://x/"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: --size is required for a disk not made from a snapshot"


def test_a_snapshot_reference_must_be_a_name_or_an_id() -> None:
    result = CliRunner().invoke(
        app, ["disk", "create", "data", "--from-snapshot", "Not A Name", "--amqp-url", "amqp://x/"]
    )
    assert result.exit_code == 1 and "invalid resource name" in result.stderr
