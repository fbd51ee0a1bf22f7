"""State nobody asked for: a sled that stops beating or is lost, a VMM that crashes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from nexus.api import instance_view
from nexus.db.models import Instance, Sled, Vmm
from nexus.db.states import InstanceState, SledState, VmmState
from nexus.liveness import LOST_REASON, expunge_lost_sleds, mark_silent_sleds
from nexus.saga.clock import ManualClock
from schemas.instance import VmmState as Wire
from schemas.sled import Heartbeat, SledHeartbeat
from tests.saga_support import Database, Replica, add_sleds, placed_vmm, sled_of, vmm_event

AFTER = timedelta(seconds=60)


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    db = await Database.migrated(f"sqlite+aiosqlite:///{tmp_path / 'nexus.sqlite3'}")
    yield db
    await db.close()


def heartbeat(sled_id: uuid.UUID, clock: ManualClock) -> SledHeartbeat:
    return SledHeartbeat(
        source=f"sled/{sled_id}",
        payload=Heartbeat(
            sled_id=sled_id,
            sequence=1,
            started_at=clock.now(),
            cpus_used=0,
            memory_used_bytes=0,
            instances_running=0,
        ),
    )


async def rows(database: Database, vmm_id: uuid.UUID) -> tuple[Vmm, Instance, Sled]:
    async with database.sessions() as session:
        vmm = await session.get(Vmm, vmm_id)
        assert vmm is not None
        instance = await session.get(Instance, vmm.instance_id)
        sled = await session.get(Sled, vmm.sled_id)
        assert instance is not None and sled is not None
        return vmm, instance, sled


async def test_a_silent_sled_is_unreachable_and_its_instances_show_it(
    database: Database,
) -> None:
    clock = ManualClock()
    quiet = await placed_vmm(database, state=VmmState.RUNNING, generation=2)
    beating = await placed_vmm(database, state=VmmState.RUNNING, generation=2)
    replica = Replica(database, "a", clock=clock)

    clock.advance(timedelta(seconds=11))
    await replica.deliver(heartbeat(sled_of(beating), clock))
    marked = await mark_silent_sleds(
        database.sessions, now=clock.now(), timeout=timedelta(seconds=10)
    )

    assert marked == 1
    vmm, instance, sled = await rows(database, quiet)
    assert sled.state == SledState.UNREACHABLE
    assert (await rows(database, beating))[2].state == SledState.ACTIVE
    # Unreachable is not lost: its VMMs are left alone.
    assert (vmm.state, instance.state) == (VmmState.RUNNING, InstanceState.RUNNING)
    async with database.sessions() as session:
        view = await instance_view(session, instance)
    assert not view.sled_reachable and view.vmm_id == quiet

    await replica.deliver(heartbeat(sled_of(quiet), clock))
    assert (await rows(database, quiet))[2].state == SledState.ACTIVE


async def test_a_lost_sled_fails_its_instances_within_its_threshold_and_stays_lost(
    database: Database,
) -> None:
    clock = ManualClock()
    lost = await placed_vmm(database, state=VmmState.RUNNING, generation=2)
    (beating,) = await add_sleds(database, 1)
    replica = Replica(database, "a", clock=clock)

    async def expunge() -> None:
        await replica.deliver(heartbeat(beating.id, clock))
        await expunge_lost_sleds(
            database.sessions, now=clock.now(), after=AFTER, hearing=timedelta(seconds=10)
        )

    clock.advance(timedelta(seconds=59))
    await expunge()
    assert (await rows(database, lost))[1].state == InstanceState.RUNNING
    clock.advance(timedelta(seconds=2))
    await expunge()

    vmm, instance, sled = await rows(database, lost)
    assert (vmm.state, vmm.generation, vmm.reason) == (VmmState.FAILED, 3, LOST_REASON)
    assert (instance.state, instance.active_vmm_id) == (InstanceState.FAILED, None)
    assert sled.state == SledState.EXPUNGED

    # It comes back: it stays expunged, and what it says of the VMM changes nothing.
    await replica.deliver(heartbeat(sled_of(lost), clock))
    await replica.deliver(vmm_event(lost, Wire.RUNNING, 9))
    vmm, instance, sled = await rows(database, lost)
    assert (sled.state, vmm.state, instance.state) == (
        SledState.EXPUNGED,
        VmmState.FAILED,
        InstanceState.FAILED,
    )


async def test_no_sled_is_expunged_while_nexus_hears_none(database: Database) -> None:
    """Every sled silent at once (the broker down, say) is Nexus's deafness, not a rack
    lost: nothing is expunged."""
    clock = ManualClock()
    vmms = [await placed_vmm(database, state=VmmState.RUNNING, generation=2) for _ in range(2)]
    clock.advance(timedelta(seconds=600))
    woken = await expunge_lost_sleds(
        database.sessions, now=clock.now(), after=AFTER, hearing=timedelta(seconds=10)
    )
    assert woken == []
    for vmm_id in vmms:
        vmm, instance, sled = await rows(database, vmm_id)
        assert (sled.state, vmm.state, instance.state) == (
            SledState.ACTIVE,
            VmmState.RUNNING,
            InstanceState.RUNNING,
        )


async def test_an_unrequested_crash_is_applied_by_generation_and_ends_the_vmm(
    database: Database,
) -> None:
    vmm_id = await placed_vmm(database, state=VmmState.RUNNING, generation=3)
    replica = Replica(database, "a", clock=ManualClock())

    async def state() -> tuple[VmmState, int, InstanceState]:
        vmm, instance, _ = await rows(database, vmm_id)
        return vmm.state, vmm.generation, instance.state

    # A late event from before the crash changes nothing.
    await replica.deliver(vmm_event(vmm_id, Wire.RUNNING, 3))
    assert await state() == (VmmState.RUNNING, 3, InstanceState.RUNNING)
    await replica.deliver(vmm_event(vmm_id, Wire.FAILED, 4))
    assert await state() == (VmmState.FAILED, 4, InstanceState.FAILED)
    # An ended VMM never runs again: newer news of it changes nothing either.
    await replica.deliver(vmm_event(vmm_id, Wire.STARTING, 5))
    await replica.deliver(vmm_event(vmm_id, Wire.RUNNING, 6))
    assert await state() == (VmmState.FAILED, 4, InstanceState.FAILED)
