"""The event intake: a message it has no handler for changes nothing; a state change
implausibly far ahead of Nexus's record is refused and counted, and changes nothing."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nexus.db.models import Instance, Region
from nexus.db.states import InstanceState, SagaState
from nexus.events import EventIngest
from nexus.saga.clock import ManualClock
from nexus.sagas import disk_create
from nexus.settings import MAX_GENERATION_LEAD, NexusSettings
from schemas.instance import InstanceState as WireInstanceState
from schemas.messages import MessageRejected
from schemas.region import RegionDelete, RegionRef, RegionState
from tests.saga_support import Database, FakeCrucible, Replica, instance_event


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    db = await Database.migrated(f"sqlite+aiosqlite:///{tmp_path / 'nexus.sqlite3'}")
    yield db
    await db.close()


def disk_params() -> disk_create.Params:
    return disk_create.Params(
        disk_id=uuid.uuid4(), project="demo", name="data", size_bytes=3 << 30, block_size=512
    )


async def test_a_message_with_no_handler_is_logged_and_ignored(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    stray = RegionDelete(source="nexus/test", payload=RegionRef(id=uuid.uuid4()))

    with caplog.at_level(logging.WARNING, logger="nexus.events"):
        ingested = await Replica(database, "a", clock=ManualClock()).deliver(stray)

    assert ingested.woken is None
    assert [record.getMessage() for record in caplog.records] == [
        f"nexus.events got a {RegionDelete.TYPE}; ignored"
    ]


# Generations implausibly far ahead (issue #12 item 2).


async def region_generation(database: Database, region_id: uuid.UUID) -> int:
    async with database.sessions() as session:
        region = await session.get(Region, region_id)
        assert region is not None
        return region.generation


async def test_a_region_event_far_ahead_of_the_record_is_refused_and_one_ahead_applied(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    await database.add_datasets(3)
    replica = Replica(database, "a", clock=ManualClock())
    crucible = FakeCrucible.new(database)
    saga_id = await replica.executor.start(disk_create.DEFINITION, disk_params())
    ensure = (await crucible.ensures())[0]
    region_id = ensure.payload.id
    recorded = await region_generation(database, region_id)
    created = crucible.event(ensure, RegionState.CREATED)
    region = created.payload.region

    for lead in (MAX_GENERATION_LEAD + 1, 5_000):
        forged = created.model_copy(
            update={
                "id": uuid.uuid4(),
                "payload": created.payload.model_copy(
                    update={"region": region.model_copy(update={"generation": recorded + lead})}
                ),
            }
        )
        with (
            caplog.at_level(logging.WARNING, logger="nexus.events"),
            pytest.raises(MessageRejected) as refused,
        ):
            await replica.deliver(forged)
        assert refused.value.reason == "implausible_generation"
        assert f"{lead} ahead" in refused.value.detail
    assert replica.intake.refused["implausible_generation"] == 2
    assert [r.__dict__["refused_so_far"] for r in caplog.records] == [1, 2]
    assert await region_generation(database, region_id) == recorded
    assert (await database.saga(saga_id)).state is SagaState.WAITING

    plausible = created.payload.model_copy(
        update={"region": region.model_copy(update={"generation": recorded + 1})}
    )
    await replica.deliver(created.model_copy(update={"payload": plausible}))
    assert await region_generation(database, region_id) == recorded + 1


async def test_an_instance_event_at_most_the_lead_ahead_is_applied(database: Database) -> None:
    instance_id = uuid.uuid4()
    async with database.sessions.begin() as session:
        session.add(
            Instance(
                id=instance_id,
                project="p",
                name="vm",
                ncpus=1,
                memory_bytes=1 << 30,
                state=InstanceState.RUNNING,
                generation=3,
            )
        )
    replica = Replica(database, "a", clock=ManualClock())

    with pytest.raises(MessageRejected, match="implausible_generation"):
        await replica.deliver(
            instance_event(instance_id, WireInstanceState.STOPPED, 3 + MAX_GENERATION_LEAD + 1)
        )
    await replica.deliver(
        instance_event(instance_id, WireInstanceState.STOPPED, 3 + MAX_GENERATION_LEAD)
    )
    async with database.sessions() as session:
        instance = await session.get(Instance, instance_id)
        assert instance is not None
        assert (instance.state, instance.generation) == (
            InstanceState.STOPPED,
            3 + MAX_GENERATION_LEAD,
        )


async def test_the_lead_is_a_setting(database: Database) -> None:
    instance_id = uuid.uuid4()
    async with database.sessions.begin() as session:
        session.add(
            Instance(
                id=instance_id,
                project="p",
                name="vm",
                ncpus=1,
                memory_bytes=1 << 30,
                state=InstanceState.RUNNING,
                generation=1,
            )
        )
    intake = EventIngest(database.sessions, ManualClock().now, max_generation_lead=5)
    with pytest.raises(MessageRejected, match="implausible_generation"):
        await intake.ingest(instance_event(instance_id, WireInstanceState.STOPPED, 7))
    await intake.ingest(instance_event(instance_id, WireInstanceState.STOPPED, 6))
    assert NexusSettings(max_generation_lead=5).max_generation_lead == 5
    assert NexusSettings().max_generation_lead == MAX_GENERATION_LEAD == 1000
