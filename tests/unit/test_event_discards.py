"""Cheap discards (issue #12 item 6): a duplicate or stale state change from the owner
of its object, at a generation this replica already committed for it, is acked without
a database statement; a newer one is applied; a forged one from anyone else still goes
to the database and is refused ``not_owner``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from nexus.db.models import Region, Vmm
from nexus.events import Recorded
from nexus.saga.clock import ManualClock
from nexus.sagas import disk_create
from schemas.identity import NOT_OWNER
from schemas.instance import VmmState as WireVmmState
from schemas.messages import MessageRejected
from schemas.region import RegionState, RegionStateChanged
from tests.saga_support import Database, FakeCrucible, Replica, placed_vmm, vmm_event


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    db = await Database.migrated(f"sqlite+aiosqlite:///{tmp_path / 'nexus.sqlite3'}")
    yield db
    await db.close()


@contextmanager
def statements(database: Database) -> Iterator[list[str]]:
    """Every SQL statement the engine runs inside the block."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    target = database.engine.sync_engine
    event.listen(target, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(target, "before_cursor_execute", record)


def at_generation(message: RegionStateChanged, generation: int) -> RegionStateChanged:
    region = message.payload.region.model_copy(update={"generation": generation})
    return message.model_copy(
        update={
            "id": uuid.uuid4(),
            "payload": message.payload.model_copy(update={"region": region}),
        }
    )


async def test_duplicate_and_stale_region_events_are_discarded_without_a_statement(
    database: Database,
) -> None:
    await database.add_datasets(3)
    replica = Replica(database, "a", clock=ManualClock())
    crucible = FakeCrucible.new(database)
    await replica.executor.start(
        disk_create.DEFINITION,
        disk_create.Params(
            disk_id=uuid.uuid4(), project="p", name="d", size_bytes=1 << 30, block_size=512
        ),
    )
    ensure, *_ = await crucible.ensures()
    created = crucible.event(ensure, RegionState.CREATED)
    generation = created.payload.region.generation
    await replica.intake.ingest(created)

    with statements(database) as seen:
        duplicate = await replica.intake.ingest(created)
        redelivered = await replica.intake.ingest(at_generation(created, generation))
        stale = await replica.intake.ingest(at_generation(created, generation - 1))
    assert seen == []
    assert duplicate.woken is None and redelivered.woken is None and stale.woken is None
    assert replica.intake.discarded == 3

    newer = at_generation(created, generation + 1)
    with statements(database) as seen:
        await replica.intake.ingest(newer)
    assert seen, "a newer event goes to the database"
    assert replica.intake.discarded == 3
    async with database.sessions() as session:
        region = await session.get(Region, ensure.payload.id)
        assert region is not None and region.generation == generation + 1


async def test_a_stale_event_of_another_state_is_not_discarded(database: Database) -> None:
    """The cache is per wait key: another state's rendezvous row may not hold it yet."""
    replica = Replica(database, "a", clock=ManualClock())
    instance_id = await placed_vmm(database)
    await replica.intake.ingest(vmm_event(instance_id, WireVmmState.RUNNING, 5))

    with statements(database) as seen:
        await replica.intake.ingest(vmm_event(instance_id, WireVmmState.STARTING, 4))
    assert seen
    assert replica.intake.discarded == 0

    with statements(database) as seen:
        await replica.intake.ingest(vmm_event(instance_id, WireVmmState.RUNNING, 5))
        await replica.intake.ingest(vmm_event(instance_id, WireVmmState.RUNNING, 3))
    assert seen == []
    assert replica.intake.discarded == 2
    async with database.sessions() as session:
        generation = await session.scalar(select(Vmm.generation).where(Vmm.id == instance_id))
    assert generation == 5


async def test_a_forged_stale_event_from_a_non_owner_is_still_refused(
    database: Database,
) -> None:
    replica = Replica(database, "a", clock=ManualClock())
    instance_id = await placed_vmm(database)
    await replica.intake.ingest(vmm_event(instance_id, WireVmmState.RUNNING, 5))
    other = uuid.uuid4()

    with statements(database) as seen, pytest.raises(MessageRejected) as refused:
        await replica.intake.ingest(vmm_event(instance_id, WireVmmState.RUNNING, 5, sled_id=other))
    assert refused.value.reason == NOT_OWNER
    assert seen, "the refusal is decided on the database, not on the cache"
    assert replica.intake.discarded == 0
    assert replica.intake.refused == {NOT_OWNER: 1}


async def test_an_event_that_was_not_committed_fills_nothing(database: Database) -> None:
    replica = Replica(database, "a", clock=ManualClock())
    instance_id = await placed_vmm(database)
    forged = vmm_event(instance_id, WireVmmState.RUNNING, 5, sled_id=uuid.uuid4())
    with pytest.raises(MessageRejected):
        await replica.intake.ingest(forged)
    assert len(replica.intake.recorded) == 0
    with statements(database) as seen:
        await replica.intake.ingest(vmm_event(instance_id, WireVmmState.RUNNING, 5))
    assert seen, "nothing was cached from the refused message"


def test_the_cache_is_bounded() -> None:
    recorded = Recorded(capacity=2)
    subjects = [uuid.uuid4() for _ in range(3)]
    for subject in subjects:
        recorded.committed(subject, "created", "crucible/x", 2)
    assert len(recorded) == 2
    assert recorded.generation(subjects[0], "created") is None
    assert recorded.owner(subjects[0]) is None
    assert recorded.generation(subjects[2], "created") == 2
