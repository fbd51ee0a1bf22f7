"""Events no saga claimed, grouped for people: ``nexusctl events unclaimed`` and the
section of ``nexusctl doctor`` that shows them.

An event that arrives before its saga parks waits on its rendezvous row; one that no
saga claims within ``NEXUS_UNCLAIMED_RETENTION_SECONDS`` is moved to
``unclaimed_events`` (:func:`nexus.saga.rendezvous.sweep_unclaimed`). Events in a state
no saga ever waits for are not kept at all (:mod:`nexus.waitkeys`), so what is here is
worth a look: a region created after its saga gave up on it, a VMM that crashed
with no operation under way, a refusal nobody waited for.

Each event is grouped by its type, as the routing key it came on names it (from its
wait key), and its source: the agent the event names (a region event's ``agent_id``,
a VMM event's sled), or for a refusal the agent its command was sent to
(Nexus's outbox). The envelope's own ``source`` is not kept with the event.
"""

from __future__ import annotations

import heapq
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from nexus.db.models import Dataset, OutboxMessage, Sled, UnclaimedEvent
from nexus.waitkeys import event_type, is_rejection
from schemas import api

# The newest this many events are grouped; the count of all of them is exact.
SCAN_LIMIT = 50_000
UNKNOWN_SOURCE = "unknown"
_CHUNK = 500


@dataclass
class _Group:
    type: str
    source: str
    count: int = 0
    oldest_at: datetime | None = None
    newest_at: datetime | None = None
    # (arrived_at, id) of the newest few, as a min-heap.
    newest: list[tuple[datetime, int]] = field(default_factory=list)

    def add(self, row_id: int, arrived_at: datetime, keep: int) -> None:
        self.count += 1
        if self.oldest_at is None or arrived_at < self.oldest_at:
            self.oldest_at = arrived_at
        if self.newest_at is None or arrived_at > self.newest_at:
            self.newest_at = arrived_at
        if keep == 0:
            return
        if len(self.newest) < keep:
            heapq.heappush(self.newest, (arrived_at, row_id))
        elif (arrived_at, row_id) > self.newest[0]:
            heapq.heapreplace(self.newest, (arrived_at, row_id))


async def summarise(
    sessions: async_sessionmaker[AsyncSession],
    *,
    groups: int,
    examples: int,
    scan_limit: int = SCAN_LIMIT,
) -> api.UnclaimedSummary:
    """The largest ``groups`` groups, each with its ``examples`` newest events."""
    async with sessions() as session:
        total = await session.scalar(select(func.count()).select_from(UnclaimedEvent)) or 0
        rows = (
            await session.execute(
                select(
                    UnclaimedEvent.id,
                    UnclaimedEvent.wait_key,
                    UnclaimedEvent.arrived_at,
                    UnclaimedEvent.payload["agent_id"].as_string().label("agent_id"),
                    UnclaimedEvent.payload[("vmm", "sled_id")].as_string().label("sled_id"),
                    UnclaimedEvent.payload["command_id"].as_string().label("command_id"),
                )
                .order_by(UnclaimedEvent.id.desc())
                .limit(scan_limit)
            )
        ).all()
        commanded = await _agents_commanded(
            session, [row.command_id for row in rows if is_rejection(row.wait_key)]
        )
        found: dict[tuple[str, str], _Group] = {}
        for row in rows:
            kind = event_type(row.wait_key)
            if is_rejection(row.wait_key):
                source = commanded.get(row.command_id or "", UNKNOWN_SOURCE)
            elif row.agent_id:
                source = f"crucible/{row.agent_id}"
            elif row.sled_id:
                source = f"sled/{row.sled_id}"
            else:
                source = UNKNOWN_SOURCE
            group = found.setdefault((kind, source), _Group(kind, source))
            group.add(row.id, row.arrived_at, examples)
        chosen = sorted(
            found.values(), key=lambda g: (-g.count, -(g.newest_at or _EPOCH).timestamp())
        )[:groups]
        wanted = [row_id for group in chosen for _, row_id in group.newest]
        shown = await _events(session, wanted)
    return api.UnclaimedSummary(
        total=total,
        scanned=len(rows),
        group_count=len(found),
        groups=tuple(_view(group, shown) for group in chosen),
    )


_EPOCH = datetime.fromtimestamp(0, UTC)


async def _agents_commanded(
    session: AsyncSession, command_ids: Iterable[str | None]
) -> dict[str, str]:
    """Command id (as text) to the source of the agent it was sent to."""
    ids: dict[uuid.UUID, str] = {}
    for text in command_ids:
        try:
            ids[uuid.UUID(str(text))] = str(text)
        except ValueError:
            continue
    queues: dict[str, str] = {}
    keys = list(ids)
    for start in range(0, len(keys), _CHUNK):
        chunk = keys[start : start + _CHUNK]
        sent = await session.execute(
            select(OutboxMessage.message_id, OutboxMessage.routing_key).where(
                OutboxMessage.message_id.in_(chunk)
            )
        )
        queues |= {ids[row.message_id]: row.routing_key for row in sent}
    owners = await _queue_owners(session, set(queues.values()))
    return {command: owners[queue] for command, queue in queues.items() if queue in owners}


async def _queue_owners(session: AsyncSession, queues: set[str]) -> dict[str, str]:
    """Command queue name to the source of the agent that consumes it, by Nexus's records."""
    if not queues:
        return {}
    owners: dict[str, str] = {}
    names = sorted(queues)
    for start in range(0, len(names), _CHUNK):
        chunk = names[start : start + _CHUNK]
        datasets = await session.execute(
            select(Dataset.queue_name, Dataset.id).where(Dataset.queue_name.in_(chunk))
        )
        owners |= {row.queue_name: f"crucible/{row.id}" for row in datasets}
        sleds = await session.execute(
            select(Sled.queue_name, Sled.id).where(Sled.queue_name.in_(chunk))
        )
        owners |= {row.queue_name: f"sled/{row.id}" for row in sleds}
    return owners


async def _events(session: AsyncSession, row_ids: list[int]) -> dict[int, UnclaimedEvent]:
    if not row_ids:
        return {}
    rows = await session.execute(select(UnclaimedEvent).where(UnclaimedEvent.id.in_(row_ids)))
    return {event.id: event for event in rows.scalars()}


def _view(group: _Group, shown: Mapping[int, UnclaimedEvent]) -> api.UnclaimedGroup:
    assert group.oldest_at is not None and group.newest_at is not None
    newest_first = sorted(group.newest, reverse=True)
    return api.UnclaimedGroup(
        type=group.type,
        source=group.source,
        count=group.count,
        oldest_at=group.oldest_at,
        newest_at=group.newest_at,
        examples=tuple(
            api.UnclaimedExample(
                message_id=event.message_id,
                wait_key=event.wait_key,
                summary=describe(event.wait_key, event.payload or {})[:200],
                arrived_at=event.arrived_at,
                moved_at=event.moved_at,
            )
            for _, row_id in newest_first
            if (event := shown.get(row_id)) is not None
        ),
    )


def describe(wait_key: str, payload: Mapping[str, Any]) -> str:
    """One line for people: what the event said."""
    if is_rejection(wait_key):
        return (
            f"{payload.get('command_type', 'command')} {payload.get('command_id', '?')} "
            f"refused ({payload.get('code', '?')}): {payload.get('message', '')}"
        )
    for kind in ("region", "vmm"):
        thing = payload.get(kind)
        if isinstance(thing, Mapping):
            line = (
                f"{kind} {thing.get('id', '?')} {thing.get('state', '?')} "
                f"(generation {thing.get('generation', '?')})"
            )
            why = thing.get("failure") or thing.get("reason")
            return f"{line}: {why}" if why else line
    return wait_key
