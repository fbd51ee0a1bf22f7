"""Instance and disk-delete sagas on real SQLite, with sled and agents played by the test:
each succeeds; a failure at every node of instance_create unwinds to a clean slate;
every node run twice still succeeds."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import ColumnElement, func, select

from nexus.db.models import Dataset, Disk, Instance
from nexus.db.states import DiskState, InstanceState, SagaState
from nexus.saga.clock import ManualClock
from nexus.saga.faults import Faults
from nexus.sagas import disk_create, disk_delete, instance_create, instance_delete, instance_power
from schemas.instance import (
    InstanceDestroy,
    InstanceEnsure,
    InstanceReboot,
    InstanceStart,
    InstanceStop,
)
from schemas.instance import InstanceState as Wire
from schemas.region import RegionDelete, RegionState
from tests.saga_support import Database, FakeCrucible, FakeSled, Replica, add_sleds


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    db = await Database.migrated(f"sqlite+aiosqlite:///{tmp_path / 'nexus.sqlite3'}")
    await db.add_datasets(3)
    await add_sleds(db, 2)
    yield db
    await db.close()


async def count(database: Database, model: type[Any], *where: ColumnElement[bool]) -> int:
    async with database.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


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
    for state in (Wire.CREATING, Wire.STARTING, Wire.RUNNING):
        await replica.deliver(sled.event(instance_id, state))


async def test_instance_create_attaches_its_disk_and_runs(database: Database) -> None:
    replica = Replica(database, "a", clock=ManualClock())
    sled = FakeSled.new(database)
    disk_id = await ready_disk(replica, database)
    p = create_params([disk_id])

    saga_id = await replica.executor.start(instance_create.DEFINITION, p)
    assert (await database.saga(saga_id)).state == SagaState.WAITING
    (ensure,) = await sled.commands(InstanceEnsure)
    assert ensure.payload.disk_ids == (disk_id,)
    await boot(replica, sled, p.instance_id)

    assert (await database.saga(saga_id)).state == SagaState.DONE
    async with database.sessions() as session:
        instance = await session.get(Instance, p.instance_id)
        disk = await session.get(Disk, disk_id)
    assert instance is not None and instance.state == InstanceState.RUNNING
    assert instance.sled_id is not None
    assert disk is not None and disk.state == DiskState.ATTACHED
    assert disk.attached_instance_id == p.instance_id


@pytest.mark.parametrize("failing_node", instance_create.DEFINITION.node_names)
async def test_instance_create_failure_at_every_node_unwinds_to_a_clean_slate(
    database: Database, failing_node: str
) -> None:
    plain = Replica(database, "a", clock=ManualClock())
    disk_id = await ready_disk(plain, database)
    faulty = Replica(
        database,
        "a",
        clock=ManualClock(),
        faults=Faults(fail_node=lambda saga, node: node == failing_node),
    )
    sled = FakeSled.new(database)
    p = create_params([disk_id])

    saga_id = await faulty.executor.start(instance_create.DEFINITION, p)
    if (await database.saga(saga_id)).state == SagaState.WAITING:
        await boot(faulty, sled, p.instance_id)

    saga = await database.saga(saga_id)
    assert saga.state == SagaState.UNDONE and failing_node in (saga.error or "")
    assert await count(database, Instance) == 0
    async with database.sessions() as session:
        disk = await session.get(Disk, disk_id)
    assert disk is not None and disk.state == DiskState.DETACHED
    assert disk.attached_instance_id is None
    if await sled.commands(InstanceEnsure):
        assert len(await sled.commands(InstanceDestroy)) == 1, "a booted instance is destroyed"


async def test_instance_create_every_node_twice(database: Database) -> None:
    plain = Replica(database, "a", clock=ManualClock())
    disk_id = await ready_disk(plain, database)
    twice = Replica(database, "a", clock=ManualClock(), faults=Faults(repeat_actions=True))
    sled = FakeSled.new(database)
    p = create_params([disk_id])
    saga_id = await twice.executor.start(instance_create.DEFINITION, p)
    await boot(twice, sled, p.instance_id)
    assert (await database.saga(saga_id)).state == SagaState.DONE
    assert len(await sled.commands(InstanceEnsure)) == 1


async def test_a_sled_that_refuses_fails_the_create_at_once(database: Database) -> None:
    from schemas.common import CommandRejected, Rejection

    replica = Replica(database, "a", clock=ManualClock())
    sled = FakeSled.new(database)
    p = create_params([])
    saga_id = await replica.executor.start(instance_create.DEFINITION, p)
    (ensure,) = await sled.commands(InstanceEnsure)
    await replica.deliver(
        CommandRejected(
            source="sled/x",
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


async def test_disk_delete_deletes_its_regions_and_frees_the_space(database: Database) -> None:
    replica = Replica(database, "a", clock=ManualClock())
    crucible = FakeCrucible.new(database)
    async with database.sessions() as session:
        free_before = await session.scalar(select(func.sum(Dataset.free_bytes)))
    disk_id = await ready_disk(replica, database)

    saga_id = await replica.executor.start(
        disk_delete.DEFINITION, disk_delete.Params(disk_id=disk_id)
    )
    deletes = await crucible.deletes()
    assert len(deletes) == 3
    ensures = {e.payload.id: e for e in await crucible.ensures()}
    for delete in deletes:
        await replica.deliver(crucible.event(ensures[delete.payload.id], RegionState.TOMBSTONED))
        assert (await database.saga(saga_id)).state == SagaState.WAITING
    for delete in deletes:
        await replica.deliver(crucible.event(ensures[delete.payload.id], RegionState.DESTROYED))

    assert (await database.saga(saga_id)).state == SagaState.DONE
    async with database.sessions() as session:
        disk = await session.get(Disk, disk_id)
        free_after = await session.scalar(select(func.sum(Dataset.free_bytes)))
    assert disk is not None and disk.state == DiskState.DELETED
    assert free_after == free_before
    assert isinstance(deletes[0], RegionDelete)


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


@pytest.mark.parametrize("failing_node", disk_delete.DEFINITION.node_names)
async def test_disk_delete_failure_at_every_node_leaves_the_disk_visible(
    database: Database, failing_node: str
) -> None:
    """Deletion cannot be undone: a failure before anything was sent leaves the disk as it
    was; after, the disk is faulted for an operator — never looking healthy."""
    plain = Replica(database, "a", clock=ManualClock())
    disk_id = await ready_disk(plain, database)
    faulty = Replica(
        database,
        "a",
        clock=ManualClock(),
        faults=Faults(fail_node=lambda saga, node: node == failing_node),
    )
    crucible = FakeCrucible.new(database)
    saga_id = await faulty.executor.start(
        disk_delete.DEFINITION, disk_delete.Params(disk_id=disk_id)
    )
    ensures = {e.payload.id: e for e in await crucible.ensures()}
    for delete in await crucible.deletes():
        if delete.correlation_id == saga_id:
            await faulty.deliver(crucible.event(ensures[delete.payload.id], RegionState.DESTROYED))

    saga = await database.saga(saga_id)
    assert saga.state == SagaState.UNDONE and failing_node in (saga.error or "")
    async with database.sessions() as session:
        disk = await session.get(Disk, disk_id)
    assert disk is not None
    expected = DiskState.DETACHED if failing_node == "disk_mark_deleting" else DiskState.FAULTED
    assert disk.state == expected


async def test_disk_delete_every_node_twice(database: Database) -> None:
    plain = Replica(database, "a", clock=ManualClock())
    disk_id = await ready_disk(plain, database)
    async with database.sessions() as session:
        free_with_disk = await session.scalar(select(func.sum(Dataset.free_bytes)))
    twice = Replica(database, "a", clock=ManualClock(), faults=Faults(repeat_actions=True))
    crucible = FakeCrucible.new(database)
    saga_id = await twice.executor.start(
        disk_delete.DEFINITION, disk_delete.Params(disk_id=disk_id)
    )
    ensures = {e.payload.id: e for e in await crucible.ensures()}
    deletes = [d for d in await crucible.deletes() if d.correlation_id == saga_id]
    assert len(deletes) == 3
    for delete in deletes:
        await twice.deliver(crucible.event(ensures[delete.payload.id], RegionState.DESTROYED))
    assert (await database.saga(saga_id)).state == SagaState.DONE
    async with database.sessions() as session:
        free_after = await session.scalar(select(func.sum(Dataset.free_bytes)))
    extent_size, extent_count = disk_create.region_geometry(1 << 30, 512)
    assert free_after is not None and free_with_disk is not None
    assert free_after - free_with_disk == 3 * extent_size * extent_count * 512


def fail_at(failing: str) -> Faults:
    return Faults(fail_node=lambda saga, node: node == failing)


POWER_TARGET = {
    "instance_start": (InstanceStart, Wire.RUNNING),
    "instance_stop": (InstanceStop, Wire.STOPPED),
    "instance_reboot": (InstanceReboot, Wire.RUNNING),
}


async def powered_instance(
    replica: Replica, sled: FakeSled, definition: Any
) -> instance_power.Params:
    """A running instance, or a stopped one for a start."""
    p = create_params([])
    await replica.executor.start(instance_create.DEFINITION, p)
    await boot(replica, sled, p.instance_id)
    params = instance_power.Params(instance_id=p.instance_id)
    if definition is instance_power.START:
        await replica.executor.start(instance_power.STOP, params)
        await replica.deliver(sled.event(p.instance_id, Wire.STOPPED))
    return params


@pytest.mark.parametrize(
    "definition", [instance_power.START, instance_power.STOP, instance_power.REBOOT]
)
async def test_power_sagas_fail_at_every_node_and_run_twice(
    database: Database, definition: Any
) -> None:
    replica = Replica(database, "a", clock=ManualClock())
    sled = FakeSled.new(database)
    command, target = POWER_TARGET[definition.name]
    for node in definition.node_names:
        params = await powered_instance(replica, sled, definition)
        faulty = Replica(database, "a", clock=ManualClock(), faults=fail_at(node))
        failed = await faulty.executor.start(definition, params)
        if (await database.saga(failed)).state == SagaState.WAITING:
            await faulty.deliver(sled.event(params.instance_id, target))
        saga = await database.saga(failed)
        assert saga.state == SagaState.UNDONE and node in (saga.error or "")

    params = await powered_instance(replica, sled, definition)
    sent_before = len(await sled.commands(command))
    twice = Replica(database, "a", clock=ManualClock(), faults=Faults(repeat_actions=True))
    saga_id = await twice.executor.start(definition, params)
    await twice.deliver(sled.event(params.instance_id, target))
    assert (await database.saga(saga_id)).state == SagaState.DONE
    assert len(await sled.commands(command)) == sent_before + 1, "the command is sent once"
