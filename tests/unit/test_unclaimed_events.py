"""Unclaimed events: kept only where a saga could wait for them, and shown grouped by type
and source (what ``nexusctl events unclaimed`` and ``nexusctl doctor`` print)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from nexus.db.models import OutboxMessage, Region, UnclaimedEvent, WaitRendezvous
from nexus.db.states import RegionState
from nexus.sagas import ALL_SAGAS, disk_create, disk_delete
from nexus.unclaimed import summarise
from nexus.waitkeys import (
    AWAITED_REGION_STATES,
    AWAITED_REPAIR_STATES,
    AWAITED_RUNNING_SNAPSHOT_STATES,
    AWAITED_SNAPSHOT_STATES,
    AWAITED_VMM_STATES,
    disk_flush_key,
    is_rejection,
    region_key,
    repair_key,
    running_snapshot_key,
    snapshot_key,
    vmm_key,
)
from schemas.common import CommandRejected, Rejection
from schemas.identity import queue_agent
from schemas.instance import VmmState
from schemas.region import RegionEnsure
from schemas.region import RegionState as WireRegionState
from tests.saga_scenarios import SCENARIOS, disk_params
from tests.saga_support import Agents, Database, placed_vmm, vmm_event
from tests.saga_triad import Scenario, World

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
    starting = vmm_event(await placed_vmm(database), VmmState.STARTING, 3)
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


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
async def test_every_key_a_saga_parks_on_is_one_the_intake_keeps(
    database: Database, scenario: Scenario[Any]
) -> None:
    """The intake keeps events only in the states of nexus/waitkeys.py; a saga waiting
    for another state would wait for an event that is never kept."""
    world = World.for_saga(database, scenario.definition)
    params = await scenario.prepare(world)
    await world.run(scenario.definition, params)

    async with database.sessions() as session:
        parked = list(
            (
                await session.execute(
                    select(WaitRendezvous.wait_key).where(WaitRendezvous.saga_id.is_not(None))
                )
            ).scalars()
        )
    assert parked
    assert [key for key in parked if not kept_by_the_intake(key)] == []


def kept_by_the_intake(key: str) -> bool:
    if is_rejection(key):
        return True
    kind, region, rest = key.split(":", 2)
    name, _, _ = rest.rpartition(":")
    if kind == "region_snapshot":
        return key in {snapshot_key(uuid.UUID(region), name, s) for s in AWAITED_SNAPSHOT_STATES}
    if kind == "running_snapshot":
        return key in {
            running_snapshot_key(uuid.UUID(region), name, s)
            for s in AWAITED_RUNNING_SNAPSHOT_STATES
        }
    if kind == "vmm_flush":
        return key == disk_flush_key(uuid.UUID(region), uuid.UUID(name))
    object_id = uuid.UUID(key.split(":")[1])
    return key in (
        {region_key(object_id, state) for state in AWAITED_REGION_STATES}
        | {vmm_key(object_id, state) for state in AWAITED_VMM_STATES}
        | {repair_key(object_id, state) for state in AWAITED_REPAIR_STATES}
    )


async def test_unclaimed_events_are_grouped_by_type_and_source_newest_first(
    database: Database,
) -> None:
    world = World(database, Agents.new(database), ALL_SAGAS)
    datasets = await database.add_datasets(3)
    # Three disks: each agent holds a region of each.
    for _ in range(3):
        await world.run_to_done(disk_create.DEFINITION, disk_params())
    crucible = world.agents.crucible
    agent = datasets[0].id
    ensures = [e for e in await crucible.ensures() if crucible.owners[e.payload.id] == agent]
    replica = world.replica()
    # Late news about regions whose saga is done: each created once more (an agent that
    # re-created them), from the one agent that holds them (only it is believed).
    for ensure in ensures:
        await replica.deliver(crucible.event(ensure, WireRegionState.CREATED))
        world.clock.advance(timedelta(seconds=1))
    # An instance that crashed with no operation under way (on the sled Nexus put it on).
    crashed = vmm_event(await placed_vmm(database), VmmState.FAILED, 5)
    await replica.deliver(crashed)
    # A refusal of a command whose saga no longer waits, from the agent commanded.
    refused = ensures[0]
    await replica.deliver(
        rejection(refused, "conflict", queue_agent(await queue_of(database, refused)))
    )

    world.clock.advance(RETENTION * 2)
    assert await replica.executor.sweep_unclaimed(RETENTION) == len(ensures) + 2
    summary = await summarise(database.sessions, groups=10, examples=2)

    assert (summary.total, summary.scanned, summary.group_count) == (5, 5, 3)
    by_type = {group.type: group for group in summary.groups}
    assert summary.groups[0].type == "region.created"
    created = by_type["region.created"]
    assert (created.source, created.count) == (f"crucible/{agent}", 3)
    # The two newest of the three, newest first.
    assert [example.wait_key for example in created.examples] == [
        region_key(ensure.payload.id, WireRegionState.CREATED) for ensure in ensures[:0:-1]
    ]
    assert created.examples[0].summary == (f"region {ensures[2].payload.id} created (generation 3)")
    failed = by_type["vmm.failed"]
    assert (failed.source, failed.count) == (f"sled/{crashed.payload.vmm.sled_id}", 1)
    assert failed.examples[0].message_id == crashed.id
    rejected = by_type["command.rejected"]
    queue = await queue_of(database, refused)
    commanded = next(d for d in datasets if d.queue_name == queue)
    assert (rejected.source, rejected.count) == (f"crucible/{commanded.id}", 1)
    assert rejected.examples[0].summary == (
        f"region.ensure.v1 {refused.id} refused (conflict): conflict: region.ensure.v1"
    )

    largest = await summarise(database.sessions, groups=1, examples=0)
    assert [(group.type, group.count, group.examples) for group in largest.groups] == [
        ("region.created", 3, ())
    ]
    assert largest.group_count == 3


def rejection(command: RegionEnsure, code: str, source: str | None) -> CommandRejected:
    assert source is not None
    return CommandRejected(
        source=source,
        payload=Rejection(
            command_id=command.id,
            command_type=command.TYPE,
            code=code,
            message=f"{code}: {command.TYPE}",
        ),
    )


async def queue_of(database: Database, command: RegionEnsure) -> str:
    """Where Nexus sent ``command``: its outbox row's routing key."""
    async with database.sessions() as session:
        queue = await session.scalar(
            select(OutboxMessage.routing_key).where(OutboxMessage.message_id == command.id)
        )
    assert queue is not None
    return queue
