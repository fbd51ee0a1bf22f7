"""Deleting a region and waiting until its agent confirms it ``destroyed``: the rule
``disk_create``'s unwind and ``disk_delete`` share.

After Omicron's ``delete_crucible_region`` (``nexus/src/app/crucible.rs``): the delete
is idempotent; ``tombstoned`` is on its way; ``destroyed`` is done; ``failed`` means the
destroy failed, and the delete is requested again (the agent moves the region back to
``tombstoned``); a region the agent never had has nothing to delete. Omicron polls the
agent on a backoff for this; here the saga parks on the agent's events
(``region:<id>:destroyed``, ``region:<id>:failed``, the command's rejection) and asks
the agent only at the deadline. A delete is sent again at most ``MAX_RESENDS`` times
(a failed destroy, a delete the agent never received); after that, or when the agent
still says ``tombstoned`` after the wait's re-arms, the saga gives up and the disk is
faulted with the reason.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from nexus.saga.definition import ActionFailed, Ctx, Reconciled, Wait, WakeUp
from nexus.waitkeys import is_rejection, region_key, rejection_key
from schemas.common import Rejection
from schemas.identity import crucible_source
from schemas.region import RegionChange, RegionDelete, RegionGet, RegionInfo, RegionRef
from schemas.region import RegionState as WireRegionState

# How often a delete is sent again before the saga gives up on the region.
MAX_RESENDS = 5
# A rejection code that means the agent never had the region: nothing to delete.
NOT_FOUND = "not_found"


async def send_delete(
    ctx: Ctx[Any], region_id: uuid.UUID, queue: str, *, again: bool = False
) -> uuid.UUID:
    """Queue a delete for ``region_id``; ``again``: a re-send, under the next id."""
    suffix = str(region_id)
    command_id = ctx.resend_id(suffix) if again else ctx.command_id(suffix)
    await ctx.send(
        RegionDelete(id=command_id, payload=RegionRef(id=region_id), **ctx.envelope()), queue
    )
    return command_id


def destroyed_wait(
    region_id: uuid.UUID,
    command_id: uuid.UUID,
    deadline: timedelta,
    known_generation: int,
    *,
    resent: bool = False,
) -> Wait:
    """Wait for the region's ``destroyed`` (or a failed destroy, or a refusal). A
    ``failed`` no newer than what Nexus knew (a create that failed) does not wake it."""
    return Wait(
        keys=(
            region_key(region_id, WireRegionState.DESTROYED),
            region_key(region_id, WireRegionState.FAILED),
            rejection_key(command_id),
        ),
        deadline=deadline,
        min_generation=known_generation,
        resent=resent,
    )


def woken_by(wake: WakeUp) -> RegionChange | None:
    """What the event that woke a delete's wait says: the region's change, None when the
    agent never had the region; a refusal of another kind fails the node."""
    if is_rejection(wake.key):
        rejection = Rejection.model_validate(wake.payload)
        if rejection.code == NOT_FOUND:
            return None
        raise ActionFailed(f"region delete refused ({rejection.code}): {rejection.message}")
    return RegionChange.model_validate(wake.payload)


def check_resend(ctx: Ctx[Any], region_id: uuid.UUID, why: str) -> None:
    """Fail (the disk is faulted) once the delete was sent again ``MAX_RESENDS`` times."""
    if ctx.resends >= MAX_RESENDS:
        raise ActionFailed(
            f"region {region_id} not destroyed after {ctx.resends + 1} deletes: {why}"
        )


async def reconcile_delete(
    ctx: Ctx[Any], region_id: uuid.UUID, dataset_id: uuid.UUID, queue: str
) -> Reconciled:
    """The deadline passed with no news of the delete: ask the region's agent once."""
    if ctx.transport is None:
        return Reconciled.unanswered("no broker connection to ask the agent")
    # Only the agent of the region's dataset may answer.
    reply = await ctx.transport.request(
        RegionGet(payload=RegionRef(id=region_id), **ctx.envelope()),
        routing_key=queue,
        timeout=10,
        answerer=crucible_source(dataset_id),
    )
    if not isinstance(reply, RegionInfo):
        return Reconciled.unanswered(f"unexpected reply {reply.TYPE}")
    found = reply.payload.region
    if reply.payload.region_id != region_id or (found is not None and found.id != region_id):
        return Reconciled.rearm(f"agent {dataset_id} answered about another region")
    if found is None:
        gone = Rejection(
            command_id=ctx.command_id(str(region_id)),
            command_type=RegionDelete.TYPE,
            code=NOT_FOUND,
            message="the agent has no such region",
        )
        return Reconciled.resume(rejection_key(gone.command_id), gone.model_dump(mode="json"), 1)
    change = RegionChange(agent_id=reply.payload.agent_id, region=found)
    match found.state:
        case WireRegionState.DESTROYED:
            return Reconciled.resume(
                region_key(region_id, found.state), change.model_dump(mode="json"), found.generation
            )
        case WireRegionState.TOMBSTONED:
            return Reconciled.rearm(f"region {region_id} is still being destroyed")
        case WireRegionState.FAILED:
            return Reconciled.resend(f"region {region_id} failed to be destroyed: {found.failure}")
        case _:
            # Requested or created: the delete never reached the agent.
            return Reconciled.resend(f"region {region_id} is {found.state.value}: no delete came")
