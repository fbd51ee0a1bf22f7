"""instance_create: record the instance, attach its disks, and start it as a new VMM.

Nodes, in order (each action beside its undo):

    instance_record    the instance row, ``creating``, no VMM       undo: delete it (and
                                                                     its VMM rows)
    disks_attach       each disk detached → attached               undo: detach them
    vmm_ids … vmm_running   instance_start's nodes (nexus/sagas/instance_start.py): a
                       sled with room, a new VMM there, booted and running

Omicron's ``instance_create.rs`` ends with the instance stopped (``no_vmm``) and its API
then runs ``instance_start``; here the start's nodes are part of the saga, so one saga
(and one ``--wait``) covers both, and a start that fails unwinds the create.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import delete, select

from nexus.db.models import Disk, Instance, Vmm
from nexus.db.states import DiskState, InstanceState
from nexus.saga.definition import ActionFailed, Ctx, Node, SagaDefinition, sequence
from nexus.sagas import instance_start
from nexus.sagas.disk_create import announce_disk
from nexus.sagas.vmm_common import announce_instance
from schemas.progress import DiskState as WireDiskState


class Params(BaseModel):
    instance_id: uuid.UUID
    project: str
    name: str
    ncpus: int = Field(gt=0)
    memory_bytes: int = Field(gt=0)
    disk_ids: list[uuid.UUID] = Field(default_factory=list)
    boot_deadline_seconds: float = Field(default=instance_start.BOOT_DEADLINE.total_seconds(), gt=0)


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
                generation=1,
                created_at=ctx.now,
                updated_at=ctx.now,
            )
        )
        await ctx.session.flush()
    await announce_instance(ctx, "creating")


async def instance_record_undo(ctx: Ctx[Params]) -> None:
    # The VMM rows go too: the start's undos have ended them, and they name the instance.
    await ctx.session.execute(delete(Vmm).where(Vmm.instance_id == ctx.params.instance_id))
    await ctx.session.execute(delete(Instance).where(Instance.id == ctx.params.instance_id))


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


DEFINITION: SagaDefinition[Params] = SagaDefinition(
    name="instance_create",
    version=2,
    params=Params,
    stages=sequence(
        Node("instance_record", instance_record, undo=instance_record_undo),
        Node("disks_attach", disks_attach, undo=disks_attach_undo),
        *instance_start.NODES,
    ),
    on_stuck=instance_start.instance_fault,
)
