"""The outbox relay: what a service recorded in its database leaves for the broker.

A service writes the message it wants to send in the same transaction as the state
change that caused it, then calls :meth:`OutboxRelay.notify`. The relay publishes
unsent rows in the order they were written, each with publisher confirms, and marks
them sent only after the broker confirmed. A crash between confirm and mark re-sends
the message with the same id, which consumers deduplicate; a broker outage delays
messages but never loses them. Nothing leaves before its transaction committed,
because the relay only reads committed rows.

The relay is a loop of passes (:meth:`OutboxRelay.run_pass`) that each service runs
under its :class:`schemas.tasks.Tasks`: a pass that fails, on the broker or on the
database the rows live in, is logged and run again after a backoff, so no failure ends
the relay, and a relay that completes no pass makes its process unhealthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from schemas import tracing
from schemas.base import Envelope
from schemas.messages import encode
from schemas.transport import PUBLISH_TIMEOUT_SECONDS, Transport


@dataclass(frozen=True)
class OutgoingMessage:
    """A row of an outbox: the encoded message and where it goes."""

    message_id: uuid.UUID
    message_type: str
    exchange: str
    routing_key: str
    body: bytes
    correlation_id: uuid.UUID | None = None
    reply_to: str | None = None
    # Replies and events nobody may be bound to yet must not be refused as unroutable.
    mandatory: bool = True
    # The trace the message belongs to, as it was when the row was written
    # (schemas.tracing; empty when tracing is off).
    trace_context: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        message: Envelope,
        *,
        exchange: str,
        routing_key: str,
        reply_to: str | None = None,
        mandatory: bool = True,
    ) -> OutgoingMessage:
        return cls(
            message_id=message.id,
            message_type=message.TYPE,
            exchange=exchange,
            routing_key=routing_key,
            body=encode(message),
            correlation_id=message.correlation_id,
            reply_to=reply_to,
            mandatory=mandatory,
            trace_context=tracing.current_headers(),
        )


class OutboxStore(Protocol):
    async def unsent(self, limit: int) -> Sequence[OutgoingMessage]:
        """Committed, unsent messages, oldest first."""

    async def mark_sent(self, message_ids: Sequence[uuid.UUID]) -> None: ...


# Messages in flight at once; past a handful, more only queue (docs/design.md,
# "Measured facts").
PIPELINE_WINDOW = 16


class OutboxRelay:
    """Publishes an outbox's rows; woken by ``notify()``, with a slow sweep as safety net."""

    def __init__(
        self,
        store: OutboxStore,
        transport: Transport,
        *,
        batch_size: int = 100,
        sweep_seconds: float = 5.0,
    ) -> None:
        self._store = store
        self._transport = transport
        self._batch_size = batch_size
        self._sweep_seconds = sweep_seconds
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self.published = 0

    def notify(self) -> None:
        """Something was committed to the outbox: send it now."""
        self._drained.clear()
        self._wake.set()

    async def wait_drained(self) -> None:
        """Until everything committed before the call has been published (tests, shutdown)."""
        self.notify()
        await self._drained.wait()

    @property
    def pass_window(self) -> float:
        """The longest a healthy pass takes: the sweep's wait, then a batch whose last
        window of publishes waits out the publish timeout, with room to spare."""
        return self._sweep_seconds + 2 * PUBLISH_TIMEOUT_SECONDS + 5.0

    async def run_pass(self) -> None:
        """Publish one batch; when that was all, wait for a wake-up or the sweep.

        Raises whatever failed (``PublishFailed``, the store's database error), leaving
        the rows for the next pass: the caller runs passes again and again, after a
        backoff when one failed (:meth:`schemas.tasks.Tasks.run`). A wake-up that came
        during a failed pass is not lost: the next pass publishes first.
        """
        self._wake.clear()
        if await self.flush() == self._batch_size:
            return  # More are waiting: the next pass follows at once.
        self._drained.set()
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel that
        # arrives as the wake-up does, and the relay would never stop.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._sweep_seconds):
                await self._wake.wait()

    async def flush(self) -> int:
        """Publish one batch in order; returns how many were sent.

        Publishes are pipelined in windows: frames leave in row order on one channel
        (so the broker keeps that order) and the confirms are awaited together, which
        spares a round trip per message when a burst of changes is waiting. Only the
        unbroken run of confirmed rows from the start is marked sent; if one fails, it
        and everything after it are sent again later (consumers drop duplicates).
        """
        rows = await self._store.unsent(self._batch_size)
        sent: list[uuid.UUID] = []
        try:
            for start in range(0, len(rows), PIPELINE_WINDOW):
                window = rows[start : start + PIPELINE_WINDOW]
                outcomes = await asyncio.gather(
                    *(self._publish(row) for row in window), return_exceptions=True
                )
                for row, outcome in zip(window, outcomes, strict=True):
                    if isinstance(outcome, BaseException):
                        raise outcome
                    sent.append(row.message_id)
        finally:
            if sent:
                await self._store.mark_sent(sent)
                self.published += len(sent)
        return len(sent)

    async def _publish(self, row: OutgoingMessage) -> None:
        # A row written in a trace is published in a span of it: the time it waited in
        # the outbox shows in the trace, and the consumer's span is this one's child.
        with (
            tracing.span(
                f"publish {row.message_type}",
                parent=row.trace_context or None,
                kind=tracing.SpanKind.PRODUCER,
                attributes={"messaging.destination.name": row.exchange},
            )
            if row.trace_context
            else tracing.OFF
        ):
            await self._transport.publish_bytes(
                row.body,
                exchange=row.exchange,
                routing_key=row.routing_key,
                message_id=row.message_id,
                message_type=row.message_type,
                correlation_id=row.correlation_id,
                reply_to=row.reply_to,
                # Passed on as written when this process does not trace.
                headers=tracing.current_headers() or dict(row.trace_context) or None,
                mandatory=row.mandatory,
            )
