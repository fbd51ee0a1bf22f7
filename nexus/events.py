"""Agent events into Nexus: record each once, apply it by generation, wake its saga.

One transaction per event: the rendezvous upsert (wakes a parked saga, or keeps the
event for one that has not parked yet) and Nexus's own record of the object (only if
the generation is newer). The message is acked after that commit; the woken saga then
runs on this replica.

No inbox row: every write here is guarded by the object's generation (a rejection's
key is its command's id), so a redelivered or duplicated event changes nothing by
itself, and an inbox insert would cost one statement more per event for nothing.

Authority comes first: a message is believed only about what its sender owns, by Nexus's
own records of what it placed where, never by what the message claims
(:func:`authorize`). The sender is the envelope's ``source``, which the transport has
checked against the broker-validated ``user_id``. A region event must come from the
agent of the region's dataset (and so must a snapshot or running snapshot event, about
one of its regions), a VMM event from the sled Nexus placed the VMM on, a
rejection from the agent whose queue the command was sent to (its outbox row), and an
announcement, a registration or a heartbeat from the agent it announces; the agent's
queue is derived from its id, never taken from the message. Anything else is refused
before anything is written, with reason ``not_owner``: dead-lettered, it changes no
state and wakes no saga. An event about an object Nexus has no record of at all (a
region it never placed or whose row an undo deleted, a rejection of a command it did not
send through its outbox) has no record to change and is kept like any event no saga
claims, for ``nexusctl events unclaimed`` to show; no saga can wait on it, since sagas
wait only on objects they recorded before commanding them, under fresh ids.

A VMM's state goes through :func:`nexus.vmms.record_vmm_state`: an event about a VMM
that has ended in Nexus's records (the sled's own ``destroyed`` or ``failed``, or a
failure Nexus recorded for a lost sled) changes nothing and wakes no saga, and the
instance follows only its active VMM.

A state change whose generation is implausibly far ahead of the one Nexus recorded for
its object (more than ``max_generation_lead``) is refused before anything is written:
applied, it would leave the record where no real event could ever update it again. It
is dead-lettered with reason ``implausible_generation``, logged and counted.

Cheap discards: each replica remembers, in a bounded LRU (:class:`Recorded`), the
generation of every region/VMM state change it has committed, per wait key (the
object and its state), and the owner it read for the object. A later change from that
same owner for that key whose generation is not newer is acked without a transaction:
every write it would make (the object's row, the rendezvous row of its key) is guarded
by that generation, so it could change nothing. The cache is filled only after a commit,
from what Nexus's own records said (the owner) and what it committed (the generation),
never from a message alone; an event from anyone but the cached owner takes the full
path, so a refusal (``not_owner``) is always decided on the database.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any, cast

from sqlalchemy import Table, bindparam, case, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from nexus.db.engine import upsert_insert
from nexus.db.models import (
    Dataset,
    OutboxMessage,
    Region,
    RegionReplacement,
    RegionSnapshot,
    Sled,
    Vmm,
)
from nexus.db.states import ReplacementState, SledState, VmmState
from nexus.saga import rendezvous
from nexus.saga.rendezvous import Woken
from nexus.settings import MAX_GENERATION_LEAD
from nexus.vmms import record_vmm_state, vmm_is_recorded
from nexus.waitkeys import (
    AWAITED_REGION_STATES,
    AWAITED_REPAIR_STATES,
    AWAITED_RUNNING_SNAPSHOT_STATES,
    AWAITED_SNAPSHOT_STATES,
    AWAITED_VMM_STATES,
    disk_flush_key,
    region_key,
    rejection_key,
    repair_key,
    running_snapshot_key,
    snapshot_key,
    vmm_key,
)
from schemas.base import Envelope
from schemas.common import CommandRejected
from schemas.identity import NOT_OWNER, crucible_source, queue_agent, sled_source
from schemas.instance import RepairChanged, VmmDiskFlushed, VmmStateChanged
from schemas.messages import Message, MessageRejected
from schemas.region import RegionStateChanged
from schemas.sled import AgentAnnounced, SledHeartbeat, SledRegistered
from schemas.snapshot import RegionSnapshotStateChanged, RunningSnapshotStateChanged
from schemas.topology import COMMANDS_EXCHANGE, crucible_queue, sled_queue

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


_region_snapshots = cast(Table, RegionSnapshot.__table__)
# A region's snapshot and its running snapshot, by generation (as a region's state).
_SNAPSHOT_UPDATE = (
    update(_region_snapshots)
    .where(
        _region_snapshots.c.region_id == bindparam("b_region_id"),
        _region_snapshots.c.snapshot_id == bindparam("b_snapshot_id"),
        _region_snapshots.c.snapshot_generation < bindparam("b_generation"),
    )
    .values(
        snapshot_state=bindparam("b_state", type_=_region_snapshots.c.snapshot_state.type),
        snapshot_generation=bindparam("b_generation"),
    )
)
_RUNNING_UPDATE = (
    update(_region_snapshots)
    .where(
        _region_snapshots.c.region_id == bindparam("b_region_id"),
        _region_snapshots.c.snapshot_id == bindparam("b_snapshot_id"),
        _region_snapshots.c.running_generation < bindparam("b_generation"),
    )
    .values(
        running_state=bindparam("b_state", type_=_region_snapshots.c.running_state.type),
        running_generation=bindparam("b_generation"),
        port_number=bindparam("b_port"),
    )
)

_vmms = cast(Table, Vmm.__table__)
_sleds = cast(Table, Sled.__table__)


_outbox = cast(Table, OutboxMessage.__table__)
# Who owns what, by Nexus's records (built once, as above).
# One read of the object's row gives its owner and the generation Nexus recorded.
_REGION_DATASET = select(_regions.c.dataset_id, _regions.c.generation).where(
    _regions.c.id == bindparam("b_id")
)
_VMM_SLED = select(_vmms.c.sled_id, _vmms.c.generation).where(_vmms.c.id == bindparam("b_id"))
_COMMAND_QUEUE = select(_outbox.c.routing_key).where(
    _outbox.c.message_id == bindparam("b_id"), _outbox.c.exchange == COMMANDS_EXCHANGE
)


@dataclass(frozen=True)
class Ingested:
    woken: Woken | None


class Unowned(Exception):
    """Nexus records the object an event is about with no owner: the event is dropped."""


class Nobody(Enum):
    UNRECORDED = "unrecorded"
    """The owner of an object Nexus has no record of: there is nothing of Nexus's to
    change, so only the message's own consistency is checked."""


Owner = str | None | Nobody


# How many wait keys (and objects) a replica remembers for cheap discards.
RECORDED_CAPACITY = 100_000
# At most one log line per this many seconds about discards.
DISCARD_LOG_SECONDS = 10.0


class Recorded:
    """This replica's committed facts about regions and VMMs, bounded (LRU): the
    owner Nexus's records name for an object, and the highest generation committed per
    wait key (object id and state)."""

    def __init__(self, capacity: int = RECORDED_CAPACITY) -> None:
        self._capacity = capacity
        self._owners: OrderedDict[Any, str] = OrderedDict()
        self._generations: OrderedDict[tuple[Any, str], int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._generations)

    def owner(self, subject: Any) -> str | None:
        owner = self._owners.get(subject)
        if owner is not None:
            self._owners.move_to_end(subject)
        return owner

    def generation(self, subject: Any, state: str) -> int | None:
        generation = self._generations.get((subject, state))
        if generation is not None:
            self._generations.move_to_end((subject, state))
        return generation

    def committed(self, subject: Any, state: str, owner: str, generation: int) -> None:
        """Remember an event committed for ``subject`` from ``owner`` (by Nexus's records)."""
        self._owners[subject] = owner
        self._owners.move_to_end(subject)
        key = (subject, state)
        if self._generations.get(key, -1) < generation:
            self._generations[key] = generation
        self._generations.move_to_end(key)
        for cache in (self._owners, self._generations):
            while len(cache) > self._capacity:
                cache.popitem(last=False)


def _state_change(message: Message) -> tuple[Any, str, int, str] | None:
    """A region or VMM state change's object id, state, generation and the agent
    its payload names as the speaker; None for any other message."""
    match message:
        case RegionStateChanged(payload=change):
            region = change.region
            return (
                region.id,
                region.state.value,
                region.generation,
                crucible_source(change.agent_id),
            )
        case VmmStateChanged(payload=change):
            vmm = change.vmm
            return (vmm.id, vmm.state.value, vmm.generation, sled_source(vmm.sled_id))
    return None


class EventIngest:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        clock: Callable[[], datetime],
        *,
        max_generation_lead: int = MAX_GENERATION_LEAD,
        recorded_capacity: int = RECORDED_CAPACITY,
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._max_generation_lead = max_generation_lead
        self.recorded = Recorded(recorded_capacity)
        # Stale or duplicate state changes acked without a transaction, since this
        # replica started.
        self.discarded = 0
        self._discards_logged_at = time.monotonic()
        self._discards_logged = 0
        # Events refused here, by reason, since this replica started.
        self.refused: Counter[str] = Counter()
        # Events dropped as about objects nobody owns, by type, since this replica started.
        self.unowned: Counter[str] = Counter()

    async def ingest(self, message: Message) -> Ingested:
        """Apply one event in one transaction; raises :class:`MessageRejected` for one
        that is refused (``not_owner``, ``implausible_generation``) before any write."""
        handler = HANDLERS.get(type(message))
        if handler is None:
            log.warning(
                "nexus.events got a %s; ignored",
                message.TYPE,
                extra={"message_id": str(message.id)},
            )
            return Ingested(woken=None)
        change = _state_change(message)
        if change is not None and self._discardable(message, *change):
            return Ingested(woken=None)
        now = self._clock()
        async with self._sessions.begin() as session:
            try:
                owner, recorded = await authorize(session, message)
                check_generation(message, recorded, self._max_generation_lead)
            except Unowned as unowned:
                self.unowned[message.TYPE] += 1
                log.info(
                    "dropped %s from %s: %s",
                    message.TYPE,
                    message.source,
                    unowned,
                    extra={
                        "message_id": str(message.id),
                        "source": message.source,
                        "dropped_so_far": self.unowned.total(),
                    },
                )
                return Ingested(woken=None)
            except MessageRejected as rejected:
                self.refused[rejected.reason] += 1
                log.warning(
                    "refused %s: %s: %s (%d %s so far on this replica)",
                    message.TYPE,
                    rejected.reason,
                    rejected.detail,
                    self.refused[rejected.reason],
                    rejected.reason,
                    extra={
                        "message_id": str(message.id),
                        "source": message.source,
                        "reason": rejected.reason,
                        "refused_so_far": self.refused[rejected.reason],
                    },
                )
                raise
            woken = await handler(session, message, now)
        if change is not None and isinstance(owner, str):
            subject, state, generation, _ = change
            self.recorded.committed(subject, state, owner, generation)
        return Ingested(woken=woken)

    def _discardable(
        self, message: Message, subject: Any, state: str, generation: int, named: str
    ) -> bool:
        """True (and counted) when this replica committed, for the same object and
        state, a generation at least this one's, from this same sender, the owner by
        Nexus's records: the event could change nothing."""
        owner = self.recorded.owner(subject)
        if owner is None or owner != message.source or named != message.source:
            return False  # unknown, or not the owner: the full path decides
        known = self.recorded.generation(subject, state)
        if known is None or generation > known:
            return False
        self.discarded += 1
        now = time.monotonic()
        if now - self._discards_logged_at >= DISCARD_LOG_SECONDS:
            log.info(
                "discarded %d stale or duplicate state changes without a transaction "
                "(%d in the last %.0f s)",
                self.discarded,
                self.discarded - self._discards_logged,
                now - self._discards_logged_at,
                extra={"discarded_so_far": self.discarded},
            )
            self._discards_logged_at = now
            self._discards_logged = self.discarded
        return True


async def authorize(session: AsyncSession, message: Message) -> tuple[Owner, int | None]:
    """Let ``message`` through only if its sender may say it, by Nexus's records; returns
    the owner of a region's or VMM's state change (None for other messages) and the
    generation Nexus recorded for that object (None where it has no record).

    Raises :class:`MessageRejected` (``not_owner``) when another agent owns its object
    or it speaks for another agent, :class:`Unowned` when Nexus records the object with
    no owner.
    """
    owner: Owner = None
    recorded: int | None = None
    match message:
        case RegionStateChanged(payload=change):
            region = (await session.execute(_REGION_DATASET, {"b_id": change.region.id})).first()
            if region is None:
                owner = Nobody.UNRECORDED
            else:
                owner, recorded = crucible_source(region.dataset_id), region.generation
            about = f"region {change.region.id}"
            check_speaker(message, owner, about, crucible_source(change.agent_id))
        case VmmStateChanged(payload=change):
            row = (await session.execute(_VMM_SLED, {"b_id": change.vmm.id})).first()
            if row is None:
                owner = Nobody.UNRECORDED
            else:
                owner, recorded = sled_source(row.sled_id), row.generation
            about = f"VMM {change.vmm.id}"
            check_speaker(message, owner, about, sled_source(change.vmm.sled_id))
        case VmmDiskFlushed(payload=flushed):
            row = (await session.execute(_VMM_SLED, {"b_id": flushed.vmm_id})).first()
            vmm_owner: Owner = Nobody.UNRECORDED if row is None else sled_source(row.sled_id)
            about = f"VMM {flushed.vmm_id}"
            check_speaker(message, vmm_owner, about, sled_source(flushed.sled_id))
        case CommandRejected(payload=rejection):
            # The command's addressee, from the outbox row it was sent from (Nexus keeps
            # sent rows); a command Nexus did not send through it (a query) has none.
            queue = await session.scalar(_COMMAND_QUEUE, {"b_id": rejection.command_id})
            owner = queue_agent(queue) if queue is not None else Nobody.UNRECORDED
            about = f"command {rejection.command_id} ({rejection.command_type})"
            check_speaker(message, owner, about)
        case RegionSnapshotStateChanged(payload=change):
            snapshot = change.snapshot
            await _check_region_owner(
                session,
                message,
                snapshot.region_id,
                f"snapshot {snapshot.name} of region {snapshot.region_id}",
                change.agent_id,
            )
        case RunningSnapshotStateChanged(payload=change):
            running = change.running_snapshot
            await _check_region_owner(
                session,
                message,
                running.id,
                f"running snapshot {running.name} of region {running.id}",
                change.agent_id,
            )
        case RepairChanged(payload=change):
            # A repair is its VMM's: only the sled Nexus placed the VMM on may speak of it.
            repair = change.repair
            row = (await session.execute(_VMM_SLED, {"b_id": repair.vmm_id})).first()
            owner = Nobody.UNRECORDED if row is None else sled_source(row.sled_id)
            check_speaker(
                message,
                owner,
                f"repair {repair.id} of VMM {repair.vmm_id}",
                sled_source(repair.sled_id),
            )
        case AgentAnnounced(payload=agent):
            check_speaker(message, crucible_source(agent.agent_id), f"dataset {agent.agent_id}")
        case SledRegistered(payload=info):
            check_speaker(message, sled_source(info.sled_id), f"sled {info.sled_id}")
        case SledHeartbeat(payload=beat):
            check_speaker(message, sled_source(beat.sled_id), f"sled {beat.sled_id}")
    if not isinstance(message, RegionStateChanged | VmmStateChanged):
        return None, None
    return owner, recorded


async def _check_region_owner(
    session: AsyncSession,
    message: Envelope,
    region_id: Any,
    about: str,
    agent_id: Any,
) -> None:
    """A snapshot or running snapshot is its region's: only the agent of the region's
    dataset, by Nexus's records, may speak of it."""
    region = (await session.execute(_REGION_DATASET, {"b_id": region_id})).first()
    owner: Owner = Nobody.UNRECORDED if region is None else crucible_source(region.dataset_id)
    check_speaker(message, owner, about, crucible_source(agent_id))


def check_speaker(message: Envelope, owner: Owner, about: str, *named: str) -> None:
    """Let ``message`` through only if its sender is ``owner`` (the source of the agent
    that owns the object, by Nexus's records) and so is every agent its payload ``named``
    as the speaker."""
    for claimed in named:
        if claimed != message.source:
            raise MessageRejected(
                NOT_OWNER, f"{message.source} sent a {message.TYPE} naming {claimed} about {about}"
            )
    if owner is Nobody.UNRECORDED:
        return
    if owner is None:
        raise Unowned(f"no owner recorded for {about}")
    if owner != message.source:
        raise MessageRejected(
            NOT_OWNER, f"{message.source} sent a {message.TYPE} about {about}, owned by {owner}"
        )


def check_generation(message: Message, recorded: int | None, max_lead: int) -> None:
    """Raise MessageRejected (``implausible_generation``) when a region or VMM state
    change is more than ``max_lead`` generations ahead of ``recorded``, the one Nexus
    recorded for the object. An object Nexus has no record of is not judged here."""
    if recorded is None or not isinstance(message, RegionStateChanged | VmmStateChanged):
        return
    subject = (
        message.payload.region if isinstance(message, RegionStateChanged) else message.payload.vmm
    )
    if subject.generation - recorded > max_lead:
        kind = "region" if isinstance(message, RegionStateChanged) else "VMM"
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


async def vmm_state_changed(
    session: AsyncSession, message: VmmStateChanged, now: datetime
) -> Woken | None:
    vmm = message.payload.vmm
    state = VmmState(vmm.state.value)
    applied = await record_vmm_state(session, vmm.id, state, vmm.generation, now, reason=vmm.reason)
    if vmm.state not in AWAITED_VMM_STATES:
        return None  # no saga ever waits for it (nexus.waitkeys): nothing to keep
    if not applied and await vmm_is_recorded(session, vmm.id):
        return None  # stale, repeated, or about a VMM that has ended: nothing to tell
    key = vmm_key(vmm.id, vmm.state)
    return await _file_for_saga(session, message, key, vmm.generation, now)


async def _file_for_saga(
    session: AsyncSession,
    message: RegionStateChanged
    | VmmStateChanged
    | RegionSnapshotStateChanged
    | RunningSnapshotStateChanged,
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


async def disk_flushed(
    session: AsyncSession, message: VmmDiskFlushed, now: datetime
) -> Woken | None:
    """A VMM flushed a disk for a snapshot: wakes the snapshot_create saga parked on it.
    Nothing of Nexus's records changes (a flush changes no state)."""
    flushed = message.payload
    return await rendezvous.record_event(
        session,
        key=disk_flush_key(flushed.vmm_id, flushed.snapshot_id),
        message_id=message.id,
        payload=flushed.model_dump(mode="json"),
        generation=1,
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


def snapshot_id_of(name: str) -> uuid.UUID | None:
    """The Nexus snapshot a region snapshot's name stands for (Nexus names them by the
    snapshot's id); None for a name Nexus never gives."""
    try:
        return uuid.UUID(name)
    except ValueError:
        return None


async def region_snapshot_changed(
    session: AsyncSession, message: RegionSnapshotStateChanged, now: datetime
) -> Woken | None:
    """A region's snapshot taken or deleted: Nexus's ``region_snapshots`` row follows it
    by generation, and the saga waiting for it (``nexus.waitkeys.snapshot_key``) wakes.
    One Nexus has no row for is still filed, like a region event Nexus has no record of,
    and ends among the unclaimed events if no saga claims it."""
    snapshot = message.payload.snapshot
    snapshot_id = snapshot_id_of(snapshot.name)
    if snapshot_id is not None:
        await session.execute(
            _SNAPSHOT_UPDATE,
            {
                "b_region_id": snapshot.region_id,
                "b_snapshot_id": snapshot_id,
                "b_state": snapshot.state.value,
                "b_generation": snapshot.generation,
            },
        )
    if snapshot.state not in AWAITED_SNAPSHOT_STATES:
        return None
    key = snapshot_key(snapshot.region_id, snapshot.name, snapshot.state)
    return await _file_for_saga(session, message, key, snapshot.generation, now)


async def running_snapshot_changed(
    session: AsyncSession, message: RunningSnapshotStateChanged, now: datetime
) -> Woken | None:
    """A running snapshot moved (requested, created, tombstoned, destroyed, failed): as
    :func:`region_snapshot_changed`, keyed by ``nexus.waitkeys.running_snapshot_key``."""
    running = message.payload.running_snapshot
    snapshot_id = snapshot_id_of(running.name)
    if snapshot_id is not None:
        await session.execute(
            _RUNNING_UPDATE,
            {
                "b_region_id": running.id,
                "b_snapshot_id": snapshot_id,
                "b_state": running.state.value,
                "b_generation": running.generation,
                "b_port": running.port_number,
            },
        )
    if running.state not in AWAITED_RUNNING_SNAPSHOT_STATES:
        return None
    key = running_snapshot_key(running.id, running.name, running.state)
    return await _file_for_saga(session, message, key, running.generation, now)


async def repair_changed(
    session: AsyncSession, message: RepairChanged, now: datetime
) -> Woken | None:
    """A live repair's step: the replacement request shows its progress, and its end
    (finished, failed) is filed for the saga that waits on it."""
    repair = message.payload.repair
    await session.execute(
        update(RegionReplacement)
        .where(
            RegionReplacement.new_region_id == repair.new_region_id,
            RegionReplacement.state == ReplacementState.DRIVING,
            (RegionReplacement.repair_progress.is_(None))
            | (RegionReplacement.repair_progress < repair.progress),
        )
        .values(repair_progress=repair.progress)
    )
    if repair.state not in AWAITED_REPAIR_STATES:
        return None  # no saga ever waits for it (nexus.waitkeys): nothing to keep
    return await rendezvous.record_event(
        session,
        key=repair_key(repair.id, repair.state),
        message_id=message.id,
        payload=message.payload.model_dump(mode="json"),
        generation=repair.generation,
        now=now,
        occurred_at=message.occurred_at,
    )


async def sled_registered(session: AsyncSession, message: SledRegistered, now: datetime) -> None:
    info = message.payload
    # Its queue follows from its id; the message's ``queue`` is not believed.
    queue = sled_queue(info.sled_id)
    statement = upsert_insert(session, Sled.__table__).values(
        id=info.sled_id,
        hostname=info.hostname,
        queue_name=queue,
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
                "queue_name": queue,
                "cpus": info.cpus,
                "memory_bytes": info.memory_bytes,
                # An expunged sled stays expunged: Nexus has failed its VMMs.
                "state": case(
                    (_sleds.c.state == SledState.EXPUNGED.value, SledState.EXPUNGED.value),
                    else_=SledState.ACTIVE.value,
                ),
                "last_heartbeat_at": now,
            },
        )
    )


async def sled_heartbeat(session: AsyncSession, message: SledHeartbeat, now: datetime) -> None:
    # An expunged sled stays expunged: Nexus has failed its VMMs.
    await session.execute(
        update(Sled)
        .where(Sled.id == message.payload.sled_id, Sled.state != SledState.EXPUNGED)
        .values(last_heartbeat_at=now, state=SledState.ACTIVE.value)
    )


async def agent_announced(session: AsyncSession, message: AgentAnnounced, now: datetime) -> None:
    agent = message.payload
    # Its queue follows from its id; the message's ``queue`` is not believed.
    queue = crucible_queue(agent.agent_id)
    statement = upsert_insert(session, Dataset.__table__).values(
        id=agent.agent_id,
        sled_id=agent.sled_id,
        queue_name=queue,
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
                "queue_name": queue,
                "capacity_bytes": agent.capacity_bytes,
                "last_seen_at": now,
            },
        )
    )


# Returns the saga the event made runnable, if any.
Handler = Callable[[AsyncSession, Any, datetime], Awaitable[Woken | None]]

HANDLERS: dict[type[Envelope], Handler] = {
    RegionStateChanged: region_state_changed,
    VmmStateChanged: vmm_state_changed,
    CommandRejected: command_rejected,
    VmmDiskFlushed: disk_flushed,
    RegionSnapshotStateChanged: region_snapshot_changed,
    RunningSnapshotStateChanged: running_snapshot_changed,
    RepairChanged: repair_changed,
    SledRegistered: sled_registered,
    SledHeartbeat: sled_heartbeat,
    AgentAnnounced: agent_announced,
}
