"""The sled agent as a real process against a real RabbitMQ: every state change arrives."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from schemas.base import Envelope
from schemas.common import CommandRejected
from schemas.instance import (
    CrashRequest,
    InstanceCrash,
    InstanceDestroy,
    InstanceEnsure,
    InstanceGet,
    InstanceInfo,
    InstanceReboot,
    InstanceRef,
    InstanceSpec,
    InstanceStart,
    InstanceState,
    InstanceStateChanged,
    InstanceStop,
)
from schemas.sled import SledHeartbeat
from schemas.topology import sled_queue
from sled_agent.hypervisor import RESTART_REASON
from tests.harness.servers import RabbitMQServer
from tests.integration.sled_fixtures import SOURCE, SledFactory, Watcher, sled_agents, watching

pytestmark = pytest.mark.integration
__all__ = ["sled_agents"]

S = InstanceState
FAST = {
    "heartbeat-seconds": "0.2",
    "create-seconds": "0.05",
    "boot-seconds": "0.1",
    "stop-seconds": "0.1",
    "reboot-seconds": "0.1",
}


@pytest.fixture
async def watcher(rabbitmq_url: str) -> AsyncIterator[Watcher]:
    async with watching(rabbitmq_url) as watching_events:
        yield watching_events


def a_spec(**fields: object) -> InstanceSpec:
    values: dict[str, object] = {
        "id": uuid.uuid4(),
        "name": "web-1",
        "ncpus": 2,
        "memory_bytes": 1 << 30,
        **fields,
    }
    return InstanceSpec.model_validate(values)


def ensure(spec: InstanceSpec) -> InstanceEnsure:
    return InstanceEnsure(source=SOURCE, payload=spec)


Action = type[InstanceStart | InstanceStop | InstanceReboot | InstanceDestroy]


def act(kind: Action, instance_id: uuid.UUID) -> Envelope:
    return kind(source=SOURCE, payload=InstanceRef(id=instance_id))


def crash(instance_id: uuid.UUID, reason: str = "injected crash") -> InstanceCrash:
    return InstanceCrash(source=SOURCE, payload=CrashRequest(id=instance_id, reason=reason))


def assert_generations_without_gaps(watcher: Watcher, instance_id: uuid.UUID) -> list[S]:
    changes = watcher.instance_events(instance_id)
    assert [c.generation for c in changes] == list(range(1, len(changes) + 1)), changes
    return [c.state for c in changes]


async def test_lifecycle_publishes_every_state_with_the_next_generation(
    rabbitmq_url: str, watcher: Watcher, sled_agents: SledFactory
) -> None:
    sled = sled_agents(rabbitmq_url, **FAST)
    sled.start()
    await watcher.wait_registered(sled.sled_id)
    spec = a_spec()

    await watcher.send(ensure(spec), sled.sled_id)
    await watcher.wait_for_instance(spec.id, S.RUNNING, 3)
    steps: list[tuple[Action, S, int]] = [
        (InstanceStop, S.STOPPED, 5),
        (InstanceStart, S.RUNNING, 7),
        (InstanceReboot, S.RUNNING, 9),
        (InstanceDestroy, S.DESTROYED, 11),
    ]
    for command, settled, generation in steps:
        await watcher.send(act(command, spec.id), sled.sled_id)
        await watcher.wait_for_instance(spec.id, settled, generation)

    assert assert_generations_without_gaps(watcher, spec.id) == [
        S.CREATING, S.STARTING, S.RUNNING,
        S.STOPPING, S.STOPPED,
        S.STARTING, S.RUNNING,
        S.REBOOTING, S.RUNNING,
        S.STOPPING, S.DESTROYED,
    ]  # fmt: skip

    # Refusals are published with a stable code and change nothing.
    start = act(InstanceStart, spec.id)
    await watcher.send(start, sled.sled_id)
    rejected = await watcher.wait_for(CommandRejected, lambda m: m.causation_id == start.id)
    assert rejected.payload.code == "destroyed"
    conflicting = ensure(spec.model_copy(update={"ncpus": 3}))
    await watcher.send(conflicting, sled.sled_id)
    rejected = await watcher.wait_for(CommandRejected, lambda m: m.causation_id == conflicting.id)
    assert rejected.payload.code == "conflict"
    too_big = ensure(a_spec(ncpus=10_000))
    await watcher.send(too_big, sled.sled_id)
    rejected = await watcher.wait_for(CommandRejected, lambda m: m.causation_id == too_big.id)
    assert rejected.payload.code == "insufficient_capacity"

    # The reconcile query answers with what the agent has.
    reply = await watcher.transport.request(
        InstanceGet(source=SOURCE, payload=InstanceRef(id=spec.id)),
        routing_key=sled_queue(sled.sled_id),
    )
    assert isinstance(reply, InstanceInfo)
    assert reply.payload.instance is not None
    assert (reply.payload.instance.state, reply.payload.instance.generation) == (S.DESTROYED, 11)
    assert len(watcher.instance_events(spec.id)) == 11


async def test_an_injected_crash_reaches_a_consumer_with_the_next_generation(
    rabbitmq_url: str, watcher: Watcher, sled_agents: SledFactory
) -> None:
    sled = sled_agents(rabbitmq_url, **FAST)
    sled.start()
    await watcher.wait_registered(sled.sled_id)
    spec = a_spec()
    await watcher.send(ensure(spec), sled.sled_id)
    await watcher.wait_for_instance(spec.id, S.RUNNING, 3)

    await watcher.send(crash(spec.id, "guest triple fault"), sled.sled_id)
    failed = await watcher.wait_for_instance(spec.id, S.FAILED)
    assert (failed.generation, failed.reason) == (4, "guest triple fault")
    assert_generations_without_gaps(watcher, spec.id)


async def test_random_crashes_reach_a_consumer_with_the_next_generation(
    rabbitmq_url: str, watcher: Watcher, sled_agents: SledFactory
) -> None:
    # About a thousand crashes a second per instance: a running instance dies at once.
    sled = sled_agents(rabbitmq_url, **FAST, **{"crash-rate-per-hour": "3600000", "seed": "7"})
    sled.start()
    await watcher.wait_registered(sled.sled_id)
    spec = a_spec()
    await watcher.send(ensure(spec), sled.sled_id)
    failed = await watcher.wait_for_instance(spec.id, S.FAILED)
    assert (failed.generation, failed.reason) == (4, "crashed at random")
    assert assert_generations_without_gaps(watcher, spec.id) == [
        S.CREATING, S.STARTING, S.RUNNING, S.FAILED
    ]  # fmt: skip


async def test_after_sigkill_a_running_instance_comes_back_failed_and_sigterm_is_clean(
    rabbitmq_url: str, watcher: Watcher, sled_agents: SledFactory
) -> None:
    sled = sled_agents(rabbitmq_url, **FAST)
    sled.start()
    await watcher.wait_registered(sled.sled_id)
    live, stopped = a_spec(), a_spec(start=False)
    await watcher.send(ensure(live), sled.sled_id)
    await watcher.send(ensure(stopped), sled.sled_id)
    await watcher.wait_for_instance(live.id, S.RUNNING, 3)
    await watcher.wait_for_instance(stopped.id, S.STOPPED, 2)

    sled.signal(signal.SIGKILL)
    assert await sled.wait() == -signal.SIGKILL
    sled.start()
    await watcher.wait_registered(sled.sled_id, after=1)
    failed = await watcher.wait_for_instance(live.id, S.FAILED)
    assert (failed.generation, failed.reason) == (4, RESTART_REASON)
    assert_generations_without_gaps(watcher, live.id)
    # A stopped instance lost nothing: no change, and it starts again.
    await watcher.send(act(InstanceStart, stopped.id), sled.sled_id)
    await watcher.wait_for_instance(stopped.id, S.RUNNING, 4)
    assert_generations_without_gaps(watcher, stopped.id)

    began = time.monotonic()
    sled.signal(signal.SIGTERM)
    assert await sled.wait(timeout=5) == 0
    assert time.monotonic() - began < 5
    assert "sled agent failed" not in sled.logs()


async def test_registration_then_heartbeats_with_increasing_sequence(
    rabbitmq_url: str, watcher: Watcher, sled_agents: SledFactory
) -> None:
    sled = sled_agents(rabbitmq_url, **FAST, cpus="8", **{"memory-bytes": str(16 << 30)})
    sled.start()
    registered = await watcher.wait_registered(sled.sled_id)
    assert registered.payload.queue == sled_queue(sled.sled_id)
    assert (registered.payload.cpus, registered.payload.memory_bytes) == (8, 16 << 30)
    await watcher.wait_for(
        SledHeartbeat,
        lambda m: m.payload.sled_id == sled.sled_id and m.payload.sequence >= 3,
    )
    sequences = [beat.payload.sequence for beat in watcher.heartbeats(sled.sled_id)]
    assert sequences == sorted(set(sequences)) and sequences[-1] >= 3


async def test_every_change_survives_a_rabbitmq_outage_in_generation_order(
    restartable_rabbitmq: RabbitMQServer, sled_agents: SledFactory
) -> None:
    broker = restartable_rabbitmq
    # Boots outlast the broker's stop, so their end (and the random crash right after it
    # on the second sled) happens while the broker is down.
    slow_boots = {**FAST, "boot-seconds": "3.0"}
    commanded = sled_agents(broker.url, **slow_boots)
    crashing = sled_agents(broker.url, **slow_boots, **{"crash-rate-per-hour": "3600000"})
    async with watching(broker.url) as watcher:
        for sled in (commanded, crashing):
            sled.start()
            await watcher.wait_registered(sled.sled_id)
        specs = [a_spec() for _ in range(3)]
        unlucky = a_spec()
        for spec in specs:
            await watcher.send(ensure(spec), commanded.sled_id)
        await watcher.send(ensure(unlucky), crashing.sled_id)
        for spec in specs:
            await watcher.wait_for_instance(spec.id, S.RUNNING, 3)
        await watcher.wait_for_instance(unlucky.id, S.FAILED, 4)

        # crash: failed 4; start: starting 5; crash (mid-boot): failed 6; start: starting 7;
        # then running 8 when the boot is over.
        for spec in specs:
            for command in (crash(spec.id), act(InstanceStart, spec.id)) * 2:
                await watcher.send(command, commanded.sled_id)
        # starting 5; then running 6 and a random crash, failed 7.
        await watcher.send(act(InstanceStart, unlucky.id), crashing.sled_id)
        for spec in specs:
            await watcher.wait_for_instance(spec.id, S.STARTING, 7)
        await watcher.wait_for_instance(unlucky.id, S.STARTING, 5)

        outage_began = time.time()
        await asyncio.to_thread(broker.stop)
        await asyncio.to_thread(broker.start)
        outage_ended = time.time()

        during_outage = []
        for spec in specs:
            during_outage.append(await watcher.wait_for_instance(spec.id, S.RUNNING, 8, timeout=30))
            assert assert_generations_without_gaps(watcher, spec.id) == [
                S.CREATING, S.STARTING, S.RUNNING,
                S.FAILED, S.STARTING, S.FAILED, S.STARTING, S.RUNNING,
            ]  # fmt: skip
        failed = await watcher.wait_for_instance(unlucky.id, S.FAILED, 7, timeout=30)
        assert failed.reason == "crashed at random"
        during_outage += [await watcher.wait_for_instance(unlucky.id, S.RUNNING, 6), failed]
        assert assert_generations_without_gaps(watcher, unlucky.id) == [
            S.CREATING, S.STARTING, S.RUNNING, S.FAILED, S.STARTING, S.RUNNING, S.FAILED,
        ]  # fmt: skip
        # The test did what it says: those changes happened while the broker was down.
        happened = [
            message.occurred_at.timestamp()
            for message in watcher.received
            if isinstance(message, InstanceStateChanged)
            and message.payload.instance in during_outage
        ]
        assert len(happened) == len(during_outage) and all(
            outage_began < at < outage_ended for at in happened
        ), (
            outage_began,
            happened,
            outage_ended,
        )
        # Heartbeats resume on the restored connection.
        for sled in (commanded, crashing):
            await watcher.wait_for(SledHeartbeat, beat_of(sled.sled_id, after=outage_ended))


def beat_of(sled_id: uuid.UUID, *, after: float) -> Callable[[SledHeartbeat], bool]:
    def matches(beat: SledHeartbeat) -> bool:
        return beat.payload.sled_id == sled_id and beat.occurred_at.timestamp() > after

    return matches
