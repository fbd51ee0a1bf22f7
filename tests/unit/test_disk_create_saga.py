"""disk_create beyond the triad every saga gets (tests/unit/test_saga_triad.py), on SQLite
and PostgreSQL with agents played by the test: regions go to distinct sleds; a region
failing at its agent unwinds; a failing undo leaves the saga stuck, with its error,
visible; no room fails with a clear reason.
"""

from __future__ import annotations

import sqlite3
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import ColumnElement, func, select

from nexus.api import disk_view
from nexus.db.models import Dataset, Disk, Region
from nexus.db.states import DatasetState, DiskState, SagaLogEvent, SagaState
from nexus.liveness import expunge_sled
from nexus.saga.clock import ManualClock
from nexus.saga.faults import Faults
from nexus.sagas import disk_create, region_deletion, region_replacement
from schemas.base import Envelope
from schemas.identity import queue_agent
from schemas.region import RegionFound, RegionGet, RegionInfo, RegionState, reservation_bytes
from schemas.transport import Transport
from tests.saga_support import Database, FakeCrucible, Replica, agent_of

DISK_BYTES = 3 << 30


@pytest.fixture
async def database(database: Database) -> Database:
    """The shared database, on both engines, with four live datasets on four sleds."""
    await database.add_datasets(4)
    return database


def params(name: str = "data") -> disk_create.Params:
    return disk_create.Params(
        disk_id=uuid.uuid4(), project="demo", name=name, size_bytes=DISK_BYTES, block_size=512
    )


async def count(database: Database, model: type[Any], *where: ColumnElement[bool]) -> int:
    async with database.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


async def run_to_end(replica: Replica, crucible: FakeCrucible, p: disk_create.Params) -> uuid.UUID:
    saga_id = await replica.executor.start(disk_create.DEFINITION, p)
    for event in await crucible.created_events():
        await replica.deliver(event)
    return saga_id


async def test_regions_are_placed_on_distinct_sleds(database: Database) -> None:
    replica = Replica(database, "a", clock=ManualClock())
    crucible = FakeCrucible.new(database)
    await run_to_end(replica, crucible, params())
    async with database.sessions() as session:
        rows = await session.execute(
            select(Dataset.sled_id).join(Region, Region.dataset_id == Dataset.id)
        )
        sleds = [row.sled_id for row in rows]
    assert len(sleds) == 3 and len(set(sleds)) == 3


async def test_a_region_that_fails_at_its_agent_unwinds(database: Database) -> None:
    replica = Replica(database, "a", clock=ManualClock())
    crucible = FakeCrucible.new(database)
    p = params()
    saga_id = await replica.executor.start(disk_create.DEFINITION, p)
    ensures = await crucible.ensures()
    first, *rest = ensures
    await replica.deliver(crucible.event(first, RegionState.FAILED))
    # The other two regions' late notifications find no saga waiting for them.
    for event in await crucible.created_events(rest):
        ingested = await replica.deliver(event)
        assert ingested.woken is None

    # The unwind asked for the three deletes and waits for them: the rows stay until
    # their agents confirm.
    assert len(await crucible.deletes()) == 3
    for ensure in ensures:
        assert (await database.saga(saga_id)).state == SagaState.WAITING
        assert await count(database, Region, Region.id == ensure.payload.id) == 1
        await replica.deliver(crucible.deleted(ensure))

    saga = await database.saga(saga_id)
    assert saga.state == SagaState.UNDONE
    assert "failed" in (saga.error or "")
    assert await count(database, Disk) == 0
    assert await count(database, Region) == 0


async def test_a_failed_destroy_is_asked_again_until_destroyed(database: Database) -> None:
    replica = Replica(database, "a", clock=ManualClock())
    crucible = FakeCrucible.new(database)
    saga_id = await replica.executor.start(disk_create.DEFINITION, params())
    ensures = await crucible.ensures()
    await replica.deliver(crucible.event(ensures[0], RegionState.FAILED))
    for ensure in ensures[1:]:
        await replica.deliver(crucible.deleted(ensure))
    first_deletes = await crucible.deletes()

    await replica.deliver(crucible.deleted(ensures[0], RegionState.FAILED))

    deletes = await crucible.deletes()
    assert len(deletes) == len(first_deletes) + 1, "the failed destroy's delete sent again"
    assert deletes[-1].payload.id == ensures[0].payload.id
    assert deletes[-1].id not in {d.id for d in first_deletes}, "under a new id"
    assert (await database.saga(saga_id)).state == SagaState.WAITING
    assert await count(database, Region, Region.state == RegionState.DESTROYED) == 2
    assert await count(database, Region) == 3, "rows removed once every agent confirmed"
    await replica.deliver(crucible.deleted(ensures[0]))
    assert (await database.saga(saga_id)).state == SagaState.UNDONE
    assert await count(database, Region) == 0


async def test_a_region_that_cannot_be_destroyed_faults_the_disk_with_the_reason(
    database: Database,
) -> None:
    replica = Replica(database, "a", clock=ManualClock())
    crucible = FakeCrucible.new(database)
    p = params()
    saga_id = await replica.executor.start(disk_create.DEFINITION, p)
    ensures = await crucible.ensures()
    await replica.deliver(crucible.event(ensures[0], RegionState.FAILED))

    for _ in range(region_deletion.MAX_RESENDS + 1):
        await replica.deliver(crucible.deleted(ensures[0], RegionState.FAILED))

    saga = await database.saga(saga_id)
    assert saga.state == SagaState.STUCK
    assert "not destroyed after" in (saga.error or "")
    assert "injected destroy failure" in (saga.error or "")
    assert len(await crucible.deletes()) == 3 + region_deletion.MAX_RESENDS
    async with database.sessions() as session:
        disk = await session.get(Disk, p.disk_id)
        assert disk is not None
        view = disk_view(disk)
    assert disk.state == DiskState.FAULTED
    # The disk says why, as the API and `nexusctl disk show` give it.
    assert disk.fault_reason is not None
    assert "undo of regions_cleanup failed" in disk.fault_reason
    assert "injected destroy failure" in disk.fault_reason
    assert view.fault_reason == disk.fault_reason
    assert await count(database, Region) == 3, "no row removed without a confirmation"


async def test_a_failing_undo_leaves_the_saga_stuck_and_the_disk_faulted(
    database: Database,
) -> None:
    faults = Faults(
        fail_node=lambda saga, node: node == "disk_finalize",
        fail_undo=lambda saga, node: node == "regions_place",
    )
    replica = Replica(database, "a", clock=ManualClock(), faults=faults)
    crucible = FakeCrucible.new(database)
    p = params()

    saga_id = await run_to_end(replica, crucible, p)
    for ensure in await crucible.ensures():
        await replica.deliver(crucible.deleted(ensure))

    saga = await database.saga(saga_id)
    assert saga.state == SagaState.STUCK
    assert saga.error is not None
    assert "disk_finalize" in saga.error and "undo of regions_place failed" in saga.error
    async with database.sessions() as session:
        disk = await session.get(Disk, p.disk_id)
    assert disk is not None and disk.state == DiskState.FAULTED
    log = await database.log(saga_id)
    assert [e.node_name for e in log if e.event == SagaLogEvent.UNDO_FAILED] == ["regions_place"]


async def test_no_region_goes_to_a_dataset_of_an_expunged_sled(database: Database) -> None:
    """Four datasets on four sleds; the sled of one is expunged by an operator: the
    disk's three regions go to the other three, and asking again changes nothing."""
    async with database.sessions() as session:
        lost = (await session.execute(select(Dataset).order_by(Dataset.id))).scalars().first()
    assert lost is not None
    async with database.sessions.begin() as session:
        first = await expunge_sled(session, lost.sled_id, ManualClock().now())
    async with database.sessions.begin() as session:
        again = await expunge_sled(session, lost.sled_id, ManualClock().now())
    assert (first.changed, first.datasets, first.failed_vmms) == (True, 1, 0)
    assert (again.changed, again.datasets, again.failed_vmms) == (False, 0, 0)

    replica = Replica(database, "a", clock=ManualClock())
    crucible = FakeCrucible.new(database)
    await run_to_end(replica, crucible, params())
    async with database.sessions() as session:
        used = set((await session.execute(select(Region.dataset_id))).scalars())
        states = dict((await session.execute(select(Dataset.id, Dataset.state))).tuples().all())
    assert len(used) == 3 and lost.id not in used
    assert states[lost.id] == DatasetState.EXPUNGED
    assert all(states[dataset] == DatasetState.ACTIVE for dataset in used)


async def test_no_room_fails_with_a_clear_reason(tmp_path: Path) -> None:
    database = await Database.migrated(f"sqlite+aiosqlite:///{tmp_path / 'small.sqlite3'}")
    await database.add_datasets(2)
    replica = Replica(database, "a", clock=ManualClock())
    saga_id = await replica.executor.start(disk_create.DEFINITION, params())
    saga = await database.saga(saga_id)
    assert saga.state == SagaState.UNDONE
    assert "insufficient capacity" in (saga.error or "")
    await database.close()


async def test_regions_take_what_the_agent_reserves_from_their_datasets(tmp_path: Path) -> None:
    """Nexus places and accounts a region by the 1.25 times its size the agent reserves:
    a dataset with room for the region but not its reservation is not chosen, and a
    placed region takes its reservation from its dataset's free space."""
    database = await Database.migrated(f"sqlite+aiosqlite:///{tmp_path / 'tight.sqlite3'}")
    p = params()
    extent_size, extent_count = disk_create.region_geometry(p.size_bytes, p.block_size)
    region_bytes = extent_size * extent_count * p.block_size
    reserved = reservation_bytes(region_bytes)
    # Room for the region, not for its reservation.
    await database.add_datasets(3, free_bytes=reserved - 1)
    replica = Replica(database, "a", clock=ManualClock())
    refused = await database.saga(await replica.executor.start(disk_create.DEFINITION, p))
    assert refused.state == SagaState.UNDONE
    assert "insufficient capacity" in (refused.error or "")
    await database.close()

    database = await Database.migrated(f"sqlite+aiosqlite:///{tmp_path / 'roomy.sqlite3'}")
    datasets = await database.add_datasets(3, free_bytes=reserved + 10)
    replica = Replica(database, "a", clock=ManualClock())
    await replica.executor.start(disk_create.DEFINITION, params())
    async with database.sessions() as session:
        free = [
            await session.scalar(select(Dataset.free_bytes).where(Dataset.id == d.id))
            for d in datasets
        ]
    assert free == [10, 10, 10]
    await database.close()


async def test_the_relay_is_woken_only_once_its_commands_are_committed(tmp_path: Path) -> None:
    """A wake-up before the commit finds nothing, and the relay would sleep until its
    next sweep with the commands unsent (seconds of a disk stuck in "creating")."""
    path = tmp_path / "relay.sqlite3"
    database = await Database.migrated(f"sqlite+aiosqlite:///{path}")
    await database.add_datasets(3)
    replica = Replica(database, "a", clock=ManualClock())
    visible_at_wake: list[int] = []

    def wake() -> None:
        # What the relay's own connection would find at this moment.
        with sqlite3.connect(path) as other:
            visible_at_wake.append(other.execute("SELECT count(*) FROM outbox").fetchone()[0])

    replica.outbox.on_commit(wake)
    await replica.executor.start(disk_create.DEFINITION, params())
    assert visible_at_wake, "the relay was never woken"
    ensures = await FakeCrucible.new(database).ensures()
    assert len(ensures) == 3
    assert visible_at_wake[-1] == len(await database.outbox()), "all committed when it wakes"
    assert all(count > 0 for count in visible_at_wake)
    await database.close()


class AgentThatNeverHeard:
    """Answers every region query as an agent that never received the ensure."""

    def __init__(self) -> None:
        self.asked = 0

    async def request(
        self, message: Envelope, *, routing_key: str, timeout: float, answerer: str | None = None
    ) -> Envelope:
        assert isinstance(message, RegionGet)
        self.asked += 1
        # The agent asked answers: the one whose queue it is, which the saga names.
        assert answerer is not None and queue_agent(routing_key) == answerer
        return RegionInfo(
            source=answerer,
            payload=RegionFound(
                agent_id=agent_of(routing_key), region=None, region_id=message.payload.id
            ),
        )


async def test_an_ensure_the_agent_never_got_is_sent_again_at_the_deadline(
    database: Database,
) -> None:
    clock = ManualClock()
    agent = AgentThatNeverHeard()
    replica = Replica(database, "a", clock=clock, transport=cast(Transport, agent))
    p = params()
    saga_id = await replica.executor.start(disk_create.DEFINITION, p)
    crucible = FakeCrucible.new(database)
    first = await crucible.ensures()
    assert len(first) == 3

    clock.advance(timedelta(seconds=p.region_deadline_seconds + 1))
    for _ in range(3):  # a sweep takes one expired wait; the saga parks again after it
        await replica.executor.sweep()
    await replica.executor.sweep()

    assert agent.asked == 3, "asked once per region, not again before the new deadline"
    ensures = await crucible.ensures()
    assert len(ensures) == 6, "each region's ensure sent again"
    again = ensures[3:]
    assert {e.payload for e in again} == {e.payload for e in first}, "the same request"
    assert not {e.id for e in again} & {e.id for e in first}, "under new ids"
    saga = await database.saga(saga_id)
    assert saga.state == SagaState.WAITING
    # The agent now creates them: the saga completes on the events, not the deadline.
    for event in await crucible.created_events(again):
        await replica.deliver(event)
    assert (await database.saga(saga_id)).state == SagaState.DONE


class AgentThatCreatedThem:
    """Answers every region query as an agent that created the region: its event is
    still on its way (say, queued behind a database outage)."""

    async def request(
        self, message: Envelope, *, routing_key: str, timeout: float, answerer: str | None = None
    ) -> Envelope:
        assert isinstance(message, RegionGet) and answerer is not None
        ensure = next(
            e for e in await self.crucible.ensures() if e.payload.id == message.payload.id
        )
        return RegionInfo(
            source=answerer,
            payload=RegionFound(
                agent_id=agent_of(routing_key),
                region_id=message.payload.id,
                region=self.crucible.event(ensure, RegionState.CREATED).payload.region,
            ),
        )

    def __init__(self, crucible: FakeCrucible) -> None:
        self.crucible = crucible


async def test_a_region_found_created_by_reconcile_is_recorded_so(database: Database) -> None:
    """Found by the chaos test (seed 1502): the disk came up ready on the reconcile's
    finding while its regions' rows still said ``requested`` (the events came later),
    and a snapshot of it was refused meanwhile ("0 created regions of 3")."""
    clock = ManualClock()
    crucible = FakeCrucible.new(database)
    replica = Replica(
        database, "a", clock=clock, transport=cast(Transport, AgentThatCreatedThem(crucible))
    )
    p = params()
    saga_id = await replica.executor.start(disk_create.DEFINITION, p)
    await crucible.ensures()
    clock.advance(timedelta(seconds=p.region_deadline_seconds + 1))
    for _ in range(4):  # a sweep takes one expired wait
        await replica.executor.sweep()
    assert (await database.saga(saga_id)).state == SagaState.DONE
    async with database.sessions() as session:
        rows = (await session.execute(select(Region).where(Region.disk_id == p.disk_id))).all()
    found = sorted((str(r[0].state.value), r[0].port_number) for r in rows)
    assert found == [("created", 19000)] * 3


async def test_no_space_is_reserved_on_a_dataset_expunged_after_it_was_chosen(
    database: Database,
) -> None:
    """Found by the chaos test (seed 1503): a placement read a dataset active, an
    operator's expunge of its sled committed, and the placement's reservation (which
    waited for the expunge's row lock) still took space there; the expunge had listed
    the dataset's regions before this one existed, so nothing ended the create's wait
    for the lost agent. The reservation itself now refuses an expunged dataset (PostgreSQL
    checks its WHERE again on the row the expunge left), and the placement unwinds."""
    (dataset, *_) = await database.add_datasets(3)
    async with database.sessions.begin() as session:
        await expunge_sled(session, dataset.sled_id, ManualClock().now())
    for reserve in (disk_create.RESERVE, region_replacement.RESERVE):
        async with database.sessions.begin() as session:
            reserved = await session.execute(reserve, {"b_id": dataset.id, "b_bytes": 1})
            assert reserved.rowcount == 0  # type: ignore[attr-defined]
