"""snapshot_create and snapshot_delete beyond the triad every saga gets
(tests/unit/test_saga_triad.py), on SQLite and PostgreSQL with agents played by the test
(``tests.saga_support.Agents``, which decides every snapshot command by the crucible
agent's own rules): the teardown's decisions; running snapshots go before snapshots; an
unwind waits for a run still in flight before stopping it; a disk with snapshots is not
deleted; clear failures for an unknown disk and a name taken.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import select

from nexus.db.models import Dataset, Region, RegionSnapshot, Snapshot
from nexus.db.states import AgentSnapshotState, DiskState, RegionState, SagaState, SnapshotState
from nexus.liveness import expunge_sled
from nexus.sagas import disk_delete, snapshot_create, snapshot_delete
from nexus.sagas.disk_create import REPLICAS
from nexus.sagas.snapshot_parts import Awaiting, PartState, decide_teardown
from schemas.base import Envelope
from schemas.snapshot import (
    RegionSnapshotCreate,
    RegionSnapshotDelete,
    RunningSnapshotRun,
    RunningSnapshotStop,
)
from schemas.topology import crucible_queue
from tests.saga_scenarios import new_disk, new_snapshot, snapshot_params
from tests.saga_support import Agents, Database, Replica
from tests.saga_triad import World, assert_saga

R1, R2, R3 = (uuid.UUID(int=n) for n in (1, 2, 3))


def part(
    region: uuid.UUID,
    snapshot: AgentSnapshotState | None = AgentSnapshotState.CREATED,
    snapshot_gen: int = 1,
    running: RegionState | None = RegionState.CREATED,
    running_gen: int = 2,
) -> PartState:
    return PartState(region, snapshot, snapshot_gen, running, running_gen)


# The teardown's decisions (no I/O).


def test_running_snapshots_are_stopped_before_any_snapshot_is_deleted() -> None:
    decided = decide_teardown([part(R1), part(R2), part(R3)], running=True, snapshots=True)
    assert (decided.stops, decided.deletes) == ((R1, R2, R3), ())
    assert decided.wait == (R1, Awaiting.STOP, 2)


def test_snapshots_are_deleted_once_every_running_snapshot_is_destroyed() -> None:
    gone = RegionState.DESTROYED
    parts = [part(R1, running=gone, running_gen=4), part(R2, running=gone), part(R3, running=None)]
    decided = decide_teardown(parts, running=True, snapshots=True)
    assert (decided.stops, decided.deletes) == ((), (R1, R2, R3))
    assert decided.wait == (R1, Awaiting.DELETE, 1)


def test_one_running_snapshot_left_holds_back_every_delete() -> None:
    gone = RegionState.DESTROYED
    parts = [part(R1, running=gone), part(R2, running=RegionState.TOMBSTONED, running_gen=3)]
    decided = decide_teardown(parts, running=True, snapshots=True)
    # Already stopping: no stop again, no delete yet, and the wait is for its end.
    assert (decided.stops, decided.deletes, decided.wait) == ((), (), (R2, Awaiting.STOP, 3))


def test_an_unanswered_run_or_take_is_waited_for_before_it_is_undone() -> None:
    asked = part(R1, running=RegionState.REQUESTED, running_gen=0)
    decided = decide_teardown([asked, part(R2)], running=True, snapshots=True)
    assert (decided.stops, decided.wait) == ((R2,), (R1, Awaiting.RUN, 0))
    taking = part(R1, snapshot=None, snapshot_gen=0, running=None)
    decided = decide_teardown([taking], running=True, snapshots=True)
    assert (decided.deletes, decided.wait) == ((), (R1, Awaiting.TAKE, 0))


def test_a_failed_running_snapshot_blocks_the_teardown() -> None:
    failed = part(R1, running=RegionState.FAILED, running_gen=2)
    decided = decide_teardown([failed, part(R2)], running=True, snapshots=True)
    assert decided.blocked is not None and str(R1) in decided.blocked


def test_nothing_left_is_done() -> None:
    gone = part(R1, snapshot=AgentSnapshotState.DESTROYED, running=RegionState.DESTROYED)
    assert decide_teardown([gone], running=True, snapshots=True).wait is None
    assert decide_teardown([], running=True, snapshots=True).wait is None
    # The running phase alone does not touch snapshots.
    assert decide_teardown([part(R1, running=None)], running=True, snapshots=False).wait is None


# Sagas, with the agents played from the outbox.


async def answer_except(agents: Agents, replica: Replica, held: Callable[[Envelope], bool]) -> None:
    """Carry out every command but those ``held`` (left for later), as Agents.answer does."""
    while pending := [
        (queue, message)
        for queue, message in await agents.database.sent()
        if message.IS_COMMAND and message.id not in agents.taken and not held(message)
    ]:
        for queue, command in pending:
            agents.taken.add(command.id)
            for event in agents._carry_out(queue, command):
                await replica.deliver(event)


async def parts(database: Database, snapshot_id: uuid.UUID) -> list[RegionSnapshot]:
    async with database.sessions() as session:
        rows = await session.execute(
            select(RegionSnapshot)
            .where(RegionSnapshot.snapshot_id == snapshot_id)
            .order_by(RegionSnapshot.region_id)
        )
        return list(rows.scalars())


async def snapshot_row(database: Database, snapshot_id: uuid.UUID) -> Snapshot | None:
    async with database.sessions() as session:
        return await session.get(Snapshot, snapshot_id)


async def test_a_detached_disk_is_snapshotted_without_a_flush(database: Database) -> None:
    world = World.for_saga(database, snapshot_create.DEFINITION)
    await database.add_datasets(3)
    p = snapshot_params(await new_disk(world))
    saga_id = await world.run_to_done(snapshot_create.DEFINITION, p)
    saga = await database.saga(saga_id)
    assert saga.node_outputs["disk_flush"] == {"flushed": False}
    row = await snapshot_row(database, p.snapshot_id)
    assert row is not None and row.state == SnapshotState.READY
    recorded = await parts(database, p.snapshot_id)
    assert [(r.snapshot_state, r.running_state) for r in recorded] == [
        (AgentSnapshotState.CREATED, RegionState.CREATED)
    ] * 3
    # Each address is its host (here the dataset: no sled registered) and its own port.
    assert all(r.snapshot_addr == f"{r.dataset_id}:{r.port_number}" for r in recorded)


async def test_the_delete_stops_every_running_snapshot_before_deleting_a_snapshot(
    database: Database,
) -> None:
    world = World.for_saga(database, snapshot_delete.DEFINITION)
    await database.add_datasets(3)
    snapshot_id = await new_snapshot(world, await new_disk(world))
    first_delete_command = len(await database.outbox())
    await world.run_to_done(
        snapshot_delete.DEFINITION, snapshot_delete.Params(snapshot_id=snapshot_id)
    )
    sent = (await database.outbox())[first_delete_command:]
    kinds = [type(m) for m in sent if isinstance(m, RunningSnapshotStop | RegionSnapshotDelete)]
    assert kinds == [RunningSnapshotStop] * 3 + [RegionSnapshotDelete] * 3
    assert world.agents.held()["snapshots"] == {} == world.agents.held()["running_snapshots"]
    assert await parts(database, snapshot_id) == []


async def test_an_unwind_waits_for_a_run_in_flight_before_stopping_it(database: Database) -> None:
    """The second region's agent refuses its running snapshot while the first region's
    run is still on its way: the unwind stops the third at once, but waits for the first
    region's run to be answered before stopping it, and deletes no snapshot meanwhile."""
    world = World.for_saga(database, snapshot_create.DEFINITION)
    await database.add_datasets(3)
    p = snapshot_params(await new_disk(world))
    replica = world.replica()
    saga_id = await replica.executor.start(snapshot_create.DEFINITION, p)
    regions = sorted({r for r, _ in world.agents.held()["regions"].items()})
    first, second = regions[0], regions[1]

    def held(message: Envelope) -> bool:
        return isinstance(message, RunningSnapshotRun) and message.payload.region_id in (
            first,
            second,
        )

    await answer_except(world.agents, replica, held)
    runs = {
        m.payload.region_id: (queue, m)
        for queue, m in await database.sent()
        if isinstance(m, RunningSnapshotRun)
    }
    queue, refused = runs[second]
    world.agents.taken.add(refused.id)
    await replica.deliver(world.agents._rejected(queue, refused, "no_free_port"))
    await answer_except(world.agents, replica, held)

    saga = await database.saga(saga_id)
    # Parked in its unwind, on the first region's run.
    assert saga.state == SagaState.WAITING and saga.error is not None
    sent = await database.outbox()
    assert not [m for m in sent if isinstance(m, RegionSnapshotDelete)]
    stopped = {m.payload.region_id for m in sent if isinstance(m, RunningSnapshotStop)}
    assert stopped == {regions[2]}

    await world.agents.answer(replica)
    saga = await assert_saga(database, saga_id, SagaState.UNDONE)
    assert "no_free_port" in (saga.error or "")
    assert world.agents.held()["snapshots"] == {} == world.agents.held()["running_snapshots"]
    assert await parts(database, p.snapshot_id) == []
    assert await snapshot_row(database, p.snapshot_id) is None


async def test_a_disk_with_snapshots_is_not_deleted(database: Database) -> None:
    world = World.for_saga(database, disk_delete.DEFINITION)
    await database.add_datasets(3)
    disk_id = await new_disk(world)
    p = snapshot_params(disk_id)
    await world.run_to_done(snapshot_create.DEFINITION, p)
    saga_id = await world.run(disk_delete.DEFINITION, disk_delete.Params(disk_id=disk_id))
    saga = await assert_saga(database, saga_id, SagaState.UNDONE)
    assert f"has 1 snapshot(s) ({p.name}): delete them first" in (saga.error or "")
    snapshot = await snapshot_row(database, p.snapshot_id)
    assert snapshot is not None and snapshot.state == SnapshotState.READY
    # Once the snapshot is gone, the disk goes.
    await world.run_to_done(
        snapshot_delete.DEFINITION, snapshot_delete.Params(snapshot_id=p.snapshot_id)
    )
    await world.run_to_done(disk_delete.DEFINITION, disk_delete.Params(disk_id=disk_id))


@pytest.mark.parametrize("problem", ["unknown disk", "name taken"])
async def test_a_snapshot_that_cannot_be_made_fails_at_once_with_why(
    database: Database, problem: str
) -> None:
    world = World.for_saga(database, snapshot_create.DEFINITION)
    await database.add_datasets(3)
    disk_id = await new_disk(world)
    if problem == "unknown disk":
        p, why = snapshot_params(uuid.uuid4()), "no disk"
    else:
        taken = snapshot_params(disk_id)
        await world.run_to_done(snapshot_create.DEFINITION, taken)
        p = snapshot_params(disk_id).model_copy(update={"name": taken.name})
        why = f"a snapshot named {taken.name} already exists in project triad"
    saga_id = await world.run(snapshot_create.DEFINITION, p)
    saga = await assert_saga(database, saga_id, SagaState.UNDONE)
    assert why in (saga.error or "")
    assert not [
        m
        for m in await database.outbox()
        if isinstance(m, RegionSnapshotCreate) and m.payload.name == str(p.snapshot_id)
    ]


async def test_a_deleting_disk_cannot_be_snapshotted(database: Database) -> None:
    world = World.for_saga(database, snapshot_create.DEFINITION)
    await database.add_datasets(3)
    disk_id = await new_disk(world)
    await world.run_to_done(disk_delete.DEFINITION, disk_delete.Params(disk_id=disk_id))
    saga_id = await world.run(snapshot_create.DEFINITION, snapshot_params(disk_id))
    saga = await assert_saga(database, saga_id, SagaState.UNDONE)
    assert f"is {DiskState.DELETED.value}: only a detached or attached disk" in (saga.error or "")


# A part on an expunged dataset: its agent is written off (found by the chaos test).


async def answer_but(agents: Agents, replica: Replica, lost_queue: str) -> None:
    """Carry out every command but those to ``lost_queue``: an agent that died."""
    while pending := [
        (queue, message)
        for queue, message in await agents.database.sent()
        if message.IS_COMMAND and message.id not in agents.taken and queue != lost_queue
    ]:
        for queue, command in pending:
            agents.taken.add(command.id)
            for event in agents._carry_out(queue, command):
                await replica.deliver(event)


async def expunge_dataset(world: World, dataset_id: uuid.UUID) -> None:
    """Expunge the dataset's sled (its regions' replacements are not the test's)."""
    async with world.database.sessions.begin() as session:
        dataset = await session.get(Dataset, dataset_id)
        assert dataset is not None
        await expunge_sled(session, dataset.sled_id, world.clock.now())


async def past_deadlines(world: World, replica: Replica, seconds: float) -> None:
    world.clock.advance(timedelta(seconds=seconds + 1))
    for _ in range(REPLICAS + 1):  # a sweep takes one expired wait
        await replica.executor.sweep()


async def commands_to(database: Database, queue: str) -> list[Envelope]:
    return [m for q, m in await database.sent() if q == queue and m.IS_COMMAND]


@pytest.mark.parametrize("when", ["before", "while-waiting"])
async def test_a_delete_writes_off_a_part_on_an_expunged_dataset(
    database: Database, when: str
) -> None:
    """A snapshot with a part on a sled that was lost: expunged before the delete (its
    agent is never asked), or while the delete waits for that agent's stop (at the
    deadline the part is written off rather than the dead agent asked for ever)."""
    world = World.for_saga(database, snapshot_delete.DEFINITION)
    await database.add_datasets(4)
    p = snapshot_params(await new_disk(world))
    await world.run_to_done(snapshot_create.DEFINITION, p)
    lost = (await parts(database, p.snapshot_id))[0]
    lost_queue = crucible_queue(lost.dataset_id)
    asked_before = len(await commands_to(database, lost_queue))
    replica = world.replica()
    if when == "before":
        await expunge_dataset(world, lost.dataset_id)
    saga_id = await replica.executor.start(
        snapshot_delete.DEFINITION, snapshot_delete.Params(snapshot_id=p.snapshot_id)
    )
    await answer_but(world.agents, replica, lost_queue)
    if when == "while-waiting":
        assert (await database.saga(saga_id)).state == SagaState.WAITING
        await expunge_dataset(world, lost.dataset_id)
        deadline = snapshot_delete.Params(snapshot_id=p.snapshot_id).delete_deadline_seconds
        await past_deadlines(world, replica, deadline)
        await answer_but(world.agents, replica, lost_queue)
    else:
        assert len(await commands_to(database, lost_queue)) == asked_before
    await assert_saga(database, saga_id, SagaState.DONE)
    row = await snapshot_row(database, p.snapshot_id)
    assert row is not None and row.state == SnapshotState.DESTROYED
    assert await parts(database, p.snapshot_id) == []
    # The live agents hold nothing of it.
    assert {region for region, _ in world.agents.held()["snapshots"]} <= {lost.region_id}


async def test_a_disk_with_a_region_on_an_expunged_dataset_is_not_snapshotted(
    database: Database,
) -> None:
    world = World.for_saga(database, snapshot_create.DEFINITION)
    await database.add_datasets(4)
    disk_id = await new_disk(world)
    async with database.sessions() as session:
        dataset_id = await session.scalar(
            select(Region.dataset_id).where(Region.disk_id == disk_id).limit(1)
        )
    assert dataset_id is not None
    await expunge_dataset(world, dataset_id)
    saga_id = await world.run(snapshot_create.DEFINITION, snapshot_params(disk_id))
    saga = await assert_saga(database, saga_id, SagaState.UNDONE)
    assert f"on expunged dataset {dataset_id}, being replaced" in (saga.error or "")
    assert not [m for m in await database.outbox() if isinstance(m, RegionSnapshotCreate)]


async def test_a_create_waiting_on_a_lost_agent_unwinds_at_its_deadline(
    database: Database,
) -> None:
    """The take of one part went to an agent that died, and its sled was expunged: at the
    deadline the node fails (the agent is not asked), and the unwind tears down the other
    parts and writes that one off."""
    world = World.for_saga(database, snapshot_create.DEFINITION)
    await database.add_datasets(4)
    p = snapshot_params(await new_disk(world))
    replica = world.replica()
    saga_id = await replica.executor.start(snapshot_create.DEFINITION, p)
    lost_queue = next(q for q, m in await database.sent() if isinstance(m, RegionSnapshotCreate))
    await answer_but(world.agents, replica, lost_queue)
    assert (await database.saga(saga_id)).state == SagaState.WAITING
    lost = await parts(database, p.snapshot_id)
    lost_dataset = next(r.dataset_id for r in lost if crucible_queue(r.dataset_id) == lost_queue)
    await expunge_dataset(world, lost_dataset)
    await past_deadlines(world, replica, p.part_deadline_seconds)
    await answer_but(world.agents, replica, lost_queue)
    saga = await assert_saga(database, saga_id, SagaState.UNDONE)
    assert "dataset was expunged" in (saga.error or "")
    assert await parts(database, p.snapshot_id) == []
    assert await snapshot_row(database, p.snapshot_id) is None
    assert world.agents.held()["snapshots"] == {} == world.agents.held()["running_snapshots"]
