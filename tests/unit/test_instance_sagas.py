"""Instance and disk-delete sagas beyond the triad every saga gets
(tests/unit/test_saga_triad.py), on SQLite and PostgreSQL with the sled and agents
played by the test: a refusing sled fails the create at once; an instance's life as
VMMs, each start a new one, and late events about an ended VMM changing nothing; a
delete only from stopped or failed; a lost sled's instances failed and the sagas
waiting on them woken; an attached disk is not deleted."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from nexus.db.models import Disk, Instance, Sled, Vmm
from nexus.db.states import DiskState, InstanceState, SagaState, SledState, VmmState
from nexus.liveness import LOST_REASON, expunge_lost_sleds
from nexus.saga.clock import ManualClock
from nexus.sagas import (
    disk_create,
    disk_delete,
    instance_create,
    instance_delete,
    instance_power,
    instance_start,
)
from schemas.identity import sled_source
from schemas.instance import VmmEnsure, VmmReboot, VmmSpec, VmmStop
from schemas.instance import VmmState as Wire
from tests.saga_support import Database, FakeCrucible, FakeSled, Replica, add_sleds, vmm_event


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


async def boot(replica: Replica, sled: FakeSled) -> VmmSpec:
    """The last VMM ensured starts and runs; its spec."""
    ensure = (await sled.commands(VmmEnsure))[-1]  # the sled asked is the one that answers
    for state in (Wire.STARTING, Wire.RUNNING):
        await replica.deliver(sled.event(ensure.payload, state))
    spec: VmmSpec = ensure.payload
    return spec


async def stop(replica: Replica, sled: FakeSled, instance_id: uuid.UUID, spec: VmmSpec) -> None:
    saga = await replica.executor.start(
        instance_power.STOP, instance_power.Params(instance_id=instance_id)
    )
    assert (await sled.commands(VmmStop))[-1].payload.id == spec.id
    await replica.deliver(sled.event(spec, Wire.STOPPING))
    assert (await replica.database.saga(saga)).state == SagaState.WAITING
    await replica.deliver(sled.event(spec, Wire.DESTROYED))
    assert (await replica.database.saga(saga)).state == SagaState.DONE


async def instance_of(database: Database, instance_id: uuid.UUID) -> Instance:
    async with database.sessions() as session:
        instance = await session.get(Instance, instance_id)
        assert instance is not None
        return instance


async def vmm_of(database: Database, vmm_id: uuid.UUID) -> Vmm:
    async with database.sessions() as session:
        vmm = await session.get(Vmm, vmm_id)
        assert vmm is not None
        return vmm


async def test_a_sled_that_refuses_fails_the_create_at_once(database: Database) -> None:
    from schemas.common import CommandRejected, Rejection

    replica = Replica(database, "a", clock=ManualClock())
    sled = FakeSled.new(database)
    p = create_params([])
    saga_id = await replica.executor.start(instance_create.DEFINITION, p)
    (ensure,) = await sled.commands(VmmEnsure)
    await replica.deliver(
        CommandRejected(
            source=sled_source(sled.owners[ensure.payload.id]),
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
    async with database.sessions() as session:
        assert await session.get(Instance, p.instance_id) is None
        assert await session.get(Vmm, ensure.payload.id) is None


async def test_each_start_is_a_new_vmm_and_an_ended_one_changes_nothing(
    database: Database,
) -> None:
    replica = Replica(database, "a", clock=ManualClock())
    sled = FakeSled.new(database)
    disk_id = await ready_disk(replica, database)
    p = create_params([disk_id])
    await replica.executor.start(instance_create.DEFINITION, p)
    first = await boot(replica, sled)
    assert (await instance_of(database, p.instance_id)).active_vmm_id == first.id

    reboot = await replica.executor.start(
        instance_power.REBOOT, instance_power.Params(instance_id=p.instance_id)
    )
    assert (await sled.commands(VmmReboot))[-1].payload.id == first.id
    await replica.deliver(sled.event(first, Wire.REBOOTING))
    await replica.deliver(sled.event(first, Wire.RUNNING))
    assert (await database.saga(reboot)).state == SagaState.DONE

    await stop(replica, sled, p.instance_id, first)
    stopped = await instance_of(database, p.instance_id)
    assert (stopped.state, stopped.active_vmm_id) == (InstanceState.STOPPED, None)
    assert (await vmm_of(database, first.id)).state == VmmState.DESTROYED

    start = await replica.executor.start(
        instance_start.DEFINITION, instance_start.Params(instance_id=p.instance_id)
    )
    second = await boot(replica, sled)
    assert second.id != first.id and second.instance_id == p.instance_id
    assert (await database.saga(start)).state == SagaState.DONE
    running = await instance_of(database, p.instance_id)
    assert (running.state, running.active_vmm_id) == (InstanceState.RUNNING, second.id)

    # Late news of the first run, redelivered or out of order, by its own sled: it has
    # ended, so neither it nor the instance (running as the second VMM) moves.
    owner = sled.owners[first.id]
    for late in (Wire.RUNNING, Wire.FAILED, Wire.STOPPING):
        await replica.deliver(
            vmm_event(first.id, late, 50, sled_id=owner, instance_id=p.instance_id)
        )
    assert (await vmm_of(database, first.id)).state == VmmState.DESTROYED
    after = await instance_of(database, p.instance_id)
    assert (after.state, after.active_vmm_id) == (InstanceState.RUNNING, second.id)


async def test_a_stale_start_of_a_running_instance_changes_nothing(database: Database) -> None:
    """A start saga that runs after another start won (a late, re-sent request) fails
    before any sled hears of it, and leaves the running VMM alone."""
    replica = Replica(database, "a", clock=ManualClock())
    sled = FakeSled.new(database)
    p = create_params([])
    await replica.executor.start(instance_create.DEFINITION, p)
    running = await boot(replica, sled)
    ensures = len(await sled.commands(VmmEnsure))

    late = await replica.executor.start(
        instance_start.DEFINITION, instance_start.Params(instance_id=p.instance_id)
    )
    saga = await database.saga(late)
    assert saga.state == SagaState.UNDONE and "changed before" in (saga.error or "")
    assert len(await sled.commands(VmmEnsure)) == ensures
    assert await sled.commands(VmmStop) == []
    instance = await instance_of(database, p.instance_id)
    assert (instance.state, instance.active_vmm_id) == (InstanceState.RUNNING, running.id)


async def test_delete_is_refused_while_the_instance_has_a_vmm(database: Database) -> None:
    replica = Replica(database, "a", clock=ManualClock())
    sled = FakeSled.new(database)
    disk_id = await ready_disk(replica, database)
    p = create_params([disk_id])
    await replica.executor.start(instance_create.DEFINITION, p)
    spec = await boot(replica, sled)
    params = instance_delete.Params(instance_id=p.instance_id)

    refused = await replica.executor.start(instance_delete.DEFINITION, params)
    saga = await database.saga(refused)
    assert saga.state == SagaState.UNDONE and "stop it first" in (saga.error or "")
    assert (await instance_of(database, p.instance_id)).state == InstanceState.RUNNING

    await stop(replica, sled, p.instance_id, spec)
    commands = len(await database.sent())
    deleted = await replica.executor.start(instance_delete.DEFINITION, params)
    assert (await database.saga(deleted)).state == SagaState.DONE
    assert (await instance_of(database, p.instance_id)).state == InstanceState.DELETED
    assert not [m for _, m in (await database.sent())[commands:] if m.IS_COMMAND]
    async with database.sessions() as session:
        disk = await session.get(Disk, disk_id)
    assert disk is not None and disk.state == DiskState.DETACHED


async def test_a_lost_sled_fails_its_vmms_and_wakes_the_sagas_waiting_on_them(
    database: Database,
) -> None:
    clock = ManualClock()
    replica = Replica(database, "a", clock=clock)
    sled = FakeSled.new(database)
    running = create_params([])
    await replica.executor.start(instance_create.DEFINITION, running)
    booted = await boot(replica, sled)
    booting = create_params([])
    waiting = await replica.executor.start(instance_create.DEFINITION, booting)
    ensure = (await sled.commands(VmmEnsure))[-1]
    assert (await database.saga(waiting)).state == SagaState.WAITING
    lost = {sled.owners[booted.id], sled.owners[ensure.payload.id]}
    await add_sleds(database, 1)  # Nexus hears another sled: a loss, not its own deafness

    async with database.sessions.begin() as session:
        for sled_id in lost:
            row = await session.get(Sled, sled_id)
            assert row is not None
            row.last_heartbeat_at = clock.now() - timedelta(seconds=120)
    woken = await expunge_lost_sleds(
        database.sessions,
        now=clock.now(),
        after=timedelta(seconds=60),
        hearing=timedelta(seconds=10),
    )
    assert [w.saga_id for w in woken] == [waiting]

    failed = await instance_of(database, running.instance_id)
    assert (failed.state, failed.active_vmm_id) == (InstanceState.FAILED, None)
    vmm = await vmm_of(database, booted.id)
    assert (vmm.state, vmm.reason) == (VmmState.FAILED, LOST_REASON)
    async with database.sessions() as session:
        states = {(await session.get(Sled, sled_id)).state for sled_id in lost}  # type: ignore[union-attr]
    assert states == {SledState.EXPUNGED}
    # The woken create fails at once, not at its deadline, and unwinds.
    await replica.executor.run(waiting)
    saga = await database.saga(waiting)
    assert saga.state == SagaState.UNDONE and LOST_REASON in (saga.error or "")


async def test_disk_delete_refuses_an_attached_disk(database: Database) -> None:
    replica = Replica(database, "a", clock=ManualClock())
    sled = FakeSled.new(database)
    disk_id = await ready_disk(replica, database)
    p = create_params([disk_id])
    await replica.executor.start(instance_create.DEFINITION, p)
    await boot(replica, sled)

    saga_id = await replica.executor.start(
        disk_delete.DEFINITION, disk_delete.Params(disk_id=disk_id)
    )
    saga = await database.saga(saga_id)
    assert saga.state == SagaState.UNDONE and "attached" in (saga.error or "")
    async with database.sessions() as session:
        disk = await session.get(Disk, disk_id)
    assert disk is not None and disk.state == DiskState.ATTACHED
