"""Snapshots, running snapshots and clones in the crucible agent, as a real process
against a real RabbitMQ: every command sent twice changes nothing, every change is one
event from the outbox, a region with snapshots is not deleted, a clone goes through the
clone pool with its own delay and resumes after a SIGKILL."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable

import pytest

from schemas.base import Envelope
from schemas.common import CommandRejected
from schemas.region import RegionDelete, RegionInfo, RegionRef, RegionState
from schemas.snapshot import (
    RegionSnapshotCreate,
    RegionSnapshotDelete,
    RegionSnapshotGet,
    RegionSnapshotList,
    RegionSnapshotsInfo,
    RunningSnapshotRun,
    RunningSnapshotStop,
    SnapshotRef,
    SnapshotState,
)
from schemas.transport import Transport
from tests.integration.crucible_fixtures import (
    AgentProcess,
    Events,
    crucible_agents,
    events,
    transport,
)
from tests.integration.test_crucible_agent import (
    SOURCE,
    assert_published_once_per_generation,
    delete,
    ensure,
    region_spec,
    send,
)

pytestmark = pytest.mark.integration

__all__ = ["crucible_agents", "events", "transport"]  # fixtures, used by name

REQUESTED, CREATED, TOMBSTONED, DESTROYED = (
    RegionState.REQUESTED,
    RegionState.CREATED,
    RegionState.TOMBSTONED,
    RegionState.DESTROYED,
)
MakeAgent = Callable[..., AgentProcess]


async def ask(transport: Transport, agent: AgentProcess, command: Envelope) -> Envelope:
    return await transport.request(command, routing_key=agent.queue, timeout=15)


async def snapshots_of(
    transport: Transport, agent: AgentProcess, command: Envelope
) -> RegionSnapshotsInfo:
    answer = await ask(transport, agent, command)
    assert isinstance(answer, RegionSnapshotsInfo), answer
    assert answer.causation_id == command.id
    return answer


async def created_region(
    transport: Transport, events: Events, agent: AgentProcess, *flags: str
) -> uuid.UUID:
    spec = region_spec()
    await send(transport, agent, ensure(spec))
    agent.start(*flags)
    await events.reached(agent.agent_id, spec.id, CREATED)
    return spec.id


def snapshot_states(
    events: Events, agent: AgentProcess, region_id: uuid.UUID
) -> list[tuple[str, SnapshotState, int]]:
    seen: list[tuple[str, SnapshotState, int]] = []
    for event in events.snapshot_changes(agent.agent_id, region_id):
        snap = event.payload.snapshot
        if (key := (snap.name, snap.state, snap.generation)) not in seen:
            seen.append(key)
    return seen


async def test_snapshots_are_taken_listed_and_deleted_and_keep_their_region(
    transport: Transport, events: Events, crucible_agents: MakeAgent
) -> None:
    agent = crucible_agents()
    region_id = await created_region(transport, events, agent)
    ref = SnapshotRef(region_id=region_id, name=str(uuid.uuid4()))

    take = RegionSnapshotCreate(source=SOURCE, payload=ref, correlation_id=uuid.uuid4())
    first = await snapshots_of(transport, agent, take)
    again = await snapshots_of(transport, agent, take)
    (taken,) = first.payload.snapshots
    assert (taken.name, taken.state, taken.generation) == (ref.name, SnapshotState.CREATED, 1)
    assert again.payload.snapshots == (taken,), "taken twice, the same snapshot"
    snapshot_dir = agent.region_dir(region_id) / ".zfs" / "snapshot" / ref.name
    assert sorted(path.name for path in snapshot_dir.iterdir()) == [
        "00000.extent",
        "00001.extent",
        "00002.extent",
        "00003.extent",
        "region.json",
        "snapshot.json",
    ]

    listed = await snapshots_of(
        transport, agent, RegionSnapshotList(source=SOURCE, payload=RegionRef(id=region_id))
    )
    got = await snapshots_of(transport, agent, RegionSnapshotGet(source=SOURCE, payload=ref))
    assert listed.payload.snapshots == got.payload.snapshots == (taken,)
    assert listed.payload.region_state is CREATED

    # The region cannot go while it has a snapshot: refused, and left as it was.
    rows, files = agent.regions_rows(), agent.files()
    for _ in range(2):
        refusal = delete(region_id)
        refused = await ask(transport, agent, refusal)
        assert isinstance(refused, CommandRejected), refused
        assert refused.payload.code == "has_snapshots"
        assert refused.payload.message == (
            f"must delete snapshots first: region {region_id} has 1 ({ref.name})"
        )
        assert refused.payload.command_id == refusal.id
    await events.until(lambda: bool(events.rejections(refusal.id)), "the refusal's event")
    assert agent.regions_rows() == rows
    assert agent.files() == files
    assert events.states(agent.agent_id, region_id) == [(REQUESTED, 1), (CREATED, 2)]

    drop = RegionSnapshotDelete(source=SOURCE, payload=ref)
    for _ in range(2):
        gone = await snapshots_of(transport, agent, drop)
        assert gone.payload.snapshots == ()
    assert not snapshot_dir.exists()
    await events.until(lambda: len(snapshot_states(events, agent, region_id)) == 2, "events")
    assert snapshot_states(events, agent, region_id) == [
        (ref.name, SnapshotState.CREATED, 1),
        (ref.name, SnapshotState.DESTROYED, 2),
    ]
    changes = events.snapshot_changes(agent.agent_id, region_id)
    assert len({event.id for event in changes}) == 2, "one event per change"
    assert changes[0].causation_id == take.id
    assert changes[0].correlation_id == take.correlation_id

    # Without snapshots, the region is deleted.
    await send(transport, agent, delete(region_id))
    await events.reached(agent.agent_id, region_id, DESTROYED)
    assert not agent.region_dir(region_id).exists()


async def test_a_running_snapshot_is_started_and_stopped_by_the_worker_on_a_port_of_its_own(
    transport: Transport, events: Events, crucible_agents: MakeAgent
) -> None:
    agent = crucible_agents()
    region_id = await created_region(transport, events, agent)
    ref = SnapshotRef(region_id=region_id, name="snap-1")
    await snapshots_of(transport, agent, RegionSnapshotCreate(source=SOURCE, payload=ref))

    run = RunningSnapshotRun(source=SOURCE, payload=ref)
    for _ in range(2):
        answer = await snapshots_of(transport, agent, run)
        (running,) = answer.payload.running_snapshots
        assert (running.id, running.name, running.port_number) == (region_id, "snap-1", 19001)
    await events.until(
        lambda: (CREATED, 2) in events.running_states(agent.agent_id, region_id), "created"
    )
    service = agent.data_dir / "downstairs" / f"snapshot-{region_id}-snap-1.json"
    assert '"mode": "ro"' in service.read_text()
    assert '"port": 19001' in service.read_text()

    # Its snapshot stays while it runs.
    refused = await ask(transport, agent, RegionSnapshotDelete(source=SOURCE, payload=ref))
    assert isinstance(refused, CommandRejected) and refused.payload.code == "snapshot_in_use"

    stop = RunningSnapshotStop(source=SOURCE, payload=ref)
    for _ in range(2):
        await snapshots_of(transport, agent, stop)
    await events.until(
        lambda: (DESTROYED, 4) in events.running_states(agent.agent_id, region_id), "destroyed"
    )
    assert events.running_states(agent.agent_id, region_id) == [
        (REQUESTED, 1),
        (CREATED, 2),
        (TOMBSTONED, 3),
        (DESTROYED, 4),
    ]
    ids: dict[int, set[uuid.UUID]] = {}
    for event in events.running_changes(agent.agent_id, region_id):
        ids.setdefault(event.payload.running_snapshot.generation, set()).add(event.id)
    assert all(len(each) == 1 for each in ids.values()), ids
    assert not service.exists()
    again = await snapshots_of(transport, agent, run)
    assert [r.state for r in again.payload.running_snapshots] == [DESTROYED], "as it is"
    await snapshots_of(transport, agent, RegionSnapshotDelete(source=SOURCE, payload=ref))


async def test_a_clone_of_a_running_snapshot_is_read_only_and_copied_in_the_clone_pool(
    transport: Transport, events: Events, crucible_agents: MakeAgent
) -> None:
    source_agent, agent = crucible_agents(), crucible_agents()
    region_id = await created_region(transport, events, source_agent)
    ref = SnapshotRef(region_id=region_id, name="snap-1")
    await snapshots_of(transport, source_agent, RegionSnapshotCreate(source=SOURCE, payload=ref))
    answer = await snapshots_of(
        transport, source_agent, RunningSnapshotRun(source=SOURCE, payload=ref)
    )
    address = f"127.0.0.1:{answer.payload.running_snapshots[0].port_number}"

    clone = region_spec().model_copy(update={"source": address})
    plain = region_spec()
    await send(transport, agent, ensure(clone))
    agent.start("--clone-delay=fixed:6")
    for _ in range(2):
        started = await ask(transport, agent, ensure(clone))
        assert isinstance(started, RegionInfo) and started.payload.region is not None
        assert (started.payload.region.read_only, started.payload.region.source) == (True, address)
    await events.reached(agent.agent_id, clone.id, REQUESTED)
    # The worker goes on while the clone is copied: a region ensured after it is made first.
    await send(transport, agent, ensure(plain))
    await events.reached(agent.agent_id, plain.id, CREATED)
    assert events.states(agent.agent_id, clone.id) == [(REQUESTED, 1)]
    # A delete while it is copied is refused, as the real agent's 503, and changes nothing.
    refused = await ask(transport, agent, delete(clone.id))
    assert isinstance(refused, CommandRejected), refused
    assert refused.payload.code == "unavailable"

    await events.reached(agent.agent_id, clone.id, CREATED)
    requested_at, created_at = (
        event.occurred_at
        for event in events.region_changes(agent.agent_id, clone.id)
        if event.payload.region.state in {REQUESTED, CREATED}
    )
    assert (created_at - requested_at).total_seconds() >= 5.9, "the configured clone delay"
    assert events.states(agent.agent_id, clone.id) == [(REQUESTED, 1), (CREATED, 2)]
    assert_published_once_per_generation(events, agent, clone.id)
    manifest = (agent.region_dir(clone.id) / "region.json").read_text()
    assert f'"source": "{address}"' in manifest and '"read_only": true' in manifest
    assert len(list(agent.region_dir(clone.id).glob("*.extent"))) == 4

    # Copied, it is deleted like any region.
    await send(transport, agent, delete(clone.id))
    await events.reached(agent.agent_id, clone.id, DESTROYED)


async def test_a_clone_cut_short_by_sigkill_is_copied_again_at_the_next_start(
    transport: Transport, events: Events, crucible_agents: MakeAgent
) -> None:
    agent = crucible_agents()
    clone = region_spec().model_copy(update={"source": "127.0.0.1:19001"})
    await send(transport, agent, ensure(clone))
    agent.start("--clone-delay=fixed:30")
    await events.reached(agent.agent_id, clone.id, REQUESTED)
    await agent.kill()
    assert not agent.region_dir(clone.id).exists()

    agent.start("--clone-delay=fixed:0.5")
    await events.reached(agent.agent_id, clone.id, CREATED)
    assert events.states(agent.agent_id, clone.id) == [(REQUESTED, 1), (CREATED, 2)]
    assert_published_once_per_generation(events, agent, clone.id)
    assert len(list(agent.region_dir(clone.id).glob("*.extent"))) == 4
    agent.signal(signal.SIGTERM)
    assert await agent.exited(timeout=10) == 0, agent.log_tail()


async def test_snapshot_commands_about_a_region_never_had_or_not_created_are_refused(
    transport: Transport, events: Events, crucible_agents: MakeAgent
) -> None:
    agent = crucible_agents()
    waiting = region_spec()
    await send(transport, agent, ensure(waiting))
    agent.start("--create-delay=fixed:30")
    await events.reached(agent.agent_id, waiting.id, REQUESTED)
    ref = SnapshotRef(region_id=uuid.uuid4(), name="snap-1")
    for command in (
        RegionSnapshotCreate(source=SOURCE, payload=ref),
        RegionSnapshotDelete(source=SOURCE, payload=ref),
        RunningSnapshotRun(source=SOURCE, payload=ref),
        RunningSnapshotStop(source=SOURCE, payload=ref),
    ):
        answer = await ask(transport, agent, command)
        assert isinstance(answer, CommandRejected), answer
        assert answer.payload.code == "not_found"
    listed = await snapshots_of(
        transport, agent, RegionSnapshotList(source=SOURCE, payload=RegionRef(id=ref.region_id))
    )
    assert (listed.payload.region_state, listed.payload.snapshots) == (None, ())

    early = SnapshotRef(region_id=waiting.id, name="snap-1")
    refused = await ask(transport, agent, RegionSnapshotCreate(source=SOURCE, payload=early))
    assert isinstance(refused, CommandRejected), refused
    assert refused.payload.code == "region_not_created"
    not_yet = await ask(transport, agent, RunningSnapshotRun(source=SOURCE, payload=early))
    assert isinstance(not_yet, CommandRejected) and not_yet.payload.code == "not_found"
    assert events.snapshot_changes(agent.agent_id, waiting.id) == []
    # Not created, it has no snapshots: its delete goes ahead (and is destroyed once the
    # one worker is done waiting on its create).
    await send(transport, agent, RegionDelete(source=SOURCE, payload=RegionRef(id=waiting.id)))
    await events.reached(agent.agent_id, waiting.id, TOMBSTONED)
