"""The agent's behaviour: command handlers, the file work behind them, announcements.

Every state change follows one path: decide with :mod:`crucible_agent.regions` on a
fresh read, record the new state and its event in one transaction, commit, wake the
outbox relay. A command is acked by
the transport only after its handler returned, so after that commit: a command that
arrives twice (redelivery, or a saga re-sending it) finds the work done and changes
nothing.

The file work runs after the command was acked, in one worker, as in the real agent
(``worker`` in agent/src/main.rs): it takes tombstoned regions before requested ones,
and creates one region at a time (the configured delay, reserving the space, writing
the extent files), so creates queue behind each other as on real hardware and a delete
waits for at most the create under way. The worker reads its next region from the
records, so after a restart it simply carries on: a region still ``requested`` is
created, a ``tombstoned`` one removed. If a delete arrives while a region is created,
the create's outcome is not recorded and the region stays ``tombstoned``. A destroy
that cannot remove the files makes the region ``failed`` with the reason, as the real
agent does; a delete sent again tries once more. Background work that fails on a
transient error (the state database cannot be written:
:func:`schemas.transient.is_transient`) is run again in place with backoff; any other
failure ends the agent (:meth:`RegionService.failed`), whose next start resumes the
work.

Capacity is announced at start, every ``announce_seconds``, and ``coalesce_seconds``
after a change of free space: one announcement, read after the wait, covers every
change made during it (a burst of creates costs Nexus one message, not one per
region). It goes through the outbox like any other message; one still waiting when
the process dies is made up for by the announcement at the next start.

A full data directory (:mod:`crucible_agent.space`) stops no one: reads are answered
from the records as ever; a write that does not fit is tried once more in the room the
released space reserve leaves. The worker then fails a new region "out of space"
without writing files; a create that cannot even be recorded is refused with the code
``out_of_space``, published directly rather than through the outbox. Background work
whose outcome cannot be recorded tries again later; a skipped announcement is made up
for by the next one.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import random
import signal
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn, Protocol, TypeVar

from crucible_agent import regions, snapshots
from crucible_agent.delay import Delay, Fixed
from crucible_agent.files import RegionFiles
from crucible_agent.space import SpaceReserve, is_out_of_space
from crucible_agent.store import AgentStore, Cause, OutOfSpace, Transaction
from schemas import tracing
from schemas.base import Envelope
from schemas.common import CommandRejected, Rejection
from schemas.outbox import OutgoingMessage
from schemas.region import (
    Region,
    RegionChange,
    RegionDelete,
    RegionEnsure,
    RegionFound,
    RegionGet,
    RegionInfo,
    RegionList,
    RegionListed,
    RegionListing,
    RegionState,
    RegionStateChanged,
)
from schemas.sled import AgentAnnounced, CrucibleAgentInfo
from schemas.snapshot import (
    RegionSnapshotChange,
    RegionSnapshotCreate,
    RegionSnapshotDelete,
    RegionSnapshotGet,
    RegionSnapshotList,
    RegionSnapshots,
    RegionSnapshotsInfo,
    RegionSnapshotStateChanged,
    RunningSnapshot,
    RunningSnapshotChange,
    RunningSnapshotRun,
    RunningSnapshotStateChanged,
    RunningSnapshotStop,
    Snapshot,
    SnapshotRef,
)
from schemas.tasks import TransientRetries
from schemas.topology import EVENTS_EXCHANGE, REPLIES_EXCHANGE, crucible_queue
from schemas.transport import Delivery

log = logging.getLogger(__name__)

# Event ids are derived from (agent, region, generation): a state change has one id
# however many times it is published, so consumers can deduplicate it.
EVENT_NAMESPACE = uuid.UUID("3b0f5a8e-9c1d-4e57-a2f4-6d8c0e1b7a93")

T = TypeVar("T")


class Relay(Protocol):
    def notify(self) -> None: ...


class Replier(Protocol):
    """What goes to the broker directly, not through the outbox: answers to reads, and
    the refusal of a command that could not be recorded."""

    async def reply(self, delivery: Delivery, message: Envelope) -> None: ...

    async def publish_event(self, message: Envelope) -> None: ...


NO_DELAY = Fixed(0.0)


@dataclass(frozen=True)
class Faults:
    """How long creates take and how creates and destroys go wrong, drawn from one seeded
    generator."""

    delay: Delay
    fail_fraction: float = 0.0
    crash_mid_create_fraction: float = 0.0
    destroy_fail_fraction: float = 0.0
    # What a clone (a region with a ``source``) takes on top of ``delay``: a sampled
    # delay and a rate per GiB of the region, for the copy from its source.
    clone_delay: Delay = NO_DELAY
    clone_seconds_per_gib: float = 0.0


def kill_this_process() -> None:
    """A crash as abrupt as a power cut: no cleanup, no flush, no final log line."""
    os.kill(os.getpid(), signal.SIGKILL)


def event_id(agent_id: uuid.UUID, region: Region) -> uuid.UUID:
    return uuid.uuid5(EVENT_NAMESPACE, f"{agent_id}:{region.id}:{region.generation}")


def snapshot_event_id(agent_id: uuid.UUID, snapshot: Snapshot) -> uuid.UUID:
    return uuid.uuid5(
        EVENT_NAMESPACE,
        f"{agent_id}:{snapshot.region_id}:snapshot:{snapshot.name}:{snapshot.generation}",
    )


def running_event_id(agent_id: uuid.UUID, running: RunningSnapshot) -> uuid.UUID:
    return uuid.uuid5(
        EVENT_NAMESPACE,
        f"{agent_id}:{running.id}:running:{running.name}:{running.generation}",
    )


# The real agent copies clones in a pool of this many tasks (``WORKER_COUNT``).
CLONE_SLOTS = 64
GIB = 1 << 30


class RegionService:
    def __init__(
        self,
        *,
        agent_id: uuid.UUID,
        sled_id: uuid.UUID,
        capacity_bytes: int,
        coalesce_seconds: float,
        store: AgentStore,
        files: RegionFiles,
        relay: Relay,
        replier: Replier,
        faults: Faults,
        rng: random.Random,
        reserve: SpaceReserve | None = None,
        crash: Callable[[], None] = kill_this_process,
        workers: int = 1,
    ) -> None:
        self.agent_id = agent_id
        self.source = f"crucible/{agent_id}"
        self._sled_id = sled_id
        self._capacity_bytes = capacity_bytes
        self._coalesce_seconds = coalesce_seconds
        self._announcement_due = False
        self._store = store
        self._files = files
        self._relay = relay
        self._replier = replier
        self._faults = faults
        self._rng = rng
        self._reserve = reserve
        self._crash = crash
        # The workers, while they run (one, as the real agent's; more only where a
        # benchmark asks); each ends when it finds no work, and a new record starts them
        # again. Regions a worker has taken, so that no two take the same one.
        self._worker_count = workers
        self._running_workers: set[asyncio.Task[None]] = set()
        # Workers reading the records for work right now (or about to).
        self._looking = 0
        self._taken: set[uuid.UUID] = set()
        self._taken_running: set[tuple[uuid.UUID, str]] = set()
        # Clones handed to the clone pool and not finished: a delete is refused while
        # they are (the real agent's ``Creating``; like it, kept in memory only, so a
        # restart takes the region, still ``requested``, from the start).
        self._cloning: set[uuid.UUID] = set()
        self._clone_slots = asyncio.Semaphore(CLONE_SLOTS)
        self._work_ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._workers: set[asyncio.Task[None]] = set()
        self._retries = TransientRetries()
        self._failure: BaseException | None = None
        self._failed = asyncio.Event()
        self._handling = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # Commands.

    async def handle(self, delivery: Delivery) -> None:
        self._handling += 1
        self._idle.clear()
        try:
            await self._dispatch(delivery)
        finally:
            self._handling -= 1
            if self._handling == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Until no command is being handled and no background work runs (shutdown waits
        for this before it closes the store)."""
        while True:
            await self._idle.wait()
            if not self._workers:
                return
            await asyncio.gather(*self._workers, return_exceptions=True)

    async def _dispatch(self, delivery: Delivery) -> None:
        message = delivery.message
        log.info(
            "command %s",
            message.TYPE,
            extra={"message_id": str(message.id), "correlation_id": _str(message.correlation_id)},
        )
        match message:
            case RegionEnsure():
                await self._ensure(delivery, message)
            case RegionDelete():
                await self._delete(delivery, message)
            case RegionGet():
                await self._get(delivery, message)
            case RegionList():
                await self._list(delivery, message)
            case RegionSnapshotCreate() | RegionSnapshotDelete():
                await self._snapshot_command(delivery, message)
            case RunningSnapshotRun() | RunningSnapshotStop():
                await self._running_command(delivery, message)
            case RegionSnapshotGet() | RegionSnapshotList():
                await self._snapshot_query(delivery, message)
            case _:
                await self._reject(
                    delivery,
                    message,
                    "unsupported",
                    f"a crucible agent does not take {message.TYPE}",
                )

    async def _ensure(self, delivery: Delivery, command: RegionEnsure) -> None:
        try:
            # On a full disk, once more in the room the released reserve left; the worker
            # then fails the region for want of space.
            outcome = await self._writing(lambda: self._ensure_recorded(delivery, command))
        except OutOfSpace as full:
            # Nothing was recorded: refused without a record.
            await self._answer_unrecorded(delivery, command, self._shortage() or str(full))
            return
        self._relay.notify()
        if isinstance(outcome, regions.Changed):
            self._wake_worker()

    async def _ensure_recorded(
        self, delivery: Delivery, command: RegionEnsure
    ) -> regions.EnsureOutcome:
        spec = command.payload

        async def record(tx: Transaction) -> regions.EnsureOutcome:
            existing = await tx.region(spec.id)
            outcome = regions.ensure(
                existing,
                spec,
                # Adding up the holdings reads every region held: only a new one needs it.
                holdings=await tx.holdings() if existing is None else None,
            )
            match outcome:
                case regions.Changed():
                    await self._record(tx, outcome, Cause.of(command))
                case regions.Conflict():
                    await self._send_rejection(tx, delivery, command, "conflict", outcome.message)
                    _log_rejection(command, outcome.message)
                case regions.Refused():
                    await self._send_rejection(tx, delivery, command, outcome.code, outcome.message)
                    _log_rejection(command, outcome.message)
                case regions.Unchanged():
                    log.info(
                        "region %s already %s",
                        spec.id,
                        outcome.region.state.value,
                        extra=_ids(command, spec.id),
                    )
            if isinstance(outcome, regions.Changed | regions.Unchanged):
                await self._send_info(tx, delivery, command, outcome.region)
            return outcome

        return await self._store.grouped(record)

    async def _answer_unrecorded(
        self, delivery: Delivery, command: RegionEnsure, shortage: str
    ) -> None:
        """The data directory cannot take even the ensure's answer: answer it directly."""
        spec = command.payload
        existing = await self._store.region(spec.id)
        if existing is None:
            await self._reject_directly(
                delivery, command, regions.OUT_OF_SPACE, regions.out_of_space(shortage)
            )
        elif existing.spec() != spec:
            decided = regions.ensure(existing, spec, holdings=None)
            assert isinstance(decided, regions.Conflict)
            await self._reject_directly(delivery, command, "conflict", decided.message)
        else:
            await self._replier.reply(delivery, self._info(command, spec.id, existing))

    async def _delete(self, delivery: Delivery, command: RegionDelete) -> None:
        region_id = command.payload.id
        try:
            outcome = await self._writing(lambda: self._delete_recorded(delivery, command))
        except OutOfSpace:
            if await self._store.region(region_id) is not None:
                # A delete is not answered with a refusal: the transport runs it again in
                # place (a full disk is a transient failure), until it can be recorded.
                raise
            await self._reject_directly(delivery, command, "not_found", "no such region")
            return
        self._relay.notify()
        if isinstance(outcome, regions.Changed):
            self._wake_worker()

    async def _delete_recorded(
        self, delivery: Delivery, command: RegionDelete
    ) -> regions.DeleteOutcome:
        region_id = command.payload.id

        async def record(tx: Transaction) -> regions.DeleteOutcome:
            taken = [s.name for s in await tx.snapshots(region_id) if snapshots.exists(s)]
            outcome = regions.delete(
                await tx.region(region_id), snapshots=taken, cloning=region_id in self._cloning
            )
            match outcome:
                case regions.Changed():
                    await self._record(tx, outcome, Cause.of(command))
                    await self._send_info(tx, delivery, command, outcome.region)
                case regions.Unchanged():
                    await self._send_info(tx, delivery, command, outcome.region)
                case regions.NotFound():
                    await self._send_rejection(tx, delivery, command, "not_found", outcome.message)
                    _log_rejection(command, outcome.message)
                case regions.Refused():
                    await self._send_rejection(tx, delivery, command, outcome.code, outcome.message)
                    _log_rejection(command, outcome.message)
            return outcome

        return await self._store.grouped(record)

    async def _get(self, delivery: Delivery, command: RegionGet) -> None:
        region_id = command.payload.id
        region = await self._store.region(region_id)
        await self._replier.reply(delivery, self._info(command, region_id, region))

    async def _list(self, delivery: Delivery, command: RegionList) -> None:
        listing = RegionListing(agent_id=self.agent_id, regions=tuple(await self._store.regions()))
        await self._replier.reply(
            delivery, RegionListed(source=self.source, payload=listing, **command.caused())
        )

    async def _reject(self, delivery: Delivery, command: Envelope, code: str, why: str) -> None:
        try:
            await self._writing(lambda: self._reject_recorded(delivery, command, code, why))
        except OutOfSpace:
            await self._reject_directly(delivery, command, code, why)
            return
        self._relay.notify()
        _log_rejection(command, why)

    async def _reject_recorded(
        self, delivery: Delivery, command: Envelope, code: str, why: str
    ) -> None:
        await self._store.grouped(lambda tx: self._send_rejection(tx, delivery, command, code, why))

    async def _reject_directly(
        self, delivery: Delivery, command: Envelope, code: str, why: str
    ) -> None:
        """A rejection that could not be recorded: published now, to the same places as
        one from the outbox. A broker that does not take it fails the handler, and the
        command is delivered again."""
        rejected = self._rejection(command, code, why)
        await self._replier.publish_event(rejected)
        if delivery.reply_to is not None:
            await self._replier.reply(delivery, rejected.with_id(uuid.uuid4()))
        _log_rejection(command, why)

    async def _writing(self, write: Callable[[], Awaitable[T]]) -> T:
        """Runs ``write`` (one transaction); if it did not fit and the store released the
        space reserve for it, runs it once more."""
        try:
            return await write()
        except OutOfSpace as full:
            if not full.freed:
                raise
            log.warning("%s; trying again in the space reserve's room", full)
            return await write()

    def _shortage(self) -> str | None:
        """Why the data directory has no room for a new region now, if so."""
        return None if self._reserve is None else self._reserve.shortage()

    # Snapshots: taken and deleted by the command's handler (a ZFS snapshot is taken or
    # destroyed at once; here the copy keeps the extents' holes, so it costs only their
    # data), in the transaction that records it, so that no other command decides on
    # the snapshot meanwhile. Running snapshots are recorded here and started or
    # stopped by the worker.

    async def _snapshot_command(
        self, delivery: Delivery, command: RegionSnapshotCreate | RegionSnapshotDelete
    ) -> None:
        try:
            await self._writing(lambda: self._snapshot_recorded(delivery, command))
        except OutOfSpace as full:
            await self._reject_directly(
                delivery, command, regions.OUT_OF_SPACE, regions.out_of_space(str(full))
            )
            return
        self._relay.notify()

    async def _snapshot_recorded(
        self, delivery: Delivery, command: RegionSnapshotCreate | RegionSnapshotDelete
    ) -> None:
        ref = command.payload
        async with self._store.transaction() as tx:
            region = await tx.region(ref.region_id)
            existing = await tx.snapshot(ref.region_id, ref.name)
            if isinstance(command, RegionSnapshotCreate):
                outcome = snapshots.create(region, existing, ref, now=datetime.now(UTC))
            else:
                running = await tx.running_snapshot(ref.region_id, ref.name)
                outcome = snapshots.delete(region, existing, running)
            if isinstance(outcome, snapshots.SnapshotChanged):
                failure = self._snapshot_files(outcome.snapshot)
                if failure is not None:
                    outcome = regions.Refused("snapshot_failed", failure)
            await self._answer_snapshot(tx, delivery, command, ref, outcome)

    def _snapshot_files(self, snapshot: Snapshot) -> str | None:
        """Takes or removes the snapshot's files; None, or why they could not be."""
        try:
            if snapshots.exists(snapshot):
                self._files.take_snapshot(snapshot)
            else:
                self._files.remove_snapshot(snapshot.region_id, snapshot.name)
        except OSError as error:
            if is_out_of_space(error):
                self._files.remove_snapshot(snapshot.region_id, snapshot.name)
                return regions.out_of_space(f"could not copy the region's files: {error}")
            doing = "take" if snapshots.exists(snapshot) else "remove"
            return f"could not {doing} the snapshot's files: {error}"
        return None

    async def _running_command(
        self, delivery: Delivery, command: RunningSnapshotRun | RunningSnapshotStop
    ) -> None:
        try:
            outcome = await self._writing(lambda: self._running_recorded(delivery, command))
        except OutOfSpace as full:
            await self._reject_directly(
                delivery, command, regions.OUT_OF_SPACE, regions.out_of_space(str(full))
            )
            return
        self._relay.notify()
        if isinstance(outcome, snapshots.RunningChanged):
            self._wake_worker()

    async def _running_recorded(
        self, delivery: Delivery, command: RunningSnapshotRun | RunningSnapshotStop
    ) -> snapshots.RunningOutcome:
        ref = command.payload

        async def record(tx: Transaction) -> snapshots.RunningOutcome:
            region = await tx.region(ref.region_id)
            existing = await tx.running_snapshot(ref.region_id, ref.name)
            if isinstance(command, RunningSnapshotRun):
                outcome = snapshots.run(
                    region,
                    await tx.snapshot(ref.region_id, ref.name),
                    existing,
                    ref,
                    # Adding up the holdings reads every port held: only a new one needs it.
                    free_port=(await tx.holdings()).free_port if existing is None else None,
                )
            else:
                outcome = snapshots.stop(region, existing)
            await self._answer_snapshot(tx, delivery, command, ref, outcome)
            return outcome

        return await self._store.grouped(record)

    async def _answer_snapshot(
        self,
        tx: Transaction,
        delivery: Delivery,
        command: Envelope,
        ref: SnapshotRef,
        outcome: snapshots.SnapshotOutcome | snapshots.RunningOutcome,
    ) -> None:
        """Records a change with its event and answers the command, in ``tx``."""
        match outcome:
            case snapshots.SnapshotChanged():
                await self._record_snapshot(tx, outcome, Cause.of(command))
            case snapshots.RunningChanged():
                await self._record_running(tx, outcome, Cause.of(command))
            case regions.Refused():
                await self._send_rejection(tx, delivery, command, outcome.code, outcome.message)
                _log_rejection(command, outcome.message)
                return
            case regions.NotFound():
                await self._send_rejection(tx, delivery, command, "not_found", outcome.message)
                _log_rejection(command, outcome.message)
                return
        if delivery.reply_to is not None:
            info = await self._snapshots_info(tx, command, ref.region_id)
            await tx.send(
                OutgoingMessage.of(
                    info, exchange=REPLIES_EXCHANGE, routing_key=delivery.reply_to, mandatory=False
                )
            )

    async def _snapshot_query(
        self, delivery: Delivery, command: RegionSnapshotGet | RegionSnapshotList
    ) -> None:
        """Answered directly, as region queries are: a read changes nothing."""
        async with self._store.transaction() as tx:
            if isinstance(command, RegionSnapshotGet):
                ref = command.payload
                info = await self._snapshots_info(tx, command, ref.region_id, only=ref.name)
            else:
                info = await self._snapshots_info(tx, command, command.payload.id)
        await self._replier.reply(delivery, info)

    async def _snapshots_info(
        self,
        tx: Transaction,
        command: Envelope,
        region_id: uuid.UUID,
        *,
        only: str | None = None,
    ) -> RegionSnapshotsInfo:
        """The region's snapshots that exist and all its running snapshots (as the real
        ``region_get_snapshots``), or only those named ``only``."""
        region = await tx.region(region_id)
        taken = [s for s in await tx.snapshots(region_id) if snapshots.exists(s)]
        running = await tx.running_snapshots(region_id)
        if only is not None:
            taken = [s for s in taken if s.name == only]
            running = [r for r in running if r.name == only]
        found = RegionSnapshots(
            agent_id=self.agent_id,
            region_id=region_id,
            region_state=None if region is None else region.state,
            snapshots=tuple(taken),
            running_snapshots=tuple(running),
        )
        return RegionSnapshotsInfo(source=self.source, payload=found, **command.caused())

    # Background work: the one worker, creating and destroying the files.

    async def resume(self) -> None:
        """After a start: take the space reserve, start the worker on what a previous run
        left half done, announce capacity."""
        if self._reserve is not None and not self._reserve.hold():
            log.warning("data directory nearly full: no space reserve, new regions fail")
        self._wake_worker()
        await self.announce()

    def taken(self) -> frozenset[uuid.UUID]:
        """The regions the workers are working on now."""
        return frozenset(self._taken)

    def _wake_worker(self) -> None:
        """There may be new work: a worker looks again. A worker looking already sees it
        (or looks once more: ``_work_ready``); otherwise one more starts, if there is
        room. Not one per free slot: with many workers (the benchmark's), each waking
        on every command to read the records and find nothing cost more than the
        commands themselves (BENCHMARKS.md, "Group commit in the crucible agent")."""
        self._work_ready.set()
        if self._looking == 0:
            self._add_worker()

    def _add_worker(self) -> None:
        if len(self._running_workers) >= self._worker_count:
            return
        worker = self._start(self._work())
        if worker is None:
            return
        # Looking from its start: a wake meanwhile needs no other worker.
        self._looking += 1
        self._running_workers.add(worker)
        worker.add_done_callback(self._running_workers.discard)

    async def _work(self) -> None:
        """A worker: one region at a time, in :data:`regions.WORK_ORDER`, until none is
        left. It reads the records after clearing ``_work_ready``, so a record committed
        meanwhile either is read or sets it again. Once it found work it is no longer
        looking, and another worker (if there is room) looks for more: work spreads
        over the workers one find at a time. With one worker, as the real agent has, it
        simply takes one region after the other."""
        looking = True  # counted by _add_worker
        try:
            while not self._stopping.is_set():
                if not looking:
                    self._looking += 1
                    looking = True
                self._work_ready.clear()
                region = await self._next_work()
                running = None if region is not None else await self._next_running_work()
                if region is None and running is None:
                    if self._work_ready.is_set():
                        continue
                    return
                self._looking -= 1
                looking = False
                if self._looking == 0:
                    self._add_worker()
                if region is None:
                    assert running is not None
                    await self._running_work(running)
                else:
                    await self._region_work(region)
        finally:
            if looking:
                self._looking -= 1

    async def _region_work(self, region: Region) -> None:
        self._taken.add(region.id)
        if region.state is RegionState.REQUESTED and region.source is not None:
            # A clone copies from another downstairs and may take long: it goes to the
            # clone pool and the worker carries on, as the real one does.
            self._cloning.add(region.id)
            if self._start(self._clone(region)) is None:
                self._cloning.discard(region.id)
                self._taken.discard(region.id)
            return
        try:
            if region.state is RegionState.TOMBSTONED:
                await self._destroy(region.id)
            else:
                await self._create(region.id)
        finally:
            self._taken.discard(region.id)

    async def _next_work(self) -> Region | None:
        found: list[Region | None] = [None]

        async def read() -> None:
            async with self._store.transaction() as tx:
                found[0] = await tx.next_work(regions.WORK_ORDER, taken=self._taken)

        await self._until_done("reading the next region work", read)
        return found[0]

    async def _create(self, region_id: uuid.UUID) -> None:
        with await self._work_span(region_id, "create"):
            delay = self._faults.delay.sample(self._rng)
            if await self._stopped_within(delay):
                return
            await self._until_done(
                f"create of region {region_id}", lambda: self._create_once(region_id)
            )

    async def _work_span(self, region_id: uuid.UUID, work: str) -> AbstractContextManager[None]:
        """The span of the worker's ``work`` on a region, in the trace of the command
        that asked for it (kept with the region's record, so also after a restart)."""
        if not tracing.enabled():
            return tracing.OFF
        cause = await self._store.cause(region_id)
        return tracing.span(
            f"crucible region {work}",
            parent=cause.trace_context,
            attributes={"region.id": str(region_id), "crucible.agent_id": str(self.agent_id)},
        )

    async def _clone(self, region: Region) -> None:
        """A clone in the clone pool: the create's delay, plus the copy's (the clone
        delay and the rate per GiB), then the create's reservation and files. A clone
        that fails on an error that is not transient stays taken: the agent stops, and
        its next start copies it again (the worker must not hand it out again meanwhile)."""
        async with self._clone_slots:
            delay = (
                self._faults.delay.sample(self._rng)
                + self._faults.clone_delay.sample(self._rng)
                + self._faults.clone_seconds_per_gib * region.size_bytes / GIB
            )
            log.info(
                "cloning region %s from %s (%.1f s)",
                region.id,
                region.source,
                delay,
                extra={"region_id": str(region.id)},
            )
            if not await self._stopped_within(delay):
                await self._until_done(
                    f"clone of region {region.id}", lambda: self._create_once(region.id)
                )
        self._cloning.discard(region.id)
        self._taken.discard(region.id)

    async def _create_once(self, region_id: uuid.UUID) -> None:
        """Reserve, write the files, record the outcome; each attempt starts from the
        records, so it may run again after a failure."""
        region = await self._writing(lambda: self._reserve_space(region_id))
        self._relay.notify()
        if region is None:
            return
        failure = await self._write_files(region)
        if failure is None and self._stopping.is_set():
            return
        # Files that did not fit are removed, and their reservation given back: the room
        # is what the agent's own records need (the real agent keeps them, and would
        # keep a failed dataset).
        release = failure is not None and regions.failed_out_of_space(failure)
        if release:
            self._files.remove(region_id)
        await self._writing(lambda: self._record_create_finished(region_id, failure, release))
        if release:
            self._announce_soon()
        self._relay.notify()

    async def _reserve_space(self, region_id: uuid.UUID) -> Region | None:
        """The region, its space reserved; None when it is no longer to be created or
        failed for want of space (recorded, with its event)."""
        shortage = self._shortage()

        async def record(tx: Transaction) -> Region | None:
            region = await tx.region(region_id)
            # Deleted while it waited: a create that finishes after a delete records nothing.
            if region is None or not regions.needs_files(region):
                return None
            decided = regions.reserve(
                region,
                others=await tx.holdings(except_id=region_id),
                total_bytes=self._capacity_bytes,
                shortage=shortage,
            )
            if isinstance(decided, regions.Changed):
                await self._record(tx, decided, await tx.cause(region_id))
                return None
            await tx.set_reserved(region_id, decided.bytes)
            return region

        region = await self._store.grouped(record)
        if region is not None:
            self._announce_soon()
        return region

    async def _record_create_finished(
        self, region_id: uuid.UUID, failure: str | None, release: bool
    ) -> None:
        async def record(tx: Transaction) -> None:
            current = await tx.region(region_id)
            assert current is not None, "region records are never deleted"
            if release:
                await tx.set_reserved(region_id, 0)
            outcome = regions.create_finished(current, failure)
            if isinstance(outcome, regions.Changed):
                await self._record(tx, outcome, await tx.cause(region_id))

        await self._store.grouped(record)

    async def _write_files(self, region: Region) -> str | None:
        """Writes the extents and returns None, or why the create failed. An injected
        failure comes after the files, which stay, as a failed real create keeps its
        dataset until the region is deleted."""
        crash_at = (
            region.extent_count // 2
            if self._rng.random() < self._faults.crash_mid_create_fraction
            else None
        )
        try:
            self._files.prepare(region)
            for index in range(region.extent_count):
                if index == crash_at:
                    log.warning("crashing mid-create of region %s (fault injection)", region.id)
                    self._crash()
                self._files.write_extent(region, index)
                # Lets commands and a shutdown get in between extents of a large region.
                await asyncio.sleep(0)
                if self._stopping.is_set():
                    return None
            self._files.seal(region)
        except OSError as error:
            failure = f"could not write the extent files: {error}"
            return regions.out_of_space(failure) if is_out_of_space(error) else failure
        if self._rng.random() < self._faults.fail_fraction:
            return f"injected failure (fail fraction {self._faults.fail_fraction:g})"
        return None

    async def _next_running_work(self) -> RunningSnapshot | None:
        found: list[RunningSnapshot | None] = [None]

        async def read() -> None:
            async with self._store.transaction() as tx:
                found[0] = await tx.next_running_work(
                    snapshots.WORK_ORDER, taken=self._taken_running
                )

        await self._until_done("reading the next running snapshot work", read)
        return found[0]

    async def _running_work(self, running: RunningSnapshot) -> None:
        """Starts a requested running snapshot's downstairs, or stops a tombstoned one's,
        and records the outcome (the real worker's ``apply_smf`` for running snapshots)."""
        key = (running.id, running.name)
        self._taken_running.add(key)
        try:
            await self._until_done(
                f"{'stop' if running.state is RegionState.TOMBSTONED else 'start'} of "
                f"running snapshot {running.name} of region {running.id}",
                lambda: self._running_work_once(running),
            )
        finally:
            self._taken_running.discard(key)

    async def _running_work_once(self, running: RunningSnapshot) -> None:
        failure: str | None = None
        if running.state is RegionState.TOMBSTONED:
            self._files.stop_downstairs(running)
        else:
            try:
                self._files.start_downstairs(running)
            except OSError as error:
                if is_out_of_space(error):
                    raise
                failure = f"could not start the read-only downstairs: {error}"

        async def record(tx: Transaction) -> None:
            current = await tx.running_snapshot(running.id, running.name)
            assert current is not None, "running snapshot records are never deleted"
            outcome = (
                snapshots.stop_finished(current)
                if running.state is RegionState.TOMBSTONED
                else snapshots.start_finished(current, failure)
            )
            if isinstance(outcome, snapshots.RunningChanged):
                cause = await tx.running_cause(running.id, running.name)
                await self._record_running(tx, outcome, cause)

        await self._writing(lambda: self._store.grouped(record))
        self._relay.notify()

    async def _destroy(self, region_id: uuid.UUID) -> None:
        with await self._work_span(region_id, "destroy"):
            await self._until_done(
                f"removal of region {region_id}", lambda: self._destroy_once(region_id)
            )

    async def _destroy_once(self, region_id: uuid.UUID) -> None:
        failure = self._remove_files(region_id)
        await self._writing(lambda: self._record_destroy_finished(region_id, failure))
        self._relay.notify()

    def _remove_files(self, region_id: uuid.UUID) -> str | None:
        """Removes the region's files and returns None, or why they could not be."""
        if self._rng.random() < self._faults.destroy_fail_fraction:
            return (
                f"injected failure (destroy fail fraction {self._faults.destroy_fail_fraction:g})"
            )
        try:
            self._files.remove(region_id)
        except OSError as error:
            if is_out_of_space(error):
                raise
            return f"could not remove the region's files: {error}"
        return None

    async def _record_destroy_finished(self, region_id: uuid.UUID, failure: str | None) -> None:
        async def record(tx: Transaction) -> None:
            region = await tx.region(region_id)
            assert region is not None, "region records are never deleted"
            outcome = regions.destroy_finished(region, failure)
            if isinstance(outcome, regions.Changed):
                await self._record(tx, outcome, await tx.cause(region_id))

        await self._store.grouped(record)

    def _start(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        if self._stopping.is_set():
            # Not started now, still recorded: the next start resumes it.
            work.close()
            return None
        # In a context of its own: background work is in no command's trace but the one
        # its region's record names (_work_span).
        task = asyncio.create_task(work, context=contextvars.Context())
        self._workers.add(task)
        task.add_done_callback(self._worker_done)
        return task

    async def _until_done(self, what: str, work: Callable[[], Awaitable[None]]) -> None:
        """``work``, again in place after each transient failure until done or stopped."""
        await self._retries.run("region work", what, work)

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        self._workers.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("region work failed; the agent stops", exc_info=error)
            if self._failure is None:
                self._failure = error
            self._failed.set()

    async def failed(self) -> NoReturn:
        """Returns never; raises once background work failed on an error that is not
        transient: the agent must not run on without that work (its next start resumes
        it)."""
        await self._failed.wait()
        raise RuntimeError("region work failed") from self._failure

    def work_problem(self, *, stuck_after: float) -> str | None:
        """None, or which background work has been failing on a transient error for over
        ``stuck_after`` seconds."""
        return self._retries.problem(stuck_after=stuck_after)

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Let background work reach a safe point: delays end at once, file writing stops
        between extents, a transaction under way commits. What is left resumes at start."""
        self._stopping.set()
        self._retries.stopping.set()
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)

    # Announcements.

    async def announce(self) -> None:
        """Records the capacity announcement; on a full disk it is skipped (the next one
        is made, at the latest, ``announce_seconds`` later). Takes the space reserve
        again first if space came back."""
        if self._reserve is not None:
            self._reserve.hold()
        try:
            await self._writing(self._record_announcement)
        except OutOfSpace as full:
            log.warning("announcement skipped: %s", full)
            return
        self._relay.notify()

    async def _record_announcement(self) -> None:
        async def record(tx: Transaction) -> None:
            await tx.send(await self._announcement(tx))

        await self._store.grouped(record)

    def _announce_soon(self) -> None:
        """Free space changed: announce it once ``coalesce_seconds`` have passed, unless an
        announcement is already due then (it reads the capacity after this change)."""
        if self._announcement_due:
            return
        self._announcement_due = True
        self._start(self._announce_after_wait())

    async def _announce_after_wait(self) -> None:
        if await self._stopped_within(self._coalesce_seconds):
            return
        # Cleared before the read: a change committed from here on is either seen by
        # this announcement or schedules the next one.
        self._announcement_due = False
        await self._until_done("capacity announcement", self.announce)

    async def _announcement(self, tx: Transaction) -> OutgoingMessage:
        held = await tx.holdings()
        room = regions.Capacity(total_bytes=self._capacity_bytes, used_bytes=held.used_bytes)
        info = CrucibleAgentInfo(
            agent_id=self.agent_id,
            sled_id=self._sled_id,
            queue=crucible_queue(self.agent_id),
            capacity_bytes=self._capacity_bytes,
            free_bytes=room.free_bytes,
            regions=held.regions,
        )
        announced = AgentAnnounced(source=self.source, payload=info)
        return OutgoingMessage.of(
            announced,
            exchange=EVENTS_EXCHANGE,
            routing_key=announced.routing_key(),
            mandatory=False,
        )

    # Recording.

    async def _record(self, tx: Transaction, change: regions.Changed, cause: Cause) -> None:
        region = change.region
        if change.previous is None:
            await tx.insert(region, cause)
        else:
            await tx.update(region, cause)
        event = RegionStateChanged(
            id=event_id(self.agent_id, region),
            source=self.source,
            payload=RegionChange(agent_id=self.agent_id, region=region),
            **_caused(cause),
        )
        await tx.send(
            OutgoingMessage.of(
                event, exchange=EVENTS_EXCHANGE, routing_key=event.routing_key(), mandatory=False
            )
        )
        if change.capacity_changed:
            self._announce_soon()
        log.info(
            "region %s: %s -> %s (generation %d)",
            region.id,
            change.previous_state.value if change.previous_state else "-",
            region.state.value,
            region.generation,
            extra={
                "message_id": str(event.id),
                "correlation_id": _str(event.correlation_id),
                "region_id": str(region.id),
            },
        )

    async def _record_snapshot(
        self, tx: Transaction, change: snapshots.SnapshotChanged, cause: Cause
    ) -> None:
        snapshot = change.snapshot
        await tx.save_snapshot(snapshot)
        event = RegionSnapshotStateChanged(
            id=snapshot_event_id(self.agent_id, snapshot),
            source=self.source,
            payload=RegionSnapshotChange(agent_id=self.agent_id, snapshot=snapshot),
            **_caused(cause),
        )
        await tx.send(
            OutgoingMessage.of(
                event, exchange=EVENTS_EXCHANGE, routing_key=event.routing_key(), mandatory=False
            )
        )
        log.info(
            "region %s snapshot %s: %s (generation %d)",
            snapshot.region_id,
            snapshot.name,
            snapshot.state.value,
            snapshot.generation,
            extra={
                "message_id": str(event.id),
                "correlation_id": _str(event.correlation_id),
                "region_id": str(snapshot.region_id),
            },
        )

    async def _record_running(
        self, tx: Transaction, change: snapshots.RunningChanged, cause: Cause
    ) -> None:
        running = change.running
        await tx.save_running_snapshot(running, cause)
        event = RunningSnapshotStateChanged(
            id=running_event_id(self.agent_id, running),
            source=self.source,
            payload=RunningSnapshotChange(agent_id=self.agent_id, running_snapshot=running),
            **_caused(cause),
        )
        await tx.send(
            OutgoingMessage.of(
                event, exchange=EVENTS_EXCHANGE, routing_key=event.routing_key(), mandatory=False
            )
        )
        log.info(
            "region %s running snapshot %s: %s -> %s (generation %d, port %d)",
            running.id,
            running.name,
            change.previous.state.value if change.previous else "-",
            running.state.value,
            running.generation,
            running.port_number,
            extra={
                "message_id": str(event.id),
                "correlation_id": _str(event.correlation_id),
                "region_id": str(running.id),
            },
        )

    async def _send_info(
        self, tx: Transaction, delivery: Delivery, command: Envelope, region: Region
    ) -> None:
        """Ensure and delete answer like Crucible's API does (with the region) when asked."""
        if delivery.reply_to is None:
            return
        info = self._info(command, region.id, region)
        await tx.send(
            OutgoingMessage.of(
                info, exchange=REPLIES_EXCHANGE, routing_key=delivery.reply_to, mandatory=False
            )
        )

    async def _send_rejection(
        self, tx: Transaction, delivery: Delivery, command: Envelope, code: str, why: str
    ) -> None:
        rejected = self._rejection(command, code, why)
        await tx.send(
            OutgoingMessage.of(
                rejected,
                exchange=EVENTS_EXCHANGE,
                routing_key=rejected.routing_key(),
                mandatory=False,
            )
        )
        if delivery.reply_to is not None:
            # A copy for the requester under its own id: outbox rows are keyed by message
            # id, and the requester matches replies by causation, not by id.
            await tx.send(
                OutgoingMessage.of(
                    rejected.with_id(uuid.uuid4()),
                    exchange=REPLIES_EXCHANGE,
                    routing_key=delivery.reply_to,
                    mandatory=False,
                )
            )

    def _rejection(self, command: Envelope, code: str, why: str) -> CommandRejected:
        return CommandRejected(
            source=self.source,
            payload=Rejection(
                command_id=command.id, command_type=command.TYPE, code=code, message=why
            ),
            **command.caused(),
        )

    def _info(self, command: Envelope, region_id: uuid.UUID, region: Region | None) -> RegionInfo:
        found = RegionFound(agent_id=self.agent_id, region=region, region_id=region_id)
        return RegionInfo(source=self.source, payload=found, **command.caused())


def _caused(cause: Cause | None) -> dict[str, uuid.UUID | None]:
    if cause is None:
        return {}
    return {"correlation_id": cause.correlation_id, "causation_id": cause.message_id}


def _str(value: uuid.UUID | None) -> str | None:
    return None if value is None else str(value)


def _ids(command: Envelope | None, region_id: uuid.UUID) -> dict[str, str | None]:
    return {
        "message_id": _str(command.id) if command else None,
        "correlation_id": _str(command.correlation_id) if command else None,
        "region_id": str(region_id),
    }


def _log_rejection(command: Envelope, why: str) -> None:
    log.warning(
        "rejected %s: %s",
        command.TYPE,
        why,
        extra={"message_id": str(command.id), "correlation_id": _str(command.correlation_id)},
    )
