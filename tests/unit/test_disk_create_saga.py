"""Omicron's triad for disk_create, on a real SQLite database with agents played by the test:
it succeeds; a failure injected at every node unwinds to a clean slate; every node run
twice still succeeds. And a failing undo leaves the saga stuck, with its error, visible.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import ColumnElement, func, select

from nexus.db.models import Dataset, Disk, Region, WaitRendezvous
from nexus.db.states import DiskState, SagaLogEvent, SagaState
from nexus.saga.clock import ManualClock
from nexus.saga.faults import Faults
from nexus.sagas import disk_create
from schemas.region import RegionState
from tests.saga_support import Database, FakeCrucible, Replica

DISK_BYTES = 3 << 30


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    db = await Database.migrated(f"sqlite+aiosqlite:///{tmp_path / 'nexus.sqlite3'}")
    await db.add_datasets(4)
    yield db
    await db.close()


def params(name: str = "data") -> disk_create.Params:
    return disk_create.Params(
        disk_id=uuid.uuid4(), project="demo", name=name, size_bytes=DISK_BYTES, block_size=512
    )


async def count(database: Database, model: type[Any], *where: ColumnElement[bool]) -> int:
    async with database.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


async def free_bytes(database: Database) -> int:
    async with database.sessions() as session:
        return int(await session.scalar(select(func.sum(Dataset.free_bytes))) or 0)


async def run_to_end(replica: Replica, crucible: FakeCrucible, p: disk_create.Params) -> uuid.UUID:
    saga_id = await replica.executor.start(disk_create.DEFINITION, p)
    for event in await crucible.created_events():
        await replica.deliver(event)
    return saga_id


async def test_disk_create_succeeds(database: Database) -> None:
    replica = Replica(database, "a", clock=ManualClock())
    crucible = FakeCrucible.new(database)
    p = params()
    before = await free_bytes(database)

    saga_id = await replica.executor.start(disk_create.DEFINITION, p)

    saga = await database.saga(saga_id)
    assert saga.state == SagaState.WAITING
    assert saga.lease_owner is None, "a parked saga is held by no replica"
    ensures = await crucible.ensures()
    assert len(ensures) == 3
    assert len({e.payload.id for e in ensures}) == 3
    for event in await crucible.created_events():
        await replica.deliver(event)

    saga = await database.saga(saga_id)
    assert saga.state == SagaState.DONE, saga.error
    async with database.sessions() as session:
        disk = await session.get(Disk, p.disk_id)
        assert disk is not None and disk.state == DiskState.DETACHED
        regions = list((await session.execute(select(Region))).scalars())
    assert {r.state for r in regions} == {RegionState.CREATED.value}
    assert len({r.dataset_id for r in regions}) == 3
    extent_size, extent_count = disk_create.region_geometry(DISK_BYTES, 512)
    assert before - await free_bytes(database) == 3 * extent_size * extent_count * 512
    events = [entry.event for entry in await database.log(saga_id)]
    assert events.count(SagaLogEvent.WAITING) == 3
    assert events.count(SagaLogEvent.RESUMED) == 3


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


@pytest.mark.parametrize("failing_node", disk_create.DEFINITION.node_names)
async def test_a_failure_at_every_node_unwinds_to_a_clean_slate(
    database: Database, failing_node: str
) -> None:
    faults = Faults(fail_node=lambda saga, node: node == failing_node)
    replica = Replica(database, "a", clock=ManualClock(), faults=faults)
    crucible = FakeCrucible.new(database)
    before = await free_bytes(database)
    p = params()

    saga_id = await replica.executor.start(disk_create.DEFINITION, p)
    saga = await database.saga(saga_id)
    if saga.state == SagaState.WAITING:
        # The failing node is after the wait: let the regions be created first.
        for event in await crucible.created_events():
            await replica.deliver(event)

    saga = await database.saga(saga_id)
    assert saga.state == SagaState.UNDONE
    assert saga.error is not None and failing_node in saga.error
    assert await count(database, Disk) == 0
    assert await count(database, Region) == 0
    assert await free_bytes(database) == before
    assert await count(database, WaitRendezvous, WaitRendezvous.state == "parked") == 0
    ensured = {e.payload.id for e in await crucible.ensures()}
    deleted = {d.payload.id for d in await crucible.deletes()}
    assert ensured <= deleted, "every region asked for is asked to be deleted"
    log = await database.log(saga_id)
    failed = [e for e in log if e.event == SagaLogEvent.FAILED]
    assert [e.node_name for e in failed] == [failing_node]
    undone = [e.node_name for e in log if e.event == SagaLogEvent.UNDO_FINISHED]
    assert failing_node not in undone, "the failed node's own undo is not run"


async def test_a_region_that_fails_at_its_agent_unwinds(database: Database) -> None:
    replica = Replica(database, "a", clock=ManualClock())
    crucible = FakeCrucible.new(database)
    p = params()
    saga_id = await replica.executor.start(disk_create.DEFINITION, p)
    first, *rest = await crucible.ensures()
    await replica.deliver(crucible.event(first, RegionState.FAILED))

    saga = await database.saga(saga_id)
    assert saga.state == SagaState.UNDONE
    assert "failed" in (saga.error or "")
    assert await count(database, Disk) == 0
    # The other two regions' late notifications find no saga and change nothing.
    for event in await crucible.created_events(rest):
        ingested = await replica.deliver(event)
        assert ingested.woken is None
    assert (await database.saga(saga_id)).state == SagaState.UNDONE


async def test_every_node_run_twice_still_succeeds(database: Database) -> None:
    replica = Replica(database, "a", clock=ManualClock(), faults=Faults(repeat_actions=True))
    crucible = FakeCrucible.new(database)
    before = await free_bytes(database)
    p = params()

    saga_id = await run_to_end(replica, crucible, p)

    assert (await database.saga(saga_id)).state == SagaState.DONE
    assert await count(database, Disk) == 1
    assert await count(database, Region) == 3
    assert len(await crucible.ensures()) == 3, "each command once, by its deterministic id"
    extent_size, extent_count = disk_create.region_geometry(DISK_BYTES, 512)
    assert before - await free_bytes(database) == 3 * extent_size * extent_count * 512


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

    saga = await database.saga(saga_id)
    assert saga.state == SagaState.STUCK
    assert saga.error is not None
    assert "disk_finalize" in saga.error and "undo of regions_place failed" in saga.error
    async with database.sessions() as session:
        disk = await session.get(Disk, p.disk_id)
    assert disk is not None and disk.state == DiskState.FAULTED
    log = await database.log(saga_id)
    assert [e.node_name for e in log if e.event == SagaLogEvent.UNDO_FAILED] == ["regions_place"]


async def test_no_room_fails_with_a_clear_reason(tmp_path: Path) -> None:
    database = await Database.migrated(f"sqlite+aiosqlite:///{tmp_path / 'small.sqlite3'}")
    await database.add_datasets(2)
    replica = Replica(database, "a", clock=ManualClock())
    saga_id = await replica.executor.start(disk_create.DEFINITION, params())
    saga = await database.saga(saga_id)
    assert saga.state == SagaState.UNDONE
    assert "insufficient capacity" in (saga.error or "")
    await database.close()
