"""A dependency that goes away and comes back: nothing is dead-lettered, no loop dies,
and the health check says so while it lasts.

- Real processes (a Nexus replica, three crucible agents) on a private PostgreSQL that
  the test stops at once (``pg_ctl stop -m immediate``) for longer than the retry
  backoff's cap while region notifications are in flight, then starts again.
- Each service in process, its loops watched through its ``Tasks``: Nexus against that
  PostgreSQL, each agent with its state database failing under its relay (SQLite's
  "disk I/O error", raised in place of the store's read), and a loop cancelled outright.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from crucible_agent import app as crucible_app
from crucible_agent.settings import CrucibleSettings
from nexus.app import NexusApp
from nexus.db.engine import create_engine, create_sessionmaker
from nexus.db.migrate import upgrade_async
from nexus.db.models import Dataset, OutboxMessage
from nexus.saga.outbox import Outbox
from nexus.settings import NexusSettings
from schemas.base import Envelope
from schemas.instance import VmmEnsure, VmmSpec, VmmStateChanged
from schemas.outbox import OutgoingMessage
from schemas.region import RegionStateChanged
from schemas.sled import AgentAnnounced
from schemas.topology import COMMANDS_EXCHANGE, DEAD_LETTER_QUEUE, EVENTS_EXCHANGE, sled_queue
from schemas.transport import Delivery, Transport
from sled_agent import app as sled_app
from sled_agent.settings import SledSettings
from tests.examples import example
from tests.harness.servers import PrivatePostgresCluster
from tests.processes import BIN, ApiClient, crucible, nexus

pytestmark = pytest.mark.integration

# Longer than the cap of the retry backoff (5 s): a handler retried in place sees the
# longest wait at least once.
OUTAGE_SECONDS = 9.0
# From the database's return to every saga done: the backoff's cap, a sweep, the rest
# of the regions' creation (at most 6 s), with room for two shared cores.
RECOVERY_SECONDS = 30.0


class Seen:
    """Every message on the events exchange that a test binds, in arrival order."""

    def __init__(self) -> None:
        self.messages: list[Envelope] = []
        self.arrived = asyncio.Event()

    async def on(self, delivery: Delivery) -> None:
        self.messages.append(delivery.message)
        self.arrived.set()

    def of(self, kind: type[Envelope]) -> list[Any]:
        return [message for message in self.messages if isinstance(message, kind)]


async def until(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(0.1)


async def health_command(service: str, health_file: Path, max_age: float) -> tuple[int, str]:
    """``<service> health``, the container health check, as a container runtime runs it."""
    process = await asyncio.create_subprocess_exec(
        str(BIN / service),
        "health",
        "--max-age",
        str(max_age),
        "--health-file",
        str(health_file),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output = (await process.communicate())[0].decode()
    assert process.returncode is not None
    return process.returncode, output


async def queue_depth(amqp_url: str, queue: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


async def plant_command(database_url: str, message: Envelope, queue: str) -> None:
    """An outbox row as a replica that died right after its commit leaves it: not among
    the rows the running replica wrote, so its relay sends it once the row is older
    than the outbox's grace (3 s), on its next pass."""
    engine = create_engine(database_url)
    try:
        async with create_sessionmaker(engine).begin() as session:
            outbox = Outbox(lambda: datetime.now(UTC))
            await outbox.add_rows(
                session, [outbox.row(message, exchange=COMMANDS_EXCHANGE, routing_key=queue)]
            )
    finally:
        await engine.dispose()


async def nexus_outbox(database_url: str) -> tuple[int, int]:
    """(rows, rows not yet sent) of Nexus's outbox."""
    engine = create_engine(database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            total = await session.scalar(select(func.count()).select_from(OutboxMessage))
            unsent = await session.scalar(
                select(func.count())
                .select_from(OutboxMessage)
                .where(OutboxMessage.sent_at.is_(None))
            )
    finally:
        await engine.dispose()
    return int(total or 0), int(unsent or 0)


async def datasets(database_url: str) -> int:
    engine = create_engine(database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            return int(await session.scalar(select(func.count()).select_from(Dataset)) or 0)
    finally:
        await engine.dispose()


async def test_disk_creates_survive_a_postgresql_outage_and_nothing_is_dead_lettered(
    restartable_postgres: PrivatePostgresCluster, vhost_url: str, tmp_path: Path
) -> None:
    """PostgreSQL stopped (immediate) for 9 s while the regions of six disk creates are
    being made: every region notification of the outage waits unacked on its consumer,
    which retries it in place, and is applied once the database is back; nothing
    reaches ``control.dead-letters``; the relay, which failed on the database all
    along, sends a command written just before the outage, and every later one; the
    replica reports unhealthy meanwhile, never exits, and is healthy again after."""
    database_url = restartable_postgres.create_database()
    await upgrade_async(database_url)
    agents = [crucible(vhost_url, tmp_path, create_delay="uniform:2,6") for _ in range(3)]
    health_file = tmp_path / "nexus.health"
    replica = nexus(
        "replica-a",
        database_url=database_url,
        amqp_url=vhost_url,
        workdir=tmp_path,
        health_file=str(health_file),
        sweep_seconds="0.2",
        lease_seconds="2",
    )
    seen = Seen()
    planted = example("region.get.v1")
    async with Transport(vhost_url, name="test-observer") as transport:
        await transport.declare_topology()
        events = f"test.events.{uuid.uuid4()}"
        await transport.declare_queue(events, [(EVENTS_EXCHANGE, "region.*")])
        await transport.consume(events, seen.on)
        commands = f"test.commands.{uuid.uuid4()}"
        await transport.declare_command_queue(commands)
        await transport.consume(commands, seen.on)
        client = ApiClient(transport)
        for agent in agents:
            agent.service.start()
        replica.start()
        try:

            async def healthy() -> bool:
                return (await health_command("nexus", health_file, 3))[0] == 0

            async def announced() -> bool:
                return await datasets(database_url) == 3

            await until(healthy, 30, "the replica is healthy")
            await until(announced, 30, "the three agents are known")

            before = [await client.create_disk(f"before-{index}") for index in range(6)]
            for accepted in before:
                await client.saga_in(accepted.saga_id, {"waiting"})
            await plant_command(database_url, planted, commands)
            outage_began = datetime.now(UTC)
            restartable_postgres.stop_immediately()
            await asyncio.sleep(OUTAGE_SECONDS / 2)
            during_code, during_output = await health_command("nexus", health_file, 2)
            await asyncio.sleep(OUTAGE_SECONDS / 2)
            assert replica.running, replica.log_text()[-3000:]
            outage_ended = datetime.now(UTC)
            restartable_postgres.start()
            back = time.monotonic()

            for accepted in before:
                view = await client.saga_in(
                    accepted.saga_id, {"done", "undone", "stuck"}, timeout=RECOVERY_SECONDS
                )
                assert view.state == "done", view.error
            recovered_in = time.monotonic() - back

            after = [await client.create_disk(f"after-{index}") for index in range(3)]
            for accepted in after:
                view = await client.saga_in(
                    accepted.saga_id, {"done", "undone", "stuck"}, timeout=RECOVERY_SECONDS
                )
                assert view.state == "done", view.error

            async def planted_arrived() -> bool:
                return any(message.id == planted.id for message in seen.messages)

            await until(planted_arrived, 15, "the command written before the outage is sent")

            async def outbox_sent() -> bool:
                return (await nexus_outbox(database_url))[1] == 0

            await until(outbox_sent, 15, "every outbox row is sent")
            await until(healthy, 15, "the replica is healthy again")
            assert replica.running
        finally:
            await replica.stop()
            for agent in agents:
                await agent.service.stop()

    log = replica.log_text()
    assert replica.exits == [0], log[-3000:]
    assert during_code == 1, during_output
    assert "unhealthy" in during_output
    in_flight = [
        event
        for event in seen.of(RegionStateChanged)
        if outage_began <= event.occurred_at <= outage_ended
    ]
    # A precondition, not the behaviour: the outage must catch some notifications in
    # flight (18 regions, one worker per agent, 2-6 s each: 5 to 9 a run; CI once saw 5
    # against the old bound of 6 once the agent's workers got faster).
    assert len(in_flight) >= 3, (
        f"the outage must catch region notifications in flight: {len(in_flight)} did"
    )
    assert recovered_in < RECOVERY_SECONDS
    assert await queue_depth(vhost_url, DEAD_LETTER_QUEUE) == 0, "nothing was dead-lettered"
    assert "failed on a transient error, run again in place" in log, "the retries are logged"
    assert "outbox-relay failed" in log and "outbox-relay recovered" in log
    # Bounded: one line per queue every 10 s over the ~15 s of retries (the outage, then
    # the backoff's cap), for the two queues Nexus consumes; not one per attempt of each
    # of the dozens of messages waiting.
    retry_lines = log.count("failed on a transient error, run again in place")
    assert retry_lines <= 4, retry_lines


# Each service in process, its loops watched through its Tasks.


async def eventually(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(0.02)


def touched_since(path: Path, moment: float) -> bool:
    return path.exists() and path.stat().st_mtime > moment


def age(path: Path) -> None:
    """Make the health file an hour old: only the next touch makes it fresh again."""
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))


async def assert_not_touched(path: Path, seconds: float) -> None:
    age(path)
    await asyncio.sleep(seconds)
    assert not touched_since(path, time.time() - 3000), f"{path} was touched"


async def test_nexus_loops_survive_a_postgresql_outage_and_a_dead_loop_is_unhealthy(
    restartable_postgres: PrivatePostgresCluster, vhost_url: str, tmp_path: Path
) -> None:
    database_url = restartable_postgres.create_database()
    await upgrade_async(database_url)
    health_file = tmp_path / "nexus.health"
    app = NexusApp(
        NexusSettings(
            replica_id="solo",
            database_url=database_url,
            amqp_url=vhost_url,
            sweep_seconds=0.2,
            health_file=health_file,
        )
    )
    seen = Seen()
    planted = example("region.get.v1")
    await app.start()
    try:
        async with Transport(vhost_url, name="test-observer") as transport:
            commands = f"test.commands.{uuid.uuid4()}"
            await transport.declare_command_queue(commands)
            await transport.consume(commands, seen.on)
            await eventually(lambda: health_file.exists() and not app.problems(), 15, "healthy")

            await plant_command(database_url, planted, commands)
            restartable_postgres.stop_immediately()
            down = time.monotonic()
            assert app.relay is not None
            app.relay.notify()

            def failing() -> bool:
                problems = " | ".join(app.problems())
                return "outbox-relay is failing" in problems and "sweeper is failing" in problems

            await eventually(failing, 10, "the relay and the sweeper fail on the database")
            await assert_not_touched(health_file, 1.5)
            assert all(not record.task_done for record in map(app.tasks.record, LOOPS))
            # Past the backoff's cap, and the grace of the planted row.
            await asyncio.sleep(max(0.0, 6.0 - (time.monotonic() - down)))
            restartable_postgres.start()
            await eventually(lambda: not app.problems(), 15, "the loops recover")
            await eventually(
                lambda: any(m.id == planted.id for m in seen.messages),
                15,
                "the command written before the outage is sent",
            )
            touched = time.time()
            await eventually(lambda: touched_since(health_file, touched), 5, "touched again")

            sweeper = app.tasks.record("sweeper").task
            assert sweeper is not None
            sweeper.cancel()
            await eventually(
                lambda: app.problems() == ["sweeper is not running"], 5, "the dead loop seen"
            )
            await assert_not_touched(health_file, 1.5)
    finally:
        await app.stop()


LOOPS = ("outbox-relay", "sweeper")


class FailingReads:
    """Stands in for an agent store's ``unsent`` (the relay's read): fails as SQLite does
    when its disk fails while ``broken``, reads the real table otherwise."""

    def __init__(self, unsent: Callable[[int], Awaitable[Sequence[OutgoingMessage]]]) -> None:
        self._unsent = unsent
        self.broken = False
        self.failures = 0

    async def __call__(self, limit: int) -> Sequence[OutgoingMessage]:
        if self.broken:
            self.failures += 1
            raise OperationalError(
                "SELECT ... FROM outbox", {}, sqlite3.OperationalError("disk I/O error")
            )
        return await self._unsent(limit)


async def test_the_crucible_agents_relay_survives_its_database_failing_and_health_says_so(
    vhost_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(crucible_app, "HEALTH_SECONDS", 0.05)
    health_file = tmp_path / "crucible.health"
    settings = CrucibleSettings(
        agent_id=uuid.uuid4(),
        sled_id=uuid.uuid4(),
        data_dir=tmp_path / "crucible",
        amqp_url=vhost_url,
        announce_seconds=0.5,
        announce_coalesce_seconds=0,
        health_file=health_file,
    )
    agent = await crucible_app.build(settings)
    reads = FailingReads(agent.store.unsent)
    monkeypatch.setattr(agent.store, "unsent", reads)
    seen = Seen()
    stop = asyncio.Event()
    async with Transport(vhost_url, name="test-observer") as transport:
        await transport.declare_topology()
        events = f"test.events.{uuid.uuid4()}"
        await transport.declare_queue(events, [(EVENTS_EXCHANGE, "agent.*")])
        await transport.consume(events, seen.on)
        serving = asyncio.create_task(crucible_app.serve(agent, stop))
        try:
            await eventually(
                lambda: health_file.exists() and not agent.tasks.problems(), 15, "healthy"
            )
            reads.broken = True
            await eventually(
                lambda: any("outbox-relay is failing" in p for p in agent.tasks.problems()),
                10,
                "the relay fails on its database",
            )
            await assert_not_touched(health_file, 0.5)
            failed_at = len(seen.of(AgentAnnounced))
            # The announcer goes on recording announcements; they wait in the outbox.
            await asyncio.sleep(1.5)
            assert not serving.done()
            reads.broken = False
            await eventually(lambda: not agent.tasks.problems(), 15, "the relay recovers")
            await eventually(
                lambda: len(seen.of(AgentAnnounced)) > failed_at + 1,
                10,
                "the announcements written meanwhile are sent",
            )
            touched = time.time()
            await eventually(lambda: touched_since(health_file, touched), 5, "touched again")

            # A loop that ends takes the agent down (it is restarted); it is healthy no more.
            announcer = agent.tasks.record("announcer").task
            assert announcer is not None
            announcer.cancel()
            with pytest.raises(RuntimeError, match="announcer was cancelled"):
                async with asyncio.timeout(15):
                    await serving
            await assert_not_touched(health_file, 0.5)
        finally:
            stop.set()
            await asyncio.gather(serving, return_exceptions=True)
    assert reads.failures >= 3, "the relay kept trying"


async def test_the_sled_agents_relay_survives_its_database_failing_and_health_says_so(
    vhost_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sled_app, "HEALTH_SECONDS", 0.05)
    health_file = tmp_path / "sled.health"
    settings = SledSettings(
        sled_id=uuid.uuid4(),
        data_dir=tmp_path / "sled",
        amqp_url=vhost_url,
        heartbeat_seconds=0.2,
        health_file=health_file,
    )
    sled = sled_app.build(settings)
    reads = FailingReads(sled.store.unsent)
    monkeypatch.setattr(sled.store, "unsent", reads)
    seen = Seen()
    stop = asyncio.Event()
    async with Transport(vhost_url, name="test-observer") as transport:
        await transport.declare_topology()
        events = f"test.events.{uuid.uuid4()}"
        await transport.declare_queue(
            events, [(EVENTS_EXCHANGE, "sled.*"), (EVENTS_EXCHANGE, "instance.*")]
        )
        await transport.consume(events, seen.on)
        serving = asyncio.create_task(sled_app.run(sled, stop))
        try:
            await eventually(
                lambda: health_file.exists() and not sled.tasks.problems(), 15, "healthy"
            )
            reads.broken = True
            await eventually(
                lambda: any("outbox-relay is failing" in p for p in sled.tasks.problems()),
                10,
                "the relay fails on its database",
            )
            await assert_not_touched(health_file, 0.5)
            # A change made meanwhile: a VMM, whose events wait in the outbox.
            spec = VmmSpec(
                id=uuid.uuid4(),
                instance_id=uuid.uuid4(),
                name="web-1",
                ncpus=1,
                memory_bytes=1 << 30,
            )
            await transport.send_command(
                VmmEnsure(source="test/outage", payload=spec), sled_queue(settings.sled_id)
            )
            await asyncio.sleep(1.0)
            assert not serving.done()
            assert not [m for m in seen.of(VmmStateChanged) if m.payload.vmm.id == spec.id]
            reads.broken = False
            await eventually(lambda: not sled.tasks.problems(), 15, "the relay recovers")
            await eventually(
                lambda: any(
                    m.payload.vmm.id == spec.id and m.payload.vmm.state == "running"
                    for m in seen.of(VmmStateChanged)
                ),
                10,
                "the VMM's changes made meanwhile are sent",
            )
            touched = time.time()
            await eventually(lambda: touched_since(health_file, touched), 5, "touched again")

            # A loop that ends takes the agent down (it is restarted); it is healthy no more.
            heartbeats = sled.tasks.record("heartbeats").task
            assert heartbeats is not None
            heartbeats.cancel()
            with pytest.raises(RuntimeError, match="heartbeats was cancelled"):
                async with asyncio.timeout(15):
                    await serving
            await assert_not_touched(health_file, 0.5)
        finally:
            stop.set()
            await asyncio.gather(serving, return_exceptions=True)
    assert reads.failures >= 3, "the relay kept trying"


async def test_a_replica_started_while_postgresql_is_down_waits_for_it_then_serves(
    restartable_postgres: PrivatePostgresCluster, vhost_url: str, tmp_path: Path
) -> None:
    """A replica (re)started during a database restart, as the chaos test's SIGKILLed
    replicas are: it waits for PostgreSQL (its revision check, its clock) instead of
    exiting, and once the database is back it is healthy and runs a disk create."""
    database_url = restartable_postgres.create_database()
    await upgrade_async(database_url)
    agents = [crucible(vhost_url, tmp_path) for _ in range(3)]
    health_file = tmp_path / "nexus.health"
    replica = nexus(
        "replica-a",
        database_url=database_url,
        amqp_url=vhost_url,
        workdir=tmp_path,
        health_file=str(health_file),
        sweep_seconds="0.2",
    )
    async with Transport(vhost_url, name="test-observer") as transport:
        await transport.declare_topology()
        client = ApiClient(transport)
        for agent in agents:
            agent.service.start()
        restartable_postgres.stop_immediately()
        try:
            replica.start()
            await asyncio.sleep(4)
            assert replica.running, replica.log_text()[-3000:]
            restartable_postgres.start()

            async def healthy() -> bool:
                return (await health_command("nexus", health_file, 3))[0] == 0

            await until(healthy, 30, "the replica is healthy once the database is back")

            async def announced() -> bool:
                return await datasets(database_url) == 3

            await until(announced, 30, "the three agents are known")
            accepted = await client.create_disk("after-the-wait")
            view = await client.saga_in(accepted.saga_id, {"done", "undone", "stuck"}, timeout=60)
            assert view.state == "done", view.error
        finally:
            if not restartable_postgres.running:
                restartable_postgres.start()
            await replica.stop()
            for agent in agents:
                await agent.service.stop()

    log = replica.log_text()
    assert replica.exits == [0], log[-3000:]
    assert "waiting for" in log
