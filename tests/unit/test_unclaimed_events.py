"""Unclaimed events: kept only where a saga could wait for them."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from nexus.db.models import Region, UnclaimedEvent, WaitRendezvous
from nexus.db.states import RegionState
from nexus.sagas import ALL_SAGAS, disk_create, disk_delete
from nexus.waitkeys import NeverAwaited, instance_key, region_key
from schemas.instance import InstanceState
from schemas.region import RegionState as WireRegionState
from tests.saga_scenarios import disk_params
from tests.saga_support import Agents, Database, instance_event
from tests.saga_triad import World

RETENTION = timedelta(hours=1)


async def test_a_region_delete_leaves_no_event_nobody_will_claim(database: Database) -> None:
    """Every region delete sends ``tombstoned`` before ``destroyed``, and no saga waits
    for ``tombstoned``: the region's record follows it, and nothing is kept for a saga."""
    world = World(database, Agents.new(database), ALL_SAGAS)
    await database.add_datasets(3)
    p = disk_params()
    await world.run_to_done(disk_create.DEFINITION, p)
    await world.run_to_done(disk_delete.DEFINITION, disk_delete.Params(disk_id=p.disk_id))

    world.clock.advance(RETENTION * 2)
    moved = await world.replica().executor.sweep_unclaimed(RETENTION)

    assert moved == 0
    async with database.sessions() as session:
        kept = await session.scalar(select(func.count()).select_from(UnclaimedEvent))
        regions = list((await session.execute(select(Region.state))).scalars())
    assert kept == 0
    assert regions == [RegionState.DESTROYED] * disk_create.REPLICAS


async def test_an_event_no_saga_waits_for_updates_its_object_and_keeps_nothing(
    database: Database,
) -> None:
    world = World(database, Agents.new(database), ALL_SAGAS)
    await database.add_datasets(3)
    p = disk_params()
    await world.run_to_done(disk_create.DEFINITION, p)
    ensure = (await world.agents.crucible.ensures())[0]
    tombstoned = world.agents.crucible.event(ensure, WireRegionState.TOMBSTONED)
    starting = instance_event(uuid.uuid4(), InstanceState.STARTING, 3)
    async with database.sessions() as session:
        keys_before = set((await session.execute(select(WaitRendezvous.wait_key))).scalars())

    replica = world.replica()
    assert (await replica.deliver(tombstoned)).woken is None
    assert (await replica.deliver(starting)).woken is None

    async with database.sessions() as session:
        region = await session.get(Region, ensure.payload.id)
        keys_after = set((await session.execute(select(WaitRendezvous.wait_key))).scalars())
    assert region is not None
    assert (region.state, region.generation) == (
        RegionState.TOMBSTONED,
        tombstoned.payload.region.generation,
    )
    assert keys_after == keys_before


def test_no_saga_can_wait_for_a_state_the_intake_does_not_keep() -> None:
    with pytest.raises(NeverAwaited, match="tombstoned"):
        region_key(uuid.uuid4(), WireRegionState.TOMBSTONED)
    with pytest.raises(NeverAwaited, match="requested"):
        region_key(uuid.uuid4(), WireRegionState.REQUESTED)
    with pytest.raises(NeverAwaited, match="starting"):
        instance_key(uuid.uuid4(), InstanceState.STARTING)
