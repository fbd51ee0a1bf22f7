"""The sled agent's service layer: commands in, timed transitions, crashes, heartbeats.

Every change to a VMM, asked for or not, goes the same way: the hypervisor decides
it, the store commits it together with its ``VmmStateChanged`` event in one
transaction, then the in-memory view applies it and the outbox relay is woken. A command
is acked (by the transport, when :meth:`SledAgent.handle` returns) only after that commit.

One lock serializes all changes, so commands, timers and crashes never decide on a stale
view. Deliveries reach the lock in the order the broker delivered them (asyncio's lock is
first come, first served), which keeps commands for one VMM in order.

A timed transition or a random crash whose commit fails on a transient error (the
database cannot be written: :func:`schemas.transient.is_transient`) is tried again in
place with backoff; any other failure ends the agent rather than leaving it half alive.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import uuid
from collections.abc import Sequence
from typing import Protocol

from schemas.base import Envelope, utcnow
from schemas.common import CommandRejected, Rejection
from schemas.instance import (
    ENDED_REPAIR_STATES,
    DiskFlushed,
    DiskSnapshotRequest,
    Repair,
    RepairChange,
    RepairChanged,
    RepairFound,
    RepairInfo,
    Vmm,
    VmmChange,
    VmmCrash,
    VmmDiskFlushed,
    VmmDiskSnapshot,
    VmmEnsure,
    VmmFound,
    VmmGet,
    VmmInfo,
    VmmReboot,
    VmmState,
    VmmStateChanged,
    VmmStop,
    VolumeRepair,
    VolumeRepairGet,
)
from schemas.messages import Message
from schemas.outbox import OutgoingMessage
from schemas.sled import Heartbeat, SledHeartbeat, SledInfo, SledRegistered
from schemas.tasks import TransientRetries
from schemas.topology import EVENTS_EXCHANGE, REPLIES_EXCHANGE, sled_queue
from schemas.transport import Delivery
from sled_agent.hypervisor import Capacity, Cause, Change, Hypervisor, Rejected
from sled_agent.repairs import STEPS, Repairs
from sled_agent.settings import SledSettings
from sled_agent.store import SledStore

log = logging.getLogger(__name__)

# The namespace of the ids of messages the sled agent derives from another id, so that
# recording the same thing twice (a redelivered command) yields the same message.
SLED_NAMESPACE = uuid.UUID("0b8e3d4c-5d0f-4f7e-9a51-3c2f6a1e7d20")
# How often the random-crash draw is made; fine enough for any sensible rate.
CRASH_TICK_SECONDS = 0.1


class Wire(Protocol):
    """What the agent sends directly rather than through its outbox."""

    async def publish_event(self, message: Envelope) -> None: ...

    async def reply(self, delivery: Delivery, message: Envelope) -> None: ...


class Relay(Protocol):
    def notify(self) -> None: ...


def derived_id(source: uuid.UUID, purpose: str) -> uuid.UUID:
    return uuid.uuid5(SLED_NAMESPACE, f"{source}:{purpose}")


def target_of(message: Message) -> uuid.UUID | None:
    """The VMM a command is about."""
    match message:
        case VmmEnsure() | VmmStop() | VmmReboot() | VmmCrash() | VmmGet() | VmmDiskSnapshot():
            return message.payload.id
        case VolumeRepair():
            return message.payload.vmm_id
    return None


def decide(hypervisor: Hypervisor, message: Message, cause: Cause) -> Change | None:
    """The command table: each command type and what the hypervisor makes of it."""
    match message:
        case VmmEnsure(payload=spec):
            return hypervisor.ensure(spec, cause)
        case VmmStop(payload=ref):
            return hypervisor.stop(ref.id, cause)
        case VmmReboot(payload=ref):
            return hypervisor.reboot(ref.id, cause)
        case VmmCrash(payload=request):
            return hypervisor.crash(request.id, request.reason, cause)
    raise Rejected("unsupported_command", f"a sled agent does not handle {message.TYPE}")


def disk_flush(
    hypervisor: Hypervisor, request: DiskSnapshotRequest, sled_id: uuid.UUID
) -> DiskFlushed:
    """Whether a disk can be flushed for a snapshot: only one attached to a running VMM
    (Omicron's propolis has a volume to flush only then); raises :class:`Rejected`."""
    current = hypervisor.get(request.id)
    if current is None:
        raise Rejected("not_found", f"no VMM {request.id} on this sled")
    vmm = current.vmm
    if vmm.state is not VmmState.RUNNING:
        raise Rejected("not_running", f"VMM {vmm.id} is {vmm.state.value}: nothing to flush")
    if request.disk_id not in vmm.disk_ids:
        raise Rejected("disk_not_attached", f"disk {request.disk_id} is not attached to {vmm.id}")
    return DiskFlushed(
        sled_id=sled_id, vmm_id=vmm.id, disk_id=request.disk_id, snapshot_id=request.snapshot_id
    )


class SledAgent:
    def __init__(self, settings: SledSettings, store: SledStore, wire: Wire, relay: Relay) -> None:
        self._settings = settings
        self._store = store
        self._wire = wire
        self._relay = relay
        self._source = f"sled/{settings.sled_id}"
        self._hypervisor = Hypervisor(
            settings.sled_id, Capacity(settings.cpus, settings.memory_bytes)
        )
        self._durations = {
            VmmState.STARTING: settings.boot_seconds,
            VmmState.STOPPING: settings.stop_seconds,
            VmmState.REBOOTING: settings.reboot_seconds,
        }
        self._repairs = Repairs(settings.sled_id)
        self._lock = asyncio.Lock()
        self._tasks: asyncio.TaskGroup | None = None
        self._started_at = utcnow()
        self._random = random.Random(settings.seed)
        self._retries = TransientRetries()
        self._beats = 0

    @property
    def hypervisor(self) -> Hypervisor:
        return self._hypervisor

    # Start.

    async def recover(self) -> None:
        """Load the VMMs, apply the restart rule, and record the sled's registration."""
        vms = await self._store.load()
        self._hypervisor = Hypervisor(
            self._settings.sled_id, Capacity(self._settings.cpus, self._settings.memory_bytes), vms
        )
        registration = SledRegistered(
            source=self._source,
            payload=SledInfo(
                sled_id=self._settings.sled_id,
                hostname=self._settings.hostname,
                cpus=self._settings.cpus,
                memory_bytes=self._settings.memory_bytes,
                queue=sled_queue(self._settings.sled_id),
            ),
        )
        async with self._lock:
            await self._commit(self._hypervisor.after_restart(), [_event_row(registration)])
        log.info(
            "sled %s recovered %d VMMs",
            self._settings.sled_id,
            len(vms),
            extra={"message_id": str(registration.id)},
        )

    async def run(self) -> None:
        """Timed transitions and random crashes, until cancelled.

        A commit of theirs that fails on a transient error is tried again in place; any
        other failure ends the agent rather than leaving it half alive.
        """
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            if self._settings.crash_rate_per_hour > 0:
                tasks.create_task(self._random_crashes())
            # Open until cancelled: timed transitions join the group as they are scheduled.
            await asyncio.get_running_loop().create_future()

    # Commands.

    async def handle(self, delivery: Delivery) -> None:
        message = delivery.message
        extra = {
            "message_id": str(message.id),
            "correlation_id": str(message.correlation_id or message.id),
            "type": message.TYPE,
            "vmm_id": str(target_of(message)),
        }
        log.info("command %s", message.TYPE, extra=extra)
        if isinstance(message, VmmGet):
            current = self._hypervisor.get(message.payload.id)
            reply = self._info(message, message.payload.id, current.vmm if current else None)
            await self._wire.reply(delivery, reply)
            return
        if isinstance(message, VolumeRepairGet):
            await self._wire.reply(delivery, self._repair_info(message))
            return
        if isinstance(message, VolumeRepair):
            await self._start_repair(delivery, message, extra)
            return
        cause = Cause(message.correlation_id or message.id, message.id)
        if isinstance(message, VmmDiskSnapshot):
            await self._flush(delivery, message, extra)
            return
        async with self._lock:
            try:
                change = decide(self._hypervisor, message, cause)
            except Rejected as rejected:
                log.warning("rejected: %s: %s", rejected.code, rejected.message, extra=extra)
                await self._commit([], self._rejection(delivery, message, rejected))
                return
            replies = []
            if delivery.reply_to is not None and (vmm_id := target_of(message)):
                vm = change.after if change else self._hypervisor.get(vmm_id)
                reply = self._info(message, vmm_id, vm.vmm if vm else None)
                replies.append(_reply_row(reply, delivery.reply_to))
            if change is None:
                log.info("no change: already as asked, or the VMM has ended", extra=extra)
            await self._commit([change] if change else [], replies)

    async def _flush(
        self, delivery: Delivery, command: VmmDiskSnapshot, extra: dict[str, str]
    ) -> None:
        """A disk's flush for a snapshot: answered by an event through the outbox (its id
        derived from the command's, so a redelivery sends the same event), or refused."""
        request = command.payload
        async with self._lock:
            try:
                flushed = disk_flush(self._hypervisor, request, self._settings.sled_id)
            except Rejected as rejected:
                log.warning("rejected: %s: %s", rejected.code, rejected.message, extra=extra)
                await self._commit([], self._rejection(delivery, command, rejected))
                return
            event = VmmDiskFlushed(
                id=derived_id(command.id, "flushed"),
                source=self._source,
                **command.caused(),
                payload=flushed,
            )
            log.info(
                "VMM %s flushed disk %s for snapshot %s",
                request.id,
                request.disk_id,
                request.snapshot_id,
                extra=extra,
            )
            await self._commit([], [_event_row(event)])

    # Live repairs (sled_agent/repairs.py).

    async def _start_repair(
        self, delivery: Delivery, command: VolumeRepair, extra: dict[str, str]
    ) -> None:
        async with self._lock:
            try:
                repair = self._repairs.start(
                    command.payload, self._hypervisor.get(command.payload.vmm_id)
                )
            except Rejected as rejected:
                log.warning("rejected: %s: %s", rejected.code, rejected.message, extra=extra)
                await self._commit([], self._rejection(delivery, command, rejected))
                return
            if repair is None:
                log.info("no change: the repair exists", extra=extra)
                return
            await self._commit_repair(repair, command.correlation_id or command.id, command.id)

    async def _commit_repair(
        self, repair: Repair, correlation_id: uuid.UUID | None, causation_id: uuid.UUID | None
    ) -> None:
        """Persist the repair's event (its state lives in memory, with its VMM), then
        apply it and time its next step. Hold ``self._lock``."""
        event = RepairChanged(
            # One id per generation: however often it is sent, it is the same event.
            id=derived_id(repair.id, f"repair-generation-{repair.generation}"),
            source=self._source,
            correlation_id=correlation_id,
            causation_id=causation_id,
            payload=RepairChange(repair=repair),
        )
        await self._store.save([], [_event_row(event)])
        self._repairs.apply(repair)
        log.info(
            "repair %s of disk %s (VMM %s) is %s, %d%%",
            repair.id,
            repair.disk_id,
            repair.vmm_id,
            repair.state.value,
            repair.progress,
            extra={"message_id": str(event.id), "vmm_id": str(repair.vmm_id)},
        )
        if repair.state not in ENDED_REPAIR_STATES:
            if self._tasks is None:
                raise RuntimeError("the agent is not running; call run() first")
            delay = self._settings.repair_seconds / STEPS
            self._tasks.create_task(
                self._next_repair_step(repair.id, repair.generation, delay, correlation_id)
            )
        self._relay.notify()

    async def _next_repair_step(
        self, repair_id: uuid.UUID, generation: int, delay: float, correlation_id: uuid.UUID | None
    ) -> None:
        await asyncio.sleep(delay)

        async def step() -> None:
            async with self._lock:
                repair = self._repairs.get(repair_id)
                vm = self._hypervisor.get(repair.vmm_id) if repair is not None else None
                moved = self._repairs.step(repair_id, generation, vm)
                if moved is not None:
                    await self._commit_repair(moved, correlation_id, None)

        await self._retries.run("repairs", f"step {generation} of repair {repair_id}", step)

    def _repair_info(self, query: VolumeRepairGet) -> RepairInfo:
        return RepairInfo(
            id=derived_id(query.id, "reply"),
            source=self._source,
            **query.caused(),
            payload=RepairFound(
                sled_id=self._settings.sled_id,
                repair_id=query.payload.id,
                repair=self._repairs.get(query.payload.id),
            ),
        )

    def _info(self, command: Envelope, vmm_id: uuid.UUID, vmm: Vmm | None) -> VmmInfo:
        return VmmInfo(
            id=derived_id(command.id, "reply"),
            source=self._source,
            **command.caused(),
            payload=VmmFound(sled_id=self._settings.sled_id, vmm_id=vmm_id, vmm=vmm),
        )

    def _rejection(
        self, delivery: Delivery, command: Envelope, rejected: Rejected
    ) -> list[OutgoingMessage]:
        rejection = CommandRejected(
            id=derived_id(command.id, "rejected"),
            source=self._source,
            **command.caused(),
            payload=Rejection(
                command_id=command.id,
                command_type=command.TYPE,
                code=rejected.code,
                message=rejected.message[:2000],
            ),
        )
        rows = [_event_row(rejection)]
        if delivery.reply_to is not None:
            reply = rejection.with_id(derived_id(command.id, "rejected-reply"))
            rows.append(_reply_row(reply, delivery.reply_to))
        return rows

    # Changes nobody asked for.

    def _schedule(self, vmm_id: uuid.UUID, generation: int, state: VmmState) -> None:
        if self._tasks is None:
            raise RuntimeError("the agent is not running; call run() first")
        delay = self._durations[state]
        self._tasks.create_task(self._finish_transition(vmm_id, generation, delay))

    async def _finish_transition(self, vmm_id: uuid.UUID, generation: int, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._retries.run(
            "timed transitions",
            f"the transition of VMM {vmm_id} from generation {generation}",
            lambda: self._advance(vmm_id, generation),
        )

    async def _advance(self, vmm_id: uuid.UUID, generation: int) -> None:
        async with self._lock:
            change = self._hypervisor.advance(vmm_id, generation)
            if change is not None:
                await self._commit([change])

    async def _random_crashes(self) -> None:
        """Each running VMM crashes at ``crash_rate_per_hour`` (a Poisson process)."""
        rate_per_second = self._settings.crash_rate_per_hour / 3600
        probability = 1 - math.exp(-rate_per_second * CRASH_TICK_SECONDS)
        while True:
            await asyncio.sleep(CRASH_TICK_SECONDS)
            await self._retries.run(
                "random crashes", "a draw of crashes", lambda: self._crash_at_random(probability)
            )

    async def _crash_at_random(self, probability: float) -> None:
        async with self._lock:
            # Sorted, so that a seed replays the same crashes for the same VMMs.
            running = sorted(self._hypervisor.running(), key=lambda vm: vm.id)
            victims = [vm for vm in running if self._random.random() < probability]
            crashes = [
                self._hypervisor.crash(vm.id, "crashed at random", Cause()) for vm in victims
            ]
            await self._commit([change for change in crashes if change is not None])

    def work_problem(self, *, stuck_after: float) -> str | None:
        """None, or which timed work has been failing on a transient error for over
        ``stuck_after`` seconds."""
        return self._retries.problem(stuck_after=stuck_after)

    async def heartbeat(self) -> None:
        """One heartbeat, then the wait until the next: a pass of the app's heartbeat task.

        Ephemeral: published directly, not through the outbox; a beat lost in an outage
        is not worth keeping. One that cannot be sent raises ``PublishFailed``, and the
        task runs the next pass after a backoff.
        """
        reserved = self._hypervisor.reserved()
        beat = SledHeartbeat(
            source=self._source,
            payload=Heartbeat(
                sled_id=self._settings.sled_id,
                sequence=self._beats,
                started_at=self._started_at,
                cpus_used=reserved.cpus,
                memory_used_bytes=reserved.memory_bytes,
                instances_running=len(self._hypervisor.running()),
            ),
        )
        self._beats += 1
        await self._wire.publish_event(beat)
        await asyncio.sleep(self._settings.heartbeat_seconds)

    # The one way a change happens.

    async def _commit(
        self, changes: Sequence[Change], messages: Sequence[OutgoingMessage] = ()
    ) -> None:
        """Persist changes with their events, then apply them. Hold ``self._lock``."""
        events = [self._state_changed(change) for change in changes]
        if not changes and not messages:
            return
        await self._store.save(
            [change.after for change in changes], [*(_event_row(e) for e in events), *messages]
        )
        for change in changes:
            self._hypervisor.apply(change)
        for event in events:
            vmm = event.payload.vmm
            log.info(
                "VMM %s of instance %s is %s (generation %d)",
                vmm.id,
                vmm.instance_id,
                vmm.state,
                vmm.generation,
                extra={
                    "message_id": str(event.id),
                    "correlation_id": str(event.correlation_id),
                    "vmm_id": str(vmm.id),
                    "instance_id": str(vmm.instance_id),
                    "reason": vmm.reason,
                },
            )
            if vmm.state in self._durations:
                self._schedule(vmm.id, vmm.generation, vmm.state)
        self._relay.notify()

    def _state_changed(self, change: Change) -> VmmStateChanged:
        vm = change.after
        return VmmStateChanged(
            # One id per generation: however often it is sent, it is the same event.
            id=derived_id(vm.id, f"generation-{vm.generation}"),
            source=self._source,
            correlation_id=vm.cause.correlation_id,
            causation_id=vm.cause.causation_id,
            payload=VmmChange(vmm=vm.vmm),
        )


def _event_row(
    message: VmmStateChanged | VmmDiskFlushed | SledRegistered | CommandRejected | RepairChanged,
) -> OutgoingMessage:
    # Nobody bound to an event yet is not an error: watchers come and go.
    return OutgoingMessage.of(
        message, exchange=EVENTS_EXCHANGE, routing_key=message.routing_key(), mandatory=False
    )


def _reply_row(message: Envelope, reply_to: str) -> OutgoingMessage:
    # A requester that gave up (its reply queue is gone) is not an error.
    return OutgoingMessage.of(
        message, exchange=REPLIES_EXCHANGE, routing_key=reply_to, mandatory=False
    )
