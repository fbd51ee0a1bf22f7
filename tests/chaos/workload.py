"""What the chaos test asks of the rack: operations through the API as an operator
would send them (each re-sent with the same request id until answered, and again while
the answer is "try again"). The faults are in ``tests/chaos/driver.py``.

Every operation and fault goes into a :class:`Ledger`, from which the test computes
its figures: operations submitted, faults injected by kind, operations lost.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import aio_pika

from schemas import api
from schemas.base import Envelope
from schemas.messages import Message
from schemas.topology import NEXUS_API_QUEUE
from schemas.transport import PublishFailed, Transport

PROJECT = "chaos"
SOURCE = "cli/chaos"
ENDED = frozenset({"done", "undone", "stuck", "unrecoverable"})
# How long an operator keeps re-sending one request while replicas and the broker come
# and go; longer than any outage the driver makes.
ANSWER_BUDGET = 90.0
# How long one operation may take under faults before the workload moves on; the
# operation is then checked again after the faults stop.
OPERATION_BUDGET = 90.0
REQUEST_TIMEOUT = 5.0
_BROKER_TROUBLE = (
    TimeoutError,
    PublishFailed,
    ConnectionError,
    aio_pika.exceptions.AMQPError,
    aio_pika.exceptions.ChannelInvalidStateError,
)
# Answers an operator meets with sending the same request again a little later.
TRY_AGAIN = frozenset({api.ErrorCode.UNAVAILABLE, api.ErrorCode.INTERNAL})
_Reply = TypeVar("_Reply", bound=Message)


class Unanswered(Exception):
    """No reply to a request within ``ANSWER_BUDGET``, re-sent all along."""


@dataclass
class Operation:
    kind: str
    resource: str
    request_id: uuid.UUID
    answer: str = "pending"
    saga_id: uuid.UUID | None = None
    resource_id: uuid.UUID | None = None
    final: str | None = None
    attempts: int = 0
    submitted_at: float = field(default_factory=time.monotonic)
    # When the workload stopped watching it (answered, and its saga ended or the
    # budget ran out).
    ended_at: float | None = None


@dataclass
class Ledger:
    operations: list[Operation] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    fault_log: list[str] = field(default_factory=list)
    # Requests answered differently when re-sent with the same id (the first answer was
    # lost): each one breaks "a re-sent command is recognisably the same request".
    retry_mismatches: list[str] = field(default_factory=list)
    # Requests answered "unavailable" or "internal" (and re-sent): each internal one is a
    # request that failed on Nexus's own exception, such as a database that was down.
    error_answers: list[tuple[api.ErrorCode, str]] = field(default_factory=list)
    # When a crucible agent's data directory was full: (service, filled, emptied).
    full_windows: list[tuple[str, float, float]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def fault(self, kind: str, what: str, at: float | None = None) -> None:
        """Log a fault; ``at`` (monotonic) when it began, if not now."""
        self.faults[kind] += 1
        began = time.monotonic() if at is None else at
        self.fault_log.append(f"{began - self.started:7.2f}s {kind}: {what}")

    @property
    def submitted(self) -> int:
        return len(self.operations)


class Api:
    """Requests to Nexus as ``nexusctl`` sends them, re-sent unchanged until answered."""

    def __init__(self, transport: Transport, ledger: Ledger) -> None:
        self._transport = transport
        self._ledger = ledger

    async def call(self, message: Envelope, operation: Operation | None = None) -> Message:
        deadline = time.monotonic() + ANSWER_BUDGET
        while True:
            if operation is not None:
                operation.attempts += 1
            try:
                return await self._transport.request(
                    message, routing_key=NEXUS_API_QUEUE, timeout=REQUEST_TIMEOUT
                )
            except _BROKER_TROUBLE:
                if time.monotonic() > deadline:
                    raise Unanswered(f"{message.TYPE} {message.id}") from None
                await asyncio.sleep(0.5)

    async def call_until(self, message: Envelope, operation: Operation | None = None) -> Message:
        """The reply; sent again while it is an error that says to try again (a replica
        whose database is down), until ``ANSWER_BUDGET`` runs out."""
        deadline = time.monotonic() + ANSWER_BUDGET
        while True:
            reply = await self.call(message, operation)
            if not isinstance(reply, api.ApiError):
                return reply
            if reply.payload.code not in TRY_AGAIN or time.monotonic() > deadline:
                return reply
            what = f"{operation.kind} {operation.resource}" if operation else message.TYPE
            self._ledger.error_answers.append(
                (reply.payload.code, f"{what}: {reply.payload.message}")
            )
            await asyncio.sleep(1.0)

    async def listing(self, message: Envelope, expected: type[_Reply]) -> _Reply:
        reply = await self.call_until(message)
        assert isinstance(reply, expected), reply
        return reply

    async def saga(self, saga_id: uuid.UUID) -> api.SagaView | None:
        request = api.SagaGet(source=SOURCE, payload=api.SagaRef(saga_id=saga_id))
        reply = await self.call_until(request)
        return reply.payload if isinstance(reply, api.SagaReply) else None

    async def saga_end(self, saga_id: uuid.UUID, timeout: float) -> str:
        """The saga's state once it ended, or its current state when ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        state = "unknown"
        while True:
            try:
                view = await self.saga(saga_id)
            except Unanswered:
                view = None
            if view is not None:
                state = view.state
                if state in ENDED or time.monotonic() > deadline:
                    return state
            elif time.monotonic() > deadline:
                return state
            await asyncio.sleep(0.3)

    async def sagas(self) -> tuple[api.SagaView, ...]:
        request = api.SagaList(source=SOURCE, payload=api.SagaFilter(limit=10_000))
        return (await self.listing(request, api.SagaListReply)).payload

    async def disks(self) -> tuple[api.DiskView, ...]:
        request = api.DiskList(source=SOURCE, payload=api.ProjectFilter(project=PROJECT))
        return (await self.listing(request, api.DiskListReply)).payload

    async def snapshots(self) -> tuple[api.SnapshotView, ...]:
        request = api.SnapshotList(source=SOURCE, payload=api.ProjectFilter(project=PROJECT))
        return (await self.listing(request, api.SnapshotListReply)).payload

    async def replacements(self) -> tuple[api.ReplacementView, ...]:
        request = api.RegionReplacementList(
            source=SOURCE, payload=api.ReplacementFilter(limit=1000)
        )
        return (await self.listing(request, api.RegionReplacementListReply)).payload

    async def instances(self) -> tuple[api.InstanceView, ...]:
        request = api.InstanceList(source=SOURCE, payload=api.ProjectFilter(project=PROJECT))
        return (await self.listing(request, api.InstanceListReply)).payload

    async def instance(self, instance_id: uuid.UUID) -> api.InstanceView | None:
        return next((i for i in await self.instances() if i.id == instance_id), None)

    async def expunge_sled(self, sled_id: uuid.UUID) -> api.SledExpunged:
        """``nexusctl sled expunge --yes``: re-sent with the same id until answered. A
        copy answered after the first was (its answer lost) says ``changed`` false and
        files nothing: the first copy filed the replacements."""
        request = api.SledExpunge(source=SOURCE, payload=api.SledRef(sled_id=sled_id))
        return (await self.listing(request, api.SledExpungeReply)).payload

    async def doctor(self) -> api.DoctorReport:
        request = api.Doctor(source=SOURCE, payload=api.DoctorRequest(timeout_seconds=10.0))
        return (await self.listing(request, api.DoctorReply)).payload


# The share of disks snapshotted (each snapshot deleted again at this chance), and of
# instances whose attached disk is snapshotted while it runs.
SNAPSHOT_CHANCE = 0.5
SNAPSHOT_DELETE_CHANCE = 0.7
ATTACHED_SNAPSHOT_CHANCE = 0.75
# The share of snapshots a disk is made from (``disk create --from-snapshot``), and of
# those disks deleted again.
FROM_SNAPSHOT_CHANCE = 0.8
FROM_SNAPSHOT_DELETE_CHANCE = 0.5


class Workload:
    """Disk creates (some snapshotted, some deleted again) and instance lifecycles (the
    attached disk snapshotted while it runs), side by side."""

    def __init__(
        self,
        client: Api,
        ledger: Ledger,
        rng: random.Random,
        gate: Callable[[], Awaitable[None]] | None = None,
        may_clone: Callable[[], bool] = lambda: True,
    ) -> None:
        """``gate``: awaited before each disk create of ``disk_creates`` (the fault
        driver holds the workload there until a fault that is due has begun).
        ``may_clone``: whether a disk may now be made from a snapshot taken from here on
        (the chaos test's: once its sled expunge is over, as region replacement does
        not replace a clone)."""
        self._api = client
        self._ledger = ledger
        self._rng = rng
        self._gate = gate
        self._may_clone = may_clone
        self.disks_submitted = 0

    async def submit(
        self,
        kind: str,
        resource: str,
        message: Envelope,
        recover: Callable[[], Awaitable[api.Accepted | None]] | None = None,
    ) -> Operation:
        """Send one operation; ``recover`` finds its saga when a re-sent request was
        refused because the first copy had already started it."""
        operation = Operation(kind=kind, resource=resource, request_id=message.id)
        self._ledger.operations.append(operation)
        try:
            reply = await self._api.call_until(message, operation)
        except Unanswered:
            operation.answer = "unanswered"
            return operation
        if isinstance(reply, api.AcceptedReply):
            operation.answer = "accepted"
            operation.saga_id = reply.payload.saga_id
            operation.resource_id = reply.payload.resource_id
        elif isinstance(reply, api.ApiError):
            operation.answer = f"rejected:{reply.payload.code.value}"
            if operation.attempts > 1 and recover is not None:
                accepted = await recover()
                if accepted is not None:
                    self._ledger.retry_mismatches.append(
                        f"{kind} {resource}: re-sent request {message.id} answered "
                        f"{reply.payload.code.value} ({reply.payload.message}), though the "
                        f"first copy started saga {accepted.saga_id}"
                    )
                    operation.answer = "accepted"
                    operation.saga_id = accepted.saga_id
                    operation.resource_id = accepted.resource_id
        else:
            # A power action the instance is already in: nothing to do, no saga.
            operation.answer = "no-op"
        if operation.saga_id is not None:
            operation.final = await self._api.saga_end(operation.saga_id, OPERATION_BUDGET)
        operation.ended_at = time.monotonic()
        return operation

    # Disks.

    async def disk_creates(self, count: int, concurrency: int) -> None:
        names = iter(range(count))

        async def worker() -> None:
            for number in names:
                if self._gate is not None:
                    await self._gate()
                self.disks_submitted += 1
                await self._disk_lifecycle(f"d{number}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def _disk_lifecycle(self, name: str) -> None:
        created = await self.create_disk(name)
        if created.final != "done":
            return
        # Some disks are snapshotted, and most snapshots deleted again, so that both
        # snapshot sagas run under faults (and around the sled expunge).
        kept = False
        if self._rng.random() < SNAPSHOT_CHANCE:
            kept = await self.snapshot_and_maybe_delete(
                f"{name}-s", name, SNAPSHOT_DELETE_CHANCE, clone=self._may_clone()
            )
        # Some disks are deleted again, so disk_delete runs under faults too (a disk
        # with a snapshot cannot be: its regions hold it).
        if not kept and self._rng.random() < 0.2:
            await self.delete_disk(name)

    async def snapshot_and_maybe_delete(
        self, snapshot: str, disk: str, delete: float, *, clone: bool = False
    ) -> bool:
        """Snapshot ``disk`` (with ``clone``, maybe make a disk from the snapshot, and
        maybe delete that), then delete the snapshot at chance ``delete``; whether a
        snapshot of it may be left (not deleted, or its delete did not end done)."""
        taken = await self.create_snapshot(snapshot, disk)
        if taken.final != "done":
            # Undone (a clean slate), or it did not end while watched: the latter may
            # leave a snapshot, which holds the disk.
            return taken.final != "undone"
        if clone and self._rng.random() < FROM_SNAPSHOT_CHANCE:
            made = await self.create_disk_from(f"{disk}-c", snapshot)
            if made.final == "done" and self._rng.random() < FROM_SNAPSHOT_DELETE_CHANCE:
                await self.delete_disk(f"{disk}-c")
        if self._rng.random() >= delete:
            return True
        deleted = await self.delete_snapshot(snapshot)
        return deleted.final != "done"

    async def create_snapshot(self, name: str, disk: str) -> Operation:
        request = api.SnapshotCreate(
            source=SOURCE,
            payload=api.SnapshotCreateRequest(project=PROJECT, name=name, disk=disk),
        )
        return await self.submit("snapshot_create", name, request, self._saga_of_snapshot(name))

    async def delete_snapshot(self, name: str) -> Operation:
        request = api.SnapshotDelete(
            source=SOURCE, payload=api.ResourceRef(project=PROJECT, resource=name)
        )
        return await self.submit("snapshot_delete", name, request, self._saga_of_snapshot(name))

    def _saga_of_snapshot(self, name: str) -> Callable[[], Awaitable[api.Accepted | None]]:
        async def recover() -> api.Accepted | None:
            found = next((s for s in await self._api.snapshots() if s.name == name), None)
            if found is None or found.saga_id is None:
                return None
            return api.Accepted(saga_id=found.saga_id, resource_id=found.id)

        return recover

    async def create_disk(self, name: str) -> Operation:
        request = api.DiskCreate(
            source=SOURCE,
            payload=api.DiskCreateRequest(project=PROJECT, name=name, size_bytes=1 << 30),
        )
        return await self.submit("disk_create", name, request)

    async def create_disk_from(self, name: str, snapshot: str) -> Operation:
        """``nexusctl disk create NAME --from-snapshot SNAPSHOT``: 3 clones and 3 fresh
        regions (``disk_create_from_snapshot``)."""
        request = api.DiskCreate(
            source=SOURCE,
            payload=api.DiskCreateRequest(project=PROJECT, name=name, snapshot=snapshot),
        )
        return await self.submit("disk_create_from_snapshot", name, request)

    async def delete_disk(self, name: str) -> Operation:
        request = api.DiskDelete(
            source=SOURCE, payload=api.ResourceRef(project=PROJECT, resource=name)
        )
        return await self.submit("disk_delete", name, request, self._saga_of_disk(name))

    def _saga_of_disk(self, name: str) -> Callable[[], Awaitable[api.Accepted | None]]:
        async def recover() -> api.Accepted | None:
            found = next((d for d in await self._api.disks() if d.name == name), None)
            if found is None or found.saga_id is None:
                return None
            return api.Accepted(saga_id=found.saga_id, resource_id=found.id)

        return recover

    # Instances.

    async def instance_lifecycles(self, count: int, actions_each: int) -> None:
        await asyncio.gather(
            *(self._instance_lifecycle(f"i{number}", actions_each) for number in range(count))
        )

    async def _instance_lifecycle(self, name: str, actions_each: int) -> None:
        disk = await self.create_disk(f"{name}-boot")
        if disk.final != "done":
            return
        request = api.InstanceCreate(
            source=SOURCE,
            payload=api.InstanceCreateRequest(
                project=PROJECT,
                name=name,
                ncpus=1,
                memory_bytes=1 << 30,
                disks=(f"{name}-boot",),
            ),
        )
        created = await self.submit("instance_create", name, request, self._saga_of_instance(name))
        if created.final != "done" or created.resource_id is None:
            return
        # Its disk snapshotted while it runs (the VMM flushes first), at one of its
        # power actions.
        snapshot_at = (
            self._rng.randrange(actions_each)
            if self._rng.random() < ATTACHED_SNAPSHOT_CHANCE
            else None
        )
        kept = False
        for step in range(actions_each):
            if step == snapshot_at:
                kept = await self.snapshot_and_maybe_delete(f"{name}-s", f"{name}-boot", 1.0)
            view = await self._api.instance(created.resource_id)
            if view is None:
                return
            action = self._next_action(view.state)
            if action is None:
                await asyncio.sleep(0.5)
                continue
            await self.act(name, action)
        if self._rng.random() < 0.7:
            # Only a stopped or failed instance can be deleted: stop it first.
            view = await self._api.instance(created.resource_id)
            if view is not None and view.state not in ("stopped", "failed"):
                await self.act(name, api.InstanceAction.STOP)
            deleted = await self.act(name, api.InstanceAction.DELETE)
            if deleted.final == "done" and not kept:
                await self.delete_disk(f"{name}-boot")

    def _next_action(self, state: str) -> api.InstanceAction | None:
        if state == "running":
            return self._rng.choice([api.InstanceAction.STOP, api.InstanceAction.REBOOT])
        if state in ("stopped", "failed"):
            return api.InstanceAction.START
        # Between states: the operator waits for it to settle.
        return None

    async def act(self, name: str, action: api.InstanceAction) -> Operation:
        request = api.InstanceAct(
            source=SOURCE,
            payload=api.InstanceActionRequest(project=PROJECT, resource=name, action=action),
        )
        return await self.submit(
            f"instance_{action.value}", name, request, self._saga_of_instance(name)
        )

    def _saga_of_instance(self, name: str) -> Callable[[], Awaitable[api.Accepted | None]]:
        async def recover() -> api.Accepted | None:
            found = next((i for i in await self._api.instances() if i.name == name), None)
            if found is None or found.saga_id is None:
                return None
            return api.Accepted(saga_id=found.saga_id, resource_id=found.id)

        return recover
