"""The event intake: a message it has no handler for changes nothing; a state change
implausibly far ahead of Nexus's record is refused and counted, and changes nothing; a
message is believed only from the agent that owns its object, by Nexus's records (the
real processes' side of this is tests/integration/test_authority.py)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from nexus.db.models import (
    Dataset,
    Instance,
    Region,
    Saga,
    SagaLogEntry,
    Sled,
    Vmm,
    WaitRendezvous,
)
from nexus.db.states import InstanceState, SagaState, VmmState
from nexus.events import EventIngest
from nexus.saga.clock import ManualClock
from nexus.sagas import disk_create
from nexus.settings import MAX_GENERATION_LEAD, NexusSettings
from schemas.base import Envelope
from schemas.common import CommandRejected, Rejection
from schemas.identity import NOT_OWNER, crucible_source, sled_source
from schemas.instance import VmmChange
from schemas.instance import VmmState as WireVmmState
from schemas.messages import MessageRejected
from schemas.region import (
    RegionChange,
    RegionDelete,
    RegionEnsure,
    RegionRef,
    RegionState,
    RegionStateChanged,
)
from schemas.sled import (
    AgentAnnounced,
    CrucibleAgentInfo,
    Heartbeat,
    SledHeartbeat,
    SledInfo,
    SledRegistered,
)
from schemas.topology import crucible_queue, sled_queue
from tests.examples import a_region
from tests.saga_support import (
    Database,
    FakeCrucible,
    Replica,
    placed_vmm,
    vmm_event,
)


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


async def test_a_vmm_event_at_most_the_lead_ahead_is_applied(database: Database) -> None:
    vmm_id = await placed_vmm(database, state=VmmState.RUNNING, generation=3)
    replica = Replica(database, "a", clock=ManualClock())

    with pytest.raises(MessageRejected, match="implausible_generation"):
        await replica.deliver(
            vmm_event(vmm_id, WireVmmState.DESTROYED, 3 + MAX_GENERATION_LEAD + 1)
        )
    await replica.deliver(vmm_event(vmm_id, WireVmmState.DESTROYED, 3 + MAX_GENERATION_LEAD))
    async with database.sessions() as session:
        vmm = await session.get(Vmm, vmm_id)
        assert vmm is not None
        assert (vmm.state, vmm.generation) == (VmmState.DESTROYED, 3 + MAX_GENERATION_LEAD)
        instance = await session.get(Instance, vmm.instance_id)
        assert instance is not None
        assert (instance.state, instance.active_vmm_id) == (InstanceState.STOPPED, None)


async def test_the_lead_is_a_setting(database: Database) -> None:
    vmm_id = await placed_vmm(database, state=VmmState.RUNNING, generation=1)
    intake = EventIngest(database.sessions, ManualClock().now, max_generation_lead=5)
    with pytest.raises(MessageRejected, match="implausible_generation"):
        await intake.ingest(vmm_event(vmm_id, WireVmmState.DESTROYED, 7))
    await intake.ingest(vmm_event(vmm_id, WireVmmState.DESTROYED, 6))
    assert NexusSettings(max_generation_lead=5).max_generation_lead == 5
    assert NexusSettings().max_generation_lead == MAX_GENERATION_LEAD == 1000


# Authority: a message is believed only about what its sender owns, by Nexus's records.


async def placed_disk(database: Database, replica: Replica) -> tuple[FakeCrucible, RegionEnsure]:
    """A disk_create waiting on its three regions; one ensure, and who was sent what."""
    await database.add_datasets(3)
    crucible = FakeCrucible.new(database)
    await replica.executor.start(
        disk_create.DEFINITION,
        disk_create.Params(
            disk_id=uuid.uuid4(), project="p", name="d", size_bytes=1 << 30, block_size=512
        ),
    )
    ensure, *_ = await crucible.ensures()
    return crucible, ensure


async def books(database: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every table an event may write, row by row."""
    tables = (Region, Instance, Sled, Dataset, WaitRendezvous, Saga, SagaLogEntry)
    async with database.sessions() as session:
        return {
            model.__tablename__: sorted(
                (tuple(row) for row in await session.execute(select(model.__table__))), key=str
            )
            for model in tables
        }


async def refused(replica: Replica, message: Envelope) -> str:
    with pytest.raises(MessageRejected) as raised:
        await replica.deliver(message)
    return raised.value.reason


async def test_a_region_event_from_an_agent_that_does_not_own_the_region_changes_nothing(
    database: Database,
) -> None:
    replica = Replica(database, "a", clock=ManualClock())
    crucible, ensure = await placed_disk(database, replica)
    owner = crucible.owners[ensure.payload.id]
    other = next(agent for agent in crucible.owners.values() if agent != owner)
    before = await books(database)

    def naming(event: RegionStateChanged, agent: uuid.UUID) -> RegionStateChanged:
        return event.model_copy(
            update={"payload": RegionChange(agent_id=agent, region=event.payload.region)}
        )

    forged = [
        # Another agent speaking as itself, and naming the owner in its payload.
        crucible.event(ensure, RegionState.CREATED, agent_id=other),
        naming(crucible.event(ensure, RegionState.FAILED, agent_id=other), owner),
        # The owner naming another agent in its payload.
        naming(crucible.event(ensure, RegionState.CREATED), other),
    ]
    for message in forged:
        assert await refused(replica, message) == NOT_OWNER

    assert await books(database) == before
    assert replica.intake.refused == {NOT_OWNER: 3}
    woken = await replica.deliver(crucible.event(ensure, RegionState.CREATED))
    assert woken.woken is not None, "the owner's event wakes the saga"


async def test_a_rejection_is_believed_only_from_the_agent_the_command_went_to(
    database: Database,
) -> None:
    replica = Replica(database, "a", clock=ManualClock())
    crucible, ensure = await placed_disk(database, replica)
    owner = crucible.owners[ensure.payload.id]
    other = next(agent for agent in crucible.owners.values() if agent != owner)
    before = await books(database)

    def rejection(agent: uuid.UUID) -> CommandRejected:
        return CommandRejected(
            source=crucible_source(agent),
            payload=Rejection(
                command_id=ensure.id, command_type=ensure.TYPE, code="conflict", message="no"
            ),
        )

    assert await refused(replica, rejection(other)) == NOT_OWNER
    assert await books(database) == before
    woken = await replica.deliver(rejection(owner))
    assert woken.woken is not None


async def test_events_about_objects_nexus_has_no_record_of_change_no_record_and_are_kept(
    database: Database,
) -> None:
    """Nothing of Nexus's to change, and no saga can wait on them: kept like any event no
    saga claims, for an operator to see (an agent holding a region Nexus never asked for)."""
    replica = Replica(database, "a", clock=ManualClock())
    before = await books(database)
    agent = uuid.uuid4()
    stray: list[Envelope] = [
        RegionStateChanged(
            source=crucible_source(agent), payload=RegionChange(agent_id=agent, region=a_region())
        ),
        vmm_event(uuid.uuid4(), WireVmmState.RUNNING, 2),
        CommandRejected(
            source=crucible_source(agent),
            payload=Rejection(
                command_id=uuid.uuid4(), command_type="region.get.v1", code="x", message="x"
            ),
        ),
    ]
    for message in stray:
        assert (await replica.deliver(message)).woken is None

    after = await books(database)
    assert {name for name in after if after[name] != before[name]} == {"wait_rendezvous"}
    assert len(after["wait_rendezvous"]) == len(stray)
    assert not replica.intake.refused and not replica.intake.unowned


async def test_a_vmm_event_is_believed_only_from_the_sled_nexus_placed_it_on(
    database: Database,
) -> None:
    replica = Replica(database, "a", clock=ManualClock())
    instance_id = await placed_vmm(database)
    other = uuid.uuid4()
    before = await books(database)

    assert (
        await refused(replica, vmm_event(instance_id, WireVmmState.FAILED, 9, sled_id=other))
        == NOT_OWNER
    )
    # The right sender naming another sled in its payload.
    named = vmm_event(instance_id, WireVmmState.FAILED, 9)
    named = named.model_copy(
        update={"payload": VmmChange(vmm=named.payload.vmm.model_copy(update={"sled_id": other}))}
    )
    assert await refused(replica, named) == NOT_OWNER
    assert await books(database) == before

    await replica.deliver(vmm_event(instance_id, WireVmmState.FAILED, 9))
    async with database.sessions() as session:
        vmm = await session.get(Vmm, instance_id)
        assert vmm is not None and (vmm.state, vmm.generation) == ("failed", 9)
        instance = await session.get(Instance, vmm.instance_id)
    assert instance is not None and instance.state == "failed"


async def test_an_agent_announces_only_itself_and_is_commanded_on_its_own_queue(
    database: Database,
) -> None:
    replica = Replica(database, "a", clock=ManualClock())
    agent, sled, impostor = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    announced = AgentAnnounced(
        source=crucible_source(agent),
        payload=CrucibleAgentInfo(
            agent_id=agent,
            sled_id=uuid.uuid4(),
            queue=crucible_queue(impostor),
            capacity_bytes=1 << 40,
            free_bytes=1 << 40,
            regions=0,
        ),
    )
    registered = SledRegistered(
        source=sled_source(sled),
        payload=SledInfo(
            sled_id=sled, hostname="h", cpus=8, memory_bytes=1 << 34, queue=sled_queue(impostor)
        ),
    )
    heartbeat = SledHeartbeat(
        source=sled_source(sled),
        payload=Heartbeat(
            sled_id=sled,
            sequence=1,
            started_at=ManualClock().now(),
            cpus_used=0,
            memory_used_bytes=0,
            instances_running=0,
        ),
    )
    before = await books(database)
    for message in (announced, registered, heartbeat):
        speaking_for_another = message.model_copy(
            update={
                "source": crucible_source(impostor)
                if message is announced
                else sled_source(impostor)
            }
        )
        assert await refused(replica, speaking_for_another) == NOT_OWNER
    assert await books(database) == before

    for message in (announced, registered, heartbeat):
        await replica.deliver(message)
    async with database.sessions() as session:
        dataset = await session.get(Dataset, agent)
        sled_row = await session.get(Sled, sled)
    assert dataset is not None and dataset.queue_name == crucible_queue(agent)
    assert sled_row is not None and sled_row.queue_name == sled_queue(sled)
