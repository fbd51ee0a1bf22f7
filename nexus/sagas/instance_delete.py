"""instance_delete: destroy the instance on its sled, detach its disks, mark it deleted.

Nodes, in order:

    instance_mark_deleting  any state but deleted → deleting       undo: faulted (failed)
    instance_destroy        destroy on the sled; wait for ``destroyed``
    disks_detach            its disks become detached
    instance_mark_deleted   the row stays, ``deleted``; its name is free again
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta

from pydantic import BaseModel, Field
from sqlalchemy import select, update

from nexus.db.models import Instance, Sled
from nexus.db.states import InstanceState
from nexus.saga.definition import (
    ActionFailed,
    Ctx,
    Node,
    Reconciled,
    SagaDefinition,
    Wait,
    WakeUp,
    sequence,
)
from nexus.sagas.instance_create import (
    announce_instance,
    ask_sled,
    detach_all,
    outcome_generation,
)
from nexus.waitkeys import instance_key, is_rejection, rejection_key
from schemas.common import Rejection
from schemas.instance import InstanceDestroy, InstanceRef
from schemas.instance import InstanceState as WireInstanceState

DESTROY_DEADLINE = timedelta(minutes=2)


class Params(BaseModel):
    instance_id: uuid.UUID
    deadline_seconds: float = Field(default=DESTROY_DEADLINE.total_seconds(), gt=0)


class Marked(BaseModel):
    queue: str | None
    generation: int
    # The sled the instance was on, the one that may answer the reconcile query (None in
    # outputs written before it was kept: the sled of ``queue`` answers then).
    sled_id: uuid.UUID | None = None


class Destroyed(BaseModel):
    generation: int


async def instance_mark_deleting(ctx: Ctx[Params]) -> Marked:
    instance = await ctx.session.get(Instance, ctx.params.instance_id, with_for_update=True)
    if instance is None or instance.state is InstanceState.DELETED:
        raise ActionFailed(f"no instance {ctx.params.instance_id}")
    queue = None
    if instance.sled_id is not None:
        queue = await ctx.session.scalar(select(Sled.queue_name).where(Sled.id == instance.sled_id))
    instance.state = InstanceState.DELETING
    instance.updated_at = ctx.now
    await announce_instance(ctx, "deleting")
    return Marked(queue=queue, generation=instance.generation, sled_id=instance.sled_id)


async def instance_mark_deleting_undo(ctx: Ctx[Params]) -> None:
    """The sled may or may not have destroyed it: failed, for an operator to delete again."""
    await ctx.session.execute(
        update(Instance)
        .where(Instance.id == ctx.params.instance_id)
        .values(state=InstanceState.FAILED, updated_at=ctx.now)
    )


async def instance_destroy(ctx: Ctx[Params]) -> Wait | Destroyed:
    marked = ctx.output("instance_mark_deleting", Marked)
    if marked.queue is None:
        return Destroyed(generation=marked.generation)
    command = InstanceDestroy(
        id=ctx.command_id(), payload=InstanceRef(id=ctx.params.instance_id), **ctx.envelope()
    )
    await ctx.send(command, marked.queue)
    return Wait(
        keys=(
            instance_key(ctx.params.instance_id, WireInstanceState.DESTROYED),
            rejection_key(command.id),
        ),
        deadline=timedelta(seconds=ctx.params.deadline_seconds),
        min_generation=0,
    )


async def instance_destroy_resume(ctx: Ctx[Params], wake: WakeUp) -> Destroyed:
    if is_rejection(wake.key):
        rejection = Rejection.model_validate(wake.payload)
        # A sled that never had the instance (or lost it) has nothing to destroy.
        if rejection.code in ("not_found", "destroyed"):
            return Destroyed(generation=ctx.output("instance_mark_deleting", Marked).generation)
        raise ActionFailed(f"the sled refused ({rejection.code}): {rejection.message}")
    return Destroyed(generation=outcome_generation(wake, WireInstanceState.DESTROYED))


async def instance_destroy_reconcile(ctx: Ctx[Params], keys: Sequence[str]) -> Reconciled:
    marked = ctx.output("instance_mark_deleting", Marked)
    assert marked.queue is not None
    return await ask_sled(
        ctx, ctx.params.instance_id, marked.queue, WireInstanceState.DESTROYED, marked.sled_id
    )


async def disks_detach(ctx: Ctx[Params]) -> None:
    await detach_all(ctx, ctx.params.instance_id)


async def instance_mark_deleted(ctx: Ctx[Params]) -> None:
    destroyed = ctx.output("instance_destroy", Destroyed)
    await ctx.session.execute(
        update(Instance)
        .where(Instance.id == ctx.params.instance_id)
        .values(
            state=InstanceState.DELETED,
            generation=max(destroyed.generation, 0),
            updated_at=ctx.now,
        )
    )
    await announce_instance(ctx, "deleted")


DEFINITION: SagaDefinition[Params] = SagaDefinition(
    name="instance_delete",
    version=1,
    params=Params,
    stages=sequence(
        Node("instance_mark_deleting", instance_mark_deleting, undo=instance_mark_deleting_undo),
        Node(
            "instance_destroy",
            instance_destroy,
            resume=instance_destroy_resume,
            reconcile=instance_destroy_reconcile,
        ),
        Node("disks_detach", disks_detach),
        Node("instance_mark_deleted", instance_mark_deleted),
    ),
)
