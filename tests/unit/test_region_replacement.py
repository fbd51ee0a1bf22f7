"""Region replacement: the saga on a detached disk (Nexus's repair) through the triad, as
the attached one is in test_saga_triad.py; requests filed by an expunge with their sagas
in its transaction; a disk being created when its dataset is lost; the retry of a
request whose saga unwound; and the doctor's rules about lost regions."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import cast

import pytest
from sqlalchemy import select, update

from nexus.db.models import Dataset, Disk, Region, RegionReplacement, Saga, Sled
from nexus.db.states import (
    DatasetState,
    DiskState,
    RegionState,
    ReplacementState,
    SagaState,
    SledState,
)
from nexus.doctor import DiskRecord, Records, RegionRecord, region_findings
from nexus.liveness import expunge_lost_sleds, expunge_sled
from nexus.replacement_ids import saga_id_for
from nexus.replacements import Replacements, file_request, in_flight_for, retry_delay
from nexus.sagas import ALL_SAGAS, disk_create, disk_create_from_snapshot, region_replacement
from schemas.region import RegionDelete, RegionEnsure
from schemas.region import RegionState as WireRegionState
from schemas.transport import Transport
from tests import saga_triad
from tests.saga_scenarios import (
    REGION_REPLACEMENT_DETACHED,
    disk_params,
    from_snapshot_prepare,
    new_disk,
    replacement_prepare_detached,
    running_instance,
)
from tests.saga_support import Agents, Database, Replica, add_sleds
from tests.saga_triad import World
from tests.unit.test_disk_create_saga import AgentThatNeverHeard

NODES = region_replacement.DEFINITION.node_names


async def test_a_detached_disk_is_repaired_by_nexus(database: Database) -> None:
    await saga_triad.succeeds(database, REGION_REPLACEMENT_DETACHED)


@pytest.mark.parametrize("node", NODES)
async def test_a_detached_disk_failure_unwinds_to_a_clean_slate(
    database: Database, node: str
) -> None:
    await saga_triad.failure_can_unwind(database, REGION_REPLACEMENT_DETACHED, node)


async def test_a_detached_disk_every_node_run_twice(database: Database) -> None:
    await saga_triad.actions_succeed_idempotently(database, REGION_REPLACEMENT_DETACHED)


@pytest.mark.parametrize("node", NODES)
async def test_a_detached_disk_failure_with_every_undo_run_twice(
    database: Database, node: str
) -> None:
    await saga_triad.failure_can_unwind_idempotently(database, REGION_REPLACEMENT_DETACHED, node)


async def _lost_sled(world: World, disk_id: uuid.UUID) -> uuid.UUID:
    async with world.database.sessions() as session:
        sled_id = await session.scalar(
            select(Dataset.sled_id)
            .join(Region, Region.dataset_id == Dataset.id)
            .where(Region.disk_id == disk_id)
            .order_by(Region.id)
            .limit(1)
        )
    assert sled_id is not None
    return sled_id


async def test_an_expunge_files_a_request_and_its_saga_in_one_transaction(
    database: Database,
) -> None:
    """Every region of the lost sled gets a request, and its saga is created with it;
    run, the sagas replace them all; expunging again files nothing."""
    world = World.for_saga(database, region_replacement.DEFINITION)
    await database.add_datasets(4)
    disks = [await new_disk(world) for _ in range(2)]
    sled_id = await _lost_sled(world, disks[0])
    replica = world.replica()
    replacements = Replacements(replica.executor)
    async with database.sessions.begin() as session:
        expunged = await expunge_sled(session, sled_id, world.clock.now(), replacements)
    # Four datasets on four sleds, two disks of three regions: the lost sled held one or two.
    assert expunged.lost.requested == len(expunged.lost.sagas) >= 1
    for row in expunged.lost.sagas:
        await replica.executor.run(row.id, row)
    await world.agents.answer(replica)
    async with database.sessions() as session:
        requests = (await session.execute(select(RegionReplacement))).scalars().all()
        sagas = {s.id: s.state for s in (await session.execute(select(Saga))).scalars()}
    assert len(requests) == expunged.lost.requested
    for request in requests:
        assert request.state == ReplacementState.COMPLETE
        assert sagas[saga_id_for(request.id, 1)] == SagaState.DONE
        assert [phase[0] for phase in request.history] == [
            "requested",
            "allocating",
            "running",
            "replacement_done",
            "completing",
            "complete",
        ]
    async with database.sessions.begin() as session:
        again = await expunge_sled(session, sled_id, world.clock.now(), replacements)
    assert (again.changed, again.lost.requested) == (False, 0)


async def test_an_attached_disk_drives_through_every_phase(database: Database) -> None:
    """A disk of a running instance: the live repair's phase (driving) is recorded, and
    its progress shows on the request."""
    world = World.for_saga(database, region_replacement.DEFINITION)
    instance_id = await running_instance(world)
    await database.add_datasets(1)
    async with database.sessions() as session:
        disk_id = await session.scalar(
            select(Disk.id).where(Disk.attached_instance_id == instance_id)
        )
    assert disk_id is not None
    replica = world.replica()
    async with database.sessions.begin() as session:
        expunged = await expunge_sled(
            session,
            await _lost_sled(world, disk_id),
            world.clock.now(),
            Replacements(replica.executor),
        )
    (row,) = expunged.lost.sagas
    await replica.executor.run(row.id, row)
    await world.agents.answer(replica)
    async with database.sessions() as session:
        (request,) = (await session.execute(select(RegionReplacement))).scalars().all()
    assert (request.state, request.repair_mode, request.repair_progress) == (
        ReplacementState.COMPLETE,
        "live",
        100,
    )
    assert "driving" in [phase[0] for phase in request.history]
    assert world.agents.repairs


async def test_a_disk_being_created_when_its_dataset_is_lost_unwinds(database: Database) -> None:
    """The create's wait on the lost region ends at once (failed is filed for it), and its
    unwind asks no lost agent: the disk is gone, no request is filed for it."""
    world = World.for_saga(database, disk_create.DEFINITION)
    await database.add_datasets(4)
    replica = world.replica()
    p = disk_params()
    saga_id = await replica.executor.start(disk_create.DEFINITION, p)
    async with database.sessions() as session:
        sled_id = await session.scalar(
            select(Dataset.sled_id)
            .join(Region, Region.dataset_id == Dataset.id)
            .where(Region.disk_id == p.disk_id)
            .limit(1)
        )
    assert sled_id is not None
    async with database.sessions.begin() as session:
        expunged = await expunge_sled(
            session, sled_id, world.clock.now(), Replacements(replica.executor)
        )
    assert expunged.lost.requested == 0 and len(expunged.lost.woken) == 1
    await replica.executor.run(expunged.lost.woken[0].saga_id)
    await world.agents.answer(replica)
    saga = await database.saga(saga_id)
    assert saga.state == SagaState.UNDONE, saga.error
    async with database.sessions() as session:
        assert await session.get(Disk, p.disk_id) is None
        assert not (await session.execute(select(RegionReplacement))).scalars().all()


@pytest.mark.parametrize("confirmed", [True, False], ids=["created", "never-confirmed"])
async def test_a_create_unwinding_towards_a_lost_agent_ends_when_its_sled_is_expunged(
    database: Database, confirmed: bool
) -> None:
    """Found by the chaos test (seed 1501): a create unwound (another region out of space)
    while one region was created on an agent that died before it took the delete. The
    unwind waited for that region's ``destroyed``, which no one would send, and its
    reconcile asked the dead agent for ever, even after its sled was expunged. The
    expunge files ``destroyed`` for it (the agent is gone, as Omicron counts it), and the
    unwind ends. Also when the agent died before it confirmed the region: the expunge
    files ``failed`` for it, which the unwind must not take for a failed destroy to send
    again to the lost agent."""
    world = World.for_saga(database, disk_create.DEFINITION)
    await database.add_datasets(4)
    replica = world.replica()
    p = disk_params()
    saga_id = await replica.executor.start(disk_create.DEFINITION, p)
    ensures = sorted(await world.agents.crucible.ensures(), key=lambda c: c.payload.id)
    lost_region, failing = ensures[0], ensures[1]
    # Every region is created but one, which fails (out of space): the create unwinds.
    for command in ensures:
        world.agents.taken.add(command.id)
        if command is failing or (command is lost_region and not confirmed):
            continue
        world.agents.regions[command.payload.id] = (command, WireRegionState.CREATED)
        await replica.deliver(world.agents.crucible.event(command, WireRegionState.CREATED))
    await replica.deliver(world.agents.crucible.event(failing, WireRegionState.FAILED))
    # The agents answer the deletes, but the lost region's agent has died.
    for delete in await world.agents.crucible.deletes():
        world.agents.taken.add(delete.id)
        if delete.payload.id != lost_region.payload.id:
            await replica.deliver(world.agents.crucible.deleted(ensure_of(ensures, delete)))
    saga = await database.saga(saga_id)
    assert saga.state == SagaState.WAITING, "the unwind waits for the dead agent's region"

    async with database.sessions() as session:
        sled_id = await session.scalar(
            select(Dataset.sled_id)
            .join(Region, Region.dataset_id == Dataset.id)
            .where(Region.id == lost_region.payload.id)
        )
    assert sled_id is not None
    async with database.sessions.begin() as session:
        expunged = await expunge_sled(
            session, sled_id, world.clock.now(), Replacements(replica.executor)
        )
    assert [w.saga_id for w in expunged.lost.woken] == [saga_id]
    await replica.executor.run(saga_id)
    saga = await database.saga(saga_id)
    assert saga.state == SagaState.UNDONE, saga.error
    async with database.sessions() as session:
        assert await session.get(Disk, p.disk_id) is None
        assert not (await session.execute(select(RegionReplacement))).scalars().all()


def ensure_of(ensures: list[RegionEnsure], delete: RegionDelete) -> RegionEnsure:
    """The ensure of the region a delete names."""
    return next(c for c in ensures if c.payload.id == delete.payload.id)


async def test_a_request_whose_saga_unwound_is_tried_again_after_its_backoff(
    database: Database,
) -> None:
    """No dataset to place on: the saga unwinds and the request is requested again, with
    why; the retry waits its backoff, then a second saga (attempt 2) runs and succeeds
    once a dataset is there."""
    world = World.for_saga(database, region_replacement.DEFINITION)
    await database.add_datasets(3)
    disk_id = await new_disk(world)
    replica = world.replica()
    replacements = Replacements(replica.executor)
    async with database.sessions.begin() as session:
        expunged = await expunge_sled(
            session, await _lost_sled(world, disk_id), world.clock.now(), replacements
        )
    (row,) = expunged.lost.sagas
    await replica.executor.run(row.id, row)
    async with database.sessions() as session:
        (request,) = (await session.execute(select(RegionReplacement))).scalars().all()
    assert request.state == ReplacementState.REQUESTED
    assert request.last_failure is not None and "insufficient capacity" in request.last_failure
    assert await replacements.retry(database.sessions, world.clock.now()) == 0
    await database.add_datasets(1)
    world.clock.advance(retry_delay(1) + timedelta(seconds=1))
    assert await replacements.retry(database.sessions, world.clock.now()) == 1
    await replica.executor.drain()
    await world.agents.answer(replica)
    async with database.sessions() as session:
        (request,) = (await session.execute(select(RegionReplacement))).scalars().all()
        second = await session.get(Saga, saga_id_for(request.id, 2))
    assert (request.state, request.attempts) == (ReplacementState.COMPLETE, 2)
    assert second is not None and second.state == SagaState.DONE


def test_the_doctor_flags_a_lost_region_without_a_request_and_not_one_in_flight() -> None:
    disk = DiskRecord(uuid.uuid4(), "d", DiskState.DETACHED)
    datasets = [uuid.uuid4() for _ in range(4)]
    sled_of = {dataset: uuid.uuid4() for dataset in datasets}

    def region(dataset: uuid.UUID, state: RegionState = RegionState.CREATED) -> RegionRecord:
        return RegionRecord(uuid.uuid4(), disk.id, dataset, state, 2, 512, 1, 1)

    three = [region(d) for d in datasets[:3]]
    lost = {datasets[0]}

    def kinds(regions: list[RegionRecord], in_flight: set[uuid.UUID]) -> set[str]:
        records = Records(
            disks={disk.id: disk},
            regions=regions,
            sled_of_dataset=sled_of,
            expunged_datasets=lost,
            replacing=in_flight,
        )
        return {f.kind for f in region_findings(records, {})}

    assert kinds(three, set()) == {"region_lost_unreplaced"}
    assert kinds(three, {disk.id}) == set()
    # A replacement in flight: four regions, one new, are fine.
    assert kinds([*three, region(datasets[3], RegionState.REQUESTED)], {disk.id}) == set()
    # Complete: the old one destroyed, three live regions on three live sleds.
    done = [region(datasets[0], RegionState.DESTROYED), *three[1:], region(datasets[3])]
    assert kinds(done, set()) == set()
    assert kinds(three[1:], set()) == {"disk_region_count"}


async def test_a_disk_with_a_replacement_in_flight_cannot_be_deleted_until_it_completes(
    database: Database,
) -> None:
    """The API refuses it (checked here on the rule it uses)."""
    world = World.for_saga(database, region_replacement.DEFINITION)
    await database.add_datasets(4)
    disk_id = await new_disk(world)
    replica = world.replica()
    async with database.sessions.begin() as session:
        expunged = await expunge_sled(
            session,
            await _lost_sled(world, disk_id),
            world.clock.now(),
            Replacements(replica.executor),
        )
    async with database.sessions() as session:
        assert await in_flight_for(session, disk_id) is not None
    (row,) = expunged.lost.sagas
    await replica.executor.run(row.id, row)
    await world.agents.answer(replica)
    async with database.sessions() as session:
        assert await in_flight_for(session, disk_id) is None


async def test_a_sled_lost_by_silence_has_its_regions_replaced_too(database: Database) -> None:
    """The sweeper's threshold (``expunge_lost_sleds``) files the requests and runs their
    sagas as an operator's expunge does."""
    world = World.for_saga(database, region_replacement.DEFINITION)
    await database.add_datasets(4)
    disk_id = await new_disk(world)
    lost = await _lost_sled(world, disk_id)
    (heard,) = await add_sleds(database, 1)
    async with database.sessions.begin() as session:
        session.add(
            Sled(
                id=lost,
                hostname="lost",
                queue_name=f"sled.{lost}",
                cpus=1,
                memory_bytes=1 << 30,
                state=SledState.ACTIVE,
                last_heartbeat_at=world.clock.now() - timedelta(minutes=5),
                generation=1,
            )
        )
    replica = world.replica()
    await expunge_lost_sleds(
        database.sessions,
        now=world.clock.now(),
        after=timedelta(seconds=60),
        hearing=timedelta(seconds=10),
        replacements=Replacements(replica.executor),
    )
    await replica.executor.drain()
    await world.agents.answer(replica)
    async with database.sessions() as session:
        (request,) = (await session.execute(select(RegionReplacement))).scalars().all()
    assert request.state == ReplacementState.COMPLETE
    assert heard.id != lost


async def test_a_new_region_lost_before_it_is_created_sends_its_replacement_elsewhere(
    database: Database,
) -> None:
    """A second sled is lost while the first replacement waits for its new region there:
    that wait ends at once (failed), the saga unwinds, and its retry places on a live sled."""
    world = World.for_saga(database, region_replacement.DEFINITION)
    await database.add_datasets(5)
    disk_id = await new_disk(world)
    replica = world.replica()
    replacements = Replacements(replica.executor)
    async with database.sessions.begin() as session:
        first = await expunge_sled(
            session, await _lost_sled(world, disk_id), world.clock.now(), replacements
        )
    (row,) = first.lost.sagas
    await replica.executor.run(row.id, row)  # parks on the new region's ensure, unanswered
    async with database.sessions() as session:
        (request,) = (await session.execute(select(RegionReplacement))).scalars().all()
        assert request.new_dataset_id is not None
        new_sled = (await session.get(Dataset, request.new_dataset_id)).sled_id  # type: ignore[union-attr]
    async with database.sessions.begin() as session:
        second = await expunge_sled(session, new_sled, world.clock.now(), replacements)
    assert (second.lost.requested, len(second.lost.woken)) == (0, 1)
    sent_before = len(await database.sent())
    await replica.executor.run(second.lost.woken[0].saga_id)
    # The unwind asks the lost agent nothing: its region is gone with its dataset.
    assert len(await database.sent()) == sent_before
    async with database.sessions() as session:
        (request,) = (await session.execute(select(RegionReplacement))).scalars().all()
    assert request.state == ReplacementState.REQUESTED and request.last_failure
    world.clock.advance(retry_delay(1) + timedelta(seconds=1))
    assert await replacements.retry(database.sessions, world.clock.now()) == 1
    await replica.executor.drain()
    await world.agents.answer(replica)
    async with database.sessions() as session:
        (request,) = (await session.execute(select(RegionReplacement))).scalars().all()
        dataset = await session.get(Dataset, request.new_dataset_id)
    assert request.state == ReplacementState.COMPLETE and request.attempts == 2
    assert dataset is not None and dataset.state == DatasetState.ACTIVE


async def test_a_lost_clone_is_replaced_by_a_clone_of_a_surviving_one(
    database: Database,
) -> None:
    """A disk made from a snapshot has three writable regions and three clones, each
    group on sleds of its own. A lost clone's replacement is a clone (read-only, copied
    from a surviving clone of the disk), placed apart from the other clones only; before,
    it was a writable region, or none when the disk's six regions spanned every sled
    (found by the chaos test, seed 1504)."""
    world = World(database, Agents.new(database), ALL_SAGAS)
    p = await from_snapshot_prepare(world)
    await world.run_to_done(disk_create_from_snapshot.DEFINITION, p)
    async with database.sessions.begin() as session:
        clones = list(
            (
                await session.execute(
                    select(Region)
                    .where(Region.disk_id == p.disk_id, Region.read_only.is_(True))
                    .order_by(Region.id)
                )
            ).scalars()
        )
        lost = clones[0]
        await session.execute(
            update(Dataset).where(Dataset.id == lost.dataset_id).values(state=DatasetState.EXPUNGED)
        )
        request_id = await file_request(session, lost, world.clock.now())
    assert request_id is not None
    await world.run_to_done(
        region_replacement.DEFINITION,
        region_replacement.Params(request_id=request_id, disk_id=p.disk_id, old_region_id=lost.id),
    )
    async with database.sessions() as session:
        request = await session.get(RegionReplacement, request_id)
        assert request is not None and request.state is ReplacementState.COMPLETE
        new = await session.get(Region, request.new_region_id)
        assert new is not None
        sled_of = dict((await session.execute(select(Dataset.id, Dataset.sled_id))).all())
        hostname = dict((await session.execute(select(Sled.id, Sled.hostname))).all())
        survivors = clones[1:]
    assert new.read_only and new.state is RegionState.CREATED
    addresses = {
        f"{hostname.get(sled_of[c.dataset_id]) or c.dataset_id}:{c.port_number}" for c in survivors
    }
    assert new.source in addresses
    assert sled_of[new.dataset_id] not in {sled_of[c.dataset_id] for c in survivors}
    ensure = next(e for e in await world.agents.crucible.ensures() if e.payload.id == new.id)
    assert ensure.payload.source == new.source


async def test_a_new_region_the_agent_never_got_is_sent_again_at_the_deadline(
    database: Database,
) -> None:
    """The replacement's ensure parks on the agent's event; at its deadline the agent
    is asked once (the same reconcile as disk_create's) and, having no such region,
    gets the same ensure again under a new id; its events then finish the request."""
    world = World.for_saga(database, region_replacement.DEFINITION)
    p = await replacement_prepare_detached(world)
    agent = AgentThatNeverHeard()
    replica = Replica(
        database,
        "deadline",
        clock=world.clock,
        definitions=world.definitions,
        transport=cast(Transport, agent),
    )
    saga_id = await replica.executor.start(region_replacement.DEFINITION, p)
    first = [e for e in await world.agents.crucible.ensures() if e.payload.id != p.old_region_id]
    async with database.sessions() as session:
        request = await session.get(RegionReplacement, p.request_id)
        assert request is not None and request.new_region_id is not None
        new_id = request.new_region_id
    sent = [e for e in first if e.payload.id == new_id]
    assert len(sent) == 1
    assert (await database.saga(saga_id)).state == SagaState.WAITING

    world.clock.advance(timedelta(seconds=p.region_deadline_seconds + 1))
    await replica.executor.sweep()

    assert agent.asked == 1
    again = [e for e in await world.agents.crucible.ensures() if e.payload.id == new_id]
    assert len(again) == 2, "the ensure sent again"
    assert again[1].payload == again[0].payload and again[1].id != again[0].id
    await world.agents.answer(replica)
    assert (await database.saga(saga_id)).state == SagaState.DONE
