"""The crucible agent as a real process against a real RabbitMQ: idempotent commands,
SIGKILL mid-create, delete flows, a broker outage, the reconcile queries, SIGTERM, and
the real agent's rules (one worker, ports, reservations, read-only clones, destroys that
fail)."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Callable

import pytest

from crucible_agent.store import AgentStore
from schemas.common import CommandRejected
from schemas.region import (
    RegionDelete,
    RegionEnsure,
    RegionGet,
    RegionInfo,
    RegionList,
    RegionListed,
    RegionRef,
    RegionSpec,
    RegionState,
)
from schemas.transport import Transport
from tests.harness.servers import RabbitMQServer
from tests.integration.crucible_fixtures import (
    AgentProcess,
    Events,
    crucible_agents,
    events,
    transport,
    watch_events,
)
from tests.unit.test_crucible_service import take_every_port

pytestmark = pytest.mark.integration

__all__ = ["crucible_agents", "events", "transport"]  # fixtures, used by name

SOURCE = "nexus/test"
REQUESTED, CREATED, TOMBSTONED, DESTROYED = (
    RegionState.REQUESTED,
    RegionState.CREATED,
    RegionState.TOMBSTONED,
    RegionState.DESTROYED,
)
MakeAgent = Callable[..., AgentProcess]


def region_spec(extent_count: int = 4) -> RegionSpec:
    return RegionSpec(id=uuid.uuid4(), block_size=512, extent_size=16, extent_count=extent_count)


def ensure(spec: RegionSpec) -> RegionEnsure:
    return RegionEnsure(source=SOURCE, payload=spec, correlation_id=uuid.uuid4())


def delete(region_id: uuid.UUID) -> RegionDelete:
    return RegionDelete(source=SOURCE, payload=RegionRef(id=region_id))


async def send(
    transport: Transport, agent: AgentProcess, *commands: RegionEnsure | RegionDelete
) -> None:
    # The test declares the agent's queue itself, so commands wait there while it starts.
    await transport.declare_command_queue(agent.queue)
    for command in commands:
        await transport.send_command(command, agent.queue)


def assert_published_once_per_generation(
    events: Events, agent: AgentProcess, region_id: uuid.UUID
) -> None:
    """One message id per generation (a redelivery repeats an id, never adds one), no gaps,
    and generations first arrive in order."""
    changes = events.region_changes(agent.agent_id, region_id)
    ids_per_generation: dict[int, set[uuid.UUID]] = {}
    for event in changes:
        ids_per_generation.setdefault(event.payload.region.generation, set()).add(event.id)
    assert all(len(ids) == 1 for ids in ids_per_generation.values()), ids_per_generation
    generations = [generation for _, generation in events.states(agent.agent_id, region_id)]
    assert generations == list(range(1, len(generations) + 1)), generations


async def test_ensuring_twice_leaves_one_region_and_conflicts_change_nothing(
    transport: Transport, events: Events, crucible_agents: MakeAgent
) -> None:
    agent = crucible_agents()
    spec = region_spec()
    first = ensure(spec)
    await send(transport, agent, first, first, ensure(spec))
    agent.start()
    await events.reached(agent.agent_id, spec.id, CREATED)
    # A fourth, as a request: the answer is the existing region.
    again = await transport.request(ensure(spec), routing_key=agent.queue, timeout=15)
    assert isinstance(again, RegionInfo)
    assert again.payload.region is not None
    assert (again.payload.region.state, again.payload.region.generation) == (CREATED, 2)

    assert events.states(agent.agent_id, spec.id) == [(REQUESTED, 1), (CREATED, 2)]
    assert_published_once_per_generation(events, agent, spec.id)
    rows, files = agent.regions_rows(), agent.files()
    assert len(rows) == 1
    assert sorted(files) == [f"{spec.id}/0000{n}.extent" for n in range(4)] + [
        f"{spec.id}/region.json"
    ]
    assert all(size == 16 * 512 for name, size in files.items() if name.endswith(".extent"))

    clash = RegionEnsure(source=SOURCE, payload=spec.model_copy(update={"extent_count": 5}))
    answer = await transport.request(clash, routing_key=agent.queue, timeout=15)
    assert isinstance(answer, CommandRejected)
    assert answer.payload.code == "conflict"
    assert "extent_count" in answer.payload.message
    await events.until(lambda: bool(events.rejections(clash.id)), "the rejection event")
    assert events.rejections(clash.id)[0].payload.code == "conflict"
    assert agent.regions_rows() == rows
    assert agent.files() == files
    assert events.states(agent.agent_id, spec.id) == [(REQUESTED, 1), (CREATED, 2)]


async def test_the_trivial_backend_keeps_the_protocol_and_writes_no_files(
    transport: Transport, events: Events, crucible_agents: MakeAgent
) -> None:
    """The benchmark's ``--backend=trivial``: the same states, generations, events through
    the outbox and replies as with files, and not one file under ``regions/``."""
    agent = crucible_agents()
    spec = region_spec()
    await send(transport, agent, ensure(spec))
    agent.start("--backend=trivial")
    await events.reached(agent.agent_id, spec.id, CREATED)
    answer = await transport.request(
        RegionGet(source=SOURCE, payload=RegionRef(id=spec.id)), routing_key=agent.queue
    )
    assert isinstance(answer, RegionInfo)
    assert answer.payload.region is not None
    assert (answer.payload.region.state, answer.payload.region.generation) == (CREATED, 2)

    await send(transport, agent, delete(spec.id))
    await events.reached(agent.agent_id, spec.id, DESTROYED)
    assert events.states(agent.agent_id, spec.id) == [
        (REQUESTED, 1),
        (CREATED, 2),
        (TOMBSTONED, 3),
        (DESTROYED, 4),
    ]
    assert_published_once_per_generation(events, agent, spec.id)
    assert len(agent.regions_rows()) == 1
    assert agent.files() == {}
    assert not agent.region_dir(spec.id).exists()
    # Every event left through the outbox: nothing is left unsent once they arrived.
    await events.until(lambda: agent.unsent_outbox() == 0, "the outbox drained")


async def test_sigkill_while_requested_then_restart_finishes_the_region(
    transport: Transport, events: Events, crucible_agents: MakeAgent
) -> None:
    agent = crucible_agents()
    spec = region_spec()
    await send(transport, agent, ensure(spec))
    agent.start("--create-delay=fixed:30")
    await events.reached(agent.agent_id, spec.id, REQUESTED)
    await agent.kill()
    assert events.states(agent.agent_id, spec.id) == [(REQUESTED, 1)]

    agent.start("--create-delay=fixed:0.2")
    await events.reached(agent.agent_id, spec.id, CREATED)
    assert events.states(agent.agent_id, spec.id) == [(REQUESTED, 1), (CREATED, 2)]
    assert_published_once_per_generation(events, agent, spec.id)
    assert len(list(agent.region_dir(spec.id).glob("*.extent"))) == 4


async def test_a_crash_while_writing_extents_is_finished_by_the_next_start(
    transport: Transport, events: Events, crucible_agents: MakeAgent
) -> None:
    agent = crucible_agents()
    spec = region_spec(extent_count=8)
    await send(transport, agent, ensure(spec))
    agent.start("--crash-mid-create-fraction=1")
    assert await agent.exited() == -signal.SIGKILL, agent.log_tail()
    written = sorted(path.name for path in agent.region_dir(spec.id).iterdir())
    assert written == [f"0000{n}.extent" for n in range(4)], "killed halfway, before region.json"

    agent.start()
    await events.reached(agent.agent_id, spec.id, CREATED)
    # Whether the first run published ``requested`` before it died or not, it is on the
    # wire now, once, with the same id.
    assert events.states(agent.agent_id, spec.id) == [(REQUESTED, 1), (CREATED, 2)]
    assert_published_once_per_generation(events, agent, spec.id)
    assert len(list(agent.region_dir(spec.id).glob("*.extent"))) == 8
    assert (agent.region_dir(spec.id) / "region.json").exists()


async def test_delete_tombstones_then_destroys_and_repeats_harmlessly(
    transport: Transport, events: Events, crucible_agents: MakeAgent
) -> None:
    agent = crucible_agents()
    done, waiting = region_spec(), region_spec()
    await send(transport, agent, ensure(done))
    agent.start("--create-delay=fixed:1")
    await events.reached(agent.agent_id, done.id, CREATED)

    answer = await transport.request(delete(done.id), routing_key=agent.queue, timeout=15)
    assert isinstance(answer, RegionInfo)
    assert answer.payload.region is not None
    assert (answer.payload.region.state, answer.payload.region.generation) == (TOMBSTONED, 3)
    await events.reached(agent.agent_id, done.id, DESTROYED)
    assert events.states(agent.agent_id, done.id) == [
        (REQUESTED, 1),
        (CREATED, 2),
        (TOMBSTONED, 3),
        (DESTROYED, 4),
    ]
    assert not agent.region_dir(done.id).exists()

    # Deleted while its create still waits: the create ends after the delete and must
    # not bring the region back.
    await send(transport, agent, ensure(waiting), delete(waiting.id))
    await events.reached(agent.agent_id, waiting.id, DESTROYED)

    # Repeats change nothing and answer with the record, which destroyed regions keep.
    for repeat in (delete(done.id), ensure(done)):
        again = await transport.request(repeat, routing_key=agent.queue, timeout=15)
        assert isinstance(again, RegionInfo)
        assert again.payload.region is not None
        assert (again.payload.region.state, again.payload.region.generation) == (DESTROYED, 4)

    await asyncio.sleep(1.2)  # past the create delay of the region deleted while waiting
    assert events.states(agent.agent_id, waiting.id) == [
        (REQUESTED, 1),
        (TOMBSTONED, 2),
        (DESTROYED, 3),
    ]
    assert events.states(agent.agent_id, done.id)[-1] == (DESTROYED, 4)
    for region_id in (done.id, waiting.id):
        assert_published_once_per_generation(events, agent, region_id)
    assert agent.files() == {}


async def test_every_state_change_survives_a_broker_outage_in_order(
    restartable_rabbitmq: RabbitMQServer, crucible_agents: MakeAgent
) -> None:
    specs = [region_spec() for _ in range(5)]
    async with Transport(restartable_rabbitmq.url, name="test-crucible-outage") as connected:
        await connected.declare_topology()
        watched = await watch_events(connected)
        agent = crucible_agents(amqp_url=restartable_rabbitmq.url)
        await send(connected, agent, *(ensure(spec) for spec in specs))
        agent.start("--create-delay=uniform:1.5,3", "--seed=7")
        for spec in specs:
            await watched.reached(agent.agent_id, spec.id, REQUESTED)

        await asyncio.to_thread(restartable_rabbitmq.stop)
        await asyncio.sleep(1.5)  # every create finishes while the broker is down
        await asyncio.to_thread(restartable_rabbitmq.start)

        for spec in specs:
            await watched.reached(agent.agent_id, spec.id, CREATED, timeout=40)
            assert watched.states(agent.agent_id, spec.id) == [(REQUESTED, 1), (CREATED, 2)]
            assert_published_once_per_generation(watched, agent, spec.id)
        assert agent.process is not None and agent.process.poll() is None, agent.log_tail()
        await connected.channel.queue_delete(watched.queue)


async def test_get_and_list_answer_requests_and_sigterm_stops_cleanly(
    transport: Transport, events: Events, crucible_agents: MakeAgent
) -> None:
    agent = crucible_agents()
    spec = region_spec()
    await send(transport, agent, ensure(spec))
    agent.start()
    await events.reached(agent.agent_id, spec.id, CREATED)

    get = RegionGet(source=SOURCE, payload=RegionRef(id=spec.id))
    found = await transport.request(get, routing_key=agent.queue, timeout=15)
    assert isinstance(found, RegionInfo)
    assert found.causation_id == get.id
    assert found.payload.agent_id == agent.agent_id
    assert found.payload.region is not None
    assert found.payload.region.spec() == spec
    assert (found.payload.region.state, found.payload.region.generation) == (CREATED, 2)

    unknown = uuid.uuid4()
    missing = await transport.request(
        RegionGet(source=SOURCE, payload=RegionRef(id=unknown)), routing_key=agent.queue, timeout=15
    )
    assert isinstance(missing, RegionInfo)
    assert (missing.payload.region_id, missing.payload.region) == (unknown, None)

    listed = await transport.request(RegionList(source=SOURCE), routing_key=agent.queue, timeout=15)
    assert isinstance(listed, RegionListed)
    assert [(r.id, r.state) for r in listed.payload.regions] == [(spec.id, CREATED)]

    agent.signal(signal.SIGTERM)
    assert await agent.exited(timeout=10) == 0, agent.log_tail()
    assert '"msg": "stopped"' in agent.log_tail(5)


# How the real agent's worker, ports and failures behave (docs/omicron.md).


def arrivals(events: Events, agent: AgentProcess) -> list[tuple[uuid.UUID, RegionState]]:
    """Each region change the agent published, once, in the order it first arrived."""
    seen: list[tuple[uuid.UUID, RegionState]] = []
    for event in events.region_changes(agent.agent_id):
        change = (event.payload.region.id, event.payload.region.state)
        if change not in seen:
            seen.append(change)
    return seen


async def test_one_worker_creates_one_region_at_a_time_and_takes_a_delete_first(
    transport: Transport, events: Events, crucible_agents: MakeAgent
) -> None:
    agent = crucible_agents()
    doomed = region_spec()
    await send(transport, agent, ensure(doomed))
    agent.start("--create-delay=fixed:1")
    await events.reached(agent.agent_id, doomed.id, CREATED)

    queued = [region_spec() for _ in range(3)]
    await send(transport, agent, *(ensure(spec) for spec in queued))
    for spec in queued:
        await events.reached(agent.agent_id, spec.id, REQUESTED)
    await send(transport, agent, delete(doomed.id))
    for spec in queued:
        await events.reached(agent.agent_id, spec.id, CREATED, timeout=30)

    done = [change for change in arrivals(events, agent) if change[1] in {CREATED, DESTROYED}]
    # The create under way when the delete came finishes first; the delete goes before
    # the creates still queued, which the worker takes in id order, as the real one does.
    # Which create was under way depends on how many of the three ensures were recorded
    # when the idle worker first looked (they arrive one by one): the lowest id only if
    # all three were, so the first one is read from the events.
    under_way = done[1][0]
    assert under_way in {spec.id for spec in queued}
    rest = sorted(spec.id for spec in queued if spec.id != under_way)
    assert done == [
        (doomed.id, CREATED),
        (under_way, CREATED),
        (doomed.id, DESTROYED),
        *((region_id, CREATED) for region_id in rest),
    ]
    # One at a time, each after its own one-second delay.
    created_at = sorted(
        event.occurred_at
        for event in events.region_changes(agent.agent_id)
        if event.payload.region.state is CREATED and event.payload.region.id in set(rest)
    )
    assert (created_at[1] - created_at[0]).total_seconds() >= 0.9


async def test_with_every_port_taken_a_create_is_refused_with_no_record(
    transport: Transport, events: Events, crucible_agents: MakeAgent
) -> None:
    agent = crucible_agents()
    store = await AgentStore.open(agent.data_dir / "agent.sqlite")
    await store.close()
    take_every_port(agent.data_dir / "agent.sqlite")
    await transport.declare_command_queue(agent.queue)
    agent.start()

    command = ensure(region_spec())
    answer = await transport.request(command, routing_key=agent.queue, timeout=15)
    assert isinstance(answer, CommandRejected), answer
    assert (answer.payload.code, answer.payload.message) == (
        "no_free_port",
        "no free port in 19000-19999",
    )
    await events.until(lambda: bool(events.rejections(command.id)), "the rejection event")
    assert len(agent.regions_rows()) == 1000, "no record of the refused region"
    assert not agent.region_dir(command.payload.id).exists()
    assert events.region_changes(agent.agent_id, command.payload.id) == []


async def test_a_region_that_cannot_reserve_fails_from_the_worker_and_keeps_its_port(
    transport: Transport, events: Events, crucible_agents: MakeAgent
) -> None:
    agent = crucible_agents()
    big, small = region_spec(extent_count=4), region_spec(extent_count=1)
    # 32 KiB reserves 40 KiB: more than the agent has.
    await send(transport, agent, ensure(big))
    agent.start("--capacity-bytes=36000")
    await events.reached(agent.agent_id, big.id, RegionState.FAILED)
    (failed,) = [
        e.payload.region
        for e in events.region_changes(agent.agent_id, big.id)
        if e.payload.region.state is RegionState.FAILED
    ]
    assert failed.failure == "cannot reserve 40960 bytes (1.25 x 32768): 36000 of 36000 free"
    assert failed.port_number == 19000
    assert not agent.region_dir(big.id).exists()

    answer = await transport.request(ensure(small), routing_key=agent.queue, timeout=15)
    assert isinstance(answer, RegionInfo) and answer.payload.region is not None
    assert answer.payload.region.port_number == 19001, "19000 is still the failed region's"
    await events.reached(agent.agent_id, small.id, CREATED)


async def test_read_only_is_set_whenever_a_source_is(
    transport: Transport, crucible_agents: MakeAgent
) -> None:
    agent = crucible_agents()
    await transport.declare_command_queue(agent.queue)
    agent.start()
    clone = region_spec().model_copy(update={"source": "[fd00:1122:3344:101::7]:19000"})
    for spec, read_only in ((clone, True), (region_spec(), False)):
        answer = await transport.request(ensure(spec), routing_key=agent.queue, timeout=15)
        assert isinstance(answer, RegionInfo) and answer.payload.region is not None
        assert answer.payload.region.read_only is read_only


async def test_a_failed_destroy_is_recorded_failed_and_a_delete_sent_again_destroys(
    transport: Transport, events: Events, crucible_agents: MakeAgent
) -> None:
    agent = crucible_agents()
    spec = region_spec()
    await send(transport, agent, ensure(spec))
    agent.start("--destroy-fail-fraction=1")
    await events.reached(agent.agent_id, spec.id, CREATED)
    await send(transport, agent, delete(spec.id))
    await events.reached(agent.agent_id, spec.id, RegionState.FAILED)

    (failed,) = [
        e
        for e in events.region_changes(agent.agent_id, spec.id)
        if e.payload.region.state is RegionState.FAILED
    ]
    assert failed.routing_key() == "region.failed"
    assert (failed.payload.region.failure or "").startswith("destroy failed: injected")
    assert failed.payload.region.port_number == 19000
    assert len(list(agent.region_dir(spec.id).glob("*.extent"))) == 4, "the files remain"
    agent.signal(signal.SIGTERM)
    assert await agent.exited(timeout=10) == 0, agent.log_tail()

    agent.start()
    await send(transport, agent, delete(spec.id))
    await events.reached(agent.agent_id, spec.id, DESTROYED)
    assert events.states(agent.agent_id, spec.id) == [
        (REQUESTED, 1),
        (CREATED, 2),
        (TOMBSTONED, 3),
        (RegionState.FAILED, 4),
        (TOMBSTONED, 5),
        (DESTROYED, 6),
    ]
    assert_published_once_per_generation(events, agent, spec.id)
    assert not agent.region_dir(spec.id).exists()
