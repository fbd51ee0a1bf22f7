"""What the instance sagas share: the outcome of a VMM wait, the reconcile query, and
the progress notice for watchers (after Omicron's ``nexus/src/app/sagas/instance_common.rs``)."""

from __future__ import annotations

import uuid
from typing import Any

from nexus.db.models import Instance, Vmm
from nexus.saga.definition import ActionFailed, Ctx, Reconciled, WakeUp
from nexus.waitkeys import is_rejection, vmm_key
from schemas.common import Rejection
from schemas.identity import sled_source
from schemas.instance import ENDED_VMM_STATES, VmmChange, VmmGet, VmmInfo, VmmRef, VmmState
from schemas.progress import InstanceProgress, InstanceUpdated


def outcome_generation(wake: WakeUp, wanted: VmmState) -> int:
    """The VMM's generation in ``wanted``, or the node fails with what the sled said."""
    if is_rejection(wake.key):
        rejection = Rejection.model_validate(wake.payload)
        raise ActionFailed(f"the sled refused ({rejection.code}): {rejection.message}")
    vmm = VmmChange.model_validate(wake.payload).vmm
    if vmm.state is not wanted:
        reason = f": {vmm.reason}" if vmm.reason else ""
        raise ActionFailed(f"VMM {vmm.id} of instance {vmm.name} is {vmm.state.value}{reason}")
    return vmm.generation


async def ask_sled(
    ctx: Ctx[Any], vmm_id: uuid.UUID, queue: str, sled_id: uuid.UUID, wanted: VmmState
) -> Reconciled:
    """The one reconcile query for a VMM wait: what its sled has now. Only the sled Nexus
    placed the VMM on may answer."""
    if ctx.transport is None:
        return Reconciled.rearm("no broker connection to ask the sled")
    reply = await ctx.transport.request(
        VmmGet(payload=VmmRef(id=vmm_id), **ctx.envelope()),
        routing_key=queue,
        timeout=10,
        answerer=sled_source(sled_id),
    )
    if not isinstance(reply, VmmInfo):
        return Reconciled.unanswered(f"unexpected reply {reply.TYPE}")
    if reply.payload.vmm is None:
        # The command never reached it: it is idempotent, so send it again.
        return Reconciled.resend(f"sled {sled_id} has no VMM {vmm_id}")
    vmm = reply.payload.vmm
    if vmm.id != vmm_id or vmm.sled_id != sled_id:
        return Reconciled.rearm(f"the sled answered about another VMM than {vmm_id}")
    change = VmmChange(vmm=vmm).model_dump(mode="json")
    if vmm.state is wanted:
        return Reconciled.resume(vmm_key(vmm_id, wanted), change, vmm.generation)
    if vmm.state in ENDED_VMM_STATES:
        return Reconciled.fail(f"VMM {vmm_id} is {vmm.state.value}: {vmm.reason}")
    return Reconciled.rearm(f"VMM {vmm_id} is {vmm.state.value}")


async def announce_instance(ctx: Ctx[Any], state: str) -> None:
    """Tell watchers (``nexusctl … --wait``) where the instance is, through the outbox."""
    instance = await ctx.session.get(Instance, ctx.params.instance_id)
    if instance is None:
        return
    vmm = await ctx.session.get(Vmm, instance.active_vmm_id) if instance.active_vmm_id else None
    event = InstanceUpdated(
        id=ctx.command_id(state),
        payload=InstanceProgress(
            instance_id=instance.id,
            project=instance.project,
            name=instance.name,
            state=state,
            generation=max(1, int(ctx.now.timestamp() * 1000)),
            sled_id=vmm.sled_id if vmm is not None else None,
        ),
        **ctx.envelope(),
    )
    await ctx.publish(event, event.routing_key())
