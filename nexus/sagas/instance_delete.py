"""instance_delete: an instance with no VMM (stopped or failed) is marked deleted.

One node:

    instance_mark_deleted   stopped | failed, no active VMM → its disks detached and the
                            row ``deleted`` (it stays; its name is free again)

As Omicron's ``project_delete_instance`` (``nexus/db-queries/src/db/datastore/
instance.rs``), only an instance in ``no_vmm`` (stopped) or ``failed`` can be deleted,
and the record is marked and its disks detached together
(``instance_mark_destroyed_and_detach_disks``). The API refuses any other state with
``conflict``, and this node checks again. So no sled is ever asked: an instance that may
be deleted has no VMM left on any sled (a stop destroyed it, or it failed). Omicron's
``instance_delete.rs`` then frees networking resources, which this control plane does
not have; with nothing after the one transaction, no ``deleting`` state is needed.
"""

from __future__ import annotations

import uuid

from pydantic import BaseModel

from nexus.db.models import Instance
from nexus.db.states import InstanceState
from nexus.saga.definition import ActionFailed, Ctx, Node, SagaDefinition, sequence
from nexus.sagas.instance_create import detach_all
from nexus.sagas.vmm_common import announce_instance

# The states from which an instance may be deleted.
DELETABLE = frozenset({InstanceState.STOPPED, InstanceState.FAILED})


class Params(BaseModel):
    instance_id: uuid.UUID


async def instance_mark_deleted(ctx: Ctx[Params]) -> None:
    instance = await ctx.session.get(Instance, ctx.params.instance_id, with_for_update=True)
    if instance is None:
        raise ActionFailed(f"no instance {ctx.params.instance_id}")
    if instance.state is InstanceState.DELETED:
        return  # this node ran already, or another delete did the same
    if instance.state not in DELETABLE or instance.active_vmm_id is not None:
        raise ActionFailed(refusal(instance.name, instance.state))
    await detach_all(ctx, instance.id)
    instance.state = InstanceState.DELETED
    instance.generation += 1
    instance.updated_at = ctx.now
    await ctx.session.flush()
    await announce_instance(ctx, "deleted")


def refusal(name: str, state: InstanceState) -> str:
    """Why an instance in ``state`` cannot be deleted, for people."""
    return (
        f"cannot delete instance {name}: it is {state.value}; only a stopped or failed "
        "instance can be deleted (stop it first)"
    )


DEFINITION: SagaDefinition[Params] = SagaDefinition(
    name="instance_delete",
    version=2,
    params=Params,
    stages=sequence(Node("instance_mark_deleted", instance_mark_deleted)),
)
