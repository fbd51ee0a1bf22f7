"""State nobody asked for: a sled that stops beating, an instance that crashes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from nexus.api import instance_view
from nexus.db.models import Instance, Sled
from nexus.db.states import InstanceState, SledState
from nexus.liveness import mark_silent_sleds
from nexus.saga.clock import ManualClock
from schemas.instance import InstanceState as Wire
from schemas.sled import Heartbeat, SledHeartbeat
from tests.saga_support import Database, Replica, add_sleds, instance_event


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    db = await Database.migrated(f"sqlite+aiosqlite:///{tmp_path / 'nexus.sqlite3'}")
    yield db
    await db.close()


async def running_instance(database: Database, sled_id: uuid.UUID, generation: int) -> uuid.UUID:
    instance_id = uuid.uuid4()
    now = ManualClock().now()
    async with database.sessions.begin() as session:
        session.add(
            Instance(
                id=instance_id,
                project="p",
                name=f"vm-{instance_id.hex[:6]}",
                ncpus=1,
                memory_bytes=1 << 30,
                sled_id=sled_id,
                state=InstanceState.RUNNING,
                generation=generation,
                created_at=now,
                updated_at=now,
            )
        )
    return instance_id


async def test_a_silent_sled_is_unreachable_and_its_instances_show_it(
    database: Database,
) -> None:
    clock = ManualClock()
    quiet, beating = await add_sleds(database, 2)
    instance_id = await running_instance(database, quiet.id, 3)
    replica = Replica(database, "a", clock=clock)

    clock.advance(timedelta(seconds=11))
    await replica.deliver(
        SledHeartbeat(
            source=f"sled/{beating.id}",
            payload=Heartbeat(
                sled_id=beating.id,
                sequence=9,
                started_at=clock.now(),
                cpus_used=0,
                memory_used_bytes=0,
                instances_running=0,
            ),
        )
    )
    marked = await mark_silent_sleds(
        database.sessions, now=clock.now(), timeout=timedelta(seconds=10)
    )

    assert marked == 1
    async with database.sessions() as session:
        assert (await session.get(Sled, quiet.id)).state == SledState.UNREACHABLE  # type: ignore[union-attr]
        assert (await session.get(Sled, beating.id)).state == SledState.ACTIVE  # type: ignore[union-attr]
        instance = await session.get(Instance, instance_id)
        assert instance is not None
        view = await instance_view(session, instance)
    assert not view.sled_reachable

    await replica.deliver(
        SledHeartbeat(
            source=f"sled/{quiet.id}",
            payload=Heartbeat(
                sled_id=quiet.id,
                sequence=1,
                started_at=clock.now(),
                cpus_used=1,
                memory_used_bytes=1 << 30,
                instances_running=1,
            ),
        )
    )
    async with database.sessions() as session:
        assert (await session.get(Sled, quiet.id)).state == SledState.ACTIVE  # type: ignore[union-attr]


async def test_an_unrequested_crash_is_applied_by_generation(database: Database) -> None:
    (sled,) = await add_sleds(database, 1)
    instance_id = await running_instance(database, sled.id, 3)
    replica = Replica(database, "a", clock=ManualClock())

    async def state() -> tuple[InstanceState, int]:
        async with database.sessions() as session:
            instance = await session.get(Instance, instance_id)
            assert instance is not None
            return instance.state, instance.generation

    await replica.deliver(instance_event(instance_id, Wire.FAILED, 4, sled_id=sled.id))
    assert await state() == (InstanceState.FAILED, 4)
    # A late event from before the crash changes nothing.
    await replica.deliver(instance_event(instance_id, Wire.RUNNING, 3, sled_id=sled.id))
    assert await state() == (InstanceState.FAILED, 4)
    await replica.deliver(instance_event(instance_id, Wire.STARTING, 5, sled_id=sled.id))
    await replica.deliver(instance_event(instance_id, Wire.RUNNING, 6, sled_id=sled.id))
    assert await state() == (InstanceState.RUNNING, 6)
