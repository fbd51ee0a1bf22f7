"""instance_start: a new VMM for the instance, on a sled with room, booted and running.

After Omicron's ``nexus/src/app/sagas/instance_start.rs``. Nodes, in order (each action
beside its undo; Omicron's node in brackets):

    vmm_ids            the new VMM's id                           [sis_generate_propolis_id]
    vmm_reserve        a live sled with the CPUs and memory free; the VMM's row there,
                       ``creating``, which is the reservation
                                          [sis_alloc_server, sis_create_vmm_record]
                                          undo: the VMM ``saga_unwound`` (frees the sled)
    instance_starting  the instance's active VMM is this one, ``starting``
                                          [sis_move_to_starting]
                                          undo: no active VMM, ``stopped``, if this VMM
                                          is still the active one
    vmm_cleanup        no-op              undo: stop the VMM on its sled (it may exist)
    vmm_ensure         ensure the VMM on the sled; wait (parked) for it ``running``, or
                       ``failed``, ``destroyed``, a refusal
                                          [sis_ensure_registered, sis_ensure_running]
    vmm_running        record it running (the reconcile may have found the news)

``instance_create`` runs the same nodes after its own (:data:`NODES`).

Differences from Omicron, on purpose:

- The VMM row is the reservation: a VMM holds its sled's CPUs and memory until it has
  ended (``nexus.vmms.LIVE_VMM_STATES``). Omicron keeps reservations in
  ``sled_resource_vmm`` and deletes them when the VMM is gone.
- The saga waits for the VMM to run. Omicron's ends once the sled agent has accepted the
  VMM, and the instance-update saga follows its states; here the event intake follows
  them (``nexus/vmms.py``) and this saga parks until the VMM runs or ends.
- The undo of ``instance_starting`` is guarded by the active VMM rather than by the
  instance's generation: if the VMM failed meanwhile, the event intake already took it
  off the instance, and the instance stays ``failed``.
- No networking, IP, disk-in-zone or multicast steps: this control plane has none.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import func, select, update

from nexus.db.models import Disk, Instance, Sled, Vmm
from nexus.db.states import ENDED_VMM_STATES, InstanceState, SledState, VmmState
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
from nexus.sagas.vmm_common import announce_instance, ask_sled, outcome_generation
from nexus.vmms import LIVE_VMM_STATES, record_vmm_state
from nexus.waitkeys import rejection_key, vmm_key
from schemas.instance import VmmEnsure, VmmSpec, VmmStop
from schemas.instance import VmmRef as WireVmmRef
from schemas.instance import VmmState as WireVmmState

BOOT_DEADLINE = timedelta(minutes=2)
# An instance in one of these, with no active VMM, may be given one.
STARTABLE = frozenset({InstanceState.STOPPED, InstanceState.FAILED, InstanceState.CREATING})


class Params(BaseModel):
    instance_id: uuid.UUID
    boot_deadline_seconds: float = Field(default=BOOT_DEADLINE.total_seconds(), gt=0)


class VmmIds(BaseModel):
    vmm_id: uuid.UUID


class Reserved(BaseModel):
    sled_id: uuid.UUID
    queue: str


class Booted(BaseModel):
    generation: int


# The nodes read only ``instance_id`` and ``boot_deadline_seconds`` of the parameters,
# which instance_create's have too: ``Ctx[Any]`` lets both sagas run them.


# vmm_ids


async def vmm_ids(ctx: Ctx[Any]) -> VmmIds:
    # Derived from the saga: a re-run decides the same VMM (one VMM per start).
    return VmmIds(vmm_id=uuid.uuid5(ctx.saga_id, "vmm"))


# vmm_reserve


async def vmm_reserve(ctx: Ctx[Any]) -> Reserved:
    vmm_id = ctx.output("vmm_ids", VmmIds).vmm_id
    existing = await ctx.session.get(Vmm, vmm_id)
    if existing is not None:
        return await _reserved(ctx, existing.sled_id)
    instance = await ctx.session.get(Instance, ctx.params.instance_id)
    if instance is None:
        raise ActionFailed(f"no instance {ctx.params.instance_id}")
    for sled_id in await _sleds_with_room(ctx, instance.ncpus, instance.memory_bytes):
        # Another start may have reserved on this sled since the read: lock the sled,
        # then count again. Two starts on one sled serialise here.
        sled = (
            await ctx.session.execute(select(Sled).where(Sled.id == sled_id).with_for_update())
        ).scalar_one()
        if sled.state is not SledState.ACTIVE:
            continue
        cpus, memory = await _held(ctx, sled_id)
        if cpus + instance.ncpus > sled.cpus or memory + instance.memory_bytes > sled.memory_bytes:
            continue
        ctx.session.add(
            Vmm(
                id=vmm_id,
                instance_id=instance.id,
                sled_id=sled_id,
                ncpus=instance.ncpus,
                memory_bytes=instance.memory_bytes,
                state=VmmState.CREATING,
                generation=0,
                created_at=ctx.now,
                updated_at=ctx.now,
            )
        )
        await ctx.session.flush()
        return Reserved(sled_id=sled_id, queue=sled.queue_name)
    raise ActionFailed(
        f"insufficient capacity: no live sled has {instance.ncpus} CPUs and "
        f"{instance.memory_bytes} bytes of memory free"
    )


async def vmm_reserve_undo(ctx: Ctx[Any]) -> None:
    """Omicron's ``vmm_mark_saga_unwound``: the VMM ends, and its sled's room is free."""
    await ctx.session.execute(
        update(Vmm)
        .where(Vmm.id == ctx.output("vmm_ids", VmmIds).vmm_id, Vmm.state.not_in(ENDED_VMM_STATES))
        .values(state=VmmState.SAGA_UNWOUND, updated_at=ctx.now)
    )


async def _sleds_with_room(ctx: Ctx[Any], ncpus: int, memory_bytes: int) -> list[uuid.UUID]:
    """Active sleds with room for the VMM, the one with the most CPUs free first (spread)."""
    held = (
        select(
            Vmm.sled_id,
            func.sum(Vmm.ncpus).label("cpus"),
            func.sum(Vmm.memory_bytes).label("memory"),
        )
        .where(Vmm.state.in_(LIVE_VMM_STATES))
        .group_by(Vmm.sled_id)
        .subquery()
    )
    free_cpus = Sled.cpus - func.coalesce(held.c.cpus, 0)
    free_memory = Sled.memory_bytes - func.coalesce(held.c.memory, 0)
    rows = await ctx.session.execute(
        select(Sled.id)
        .outerjoin(held, held.c.sled_id == Sled.id)
        .where(Sled.state == SledState.ACTIVE, free_cpus >= ncpus, free_memory >= memory_bytes)
        .order_by(free_cpus.desc(), Sled.id)
    )
    return list(rows.scalars())


async def _held(ctx: Ctx[Any], sled_id: uuid.UUID) -> tuple[int, int]:
    """The CPUs and memory the live VMMs of ``sled_id`` hold."""
    row = (
        await ctx.session.execute(
            select(
                func.coalesce(func.sum(Vmm.ncpus), 0), func.coalesce(func.sum(Vmm.memory_bytes), 0)
            ).where(Vmm.sled_id == sled_id, Vmm.state.in_(LIVE_VMM_STATES))
        )
    ).one()
    return int(row[0]), int(row[1])


async def _reserved(ctx: Ctx[Any], sled_id: uuid.UUID) -> Reserved:
    queue = await ctx.session.scalar(select(Sled.queue_name).where(Sled.id == sled_id))
    assert queue is not None, "a VMM's sled has a row"
    return Reserved(sled_id=sled_id, queue=queue)


# instance_starting


async def instance_starting(ctx: Ctx[Any]) -> None:
    vmm_id = ctx.output("vmm_ids", VmmIds).vmm_id
    instance = await ctx.session.get(Instance, ctx.params.instance_id, with_for_update=True)
    if instance is None:
        raise ActionFailed(f"no instance {ctx.params.instance_id}")
    if instance.active_vmm_id == vmm_id:
        return  # this node ran already
    if instance.active_vmm_id is not None or instance.state not in STARTABLE:
        # Another start won, or the instance is being deleted.
        raise ActionFailed(
            f"instance {instance.name} is {instance.state.value}: it changed before it "
            "could be started"
        )
    instance.active_vmm_id = vmm_id
    instance.state = InstanceState.STARTING
    instance.generation += 1
    instance.updated_at = ctx.now
    await ctx.session.flush()
    await announce_instance(ctx, "starting")


async def instance_starting_undo(ctx: Ctx[Any]) -> None:
    await ctx.session.execute(
        update(Instance)
        .where(
            Instance.id == ctx.params.instance_id,
            Instance.active_vmm_id == ctx.output("vmm_ids", VmmIds).vmm_id,
        )
        .values(
            active_vmm_id=None,
            state=InstanceState.STOPPED,
            generation=Instance.generation + 1,
            updated_at=ctx.now,
        )
    )


# vmm_cleanup: the undo of an ensure that may have half-happened


async def vmm_cleanup_undo(ctx: Ctx[Any]) -> None:
    reserved = ctx.output("vmm_reserve", Reserved)
    vmm_id = ctx.output("vmm_ids", VmmIds).vmm_id
    await ctx.send(
        VmmStop(id=ctx.command_id(), payload=WireVmmRef(id=vmm_id), **ctx.envelope()),
        reserved.queue,
    )


# vmm_ensure


async def vmm_ensure(ctx: Ctx[Any]) -> Wait:
    vmm_id = ctx.output("vmm_ids", VmmIds).vmm_id
    reserved = ctx.output("vmm_reserve", Reserved)
    instance = await ctx.session.get(Instance, ctx.params.instance_id)
    if instance is None:
        raise ActionFailed(f"no instance {ctx.params.instance_id}")
    disks = await ctx.session.execute(
        select(Disk.id).where(Disk.attached_instance_id == instance.id).order_by(Disk.id)
    )
    command = VmmEnsure(
        id=ctx.command_id(),
        payload=VmmSpec(
            id=vmm_id,
            instance_id=instance.id,
            name=instance.name,
            ncpus=instance.ncpus,
            memory_bytes=instance.memory_bytes,
            disk_ids=tuple(disks.scalars()),
        ),
        **ctx.envelope(),
    )
    await ctx.send(command, reserved.queue)
    return Wait(
        keys=(
            vmm_key(vmm_id, WireVmmState.RUNNING),
            vmm_key(vmm_id, WireVmmState.FAILED),
            vmm_key(vmm_id, WireVmmState.DESTROYED),
            rejection_key(command.id),
        ),
        deadline=timedelta(seconds=ctx.params.boot_deadline_seconds),
    )


async def vmm_ensure_resume(ctx: Ctx[Any], wake: WakeUp) -> Booted:
    return Booted(generation=outcome_generation(wake, WireVmmState.RUNNING))


async def vmm_ensure_reconcile(ctx: Ctx[Any], keys: Sequence[str]) -> Reconciled:
    reserved = ctx.output("vmm_reserve", Reserved)
    vmm_id = ctx.output("vmm_ids", VmmIds).vmm_id
    return await ask_sled(ctx, vmm_id, reserved.queue, reserved.sled_id, WireVmmState.RUNNING)


# vmm_running


async def vmm_running(ctx: Ctx[Any]) -> None:
    booted = ctx.output("vmm_ensure", Booted)
    vmm_id = ctx.output("vmm_ids", VmmIds).vmm_id
    await record_vmm_state(ctx.session, vmm_id, VmmState.RUNNING, booted.generation, ctx.now)
    await announce_instance(ctx, "running")


# helpers


async def instance_fault(ctx: Ctx[Any], why: str) -> None:
    """An undo failed: the instance is ``failed``, with no VMM, for an operator. The
    reason (``why``) stays in the saga's error: an instance records no fault reason."""
    await ctx.session.execute(
        update(Instance)
        .where(Instance.id == ctx.params.instance_id)
        .values(
            state=InstanceState.FAILED,
            active_vmm_id=None,
            generation=Instance.generation + 1,
            updated_at=ctx.now,
        )
    )


NODES: tuple[Node[Any], ...] = (
    Node("vmm_ids", vmm_ids),
    Node("vmm_reserve", vmm_reserve, undo=vmm_reserve_undo),
    Node("instance_starting", instance_starting, undo=instance_starting_undo),
    Node("vmm_cleanup", no_op, undo=vmm_cleanup_undo),
    Node(
        "vmm_ensure",
        vmm_ensure,
        resume=vmm_ensure_resume,
        reconcile=vmm_ensure_reconcile,
    ),
    Node("vmm_running", vmm_running),
)

DEFINITION: SagaDefinition[Params] = SagaDefinition(
    name="instance_start",
    version=2,
    params=Params,
    stages=sequence(*NODES),
    on_stuck=instance_fault,
)
