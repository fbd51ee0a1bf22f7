"""instance_create: record the instance, place it on a sled, attach its disks, boot it.

Nodes, in order (each action beside its undo):

    instance_record    the instance row, ``creating``              undo: delete it
    sled_place         a live sled with the CPUs and memory free   undo: release it
    disks_attach       each disk detached → attached               undo: detach them
    instance_cleanup   no-op                                       undo: destroy on the sled
    instance_ensure    ensure on the sled agent; wait for ``running`` (or ``failed``)
    instance_finalize  the instance is ``running``
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import delete, func, select, update

from nexus.db.models import Disk, Instance, Sled
from nexus.db.states import DiskState, InstanceState, SledState
from nexus.saga.definition import (
    ActionFailed,
    Ctx,
    Node,
    Reconciled,
    SagaDefinition,
    Wait,
    WakeUp,
    no_op,
    sequence,
)
from nexus.sagas.disk_create import announce_disk
from nexus.waitkeys import instance_key, is_rejection, rejection_key
from schemas.common import Rejection
from schemas.identity import sled_source
from schemas.instance import (
    InstanceChange,
    InstanceDestroy,
    InstanceEnsure,
    InstanceGet,
    InstanceInfo,
    InstanceRef,
    InstanceSpec,
)
from schemas.instance import InstanceState as WireInstanceState
from schemas.progress import DiskState as WireDiskState
from schemas.progress import InstanceProgress, InstanceUpdated

BOOT_DEADLINE = timedelta(minutes=2)
# States in which an instance holds its sled's CPUs and memory.
HOLDS_RESOURCES = [state for state in InstanceState if state is not InstanceState.DELETED]


class Params(BaseModel):
    instance_id: uuid.UUID
    project: str
    name: str
    ncpus: int = Field(gt=0)
    memory_bytes: int = Field(gt=0)
    disk_ids: list[uuid.UUID] = Field(default_factory=list)
    boot_deadline_seconds: float = Field(default=BOOT_DEADLINE.total_seconds(), gt=0)


class Placed(BaseModel):
    sled_id: uuid.UUID
    queue: str


class Booted(BaseModel):
    generation: int


# instance_record


async def instance_record(ctx: Ctx[Params]) -> None:
    p = ctx.params
    if await ctx.session.get(Instance, p.instance_id) is None:
        ctx.session.add(
            Instance(
                id=p.instance_id,
                project=p.project,
                name=p.name,
                ncpus=p.ncpus,
                memory_bytes=p.memory_bytes,
                state=InstanceState.CREATING,
                generation=0,
                created_at=ctx.now,
                updated_at=ctx.now,
            )
        )
        await ctx.session.flush()
    await announce_instance(ctx, "creating")


async def instance_record_undo(ctx: Ctx[Params]) -> None:
    await ctx.session.execute(delete(Instance).where(Instance.id == ctx.params.instance_id))


# sled_place


async def sled_place(ctx: Ctx[Params]) -> Placed:
    p = ctx.params
    used = (
        select(
            Instance.sled_id,
            func.sum(Instance.ncpus).label("cpus"),
            func.sum(Instance.memory_bytes).label("memory"),
        )
        .where(Instance.state.in_(HOLDS_RESOURCES), Instance.id != p.instance_id)
        .group_by(Instance.sled_id)
        .subquery()
    )
    free_cpus = Sled.cpus - func.coalesce(used.c.cpus, 0)
    free_memory = Sled.memory_bytes - func.coalesce(used.c.memory, 0)
    row = (
        await ctx.session.execute(
            select(Sled)
            .outerjoin(used, used.c.sled_id == Sled.id)
            .where(
                Sled.state == SledState.ACTIVE,
                free_cpus >= p.ncpus,
                free_memory >= p.memory_bytes,
            )
            # Spread: the sled with the most CPUs free first.
            .order_by(free_cpus.desc(), Sled.id)
            .limit(1)
        )
    ).scalar_one_or_none()
    if row is None:
        raise ActionFailed(
            f"insufficient capacity: no live sled has {p.ncpus} CPUs and "
            f"{p.memory_bytes} bytes of memory free"
        )
    await ctx.session.execute(
        update(Instance).where(Instance.id == p.instance_id).values(sled_id=row.id)
    )
    return Placed(sled_id=row.id, queue=row.queue_name)


async def sled_place_undo(ctx: Ctx[Params]) -> None:
    await ctx.session.execute(
        update(Instance).where(Instance.id == ctx.params.instance_id).values(sled_id=None)
    )


# disks_attach


async def disks_attach(ctx: Ctx[Params]) -> None:
    for disk_id in ctx.params.disk_ids:
        disk = await ctx.session.get(Disk, disk_id, with_for_update=True)
        if disk is None:
            raise ActionFailed(f"no disk {disk_id}")
        if disk.attached_instance_id == ctx.params.instance_id:
            continue
        if disk.state is not DiskState.DETACHED:
            raise ActionFailed(f"disk {disk.name} is {disk.state.value}, not detached")
        disk.state = DiskState.ATTACHED
        disk.attached_instance_id = ctx.params.instance_id
        disk.updated_at = ctx.now
        await announce_disk(ctx, disk.id, disk.project, disk.name, WireDiskState.ATTACHED)


async def disks_attach_undo(ctx: Ctx[Params]) -> None:
    await detach_all(ctx, ctx.params.instance_id)


async def detach_all(ctx: Ctx[Any], instance_id: uuid.UUID) -> None:
    disks = await ctx.session.execute(select(Disk).where(Disk.attached_instance_id == instance_id))
    for disk in disks.scalars():
        disk.state = DiskState.DETACHED
        disk.attached_instance_id = None
        disk.updated_at = ctx.now
        await announce_disk(ctx, disk.id, disk.project, disk.name, WireDiskState.DETACHED)


# instance_cleanup: the undo of a boot that may have half-happened


async def instance_cleanup_undo(ctx: Ctx[Params]) -> None:
    placed = ctx.output("sled_place", Placed)
    await ctx.send(
        InstanceDestroy(
            id=ctx.command_id(), payload=InstanceRef(id=ctx.params.instance_id), **ctx.envelope()
        ),
        placed.queue,
    )


# instance_ensure


async def instance_ensure(ctx: Ctx[Params]) -> Wait:
    p = ctx.params
    placed = ctx.output("sled_place", Placed)
    command = InstanceEnsure(
        id=ctx.command_id(),
        payload=InstanceSpec(
            id=p.instance_id,
            name=p.name,
            ncpus=p.ncpus,
            memory_bytes=p.memory_bytes,
            disk_ids=tuple(p.disk_ids),
            start=True,
        ),
        **ctx.envelope(),
    )
    await ctx.send(command, placed.queue)
    return Wait(
        keys=(
            instance_key(p.instance_id, WireInstanceState.RUNNING),
            instance_key(p.instance_id, WireInstanceState.FAILED),
            rejection_key(command.id),
        ),
        deadline=timedelta(seconds=p.boot_deadline_seconds),
    )


async def instance_ensure_resume(ctx: Ctx[Params], wake: WakeUp) -> Booted:
    return Booted(generation=outcome_generation(wake, WireInstanceState.RUNNING))


def outcome_generation(wake: WakeUp, wanted: WireInstanceState) -> int:
    """The generation reached, or the node fails with what the sled said."""
    if is_rejection(wake.key):
        rejection = Rejection.model_validate(wake.payload)
        raise ActionFailed(f"the sled refused ({rejection.code}): {rejection.message}")
    instance = InstanceChange.model_validate(wake.payload).instance
    if instance.state is not wanted:
        raise ActionFailed(f"instance {instance.name} is {instance.state.value}: {instance.reason}")
    return instance.generation


async def ask_sled(
    ctx: Ctx[Any],
    instance_id: uuid.UUID,
    queue: str,
    wanted: WireInstanceState,
    sled_id: uuid.UUID | None,
) -> Reconciled:
    """The one reconcile query for an instance wait: what the sled has now. Only the
    sled Nexus placed the instance on (``sled_id``; when not known, the one whose queue
    ``queue`` is) may answer."""
    if ctx.transport is None:
        return Reconciled.rearm("no broker connection to ask the sled")
    reply = await ctx.transport.request(
        InstanceGet(payload=InstanceRef(id=instance_id), **ctx.envelope()),
        routing_key=queue,
        timeout=10,
        answerer=sled_source(sled_id) if sled_id is not None else None,
    )
    if not isinstance(reply, InstanceInfo) or reply.payload.instance is None:
        return Reconciled.fail(f"the sled has no instance {instance_id}")
    instance = reply.payload.instance
    if instance.id != instance_id or (sled_id is not None and instance.sled_id != sled_id):
        return Reconciled.rearm(f"the sled answered about another instance than {instance_id}")
    change = InstanceChange(instance=instance).model_dump(mode="json")
    if instance.state is wanted:
        return Reconciled.resume(instance_key(instance_id, wanted), change, instance.generation)
    if instance.state in (WireInstanceState.FAILED, WireInstanceState.DESTROYED):
        return Reconciled.fail(f"instance is {instance.state.value}: {instance.reason}")
    return Reconciled.rearm(f"instance is {instance.state.value}")


async def instance_ensure_reconcile(ctx: Ctx[Params], keys: Sequence[str]) -> Reconciled:
    placed = ctx.output("sled_place", Placed)
    return await ask_sled(
        ctx, ctx.params.instance_id, placed.queue, WireInstanceState.RUNNING, placed.sled_id
    )


# instance_finalize


async def instance_finalize(ctx: Ctx[Params]) -> None:
    booted = ctx.output("instance_ensure", Booted)
    await ctx.session.execute(
        update(Instance)
        .where(Instance.id == ctx.params.instance_id, Instance.generation <= booted.generation)
        .values(state=InstanceState.RUNNING, generation=booted.generation, updated_at=ctx.now)
    )
    await announce_instance(ctx, "running")


# helpers


async def announce_instance(ctx: Ctx[Any], state: str) -> None:
    instance = await ctx.session.get(Instance, ctx.params.instance_id)
    if instance is None:
        return
    event = InstanceUpdated(
        id=ctx.command_id(state),
        payload=InstanceProgress(
            instance_id=instance.id,
            project=instance.project,
            name=instance.name,
            state=state,
            generation=max(1, int(ctx.now.timestamp() * 1000)),
            sled_id=instance.sled_id,
        ),
        **ctx.envelope(),
    )
    await ctx.publish(event, event.routing_key())


async def instance_fault(ctx: Ctx[Params]) -> None:
    await ctx.session.execute(
        update(Instance)
        .where(Instance.id == ctx.params.instance_id)
        .values(state=InstanceState.FAILED, updated_at=ctx.now)
    )


DEFINITION: SagaDefinition[Params] = SagaDefinition(
    name="instance_create",
    version=1,
    params=Params,
    stages=sequence(
        Node("instance_record", instance_record, undo=instance_record_undo),
        Node("sled_place", sled_place, undo=sled_place_undo),
        Node("disks_attach", disks_attach, undo=disks_attach_undo),
        Node("instance_cleanup", no_op, undo=instance_cleanup_undo),
        Node(
            "instance_ensure",
            instance_ensure,
            resume=instance_ensure_resume,
            reconcile=instance_ensure_reconcile,
        ),
        Node("instance_finalize", instance_finalize),
    ),
    on_stuck=instance_fault,
)
