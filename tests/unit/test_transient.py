"""Transient vs poison: a handler that fails because its own dependency is down is run
again in place (the message stays unacked, so the failure never counts toward the
delivery limit), while a message that is wrong in itself goes the way it went before.

The transport is driven here without a broker: ``_dispatch`` gets a delivery that
records how it was settled, and the dead-letter publish is recorded instead of sent.
The same policy against a real broker, past the delivery limit, is
``tests/integration/test_transport.py::test_a_handler_failing_on_a_transient_error_is_never_dead_lettered``.
"""

from __future__ import annotations

import asyncio
import importlib
import sqlite3
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy import exc as sa

from schemas.messages import encode
from schemas.tasks import Backoff, TransientRetries
from schemas.topology import DEAD_LETTER_EXCHANGE, REASON_HEADER
from schemas.transient import Transient, is_transient
from schemas.transport import Delivery, HeaderValue, PublishFailed, RequestTimedOut, Transport
from tests.examples import example

# asyncpg ships no type information; its exceptions are what a test needs of it.
asyncpg_errors: Any = importlib.import_module("asyncpg.exceptions")


def _wrapped(orig: BaseException, kind: type[sa.DBAPIError] = sa.DBAPIError) -> sa.DBAPIError:
    return kind("SELECT 1", {}, orig)


def _invalidated() -> sa.DBAPIError:
    return sa.DBAPIError("SELECT 1", {}, Exception("server closed"), connection_invalidated=True)


def _caused_by(cause: BaseException) -> RuntimeError:
    try:
        raise RuntimeError("while recording the event") from cause
    except RuntimeError as error:
        return error


TRANSIENT: list[tuple[str, BaseException]] = [
    ("refused", ConnectionRefusedError(111, "Connect call failed")),
    ("reset", ConnectionResetError()),
    ("timeout", TimeoutError()),
    ("request timed out", RequestTimedOut("no reply")),
    ("disk full (OSError)", OSError(28, "No space left on device")),
    ("publish failed", PublishFailed("not confirmed")),
    ("a Transient of our own", Transient("wait")),
    ("channel closed", aio_pika.exceptions.ChannelClosed(320, "CONNECTION_FORCED")),
    ("channel invalid state", aio_pika.exceptions.ChannelInvalidStateError()),
    ("amqp connection", aio_pika.exceptions.AMQPConnectionError()),
    (
        "sqlite full",
        _wrapped(sqlite3.OperationalError("database or disk is full"), sa.OperationalError),
    ),
    ("sqlite I/O", _wrapped(sqlite3.OperationalError("disk I/O error"), sa.OperationalError)),
    (
        "sqlite locked",
        _wrapped(sqlite3.OperationalError("database is locked"), sa.OperationalError),
    ),
    ("raw sqlite full", sqlite3.OperationalError("database or disk is full")),
    ("interface", _wrapped(Exception("connection is closed"), sa.InterfaceError)),
    ("invalidated", _invalidated()),
    ("pool timeout", sa.TimeoutError("QueuePool limit reached")),
    ("admin shutdown", asyncpg_errors.AdminShutdownError("terminating connection")),
    ("starting up", asyncpg_errors.CannotConnectNowError("the database is starting up")),
    ("connection gone", asyncpg_errors.ConnectionDoesNotExistError("closed mid-operation")),
    ("too many connections", asyncpg_errors.TooManyConnectionsError("too many")),
    ("statement timeout", _wrapped(asyncpg_errors.QueryCanceledError("statement timeout"))),
    ("lock timeout", _wrapped(asyncpg_errors.LockNotAvailableError("lock timeout"))),
    ("deadlock", _wrapped(asyncpg_errors.DeadlockDetectedError("deadlock detected"))),
    # A replicated database failing over (tests/integration/test_ha_database.py).
    (
        "write on a standby",
        _wrapped(asyncpg_errors.ReadOnlySQLTransactionError("cannot execute INSERT")),
    ),
    ("raw write on a standby", asyncpg_errors.ReadOnlySQLTransactionError("read-only")),
    (
        "no server accepts writes yet",
        asyncpg_errors.TargetServerAttributeNotMatched('None of the hosts match "read-write"'),
    ),
    (
        "no server accepts writes yet, wrapped",
        _caused_by(asyncpg_errors.TargetServerAttributeNotMatched("none")),
    ),
    ("recovering", _wrapped(asyncpg_errors.CannotConnectNowError("in recovery mode"))),
    ("caused by a transient one", _caused_by(OSError(5, "Input/output error"))),
    ("group of transient ones", ExceptionGroup("both", [OSError(), PublishFailed("x")])),
]

NOT_TRANSIENT: list[tuple[str, BaseException]] = [
    ("a bug", KeyError("node")),
    ("validation", ValueError("bad size")),
    ("an assertion", AssertionError()),
    ("a runtime error", RuntimeError("unexpected state")),
    ("integrity", _wrapped(Exception("duplicate key"), sa.IntegrityError)),
    ("unique violation", _wrapped(asyncpg_errors.UniqueViolationError("duplicate"))),
    ("corrupt sqlite", _wrapped(sqlite3.DatabaseError("file is not a database"))),
    ("not found on the broker", aio_pika.exceptions.MessageProcessError("x", "y")),
    ("a mixed group", ExceptionGroup("mixed", [OSError(), ValueError()])),
    ("caused by a bug", _caused_by(KeyError("x"))),
]


@pytest.mark.parametrize(
    "error", [error for _, error in TRANSIENT], ids=[name for name, _ in TRANSIENT]
)
def test_a_dependency_that_is_down_is_transient(error: BaseException) -> None:
    assert is_transient(error)


@pytest.mark.parametrize(
    "error", [error for _, error in NOT_TRANSIENT], ids=[name for name, _ in NOT_TRANSIENT]
)
def test_an_error_of_the_work_itself_is_not_transient(error: BaseException) -> None:
    assert not is_transient(error)


def test_backoff_doubles_from_the_first_delay_to_the_cap_with_jitter() -> None:
    backoff = Backoff(0.1, 5.0, jitter=0.2)
    delays = [backoff.next() for _ in range(10)]
    nominal = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0]
    for delay, expected in zip(delays, nominal, strict=True):
        assert expected * 0.8 <= delay <= expected * 1.2
    backoff.reset()
    assert 0.08 <= backoff.next() <= 0.12


# The transport's consume path, without a broker.


@dataclass
class FakeIncoming:
    """The parts of an aio-pika delivery that the transport reads, recording its settling."""

    body: bytes
    user_id: str | None = None
    routing_key: str = "test.queue"
    reply_to: str | None = None
    redelivered: bool = False
    message_id: str | None = None
    type: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    channel: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(is_closed=False))
    settled: list[str] = field(default_factory=list)

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nack(self, requeue: bool = True) -> None:
        self.settled.append(f"nack(requeue={requeue})")


class RecordingTransport(Transport):
    """Records what it would publish (the dead-letter path) instead of sending it."""

    def __init__(self) -> None:
        super().__init__(
            "amqp://guest:guest@127.0.0.1:1/",
            name="test",
            require_user_id=False,
            retry_first_seconds=0.001,
            retry_max_seconds=0.008,
        )
        self.published: list[tuple[str, Mapping[str, HeaderValue]]] = []

    async def publish_bytes(
        self,
        body: bytes,
        *,
        exchange: str,
        routing_key: str,
        message_id: uuid.UUID,
        message_type: str,
        correlation_id: uuid.UUID | None = None,
        reply_to: str | None = None,
        headers: Mapping[str, HeaderValue] | None = None,
        mandatory: bool = True,
    ) -> None:
        self.published.append((exchange, dict(headers or {})))


async def dispatch(transport: Transport, incoming: FakeIncoming, handler: Any) -> None:
    await transport._dispatch("test.queue", cast(AbstractIncomingMessage, incoming), handler)


def a_message() -> FakeIncoming:
    message = example("region.state_changed.v1")
    return FakeIncoming(body=encode(message), message_id=str(message.id), type=message.TYPE)


@pytest.mark.parametrize("failures", [1, 25])
async def test_a_handler_failing_on_a_transient_error_runs_again_and_the_message_is_acked_once(
    failures: int,
) -> None:
    """More failures than the delivery limit (20): none of them reaches the broker."""
    transport = RecordingTransport()
    incoming = a_message()
    errors = [error for _, error in TRANSIENT]
    calls: list[Delivery] = []

    async def handler(delivery: Delivery) -> None:
        calls.append(delivery)
        if len(calls) <= failures:
            raise errors[(len(calls) - 1) % len(errors)]

    started = time.monotonic()
    await dispatch(transport, incoming, handler)

    assert len(calls) == failures + 1
    assert {id(delivery) for delivery in calls} == {id(calls[0])}, "the same delivery each time"
    assert incoming.settled == ["ack"]
    assert transport.published == []
    assert transport.retrying == 0
    # A backoff of 1 ms doubling to 8 ms (±20 %): 25 attempts well within a second.
    assert time.monotonic() - started < 2.0


async def test_a_poison_message_is_dead_lettered_at_once() -> None:
    transport = RecordingTransport()
    incoming = FakeIncoming(body=b"{not json", message_id=str(uuid.uuid4()), type="x")
    calls: list[Delivery] = []

    async def handler(delivery: Delivery) -> None:
        calls.append(delivery)

    await dispatch(transport, incoming, handler)

    assert calls == []
    assert [(exchange, headers[REASON_HEADER]) for exchange, headers in transport.published] == [
        (DEAD_LETTER_EXCHANGE, "invalid_json")
    ]
    assert incoming.settled == ["ack"]


async def test_a_handler_failing_on_its_own_error_is_requeued_at_once_as_before() -> None:
    """Not retried in place: it counts toward the delivery limit, past which the quorum
    queue dead-letters it (the integration test of the transport shows that part)."""
    transport = RecordingTransport()
    incoming = a_message()
    calls: list[Delivery] = []

    async def handler(delivery: Delivery) -> None:
        calls.append(delivery)
        raise ValueError("this handler cannot cope with this message")

    await dispatch(transport, incoming, handler)

    assert len(calls) == 1
    assert incoming.settled == ["nack(requeue=True)"]
    assert transport.published == []


async def test_a_message_retrying_when_the_transport_closes_goes_back_to_its_queue() -> None:
    transport = RecordingTransport()
    incoming = a_message()
    calls = 0

    async def handler(delivery: Delivery) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionRefusedError(111, "the database is down")

    dispatching = asyncio.create_task(dispatch(transport, incoming, handler))
    async with asyncio.timeout(5):
        while calls < 3:
            await asyncio.sleep(0.001)
    assert transport.retrying == 1
    async with asyncio.timeout(5):
        await transport.close()
        await dispatching
    assert incoming.settled == ["nack(requeue=True)"]
    assert transport.retrying == 0
    stopped_at = calls
    await asyncio.sleep(0.05)
    assert calls == stopped_at, "no attempt after the close"


async def test_a_message_whose_channel_closed_is_left_to_the_broker() -> None:
    """The broker returns it with the channel; this copy is not run again."""
    transport = RecordingTransport()
    incoming = a_message()
    calls = 0

    async def handler(delivery: Delivery) -> None:
        nonlocal calls
        calls += 1
        incoming.channel.is_closed = True
        raise PublishFailed("channel closed under the handler")

    async with asyncio.timeout(5):
        await dispatch(transport, incoming, handler)
    assert calls == 1
    assert incoming.settled == ["nack(requeue=True)"]


async def test_work_failing_on_a_transient_error_for_long_is_reported_with_what_it_is() -> None:
    retries = TransientRetries(first_delay=0.001, max_delay=0.002)

    async def down() -> None:
        raise OSError(28, "No space left on device")

    work = asyncio.create_task(retries.run("region work", "create of region r1", down))
    try:
        async with asyncio.timeout(5):
            while len(retries) == 0:
                await asyncio.sleep(0.001)
        assert retries.problem(stuck_after=60) is None
        await asyncio.sleep(0.05)
        problem = retries.problem(stuck_after=0.01)
        assert problem is not None
        assert "create of region r1 (region work)" in problem
        assert "No space left on device" in problem
    finally:
        await retries.stop(timeout=1)
    assert await work is False
    assert len(retries) == 0
    assert retries.problem(stuck_after=0.01) is None


async def test_retries_are_logged_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    """Sixteen messages failing together for a while: a line at the start (and one per
    ``log_every``), not one per attempt; and one line when the last of them is done."""
    retries = TransientRetries(first_delay=0.001, max_delay=0.004, log_every=60)
    down = True

    async def attempt() -> None:
        if down:
            raise ConnectionRefusedError(111, "refused")

    caplog.set_level("INFO", logger="schemas.tasks")
    works = [
        asyncio.create_task(retries.run("nexus.events", f"event {index}", attempt))
        for index in range(16)
    ]
    await asyncio.sleep(0.2)
    down = False
    assert await asyncio.gather(*works) == [True] * 16
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    infos = [r for r in caplog.records if r.levelname == "INFO"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "nexus.events: event 0 failed on a transient error" in warnings[0].getMessage()
    assert "refused" in warnings[0].getMessage()
    assert len(infos) == 2, [r.getMessage() for r in infos]  # the first done, and the last
    assert any("more still waiting" not in r.getMessage() for r in infos)
