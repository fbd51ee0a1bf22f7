"""The Nexus API: requests from ``nexusctl`` on ``nexus.api``, served by any replica.

Every request that carries ``reply_to`` gets exactly one reply there: its typed result,
or ``api.error.v1`` with a stable code and a one-line message. That includes a request
that does not parse (``invalid_request`` with its field errors, while the request itself
is dead-lettered). A reply goes only to a reply queue of the user who sent the request
(``schemas.topology.is_reply_queue_of``); a request naming any other queue is
dead-lettered (``foreign_reply_to``) and not carried out.

A request that starts an operation records its saga and replies ``accepted`` at once;
the saga runs on this replica in the background. The saga's id is derived from the
request's id and parameters, and the request's id is recorded with it: the same request
sent again gets the first answer, and its id re-used for anything else gets
``conflict``.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from nexus.db.models import (
    Disk,
    InboxMessage,
    Instance,
    RegionReplacement,
    Saga,
    SagaLogEntry,
    Sled,
    Snapshot,
    Vmm,
    WaitRendezvous,
)
from nexus.db.states import (
    DiskState,
    InstanceState,
    ReplacementState,
    SagaState,
    SledState,
    SnapshotState,
    WaitState,
)
from nexus.doctor import run_doctor
from nexus.liveness import expunge_sled
from nexus.replacements import Replacements, in_flight_for
from nexus.replacements import view as replacement_view
from nexus.saga.definition import ActionFailed, SagaDefinition
from nexus.saga.executor import SagaExecutor
from nexus.saga.position import Position, WaitingNode
from nexus.sagas import (
    disk_create,
    disk_create_from_snapshot,
    disk_delete,
    instance_create,
    instance_delete,
    instance_power,
    snapshot_create,
    snapshot_delete,
)
from nexus.sleds import sled_views
from nexus.snapshots import find_snapshot, live_snapshot, snapshot_view
from nexus.unclaimed import summarise
from schemas import api
from schemas.base import Envelope
from schemas.messages import Message, MessageRejected
from schemas.progress import DiskState as WireDiskState
from schemas.topology import REPLIES_EXCHANGE, is_reply_queue_of
from schemas.transient import is_transient
from schemas.transport import Delivery, Refused, Transport

log = logging.getLogger(__name__)

# The consumer name under which the inbox records the ids of requests that started a saga.
API_CONSUMER = "nexus.api"


class ApiProblem(Exception):
    def __init__(self, code: api.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def not_found(kind: str, ref: object) -> ApiProblem:
    return ApiProblem(api.ErrorCode.NOT_FOUND, f"no {kind} {ref}")


class Api:
    def __init__(
        self,
        *,
        disk_create_saga: SagaDefinition[Any] = disk_create.DEFINITION,
        sessions: async_sessionmaker[AsyncSession],
        executor: SagaExecutor,
        transport: Transport,
        replacements: Replacements | None = None,
        clock: Callable[[], datetime],
        replica_id: str,
        region_deadline: timedelta = disk_create.REGION_DEADLINE,
        region_max_rearms: int | None = None,
        delete_deadline: timedelta = disk_create.DELETE_DEADLINE,
    ) -> None:
        self._delete_deadline = delete_deadline
        self._disk_create = disk_create_saga
        self._region_deadline = region_deadline
        self._region_max_rearms = region_max_rearms
        self._sessions = sessions
        self._executor = executor
        self._replacements = replacements or Replacements(
            executor, region_deadline=region_deadline, delete_deadline=delete_deadline
        )
        self._transport = transport
        self._clock = clock
        self._replica_id = replica_id
        self._handlers: dict[type[Envelope], Callable[[Any], Awaitable[Envelope]]] = {
            api.DiskCreate: self.disk_create,
            api.DiskGet: self.disk_get,
            api.DiskList: self.disk_list,
            api.DiskDelete: self.disk_delete,
            api.SnapshotCreate: self.snapshot_create,
            api.SnapshotGet: self.snapshot_get,
            api.SnapshotList: self.snapshot_list,
            api.SnapshotDelete: self.snapshot_delete,
            api.InstanceCreate: self.instance_create,
            api.InstanceAct: self.instance_act,
            api.InstanceList: self.instance_list,
            api.Doctor: self.doctor,
            api.UnclaimedEventsList: self.unclaimed_events,
            api.SagaGet: self.saga_get,
            api.SagaList: self.saga_list,
            api.SledList: self.sled_list,
            api.SledExpunge: self.sled_expunge,
            api.RegionReplacementList: self.replacement_list,
            api.RegionReplacementGet: self.replacement_get,
        }

    @property
    def source(self) -> str:
        return f"nexus/{self._replica_id}"

    async def handle(self, delivery: Delivery) -> None:
        """Answer a request on its requester's own reply queue.

        Raises MessageRejected (the transport dead-letters the request) when
        ``reply_to`` names a queue that is not a reply queue of the user who sent it.
        """
        request = delivery.message
        if delivery.reply_to is not None and not _own_reply_queue(
            delivery.reply_to, delivery.user_id
        ):
            raise MessageRejected(
                "foreign_reply_to",
                f"reply_to {delivery.reply_to[:200]!r} is not a reply queue of user "
                f"{delivery.user_id!r}",
            )
        reply = await self.answer(request)
        await self._transport.reply(delivery, reply)

    async def on_refused(self, refused: Refused) -> None:
        """A request dead-lettered before it was handled (it does not parse, or its
        source does not verify) is answered ``invalid_request`` with the reason, on the
        requester's own reply queue; a copy of the refused bytes is in the dead letters."""
        if refused.reply_to is None or not _own_reply_queue(refused.reply_to, refused.user_id):
            return
        request_id = _uuid_or_none(refused.message_id)
        error = api.ApiError(
            source=self.source,
            correlation_id=_uuid_or_none(refused.correlation_id) or request_id,
            causation_id=request_id,
            payload=api.ApiErrorBody(
                code=api.ErrorCode.INVALID_REQUEST,
                message=f"{refused.reason}: {refused.detail}"[: api.MAX_ERROR_MESSAGE],
            ),
        )
        await self._transport.publish(
            error, exchange=REPLIES_EXCHANGE, routing_key=refused.reply_to, mandatory=False
        )

    async def answer(self, request: Message) -> Envelope:
        handler = self._handlers.get(type(request))
        try:
            if handler is None:
                raise ApiProblem(
                    api.ErrorCode.INVALID_REQUEST, f"{request.TYPE} is not an API request"
                )
            try:
                return await handler(request)
            except IntegrityError:
                # Another replica committed the same request, or the same name, first
                # (two copies of one request, re-sent while the first was in flight):
                # asked again, the handler sees what it committed and answers from that.
                return await handler(request)
        except ApiProblem as problem:
            return self._error(request, problem.code, problem.message)
        except Exception as error:
            if is_transient(error):
                # The database (or the broker) is down: the transport holds the request
                # and runs it again once it is back, rather than answering "internal".
                raise
            log.exception(
                "API request %s failed", request.TYPE, extra={"message_id": str(request.id)}
            )
            return self._error(
                request, api.ErrorCode.INTERNAL, f"internal error handling {request.TYPE}"
            )

    def _error(self, request: Envelope, code: api.ErrorCode, message: str) -> api.ApiError:
        return api.ApiError(
            source=self.source,
            payload=api.ApiErrorBody(code=code, message=message),
            **request.caused(),
        )

    # Disks.

    async def disk_create(self, request: api.DiskCreate) -> Envelope:
        body = request.payload
        if body.snapshot is not None:
            return await self._disk_from_snapshot(request, body.snapshot)
        assert body.size_bytes is not None, "the request's model requires it"
        if body.size_bytes % body.block_size:
            raise ApiProblem(
                api.ErrorCode.INVALID_REQUEST,
                f"size {body.size_bytes} is not a multiple of the block size {body.block_size}",
            )
        disk_id = uuid.uuid4()
        async with self._sessions.begin() as session:
            if started := await self._started(session, request, self._disk_create, "disk_id"):
                return started
            if await self._live_disk(session, body.project, body.name) is not None:
                raise ApiProblem(
                    api.ErrorCode.ALREADY_EXISTS,
                    f"a disk named {body.name!r} already exists in project {body.project!r}",
                )
            params = disk_create.Params(
                disk_id=disk_id,
                project=body.project,
                name=body.name,
                size_bytes=body.size_bytes,
                block_size=body.block_size,
                region_deadline_seconds=self._region_deadline.total_seconds(),
                region_max_rearms=self._region_max_rearms,
                delete_deadline_seconds=self._delete_deadline.total_seconds(),
            )
            saga_id = self._record(session, request, self._disk_create)
            # The benchmark's baselines share disk_create's parameters.
            created = await self._executor.create(session, self._disk_create, params, saga_id)
        self._executor.spawn(saga_id, created)
        return self._accepted(request, saga_id, disk_id)

    async def _disk_from_snapshot(self, request: api.DiskCreate, ref: str | uuid.UUID) -> Envelope:
        """A disk made from a snapshot: refused with the reason, before anything is
        created, unless the snapshot is ready and the size fits it (Omicron's checks in
        ``nexus/src/app/disk.rs``); ``disk_create_from_snapshot`` checks again."""
        body = request.payload
        definition = disk_create_from_snapshot.DEFINITION
        disk_id = uuid.uuid4()
        async with self._sessions.begin() as session:
            if started := await self._started(session, request, definition, "disk_id"):
                return started
            snapshot = await find_snapshot(
                session, api.ResourceRef(project=body.project, resource=ref)
            )
            if snapshot is None:
                raise not_found("snapshot", f"{ref} in project {body.project}")
            try:
                await disk_create_from_snapshot.read_source(session, snapshot.id)
            except ActionFailed as refused:
                raise ApiProblem(api.ErrorCode.CONFLICT, str(refused)) from None
            size_bytes = body.size_bytes or snapshot.size_bytes
            if "block_size" in body.model_fields_set and body.block_size != snapshot.block_size:
                raise ApiProblem(
                    api.ErrorCode.INVALID_REQUEST,
                    f"block size {body.block_size} is not snapshot {snapshot.name}'s "
                    f"({snapshot.block_size})",
                )
            if size_bytes < snapshot.size_bytes or size_bytes % snapshot.block_size:
                raise ApiProblem(
                    api.ErrorCode.INVALID_REQUEST,
                    f"size {size_bytes} must be a multiple of {snapshot.block_size} and at "
                    f"least snapshot {snapshot.name}'s size ({snapshot.size_bytes})",
                )
            if await self._live_disk(session, body.project, body.name) is not None:
                raise ApiProblem(
                    api.ErrorCode.ALREADY_EXISTS,
                    f"a disk named {body.name!r} already exists in project {body.project!r}",
                )
            params = disk_create_from_snapshot.Params(
                disk_id=disk_id,
                project=body.project,
                name=body.name,
                size_bytes=size_bytes,
                block_size=snapshot.block_size,
                snapshot_id=snapshot.id,
                region_deadline_seconds=self._region_deadline.total_seconds(),
                region_max_rearms=self._region_max_rearms,
                delete_deadline_seconds=self._delete_deadline.total_seconds(),
            )
            reply = await self._start(request, session, definition, params, disk_id)
        self._executor.spawn(reply.payload.saga_id)
        return reply

    async def _start(
        self,
        request: Envelope,
        session: AsyncSession,
        definition: SagaDefinition[Any],
        params: BaseModel,
        resource_id: uuid.UUID,
    ) -> api.AcceptedReply:
        """Record the request and its saga in the caller's transaction; the saga runs
        here once that commits (the caller checked ``_started`` first)."""
        saga_id = self._record(session, request, definition)
        await self._executor.create(session, definition, params, saga_id)
        return self._accepted(request, saga_id, resource_id)

    def _record(
        self, session: AsyncSession, request: Envelope, definition: SagaDefinition[Any]
    ) -> uuid.UUID:
        """Mark the request's id as used, in the transaction that creates its saga;
        returns the saga's id."""
        session.add(
            InboxMessage(message_id=request.id, consumer=API_CONSUMER, received_at=self._clock())
        )
        return saga_id_for(request, definition)

    async def _started(
        self,
        session: AsyncSession,
        request: Envelope,
        definition: SagaDefinition[Any],
        id_field: str,
    ) -> api.AcceptedReply | None:
        """The answer the first copy of a re-sent request got, before any check that
        the operation itself has since made false (the instance no longer exists...);
        ``conflict`` when the request's id already started something else."""
        saga = await session.get(Saga, saga_id_for(request, definition))
        if saga is not None:
            return self._accepted(request, saga.id, uuid.UUID(saga.params[id_field]))
        if await session.get(InboxMessage, (request.id, API_CONSUMER)) is not None:
            raise ApiProblem(
                api.ErrorCode.CONFLICT,
                f"request id {request.id} was already used for a different request; "
                "send a new request with a new id",
            )
        return None

    def _accepted(
        self, request: Envelope, saga_id: uuid.UUID, resource_id: uuid.UUID
    ) -> api.AcceptedReply:
        return api.AcceptedReply(
            source=self.source,
            payload=api.Accepted(saga_id=saga_id, resource_id=resource_id),
            **request.caused(),
        )

    async def disk_delete(self, request: api.DiskDelete) -> Envelope:
        async with self._sessions.begin() as session:
            if started := await self._started(session, request, disk_delete.DEFINITION, "disk_id"):
                return started
            disk = await self._find_disk(session, request.payload)
            if disk.state not in (DiskState.DETACHED, DiskState.FAULTED):
                raise ApiProblem(
                    api.ErrorCode.CONFLICT,
                    f"disk {disk.name} is {disk.state.value}; only a detached disk can be deleted",
                )
            if kept := await disk_delete.snapshots_of(session, disk.id):
                raise ApiProblem(
                    api.ErrorCode.CONFLICT, disk_delete.snapshots_block(disk.name, kept)
                )
            if (replacing := await in_flight_for(session, disk.id)) is not None:
                raise ApiProblem(
                    api.ErrorCode.CONFLICT,
                    f"disk {disk.name} has region replacement {replacing.id} in flight "
                    f"({replacing.state.value}); delete it once that is complete",
                )
            reply = await self._start(
                request,
                session,
                disk_delete.DEFINITION,
                disk_delete.Params(
                    disk_id=disk.id,
                    region_deadline_seconds=self._delete_deadline.total_seconds(),
                ),
                disk.id,
            )
        self._executor.spawn(reply.payload.saga_id)
        return reply

    async def disk_get(self, request: api.DiskGet) -> Envelope:
        async with self._sessions() as session:
            disk = await self._find_disk(session, request.payload)
            return api.DiskReply(source=self.source, payload=disk_view(disk), **request.caused())

    async def disk_list(self, request: api.DiskList) -> Envelope:
        async with self._sessions() as session:
            query = select(Disk).where(Disk.state != DiskState.DELETED)
            if request.payload.project is not None:
                query = query.where(Disk.project == request.payload.project)
            disks = (await session.execute(query.order_by(Disk.created_at))).scalars()
            return api.DiskListReply(
                source=self.source,
                payload=tuple(disk_view(d) for d in disks),
                **request.caused(),
            )

    async def _live_disk(self, session: AsyncSession, project: str, name: str) -> Disk | None:
        return (
            await session.execute(
                select(Disk).where(
                    Disk.project == project, Disk.name == name, Disk.state != DiskState.DELETED
                )
            )
        ).scalar_one_or_none()

    async def _find_disk(self, session: AsyncSession, ref: api.ResourceRef) -> Disk:
        if isinstance(ref.resource, uuid.UUID):
            disk = await session.get(Disk, ref.resource)
            if disk is not None and disk.project == ref.project:
                return disk
        else:
            found = await self._live_disk(session, ref.project, ref.resource)
            if found is not None:
                return found
        raise not_found("disk", f"{ref.resource} in project {ref.project}")

    # Snapshots.

    async def snapshot_create(self, request: api.SnapshotCreate) -> Envelope:
        body = request.payload
        async with self._sessions.begin() as session:
            if started := await self._started(
                session, request, snapshot_create.DEFINITION, "snapshot_id"
            ):
                return started
            disk = await self._find_disk(
                session, api.ResourceRef(project=body.project, resource=body.disk)
            )
            if disk.state not in (DiskState.DETACHED, DiskState.ATTACHED):
                raise ApiProblem(
                    api.ErrorCode.CONFLICT,
                    f"disk {disk.name} is {disk.state.value}; only a detached or attached disk "
                    "can be snapshotted",
                )
            if await live_snapshot(session, body.project, body.name) is not None:
                raise ApiProblem(
                    api.ErrorCode.ALREADY_EXISTS,
                    f"a snapshot named {body.name!r} already exists in project {body.project!r}",
                )
            snapshot_id = uuid.uuid4()
            params = snapshot_create.Params(
                snapshot_id=snapshot_id,
                project=body.project,
                name=body.name,
                disk_id=disk.id,
                part_deadline_seconds=self._region_deadline.total_seconds(),
                part_max_rearms=self._region_max_rearms,
                delete_deadline_seconds=self._delete_deadline.total_seconds(),
            )
            reply = await self._start(
                request, session, snapshot_create.DEFINITION, params, snapshot_id
            )
        self._executor.spawn(reply.payload.saga_id)
        return reply

    async def snapshot_delete(self, request: api.SnapshotDelete) -> Envelope:
        async with self._sessions.begin() as session:
            if started := await self._started(
                session, request, snapshot_delete.DEFINITION, "snapshot_id"
            ):
                return started
            snapshot = await self._find_snapshot(session, request.payload)
            if snapshot.state not in (SnapshotState.READY, SnapshotState.FAULTED):
                raise ApiProblem(
                    api.ErrorCode.CONFLICT,
                    f"snapshot {snapshot.name} is {snapshot.state.value}; only a ready or "
                    "faulted snapshot can be deleted",
                )
            reply = await self._start(
                request,
                session,
                snapshot_delete.DEFINITION,
                snapshot_delete.Params(
                    snapshot_id=snapshot.id,
                    delete_deadline_seconds=self._delete_deadline.total_seconds(),
                ),
                snapshot.id,
            )
        self._executor.spawn(reply.payload.saga_id)
        return reply

    async def snapshot_get(self, request: api.SnapshotGet) -> Envelope:
        async with self._sessions() as session:
            snapshot = await self._find_snapshot(session, request.payload)
            view = await snapshot_view(session, snapshot)
            return api.SnapshotReply(source=self.source, payload=view, **request.caused())

    async def snapshot_list(self, request: api.SnapshotList) -> Envelope:
        async with self._sessions() as session:
            query = select(Snapshot).where(Snapshot.state != SnapshotState.DESTROYED)
            if request.payload.project is not None:
                query = query.where(Snapshot.project == request.payload.project)
            found = (await session.execute(query.order_by(Snapshot.created_at))).scalars()
            views = [await snapshot_view(session, snapshot) for snapshot in found]
            return api.SnapshotListReply(
                source=self.source, payload=tuple(views), **request.caused()
            )

    async def _find_snapshot(self, session: AsyncSession, ref: api.ResourceRef) -> Snapshot:
        snapshot = await find_snapshot(session, ref)
        if snapshot is None:
            raise not_found("snapshot", f"{ref.resource} in project {ref.project}")
        return snapshot

    # Instances.

    async def instance_create(self, request: api.InstanceCreate) -> Envelope:
        body = request.payload
        async with self._sessions.begin() as session:
            if started := await self._started(
                session, request, instance_create.DEFINITION, "instance_id"
            ):
                return started
            if await self._live_instance(session, body.project, body.name) is not None:
                raise ApiProblem(
                    api.ErrorCode.ALREADY_EXISTS,
                    f"an instance named {body.name!r} already exists in project {body.project!r}",
                )
            disk_ids = []
            for ref in body.disks:
                disk = await self._find_disk(
                    session, api.ResourceRef(project=body.project, resource=ref)
                )
                if disk.state is not DiskState.DETACHED:
                    raise ApiProblem(
                        api.ErrorCode.CONFLICT,
                        f"disk {disk.name} is {disk.state.value}; it must be detached",
                    )
                disk_ids.append(disk.id)
            if len(set(disk_ids)) != len(disk_ids):
                raise ApiProblem(api.ErrorCode.INVALID_REQUEST, "a disk is named twice")
            instance_id = uuid.uuid4()
            params = instance_create.Params(
                instance_id=instance_id,
                project=body.project,
                name=body.name,
                ncpus=body.ncpus,
                memory_bytes=body.memory_bytes,
                disk_ids=disk_ids,
            )
            reply = await self._start(
                request, session, instance_create.DEFINITION, params, instance_id
            )
        self._executor.spawn(reply.payload.saga_id)
        return reply

    async def instance_act(self, request: api.InstanceAct) -> Envelope:
        body = request.payload
        action_saga = (
            instance_delete.DEFINITION
            if body.action is api.InstanceAction.DELETE
            else instance_power.POWER[body.action].saga
        )
        async with self._sessions.begin() as session:
            if started := await self._started(session, request, action_saga, "instance_id"):
                return started
            instance = await self._find_instance(
                session, api.ResourceRef(project=body.project, resource=body.resource)
            )
            state = instance.state
            if body.action is api.InstanceAction.DELETE:
                definition: SagaDefinition[Any] = instance_delete.DEFINITION
                params: BaseModel = instance_delete.Params(instance_id=instance.id)
                if state not in instance_delete.DELETABLE:
                    # No saga and no word to the sled: the instance still has a VMM.
                    raise ApiProblem(
                        api.ErrorCode.CONFLICT, instance_delete.refusal(instance.name, state)
                    )
            else:
                power = instance_power.POWER[body.action]
                definition = power.saga
                if state in power.already:
                    # Nothing to do; the sled would not announce a change either.
                    return api.InstanceReply(
                        source=self.source,
                        payload=await instance_view(session, instance),
                        **request.caused(),
                    )
                if state not in power.allowed_from:
                    raise ApiProblem(
                        api.ErrorCode.CONFLICT,
                        f"instance {instance.name} is {state.value}; cannot {body.action.value}",
                    )
                params = power.params(instance.id)
            reply = await self._start(request, session, definition, params, instance.id)
        self._executor.spawn(reply.payload.saga_id)
        return reply

    async def instance_list(self, request: api.InstanceList) -> Envelope:
        async with self._sessions() as session:
            query = select(Instance).where(Instance.state != InstanceState.DELETED)
            if request.payload.project is not None:
                query = query.where(Instance.project == request.payload.project)
            instances = (await session.execute(query.order_by(Instance.created_at))).scalars()
            views = [await instance_view(session, i) for i in instances]
            return api.InstanceListReply(
                source=self.source, payload=tuple(views), **request.caused()
            )

    async def _live_instance(
        self, session: AsyncSession, project: str, name: str
    ) -> Instance | None:
        return (
            await session.execute(
                select(Instance).where(
                    Instance.project == project,
                    Instance.name == name,
                    Instance.state != InstanceState.DELETED,
                )
            )
        ).scalar_one_or_none()

    async def _find_instance(self, session: AsyncSession, ref: api.ResourceRef) -> Instance:
        if isinstance(ref.resource, uuid.UUID):
            instance = await session.get(Instance, ref.resource)
            if (
                instance is not None
                and instance.project == ref.project
                and instance.state is not InstanceState.DELETED
            ):
                return instance
        else:
            found = await self._live_instance(session, ref.project, ref.resource)
            if found is not None:
                return found
        raise not_found("instance", f"{ref.resource} in project {ref.project}")

    # Sleds.

    async def sled_list(self, request: api.SledList) -> Envelope:
        async with self._sessions() as session:
            views = await sled_views(session)
        return api.SledListReply(source=self.source, payload=tuple(views), **request.caused())

    async def sled_expunge(self, request: api.SledExpunge) -> Envelope:
        sled_id = request.payload.sled_id
        async with self._sessions.begin() as session:
            expunged = await expunge_sled(session, sled_id, self._clock(), self._replacements)
            views = await sled_views(session, only=sled_id)
            if not views:
                # Nothing names it: a typo, not a sled. The transaction changed nothing.
                raise not_found("sled", sled_id)
        for woke in expunged.woken:
            self._executor.spawn(woke.saga_id)
        # Committed: every lost region's replacement saga runs now.
        self._replacements.run(expunged.lost)
        if expunged.changed:
            log.warning(
                "sled %s expunged by an operator: %d datasets expunged, %d VMMs failed",
                sled_id,
                expunged.datasets,
                expunged.failed_vmms,
            )
        return api.SledExpungeReply(
            source=self.source,
            payload=api.SledExpunged(
                sled=views[0],
                changed=expunged.changed,
                datasets_expunged=expunged.datasets,
                vmms_failed=expunged.failed_vmms,
                replacements_requested=expunged.lost.requested,
                replacement_sagas=tuple(row.id for row in expunged.lost.sagas),
            ),
            **request.caused(),
        )

    # Region replacements.

    async def replacement_list(self, request: api.RegionReplacementList) -> Envelope:
        wanted = request.payload
        query = (
            select(RegionReplacement)
            .order_by(RegionReplacement.request_time.desc(), RegionReplacement.id)
            .limit(wanted.limit)
        )
        if wanted.state is not None:
            if wanted.state not in {s.value for s in ReplacementState}:
                raise ApiProblem(
                    api.ErrorCode.INVALID_REQUEST,
                    f"no replacement state {wanted.state!r}; one of "
                    + ", ".join(s.value for s in ReplacementState),
                )
            query = query.where(RegionReplacement.state == wanted.state)
        if wanted.disk_id is not None:
            query = query.where(RegionReplacement.disk_id == wanted.disk_id)
        async with self._sessions() as session:
            found = (await session.execute(query)).scalars().all()
        return api.RegionReplacementListReply(
            source=self.source,
            payload=tuple(replacement_view(r) for r in found),
            **request.caused(),
        )

    async def replacement_get(self, request: api.RegionReplacementGet) -> Envelope:
        async with self._sessions() as session:
            found = await session.get(RegionReplacement, request.payload.id)
        if found is None:
            raise not_found("region replacement", request.payload.id)
        return api.RegionReplacementReply(
            source=self.source, payload=replacement_view(found), **request.caused()
        )

    # Doctor.

    async def doctor(self, request: api.Doctor) -> Envelope:
        report = await run_doctor(
            self._sessions, self._transport, self.source, request.payload.timeout_seconds
        )
        return api.DoctorReply(source=self.source, payload=report, **request.caused())

    async def unclaimed_events(self, request: api.UnclaimedEventsList) -> Envelope:
        wanted = request.payload
        summary = await summarise(self._sessions, groups=wanted.groups, examples=wanted.examples)
        return api.UnclaimedEventsReply(source=self.source, payload=summary, **request.caused())

    # Sagas.

    async def saga_get(self, request: api.SagaGet) -> Envelope:
        async with self._sessions() as session:
            saga = await session.get(Saga, request.payload.saga_id)
            if saga is None:
                raise not_found("saga", request.payload.saga_id)
            view = await saga_view(session, saga, with_log=True)
            return api.SagaReply(source=self.source, payload=view, **request.caused())

    async def saga_list(self, request: api.SagaList) -> Envelope:
        filters = request.payload
        async with self._sessions() as session:
            query = select(Saga).order_by(Saga.created_at.desc()).limit(filters.limit)
            if filters.state is not None:
                if filters.state not in {s.value for s in SagaState}:
                    raise ApiProblem(
                        api.ErrorCode.INVALID_REQUEST,
                        f"no saga state {filters.state!r}; one of "
                        + ", ".join(s.value for s in SagaState),
                    )
                query = query.where(Saga.state == filters.state)
            sagas = (await session.execute(query)).scalars().all()
            views = [await saga_view(session, saga, with_log=False) for saga in sagas]
            return api.SagaListReply(source=self.source, payload=tuple(views), **request.caused())


async def instance_view(session: AsyncSession, instance: Instance) -> api.InstanceView:
    reachable = True
    vmm = await session.get(Vmm, instance.active_vmm_id) if instance.active_vmm_id else None
    if vmm is not None:
        sled = await session.get(Sled, vmm.sled_id)
        reachable = sled is not None and sled.state is SledState.ACTIVE
    disk_ids = (
        await session.execute(select(Disk.id).where(Disk.attached_instance_id == instance.id))
    ).scalars()
    return api.InstanceView(
        id=instance.id,
        project=instance.project,
        name=instance.name,
        ncpus=instance.ncpus,
        memory_bytes=instance.memory_bytes,
        state=instance.state.value,
        sled_id=vmm.sled_id if vmm is not None else None,
        vmm_id=vmm.id if vmm is not None else None,
        sled_reachable=reachable,
        disk_ids=tuple(disk_ids),
        created_at=instance.created_at,
        updated_at=instance.updated_at,
    )


def disk_view(disk: Disk) -> api.DiskView:
    return api.DiskView(
        id=disk.id,
        project=disk.project,
        name=disk.name,
        size_bytes=disk.size_bytes,
        block_size=disk.block_size,
        state=WireDiskState(disk.state),
        instance_id=disk.attached_instance_id,
        saga_id=disk.saga_id,
        fault_reason=disk.fault_reason if disk.state == DiskState.FAULTED else None,
        snapshot_id=disk.create_snapshot_id,
        created_at=disk.created_at,
        updated_at=disk.updated_at,
    )


async def saga_view(session: AsyncSession, saga: Saga, *, with_log: bool) -> api.SagaView:
    log_entries: tuple[api.SagaLogEntry, ...] = ()
    if with_log:
        rows = await session.execute(
            select(SagaLogEntry).where(SagaLogEntry.saga_id == saga.id).order_by(SagaLogEntry.id)
        )
        log_entries = tuple(
            api.SagaLogEntry(
                node=entry.node_name,
                event=entry.event,
                replica=entry.replica_id,
                at=entry.at,
                detail=_detail(entry.data),
            )
            for entry in rows.scalars()
        )
    waits = await session.execute(
        select(WaitRendezvous).where(
            WaitRendezvous.saga_id == saga.id, WaitRendezvous.state == WaitState.PARKED
        )
    )
    # The position knows since when a node waits (re-arms and re-sends keep it) and how
    # often its deadline was reconciled; a wait row only knows its latest park.
    nodes = Position.of(saga.state, saga.progress or {}).waiting
    waiting = tuple(_wait_view(w, nodes.get(w.node_name or ""), saga) for w in waits.scalars())
    return api.SagaView(
        id=saga.id,
        name=saga.name,
        version=saga.definition_version,
        state=saga.state,
        lease_owner=saga.lease_owner,
        error=saga.error,
        created_at=saga.created_at,
        updated_at=saga.updated_at,
        log=log_entries,
        waiting_for=waiting,
    )


def _wait_view(row: WaitRendezvous, node: WaitingNode | None, saga: Saga) -> api.WaitView:
    return api.WaitView(
        wait_key=row.wait_key,
        node=row.node_name or "",
        since=node.since if node is not None else (row.parked_at or saga.updated_at),
        deadline=row.deadline or saga.updated_at,
        reconciles=node.asked if node is not None else 0,
    )


def _detail(data: dict[str, Any] | None) -> str | None:
    if not data:
        return None
    if "error" in data:
        return str(data["error"])[:2000]
    return ", ".join(f"{k}={v}" for k, v in data.items() if k != "traceback")[:2000]


def request_digest(request: Envelope) -> str:
    """What a request asks for: its type and its parameters, not who sent it or when."""
    payload = getattr(request, "payload", None)
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else ""
    return hashlib.sha256(f"{request.TYPE}\n{body}".encode()).hexdigest()


def saga_id_for(request: Envelope, definition: SagaDefinition[Any]) -> uuid.UUID:
    """The saga a request starts: the same request sent again names the same saga, and
    its id with other parameters (or for another operation) names another one."""
    return uuid.uuid5(request.id, f"{definition.name}:{request_digest(request)}")


def _own_reply_queue(reply_to: str, user: str | None) -> bool:
    return user is not None and is_reply_queue_of(reply_to, user)


def _uuid_or_none(text: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(text or "")
    except ValueError:
        return None
