"""Agent events into Nexus: record each once, apply it by generation, wake its saga.

One transaction per event: the rendezvous upsert (wakes a parked saga, or keeps the
event for one that has not parked yet) and Nexus's own record of the object (only if
the generation is newer). The message is acked after that commit; the woken saga then
runs on this replica.

No inbox row: every write here is guarded by the object's generation (a rejection's
key is its command's id), so a redelivered or duplicated event changes nothing by
itself, and an inbox insert would cost one statement more per event for nothing.

A state change whose generation is implausibly far ahead of the one Nexus recorded for
its object (more than ``max_generation_lead``) is refused before anything is written:
applied, it would leave the record where no real event could ever update it again. It
is dead-lettered with reason ``implausible_generation``, logged and counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from nexus.db.engine import upsert_insert
from nexus.db.models import Dataset, Instance, Region, Sled
from nexus.db.states import SledState
from nexus.saga import rendezvous
from nexus.saga.rendezvous import Woken
from nexus.settings import MAX_GENERATION_LEAD
from nexus.waitkeys import (
    AWAITED_INSTANCE_STATES,
    AWAITED_REGION_STATES,
    instance_key,
    region_key,
    rejection_key,
)
from schemas.base import Envelope
from schemas.common import CommandRejected
from schemas.instance import InstanceStateChanged
from schemas.messages import Message, MessageRejected
from schemas.region import RegionStateChanged
from schemas.sled import AgentAnnounced, SledHeartbeat, SledRegistered

log = logging.getLogger(__name__)

_regions = cast(Table, Region.__table__)
# Built once: it runs for every region event.
_REGION_UPDATE = (
    update(_regions)
    .where(_regions.c.id == bindparam("b_id"), _regions.c.generation < bindparam("b_generation"))
    .values(
        state=bindparam("b_state", type_=_regions.c.state.type),
        generation=bindparam("b_generation"),
        port_number=bindparam("b_port"),
    )
)


_instances = cast(Table, Instance.__table__)
# The generation Nexus recorded for the object of a state change (built once, as above).
_RECORDED_GENERATION = {
    RegionStateChanged: select(_regions.c.generation).where(_regions.c.id == bindparam("b_id")),
    InstanceStateChanged: select(_instances.c.generation).where(
        _instances.c.id == bindparam("b_id")
    ),
}


@dataclass(frozen=True)
class Ingested:
    woken: Woken | None


class EventIngest:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        clock: Callable[[], datetime],
        *,
        max_generation_lead: int = MAX_GENERATION_LEAD,
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._max_generation_lead = max_generation_lead
        # Events refused here, by reason, since this replica started.
        self.refused: Counter[str] = Counter()

    async def ingest(self, message: Message) -> Ingested:
        handler = HANDLERS.get(type(message))
        if handler is None:
            log.warning(
                "nexus.events got a %s; ignored",
                message.TYPE,
                extra={"message_id": str(message.id)},
            )
            return Ingested(woken=None)
        now = self._clock()
        async with self._sessions.begin() as session:
            try:
                await check_generation(session, message, self._max_generation_lead)
            except MessageRejected as rejected:
                self.refused[rejected.reason] += 1
                log.warning(
                    "refused %s: %s: %s",
                    message.TYPE,
                    rejected.reason,
                    rejected.detail,
                    extra={
                        "message_id": str(message.id),
                        "source": message.source,
                        "reason": rejected.reason,
                        "refused_so_far": self.refused[rejected.reason],
                    },
                )
                raise
            return Ingested(woken=await handler(session, message, now))


async def check_generation(session: AsyncSession, message: Message, max_lead: int) -> None:
    """Raise MessageRejected (``implausible_generation``) when a region or instance state
    change is more than ``max_lead`` generations ahead of the one Nexus recorded for the
    object. An object Nexus has no record of is not judged here."""
    statement = _RECORDED_GENERATION.get(type(message))
    if statement is None:
        return
    assert isinstance(message, RegionStateChanged | InstanceStateChanged)
    subject = (
        message.payload.region
        if isinstance(message, RegionStateChanged)
        else message.payload.instance
    )
    recorded = (await session.execute(statement, {"b_id": subject.id})).scalar_one_or_none()
    if recorded is not None and subject.generation - recorded > max_lead:
        kind = "region" if isinstance(message, RegionStateChanged) else "instance"
        raise MessageRejected(
            "implausible_generation",
            f"{kind} {subject.id} at generation {subject.generation} is "
            f"{subject.generation - recorded} ahead of the {recorded} Nexus recorded "
            f"(at most {max_lead} is plausible)",
        )


# One handler per event type, each inside the event's transaction; the table at the end.


async def region_state_changed(
    session: AsyncSession, message: RegionStateChanged, now: datetime
) -> Woken | None:
    region = message.payload.region
    await session.execute(
        _REGION_UPDATE,
        {
            "b_id": region.id,
            "b_state": region.state.value,
            "b_generation": region.generation,
            "b_port": region.port_number,
        },
    )
    if region.state not in AWAITED_REGION_STATES:
        return None  # no saga ever waits for it (nexus.waitkeys): nothing to keep
    key = region_key(region.id, region.state)
    return await _file_for_saga(session, message, key, region.generation, now)


async def instance_state_changed(
    session: AsyncSession, message: InstanceStateChanged, now: datetime
) -> Woken | None:
    instance = message.payload.instance
    # Nexus's instance record follows the sled's by generation; sagas that own a
    # transition (start, stop, delete) also write it, and the higher generation wins.
    await session.execute(
        update(Instance)
        .where(
            Instance.id == instance.id,
            Instance.generation < instance.generation,
            Instance.state.not_in(["deleting", "deleted"]),
        )
        .values(
            state=instance.state.value if instance.state.value != "destroyed" else "stopped",
            generation=instance.generation,
            updated_at=now,
        )
    )
    if instance.state not in AWAITED_INSTANCE_STATES:
        return None  # no saga ever waits for it (nexus.waitkeys): nothing to keep
    key = instance_key(instance.id, instance.state)
    return await _file_for_saga(session, message, key, instance.generation, now)


async def _file_for_saga(
    session: AsyncSession,
    message: RegionStateChanged | InstanceStateChanged,
    key: str,
    generation: int,
    now: datetime,
) -> Woken | None:
    """The rendezvous: wake the saga parked on ``key``, or keep the change until it parks."""
    return await rendezvous.record_event(
        session,
        key=key,
        message_id=message.id,
        payload=message.payload.model_dump(mode="json"),
        generation=generation,
        now=now,
        occurred_at=message.occurred_at,
    )


async def command_rejected(
    session: AsyncSession, message: CommandRejected, now: datetime
) -> Woken | None:
    rejection = message.payload
    return await rendezvous.record_event(
        session,
        key=rejection_key(rejection.command_id),
        message_id=message.id,
        payload=rejection.model_dump(mode="json"),
        generation=1,
        now=now,
    )


async def sled_registered(session: AsyncSession, message: SledRegistered, now: datetime) -> None:
    info = message.payload
    statement = upsert_insert(session, Sled.__table__).values(
        id=info.sled_id,
        hostname=info.hostname,
        queue_name=info.queue,
        cpus=info.cpus,
        memory_bytes=info.memory_bytes,
        state=SledState.ACTIVE.value,
        last_heartbeat_at=now,
        generation=1,
    )
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=["id"],
            set_={
                "hostname": info.hostname,
                "queue_name": info.queue,
                "cpus": info.cpus,
                "memory_bytes": info.memory_bytes,
                "state": SledState.ACTIVE.value,
                "last_heartbeat_at": now,
            },
        )
    )


async def sled_heartbeat(session: AsyncSession, message: SledHeartbeat, now: datetime) -> None:
    await session.execute(
        update(Sled)
        .where(Sled.id == message.payload.sled_id)
        .values(last_heartbeat_at=now, state=SledState.ACTIVE.value)
    )


async def agent_announced(session: AsyncSession, message: AgentAnnounced, now: datetime) -> None:
    agent = message.payload
    statement = upsert_insert(session, Dataset.__table__).values(
        id=agent.agent_id,
        sled_id=agent.sled_id,
        queue_name=agent.queue,
        capacity_bytes=agent.capacity_bytes,
        free_bytes=agent.free_bytes,
        last_seen_at=now,
    )
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=["id"],
            # Free space is Nexus's own account once it knows the dataset: it reserves
            # space when it places a region, before the agent hears of it, so the
            # agent's figure would undo reservations.
            set_={
                "sled_id": agent.sled_id,
                "queue_name": agent.queue,
                "capacity_bytes": agent.capacity_bytes,
                "last_seen_at": now,
            },
        )
    )


# Returns the saga the event made runnable, if any.
Handler = Callable[[AsyncSession, Any, datetime], Awaitable[Woken | None]]

HANDLERS: dict[type[Envelope], Handler] = {
    RegionStateChanged: region_state_changed,
    InstanceStateChanged: instance_state_changed,
    CommandRejected: command_rejected,
    SledRegistered: sled_registered,
    SledHeartbeat: sled_heartbeat,
    AgentAnnounced: agent_announced,
}
