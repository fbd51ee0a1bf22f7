"""Where a parked saga and the event it waits for meet: one row per wait key.

Both sides upsert the same row; the database serialises them on it (a row lock on
PostgreSQL, the single writer on SQLite), so whichever comes second sees the first
and makes the saga runnable. Nothing is lost if the event comes first, and a
duplicate or stale event (a generation not newer than the one recorded) changes
nothing.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, and_, case, delete, func, literal, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from nexus.db.engine import upsert_for
from nexus.db.models import UnclaimedEvent, WaitRendezvous
from nexus.db.states import WaitState

table = cast(Table, WaitRendezvous.__table__)


@dataclass(frozen=True)
class Woken:
    """An event made a parked saga runnable."""

    saga_id: uuid.UUID
    node: str
    key: str


async def record_event(
    session: AsyncSession,
    *,
    key: str,
    message_id: uuid.UUID,
    payload: Mapping[str, Any],
    generation: int,
    now: datetime,
    occurred_at: datetime | None = None,
) -> Woken | None:
    """The consumer's side: record the event; returns the saga it made runnable, if any."""
    statement = _record_statement(session.get_bind().dialect.name)
    row = (
        await session.execute(
            statement,
            {
                "wait_key": key,
                "event_message_id": message_id,
                "event_payload": dict(payload),
                "event_generation": generation,
                "event_arrived_at": now,
                "event_occurred_at": occurred_at,
                "state": WaitState.EVENT_ARRIVED.value,
            },
        )
    ).first()
    if row is None or row.state != WaitState.READY.value or row.saga_id is None:
        return None
    return Woken(saga_id=row.saga_id, node=row.node_name, key=key)


# The two upserts run for every event and every wait: built once per dialect (building
# one costs more CPU than running it), their values bound at execution.


@functools.cache
def _record_statement(dialect: str) -> Any:
    statement = upsert_for(dialect, table)
    existing = table.c
    wakes = and_(
        existing.state.in_([WaitState.PARKED.value, WaitState.READY.value]),
        statement.excluded.event_generation > func.coalesce(existing.min_generation, 0),
    )
    return statement.on_conflict_do_update(
        index_elements=[existing.wait_key],
        set_={
            "event_message_id": statement.excluded.event_message_id,
            "event_payload": statement.excluded.event_payload,
            "event_generation": statement.excluded.event_generation,
            "event_arrived_at": statement.excluded.event_arrived_at,
            "event_occurred_at": statement.excluded.event_occurred_at,
            "state": case(
                (wakes, literal(WaitState.READY.value)),
                (existing.state == WaitState.PARKED.value, literal(WaitState.PARKED.value)),
                else_=literal(WaitState.EVENT_ARRIVED.value),
            ),
        },
        # Duplicates (same generation) and stale events (older) change nothing.
        where=func.coalesce(existing.event_generation, -1) < statement.excluded.event_generation,
    ).returning(existing.state, existing.saga_id, existing.node_name)


@functools.cache
def _park_statement(dialect: str) -> Any:
    statement = upsert_for(dialect, table)
    existing = table.c
    return statement.on_conflict_do_update(
        index_elements=[existing.wait_key],
        set_={
            "saga_id": statement.excluded.saga_id,
            "node_name": statement.excluded.node_name,
            "deadline": statement.excluded.deadline,
            "min_generation": statement.excluded.min_generation,
            "parked_at": statement.excluded.parked_at,
            "resumed_at": None,
            "state": case(
                (
                    func.coalesce(existing.event_generation, -1)
                    > statement.excluded.min_generation,
                    literal(WaitState.READY.value),
                ),
                else_=literal(WaitState.PARKED.value),
            ),
        },
    ).returning(existing.state)


async def park(
    session: AsyncSession,
    *,
    saga_id: uuid.UUID,
    node: str,
    keys: Sequence[str],
    deadline: datetime,
    min_generation: int,
    now: datetime,
) -> bool:
    """The saga's side: claim the keys; True when an event had already arrived."""
    statement = _park_statement(session.get_bind().dialect.name)
    states = await session.execute(
        statement,
        [
            {
                "wait_key": key,
                "saga_id": saga_id,
                "node_name": node,
                "deadline": deadline,
                "min_generation": min_generation,
                "parked_at": now,
                "state": WaitState.PARKED.value,
            }
            for key in keys
        ],
    )
    return any(state == WaitState.READY.value for state in states.scalars())


@dataclass(frozen=True)
class ReadyWait:
    node: str
    key: str
    payload: Mapping[str, Any]
    generation: int
    message_id: uuid.UUID | None
    occurred_at: datetime | None


async def ready_waits(session: AsyncSession, saga_id: uuid.UUID) -> list[ReadyWait]:
    rows = await session.execute(
        select(
            table.c.node_name,
            table.c.wait_key,
            table.c.event_payload,
            table.c.event_generation,
            table.c.event_message_id,
            table.c.event_occurred_at,
        )
        .where(table.c.saga_id == saga_id, table.c.state == WaitState.READY.value)
        .order_by(table.c.event_arrived_at, table.c.wait_key)
    )
    return [
        ReadyWait(
            node=row.node_name,
            key=row.wait_key,
            payload=row.event_payload or {},
            generation=row.event_generation or 0,
            message_id=row.event_message_id,
            occurred_at=row.event_occurred_at,
        )
        for row in rows
    ]


async def resolve(session: AsyncSession, *, saga_id: uuid.UUID, node: str, now: datetime) -> None:
    """The node has resumed: none of its keys may wake it again."""
    await session.execute(
        update(table)
        .where(table.c.saga_id == saga_id, table.c.node_name == node)
        .values(state=WaitState.RESUMED.value, resumed_at=now)
    )


async def force_ready(
    session: AsyncSession,
    *,
    key: str,
    payload: Mapping[str, Any],
    generation: int,
    now: datetime,
) -> None:
    """Reconcile found what the lost event would have said: record it as arrived."""
    await session.execute(
        update(table)
        .where(table.c.wait_key == key)
        .values(
            event_payload=dict(payload),
            event_generation=generation,
            event_arrived_at=now,
            event_message_id=None,
            event_occurred_at=now,
            state=WaitState.READY.value,
        )
    )


async def rearm(
    session: AsyncSession, *, saga_id: uuid.UUID, node: str, deadline: datetime
) -> None:
    await session.execute(
        update(table)
        .where(
            table.c.saga_id == saga_id,
            table.c.node_name == node,
            table.c.state == WaitState.PARKED.value,
        )
        .values(deadline=deadline)
    )


async def release(session: AsyncSession, saga_id: uuid.UUID) -> None:
    """A saga that unwinds gives up its parked keys; later events become unclaimed."""
    await session.execute(
        delete(table).where(
            table.c.saga_id == saga_id,
            table.c.state == WaitState.PARKED.value,
            table.c.event_generation.is_(None),
        )
    )
    await session.execute(
        update(table)
        .where(
            table.c.saga_id == saga_id,
            table.c.state.in_([WaitState.PARKED.value, WaitState.READY.value]),
        )
        .values(state=WaitState.EVENT_ARRIVED.value, saga_id=None, node_name=None)
    )


async def expired(session: AsyncSession, now: datetime, limit: int) -> list[uuid.UUID]:
    """Sagas with a parked key whose deadline has passed."""
    rows = await session.execute(
        select(table.c.saga_id)
        .where(table.c.state == WaitState.PARKED.value, table.c.deadline < now)
        .group_by(table.c.saga_id)
        .limit(limit)
    )
    return [row.saga_id for row in rows if row.saga_id is not None]


async def woken_but_waiting(session: AsyncSession, limit: int) -> list[uuid.UUID]:
    """Sagas with a ready key: their waker may have died before it claimed them."""
    rows = await session.execute(
        select(table.c.saga_id)
        .where(table.c.state == WaitState.READY.value, table.c.saga_id.is_not(None))
        .group_by(table.c.saga_id)
        .limit(limit)
    )
    return [row.saga_id for row in rows if row.saga_id is not None]


async def sweep_unclaimed(session: AsyncSession, *, older_than: datetime, now: datetime) -> int:
    """Move events nobody claimed in time to ``unclaimed_events``; forget old resumed keys."""
    stale = or_(
        and_(
            table.c.state == WaitState.EVENT_ARRIVED.value,
            table.c.event_arrived_at < older_than,
        ),
    )
    rows = (
        await session.execute(
            select(
                table.c.wait_key,
                table.c.event_message_id,
                table.c.event_payload,
                table.c.event_arrived_at,
            ).where(stale)
        )
    ).all()
    for row in rows:
        session.add(
            UnclaimedEvent(
                wait_key=row.wait_key,
                message_id=row.event_message_id or uuid.UUID(int=0),
                payload=row.event_payload,
                arrived_at=row.event_arrived_at,
                moved_at=now,
            )
        )
    await session.execute(delete(table).where(stale))
    await session.execute(
        delete(table).where(
            table.c.state == WaitState.RESUMED.value, table.c.resumed_at < older_than
        )
    )
    return len(rows)
