"""Nexus's outbox: messages written in a saga node's transaction, relayed after commit.

Several replicas share one outbox table. Each replica relays the rows it wrote itself
at once (it knows their ids); rows older than a grace period are relayed by whichever
replica's relay finds them, which covers a replica that died between commit and
publish. A message may so be published twice; consumers drop it by its id.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from nexus.db.engine import upsert_for
from nexus.db.models import OutboxMessage
from schemas import tracing
from schemas.base import Envelope
from schemas.messages import encode
from schemas.outbox import OutgoingMessage

outbox = cast(Table, OutboxMessage.__table__)


class Outbox:
    """Writes messages into the outbox inside a caller's transaction."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self._clock = clock
        # Ids this replica wrote, and when: relayed at once, without waiting for the grace.
        self._mine: dict[uuid.UUID, datetime] = {}
        self._listeners: list[Callable[[], None]] = []

    def on_commit(self, listener: Callable[[], None]) -> None:
        """``listener`` is called once rows were committed (the relay wakes up and looks)."""
        self._listeners.append(listener)

    def committed(self) -> None:
        """The transaction that added rows has committed: they can be found now."""
        for listener in self._listeners:
            listener()

    def row(
        self,
        message: Envelope,
        *,
        exchange: str,
        routing_key: str,
        mandatory: bool = True,
        reply_to: str | None = None,
    ) -> dict[str, Any]:
        """The outbox row of ``message``, for :meth:`add_rows`."""
        return {
            "message_id": message.id,
            "exchange": exchange,
            "routing_key": routing_key,
            "body": encode(message),
            "headers": {
                "type": message.TYPE,
                "correlation_id": str(message.correlation_id) if message.correlation_id else None,
                "mandatory": mandatory,
                "reply_to": reply_to,
                # The trace of the node that sent it (schemas.tracing): no migration, the
                # headers are JSON.
                **tracing.current_headers(),
            },
            "created_at": self._clock(),
            "attempts": 0,
        }

    async def add_rows(self, session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
        """Write rows from :meth:`row` in one statement (an executemany)."""
        if not rows:
            return
        await session.execute(_insert_statement(session.get_bind().dialect.name), list(rows))
        now = self._clock()
        for row in rows:
            self._mine[row["message_id"]] = now

    def mine(self, written_after: datetime) -> list[uuid.UUID]:
        """Recent ids; older ones (or ones whose transaction rolled back) are dropped,
        since the relay finds every row older than its grace period anyway."""
        for message_id, written in list(self._mine.items()):
            if written < written_after:
                del self._mine[message_id]
        return list(self._mine)

    def forget(self, message_ids: Sequence[uuid.UUID]) -> None:
        for message_id in message_ids:
            self._mine.pop(message_id, None)


@functools.cache
def _insert_statement(dialect: str) -> Any:
    return upsert_for(dialect, outbox).on_conflict_do_nothing(index_elements=[outbox.c.message_id])


class NexusOutboxStore:
    """The relay's view of the outbox table (``schemas.outbox.OutboxStore``)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        outbox_writer: Outbox,
        *,
        clock: Callable[[], datetime],
        grace: timedelta = timedelta(seconds=3),
    ) -> None:
        self._sessions = sessions
        self._writer = outbox_writer
        self._clock = clock
        self._grace = grace

    async def unsent(self, limit: int) -> Sequence[OutgoingMessage]:
        orphaned_before = self._clock() - self._grace
        mine = self._writer.mine(written_after=orphaned_before)
        async with self._sessions() as session:
            rows = await session.execute(
                select(outbox)
                .where(
                    outbox.c.sent_at.is_(None),
                    or_(outbox.c.message_id.in_(mine), outbox.c.created_at < orphaned_before),
                )
                .order_by(outbox.c.id)
                .limit(limit)
            )
            found = rows.all()
        return [
            OutgoingMessage(
                message_id=row.message_id,
                message_type=str(row.headers.get("type", "unknown")),
                exchange=row.exchange,
                routing_key=row.routing_key,
                body=row.body,
                correlation_id=uuid.UUID(row.headers["correlation_id"])
                if row.headers.get("correlation_id")
                else None,
                reply_to=row.headers.get("reply_to"),
                mandatory=bool(row.headers.get("mandatory", True)),
                trace_context=tracing.headers_of(row.headers),
            )
            for row in found
        ]

    async def mark_sent(self, message_ids: Sequence[uuid.UUID]) -> None:
        async with self._sessions.begin() as session:
            await session.execute(
                update(outbox)
                .where(outbox.c.message_id.in_(list(message_ids)))
                .values(sent_at=self._clock(), attempts=outbox.c.attempts + 1)
            )
        self._writer.forget(message_ids)
