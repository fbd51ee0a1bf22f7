"""A frozen replica holds nobody else up (RELIABILITY.md, "A frozen replica").

A replica stopped by SIGSTOP (a paused VM, a long GC, a stuck disk) keeps its open
transaction, with its row locks, and the messages the broker handed it. PostgreSQL ends
that transaction after ``idle_in_transaction_session_timeout`` (its locks go with it), a
wait for a lock gives up after ``lock_timeout``, and RabbitMQ closes the replica's
connection 2 to 3 AMQP heartbeats after it last heard from it, handing its unacked
messages to the other replica. Here against real processes: two Nexus replicas, real
crucible agents, PostgreSQL and RabbitMQ, one replica frozen inside a node's transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from nexus.api import saga_id_for
from nexus.db.engine import create_engine
from nexus.db.migrate import upgrade_async
from nexus.db.models import Region, Saga, SagaLogEntry
from nexus.sagas import disk_create
from nexus.settings import NexusSettings
from schemas import api
from schemas.messages import Message
from schemas.region import RegionStateChanged
from schemas.topology import EVENTS_EXCHANGE, NEXUS_API_QUEUE
from schemas.transport import Delivery, Transport
from tests.harness.servers import RabbitMQServer
from tests.processes import Crucible, Service, crucible, nexus
from tests.saga_support import Database

pytestmark = pytest.mark.integration

LEASE = 2.0
SWEEP = 0.2
FREEZE = 10.0
# What the settings make of a 2 s lease (asserted below, so the bounds follow them).
HEARTBEAT = 1
IDLE_IN_TRANSACTION = 1.0
LOCK = 1.0
STATEMENT = 2.0
# The broker closes a connection 2 to 3 heartbeats after the last bytes it received.
BROKER_CLOSES_WITHIN = 3 * HEARTBEAT
# The node whose transaction the replica freezes in: regions_place, run just before it in
# the same transaction, holds every dataset it placed on locked, so every other disk
# create in the control plane needs a row the frozen replica holds.
FROZEN_NODE = "regions_cleanup"
# Slack on every time bound: scheduling on a loaded machine, and the test's polling.
SLACK = 0.5


def test_a_2s_lease_gives_the_limits_these_tests_assume() -> None:
    settings = NexusSettings(lease_seconds=LEASE)
    timeouts = settings.postgres_timeouts()
    assert (
        timeouts.lock_seconds,
        timeouts.statement_seconds,
        timeouts.idle_in_transaction_seconds,
    ) == (LOCK, STATEMENT, IDLE_IN_TRANSACTION)
    assert settings.amqp_heartbeat == HEARTBEAT


async def test_every_connection_of_a_replica_carries_the_timeouts(
    fresh_postgres_url: str,
) -> None:
    settings = NexusSettings(database_url=fresh_postgres_url, lease_seconds=LEASE)
    engine = create_engine(settings.database_url, timeouts=settings.postgres_timeouts())
    shown: list[tuple[str, str, str]] = []

    async def show() -> None:
        async with engine.connect() as connection:
            row = (
                await connection.execute(
                    text(
                        "SELECT current_setting('lock_timeout'),"
                        " current_setting('statement_timeout'),"
                        " current_setting('idle_in_transaction_session_timeout'),"
                        " pg_sleep(0.1)"
                    )
                )
            ).one()
            shown.append((row[0], row[1], row[2]))

    try:
        await asyncio.gather(*(show() for _ in range(4)))
    finally:
        await engine.dispose()
    assert shown == [("1s", "2s", "1s")] * 4


async def test_the_server_ends_a_frozen_transaction_and_releases_its_locks(
    fresh_postgres_url: str,
) -> None:
    """The holder's event loop is blocked (its process frozen) while another client,
    in a thread of its own, waits for the row it holds."""
    timeouts = NexusSettings(lease_seconds=LEASE).postgres_timeouts()

    def other_client_updates() -> float:
        async def update() -> float:
            engine = create_engine(fresh_postgres_url, timeouts=timeouts)
            try:
                started = time.monotonic()
                async with engine.begin() as connection:
                    await connection.execute(text("UPDATE t SET n = 2 WHERE id = 1"))
                return time.monotonic() - started
            finally:
                await engine.dispose()

        return asyncio.run(update())

    frozen = create_engine(fresh_postgres_url, timeouts=timeouts)
    try:
        async with frozen.begin() as connection:
            await connection.execute(text("CREATE TABLE t (id int PRIMARY KEY, n int)"))
            await connection.execute(text("INSERT INTO t VALUES (1, 0)"))
        async with frozen.connect() as holder:
            await holder.begin()
            await holder.execute(text("UPDATE t SET n = 1 WHERE id = 1"))
            with ThreadPoolExecutor(1) as other:
                waited = other.submit(other_client_updates)
                # Frozen: not even the event loop runs.
                time.sleep(IDLE_IN_TRANSACTION + 1.5)  # noqa: ASYNC251
                assert waited.done()
            # Continued, the holder finds its transaction gone with its connection.
            with pytest.raises(DBAPIError) as raised:
                await holder.execute(text("UPDATE t SET n = 3 WHERE id = 1"))
            assert raised.value.connection_invalidated
        async with frozen.connect() as connection:
            assert (await connection.execute(text("SELECT n FROM t"))).scalar_one() == 2
    finally:
        await frozen.dispose()
    assert waited.result() <= IDLE_IN_TRANSACTION + SLACK, waited.result()


async def test_a_wait_for_a_lock_ends_with_sqlstate_55P03(fresh_postgres_url: str) -> None:
    """A live holder (no idle timeout here): the waiter gives up after lock_timeout, with
    the code that the engine must take for a lost race, not for a node's failure."""
    holder_engine = create_engine(fresh_postgres_url)
    waiter_engine = create_engine(
        fresh_postgres_url, timeouts=NexusSettings(lease_seconds=LEASE).postgres_timeouts()
    )
    try:
        async with holder_engine.begin() as connection:
            await connection.execute(text("CREATE TABLE t (id int PRIMARY KEY)"))
            await connection.execute(text("INSERT INTO t VALUES (1)"))
        async with holder_engine.begin() as holder:
            await holder.execute(text("SELECT id FROM t FOR UPDATE"))
            started = time.monotonic()
            with pytest.raises(DBAPIError) as raised:
                async with waiter_engine.begin() as waiter:
                    await waiter.execute(text("UPDATE t SET id = 1 WHERE id = 1"))
            waited = time.monotonic() - started
    finally:
        await holder_engine.dispose()
        await waiter_engine.dispose()
    assert getattr(raised.value.orig, "sqlstate", None) == "55P03"
    assert LOCK <= waited <= LOCK + SLACK, waited


async def test_a_replica_connects_with_the_heartbeat_of_its_lease(
    vhost_url: str, rabbitmq_server: RabbitMQServer
) -> None:
    settings = NexusSettings(amqp_url=vhost_url, lease_seconds=LEASE)
    name = f"nexus/{uuid.uuid4()}"
    async with Transport(settings.amqp_url, name=name, heartbeat=settings.amqp_heartbeat):
        listed = rabbitmq_server.rabbitmqctl(
            "-q", "list_connections", "-p", _vhost(vhost_url), "client_properties", "timeout"
        )
    timeouts = [line.rsplit("\t", 1)[1] for line in listed.splitlines() if name in line]
    assert timeouts == [str(HEARTBEAT)], listed


# The frozen replica, on the real stack.


class RegionEvents:
    """Every region notification the agents publish, seen from a queue of the test's own."""

    def __init__(self) -> None:
        self.by_region: dict[uuid.UUID, list[RegionStateChanged]] = defaultdict(list)

    async def on(self, delivery: Delivery) -> None:
        if isinstance(delivery.message, RegionStateChanged):
            self.by_region[delivery.message.payload.region.id].append(delivery.message)


@dataclass
class Stack:
    agents: list[Crucible]
    transport: Transport
    events: RegionEvents
    database: Database
    workdir: Path
    amqp_url: str

    def replica(self, name: str, **extra: str) -> Service:
        return nexus(
            name,
            database_url=self.database.url,
            amqp_url=self.amqp_url,
            workdir=self.workdir,
            lease_seconds=str(LEASE),
            sweep_seconds=str(SWEEP),
            **extra,
        )


@pytest.fixture
async def stack(vhost_url: str, fresh_postgres_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    await upgrade_async(fresh_postgres_url)
    agents = [crucible(vhost_url, tmp_path, create_delay="fixed:0.5") for _ in range(3)]
    for agent in agents:
        agent.service.start()
    events = RegionEvents()
    database = Database(fresh_postgres_url)
    async with Transport(vhost_url, name="test-observer") as transport:
        await transport.declare_topology()
        queue = f"test.regions.{uuid.uuid4()}"
        await transport.declare_queue(queue, [(EVENTS_EXCHANGE, "region.*")])
        await transport.consume(queue, events.on)
        try:
            yield Stack(agents, transport, events, database, tmp_path, vhost_url)
        finally:
            for agent in agents:
                await agent.service.stop()
            await database.close()


@dataclass
class Create:
    """A disk create as a client sends it: its saga is named by the request's id."""

    saga_id: uuid.UUID
    submitted: float
    reply: asyncio.Task[Message]


@dataclass(frozen=True)
class Entry:
    node: str
    event: str
    replica: str
    at: float
    data: dict[str, Any]


@dataclass(frozen=True)
class Timeline:
    """A saga as its rows tell it; times are seconds since the epoch (one host's clock)."""

    state: str
    created: float
    entries: tuple[Entry, ...]

    def at(self, node: str, event: str) -> float:
        return next(e.at for e in self.entries if (e.node, e.event) == (node, event))

    def by(self, replica: str) -> list[Entry]:
        return [e for e in self.entries if e.replica == replica]

    @property
    def finished(self) -> float:
        return self.at("disk_finalize", "succeeded")

    @property
    def lock_wait(self) -> float:
        """From its creation to its regions placed: the datasets' rows are what the frozen
        replica holds locked. (A step that gave up on a lock and ran again logged only
        its last run, so this counts from the creation.)"""
        return self.at("regions_place", "succeeded") - self.created

    @property
    def wake_delay(self) -> float:
        """The longest time from an agent's event to the saga resumed by it: an event a
        frozen replica was handed waits until the broker closes its connection."""
        return max(
            e.at - datetime.fromisoformat(e.data["event_occurred_at"]).timestamp()
            for e in self.entries
            if e.event == "resumed"
        )


def submit(stack: Stack) -> Create:
    request = api.DiskCreate(
        source="cli/test",
        payload=api.DiskCreateRequest(
            project="test", name=f"d-{uuid.uuid4().hex[:8]}", size_bytes=1 << 30
        ),
    )
    submitted = time.time()
    reply = asyncio.create_task(
        stack.transport.request(request, routing_key=NEXUS_API_QUEUE, timeout=120)
    )
    return Create(saga_id_for(request, disk_create.DEFINITION), submitted, reply)


async def timeline(database: Database, saga_id: uuid.UUID) -> Timeline | None:
    async with database.sessions() as session:
        saga = await session.get(Saga, saga_id)
        if saga is None:
            return None
        rows = await session.execute(
            select(SagaLogEntry).where(SagaLogEntry.saga_id == saga_id).order_by(SagaLogEntry.id)
        )
        entries = tuple(
            Entry(
                row.node_name, row.event.value, row.replica_id, row.at.timestamp(), row.data or {}
            )
            for row in rows.scalars()
        )
    return Timeline(saga.state.value, saga.created_at.timestamp(), entries)


async def finished(database: Database, create: Create, timeout: float = 60.0) -> Timeline:
    deadline = time.monotonic() + timeout
    while True:
        found = await timeline(database, create.saga_id)
        if found is not None and found.state in ("done", "undone", "stuck"):
            assert found.state == "done", found
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"saga {create.saga_id} not done after {timeout}s: {found}")
        await asyncio.sleep(0.05)


def stopped(service: Service) -> bool:
    """The process is stopped (SIGSTOP), as /proc tells."""
    assert service.process is not None
    stat = Path(f"/proc/{service.process.pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


def broker_connections(service: Service, broker_port: int) -> list[str]:
    """The TCP states of the process's sockets to the broker, as the kernel has them: a
    connection the broker closed is ``close_wait`` even while the process is stopped."""
    assert service.process is not None
    pid = service.process.pid
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    states = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == broker_port and fields[9] in inodes:
                states.append(_TCP_STATES.get(fields[3], fields[3]))
    return sorted(states)


_TCP_STATES = {"01": "established", "06": "time_wait", "07": "close", "08": "close_wait"}


async def poll_until(
    predicate: Callable[[], bool], deadline: float, every: float = 0.02
) -> float | None:
    """The time ``predicate()`` first held, or None at ``deadline``."""
    while time.time() < deadline:
        if predicate():
            return time.time()
        await asyncio.sleep(every)
    return None


async def freezes_or_runs_elsewhere(
    frozen: Service, database: Database, create: Create, timeout: float = 30.0
) -> float | None:
    """When ``frozen`` stopped in the saga's first transaction; None once that
    transaction committed (another replica ran it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stopped(frozen):
            return time.time()
        found = await timeline(database, create.saga_id)
        if found is not None and found.entries:
            return None
        await asyncio.sleep(0.01)
    raise TimeoutError(f"saga {create.saga_id} neither froze its replica nor ran")


async def test_a_replica_frozen_in_a_transaction_holds_nobody_else_up(stack: Stack) -> None:
    a = stack.replica("replica-a", freeze_in_node=FROZEN_NODE)
    b = stack.replica("replica-b")
    broker_port = urlsplit(stack.amqp_url).port or 5672
    b.start()
    try:
        assert await poll_until(lambda: "up (database" in b.log_text(), time.time() + 30)
        # Normal speed, on B alone.
        normal = [await finished(stack.database, submit(stack)) for _ in range(3)]
        a.start()
        assert await poll_until(lambda: "up (database" in a.log_text(), time.time() + 30)
        assert broker_connections(a, broker_port) == ["established"]

        # Disk creates one at a time, until one reaches A: it freezes inside that saga's
        # first transaction, holding the datasets that saga placed on locked.
        frozen_create: Create | None = None
        frozen_at: float | None = None
        for _ in range(20):
            create = submit(stack)
            frozen_at = await freezes_or_runs_elsewhere(a, stack.database, create)
            if frozen_at is not None:
                frozen_create = create
                break
            normal.append(await finished(stack.database, create))
        assert frozen_create is not None and frozen_at is not None, "no create reached A"

        # While A is frozen: creates sent at once (the broker hands some of them, and
        # some of their agents' events, to A, which holds them until the broker closes
        # its connection), and one sent once that connection is closed.
        during = [submit(stack) for _ in range(4)]
        closes_by = frozen_at + BROKER_CLOSES_WITHIN + SLACK
        closed_at = await poll_until(
            lambda: broker_connections(a, broker_port) != ["established"], closes_by
        )
        await asyncio.sleep(max(0.0, closes_by - time.time()))
        after_close = submit(stack)
        await asyncio.sleep(max(0.0, frozen_at + FREEZE - time.time()))
        assert stopped(a), "A stayed frozen for the whole freeze"
        a.send(signal.SIGCONT)

        frozen_saga = await finished(stack.database, frozen_create)
        during_sagas = [await finished(stack.database, create) for create in during]
        after_close_saga = await finished(stack.database, after_close)
        for create in [*during, after_close]:
            await asyncio.wait_for(create.reply, 30)
        # A, continued, finds its transaction ended and its broker connection closed; it
        # connects again (aio-pika's robust connection) and is a replica like any other.
        assert await poll_until(
            lambda: broker_connections(a, broker_port) == ["established"],
            time.time() + 20,
            every=0.1,
        ), "A did not connect to the broker again"
        doctor = await stack.transport.request(
            api.Doctor(source="cli/test"), routing_key=NEXUS_API_QUEUE, timeout=30
        )
        assert a.running and b.running, "no replica exited by itself"
    finally:
        a_exit = await a.stop()
        b_exit = await b.stop()

    adopted_at = min((e.at for e in frozen_saga.by("replica-b")), default=None)
    frozen_placed = frozen_saga.at("regions_place", "succeeded")
    accepted = [s.created - c.submitted for s, c in zip(during_sagas, during, strict=True)]
    usual = max(s.finished - s.created for s in normal)
    measured = {
        "normal create (s, slowest)": usual,
        "normal lock wait (s, slowest)": max(s.lock_wait for s in normal),
        "normal wake delay (s, slowest)": max(s.wake_delay for s in normal),
        "broker closed A's connection after (s)": _since(frozen_at, closed_at),
        "A's saga adopted by B after (s)": _since(frozen_at, adopted_at),
        "A's saga: regions placed after adoption (s)": -_since(frozen_placed, adopted_at),
        "A's saga: wake delay (s)": frozen_saga.wake_delay,
        "A's saga done after (s)": frozen_saga.finished - frozen_at,
        "sent during the freeze: accepted after (s, slowest)": max(accepted),
        "sent during the freeze: lock wait (s, slowest)": max(s.lock_wait for s in during_sagas),
        "sent during the freeze: wake delay (s, slowest)": max(s.wake_delay for s in during_sagas),
        "sent during the freeze: all A cost (s, slowest)": max(
            wait + s.lock_wait + s.wake_delay
            for s, wait in zip(during_sagas, accepted, strict=True)
        ),
        "sent during the freeze: done after (s, slowest)": max(
            s.finished - c.submitted for s, c in zip(during_sagas, during, strict=True)
        ),
        "sent after the close: accepted after (s)": after_close_saga.created
        - after_close.submitted,
        "sent after the close: lock wait (s)": after_close_saga.lock_wait,
        "sent after the close: wake delay (s)": after_close_saga.wake_delay,
        "sent after the close: done after (s)": after_close_saga.finished - after_close.submitted,
    }
    print("\n" + "\n".join(f"{key}: {value:.2f}" for key, value in measured.items()))

    # The broker gave up on A within 3 heartbeats, and handed on what A held.
    assert closed_at is not None, "the broker kept A's connection"
    # B adopted A's saga when its lease ran out, not when A woke, and finished it.
    assert adopted_at is not None, "A finished its saga itself, after it woke"
    assert adopted_at - frozen_at <= LEASE + SWEEP + HEARTBEAT
    assert frozen_placed - adopted_at <= SLACK
    assert frozen_saga.wake_delay <= BROKER_CLOSES_WITHIN + SLACK
    assert frozen_saga.finished - frozen_at <= LEASE + SWEEP + HEARTBEAT + usual + SLACK
    # Sagas A never owned: a request or an event A was handed waited for the broker to
    # close A's connection, and the rows A held locked for the idle timeout; nothing else.
    for saga, wait in zip(during_sagas, accepted, strict=True):
        assert wait <= BROKER_CLOSES_WITHIN + SLACK
        assert saga.lock_wait <= IDLE_IN_TRANSACTION + SLACK
        assert saga.wake_delay <= BROKER_CLOSES_WITHIN + SLACK
        assert wait + saga.lock_wait + saga.wake_delay <= (
            BROKER_CLOSES_WITHIN + IDLE_IN_TRANSACTION + SLACK
        )
    for saga, create in zip(during_sagas, during, strict=True):
        assert saga.finished - create.submitted <= (
            BROKER_CLOSES_WITHIN + IDLE_IN_TRANSACTION + usual + SLACK
        )
    # Once A's connection is closed (and its transaction ended), A is in nobody's way.
    assert after_close_saga.created - after_close.submitted <= SLACK
    assert after_close_saga.lock_wait <= SLACK
    assert after_close_saga.wake_delay <= SLACK
    assert after_close_saga.finished - after_close.submitted <= usual + SLACK

    # A, continued, wrote nothing: its frozen transaction had been ended, and the saga
    # it was running is B's. Every saga ran each node once.
    assert frozen_saga.by("replica-a") == []
    all_sagas = [*normal, frozen_saga, *during_sagas, after_close_saga]
    assert not [e for s in all_sagas for e in s.by("replica-a") if e.at >= frozen_at]
    for saga in all_sagas:
        succeeded = [e.node for e in saga.entries if e.event == "succeeded"]
        assert len(succeeded) == len(set(succeeded)) == len(disk_create.DEFINITION.node_names)
    assert a_exit == 0 and b_exit == 0

    # One effect per region: one ensure's events at its agent, one set of files, and
    # the doctor finds nothing astray (no region without its disk, none missing).
    async with stack.database.sessions() as session:
        region_ids = set((await session.execute(select(Region.id))).scalars())
    assert len(region_ids) == 3 * len(all_sagas)
    for region_id in region_ids:
        published = stack.events.by_region[region_id]
        generations = sorted({(e.payload.region.generation, e.id) for e in published})
        assert [g for g, _ in generations] == [1, 2], (region_id, generations)
    files = {
        uuid.UUID(path.name)
        for agent in stack.agents
        for path in (stack.workdir / f"crucible-{agent.agent_id}" / "regions").glob("*")
        if path.is_dir()
    }
    assert files == region_ids
    assert isinstance(doctor, api.DoctorReply), doctor
    assert doctor.payload.findings == () and doctor.payload.unreachable_agents == ()


def _since(start: float, end: float | None) -> float:
    return float("nan") if end is None else end - start


def _vhost(url: str) -> str:
    return urlsplit(url).path.removeprefix("/")
