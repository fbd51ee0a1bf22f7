"""Instance and disk-delete sagas beyond the triad every saga gets
(tests/unit/test_saga_triad.py), on SQLite and PostgreSQL with the sled and agents
played by the test: a refusing sled fails the create at once; an instance's life from
create to delete, through the waits of each step; an attached disk is not deleted."""

from __future__ import annotations

import uuid

import pytest

from nexus.db.models import Disk, Instance
from nexus.db.states import DiskState, InstanceState, SagaState
from nexus.saga.clock import ManualClock
from nexus.sagas import disk_create, disk_delete, instance_create, instance_delete, instance_power
from schemas.identity import sled_source
from schemas.instance import (
    InstanceDestroy,
    InstanceEnsure,
    InstanceReboot,
    InstanceStart,
    InstanceStop,
)
from schemas.instance import InstanceState as Wire
from tests.saga_support import Database, FakeCrucible, FakeSled, Replica, add_sleds


@pytest.fixture
async def database(database: Database) -> Database:
    """The shared database, on both engines, with three datasets and two sleds."""
    await database.add_datasets(3)
    await add_sleds(database, 2)
    return database


async def ready_disk(replica: Replica, database: Database) -> uuid.UUID:
    crucible = FakeCrucible.new(database)
    disk_id = uuid.uuid4()
    await replica.executor.start(
        disk_create.DEFINITION,
        disk_create.Params(
            disk_id=disk_id,
            project="p",
            name=f"d-{disk_id.hex[:6]}",
            size_bytes=1 << 30,
            block_size=512,
        ),
    )
    already = {e.payload.id for e in await crucible.deletes()}
    for event in await crucible.created_events():
        if event.payload.region.id not in already:
            await replica.deliver(event)
    return disk_id


def create_params(disk_ids: list[uuid.UUID]) -> instance_create.Params:
    return instance_create.Params(
        instance_id=(instance_id := uuid.uuid4()),
        project="p",
        name=f"vm-{instance_id.hex[:8]}",
        ncpus=4,
        memory_bytes=8 << 30,
        disk_ids=disk_ids,
    )


async def boot(replica: Replica, sled: FakeSled, instance_id: uuid.UUID) -> None:
    await sled.commands(InstanceEnsure)  # the sled that was asked is the one that answers
    for state in (Wire.CREATING, Wire.STARTING, Wire.RUNNING):
        await replica.deliver(sled.event(instance_id, state))


async def test_a_sled_that_refuses_fails_the_create_at_once(database: Database) -> None:
    from schemas.common import CommandRejected, Rejection

    replica = Replica(database, "a", clock=ManualClock())
    sled = FakeSled.new(database)
    p = create_params([])
    saga_id = await replica.executor.start(instance_create.DEFINITION, p)
    (ensure,) = await sled.commands(InstanceEnsure)
    await replica.deliver(
        CommandRejected(
            source=sled_source(sled.owners[p.instance_id]),
            payload=Rejection(
                command_id=ensure.id,
                command_type=ensure.TYPE,
                code="insufficient_capacity",
                message="no room",
            ),
        )
    )
    saga = await database.saga(saga_id)
    assert saga.state == SagaState.UNDONE and "no room" in (saga.error or "")


async def test_stop_start_reboot_and_delete(database: Database) -> None:
    replica = Replica(database, "a", clock=ManualClock())
    sled = FakeSled.new(database)
    disk_id = await ready_disk(replica, database)
    p = create_params([disk_id])
    await replica.executor.start(instance_create.DEFINITION, p)
    await boot(replica, sled, p.instance_id)

    async def state() -> InstanceState:
        async with database.sessions() as session:
            instance = await session.get(Instance, p.instance_id)
            assert instance is not None
            return instance.state

    params = instance_power.Params(instance_id=p.instance_id)
    stop = await replica.executor.start(instance_power.STOP, params)
    assert len(await sled.commands(InstanceStop)) == 1
    await replica.deliver(sled.event(p.instance_id, Wire.STOPPING))
    assert (await database.saga(stop)).state == SagaState.WAITING
    await replica.deliver(sled.event(p.instance_id, Wire.STOPPED))
    assert (await database.saga(stop)).state == SagaState.DONE
    assert await state() == InstanceState.STOPPED

    start = await replica.executor.start(instance_power.START, params)
    assert len(await sled.commands(InstanceStart)) == 1
    await replica.deliver(sled.event(p.instance_id, Wire.STARTING))
    await replica.deliver(sled.event(p.instance_id, Wire.RUNNING))
    assert (await database.saga(start)).state == SagaState.DONE

    reboot = await replica.executor.start(instance_power.REBOOT, params)
    assert len(await sled.commands(InstanceReboot)) == 1
    await replica.deliver(sled.event(p.instance_id, Wire.REBOOTING))
    assert (await database.saga(reboot)).state == SagaState.WAITING
    await replica.deliver(sled.event(p.instance_id, Wire.RUNNING))
    assert (await database.saga(reboot)).state == SagaState.DONE
    assert await state() == InstanceState.RUNNING

    delete = await replica.executor.start(
        instance_delete.DEFINITION, instance_delete.Params(instance_id=p.instance_id)
    )
    assert len(await sled.commands(InstanceDestroy)) == 1
    await replica.deliver(sled.event(p.instance_id, Wire.STOPPING))
    await replica.deliver(sled.event(p.instance_id, Wire.DESTROYED))
    assert (await database.saga(delete)).state == SagaState.DONE
    assert await state() == InstanceState.DELETED
    async with database.sessions() as session:
        disk = await session.get(Disk, disk_id)
    assert disk is not None and disk.state == DiskState.DETACHED


async def test_disk_delete_refuses_an_attached_disk(database: Database) -> None:
    replica = Replica(database, "a", clock=ManualClock())
    sled = FakeSled.new(database)
    disk_id = await ready_disk(replica, database)
    p = create_params([disk_id])
    await replica.executor.start(instance_create.DEFINITION, p)
    await boot(replica, sled, p.instance_id)

    saga_id = await replica.executor.start(
        disk_delete.DEFINITION, disk_delete.Params(disk_id=disk_id)
    )
    saga = await database.saga(saga_id)
    assert saga.state == SagaState.UNDONE and "attached" in (saga.error or "")
    async with database.sessions() as session:
        disk = await session.get(Disk, disk_id)
    assert disk is not None and disk.state == DiskState.ATTACHED
