"""disk_delete: mark the disk deleting, delete its regions, wait for each, mark it deleted.

Nodes, in order:

    disk_mark_deleting   detached → deleting (an attached disk is refused)
    region_0..2          ask the region's agent to delete it; wait for ``destroyed``
    disk_mark_deleted    the disk row stays, ``deleted``; the datasets get their space back

Deleting cannot be undone: a region asked to delete is gone. A failure after the first
node therefore leaves the disk ``faulted`` (visible, retried by an operator), never
half-deleted and looking healthy.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta

from pydantic import BaseModel, Field
from sqlalchemy import select, update

from nexus.db.models import Dataset, Disk, Region
from nexus.db.states import DiskState, RegionState
from nexus.saga.definition import (
    ActionFailed,
    Ctx,
    Node,
    Reconciled,
    SagaDefinition,
    Wait,
    WakeUp,
    parallel,
    sequence,
)
from nexus.sagas.disk_create import REPLICAS, announce_disk, disk_fault
from nexus.waitkeys import is_rejection, region_key, rejection_key
from schemas.common import Rejection
from schemas.identity import crucible_source
from schemas.progress import DiskState as WireDiskState
from schemas.region import RegionChange, RegionDelete, RegionGet, RegionInfo, RegionRef
from schemas.region import RegionState as WireRegionState

REGION_DEADLINE = timedelta(minutes=2)


class Params(BaseModel):
    disk_id: uuid.UUID
    region_deadline_seconds: float = Field(default=REGION_DEADLINE.total_seconds(), gt=0)


class DiskRegion(BaseModel):
    region_id: uuid.UUID
    dataset_id: uuid.UUID
    queue: str
    size_bytes: int


class Marked(BaseModel):
    project: str
    name: str
    regions: list[DiskRegion]


# disk_mark_deleting


async def disk_mark_deleting(ctx: Ctx[Params]) -> Marked:
    disk = await ctx.session.get(Disk, ctx.params.disk_id, with_for_update=True)
    if disk is None:
        raise ActionFailed(f"no disk {ctx.params.disk_id}")
    if disk.state not in (DiskState.DETACHED, DiskState.FAULTED, DiskState.DELETING):
        raise ActionFailed(f"disk {disk.name} is {disk.state.value}; only a detached disk goes")
    disk.state = DiskState.DELETING
    disk.saga_id = ctx.saga_id
    disk.updated_at = ctx.now
    rows = await ctx.session.execute(
        select(Region, Dataset.queue_name)
        .join(Dataset, Dataset.id == Region.dataset_id)
        .where(Region.disk_id == disk.id)
        .order_by(Region.id)
    )
    regions = [
        DiskRegion(
            region_id=region.id,
            dataset_id=region.dataset_id,
            queue=queue,
            size_bytes=region.block_size * region.extent_size * region.extent_count,
        )
        for region, queue in rows
    ]
    await announce_disk(ctx, disk.id, disk.project, disk.name, WireDiskState.DELETING)
    return Marked(project=disk.project, name=disk.name, regions=regions)


# region_0..2


def _region(ctx: Ctx[Params]) -> DiskRegion | None:
    index = int(ctx.node.rsplit("_", 1)[1])
    regions = ctx.output("disk_mark_deleting", Marked).regions
    return regions[index] if index < len(regions) else None


async def region_delete(ctx: Ctx[Params]) -> Wait | None:
    region = _region(ctx)
    if region is None:
        return None
    command = RegionDelete(
        id=ctx.command_id(), payload=RegionRef(id=region.region_id), **ctx.envelope()
    )
    await ctx.send(command, region.queue)
    return Wait(
        keys=(region_key(region.region_id, WireRegionState.DESTROYED), rejection_key(command.id)),
        deadline=timedelta(seconds=ctx.params.region_deadline_seconds),
    )


async def region_delete_resume(ctx: Ctx[Params], wake: WakeUp) -> None:
    if is_rejection(wake.key):
        rejection = Rejection.model_validate(wake.payload)
        # An agent that never had the region has nothing to delete.
        if rejection.code != "not_found":
            raise ActionFailed(f"region delete refused: {rejection.message}")
    else:
        RegionChange.model_validate(wake.payload)


async def region_delete_reconcile(ctx: Ctx[Params], keys: Sequence[str]) -> Reconciled:
    region = _region(ctx)
    assert region is not None
    if ctx.transport is None:
        return Reconciled.rearm("no broker connection to ask the agent")
    # Only the agent of the region's dataset may answer.
    reply = await ctx.transport.request(
        RegionGet(payload=RegionRef(id=region.region_id), **ctx.envelope()),
        routing_key=region.queue,
        timeout=10,
        answerer=crucible_source(region.dataset_id),
    )
    if not isinstance(reply, RegionInfo):
        return Reconciled.rearm(f"unexpected reply {reply.TYPE}")
    found = reply.payload.region
    if reply.payload.region_id != region.region_id or (
        found is not None and found.id != region.region_id
    ):
        return Reconciled.rearm(f"agent {region.dataset_id} answered about another region")
    if found is None:
        return Reconciled.resume(
            rejection_key(ctx.command_id()),
            {
                "command_id": str(ctx.command_id()),
                "command_type": RegionDelete.TYPE,
                "code": "not_found",
                "message": "the agent has no such region",
            },
            1,
        )
    if found.state is WireRegionState.DESTROYED:
        change = RegionChange(agent_id=reply.payload.agent_id, region=found)
        return Reconciled.resume(
            region_key(region.region_id, found.state),
            change.model_dump(mode="json"),
            found.generation,
        )
    return Reconciled.rearm(f"region {region.region_id} is {found.state.value}")


def _region_node(index: int) -> Node[Params]:
    return Node(
        f"region_{index}",
        region_delete,
        resume=region_delete_resume,
        reconcile=region_delete_reconcile,
    )


# disk_mark_deleted


async def disk_mark_deleted(ctx: Ctx[Params]) -> None:
    marked = ctx.output("disk_mark_deleting", Marked)
    # Guarded on the disk's state, so that running this twice frees the space once.
    deleted = await ctx.session.execute(
        update(Disk)
        .where(Disk.id == ctx.params.disk_id, Disk.state == DiskState.DELETING)
        .values(state=DiskState.DELETED, updated_at=ctx.now)
    )
    if not deleted.rowcount:  # type: ignore[attr-defined]
        return
    # Datasets in id order, as every saga locks them: no deadlock with a placement.
    for region in sorted(marked.regions, key=lambda r: r.dataset_id):
        await ctx.session.execute(
            update(Region).where(Region.id == region.region_id).values(state=RegionState.DESTROYED)
        )
        await ctx.session.execute(
            update(Dataset)
            .where(Dataset.id == region.dataset_id)
            .values(free_bytes=Dataset.free_bytes + region.size_bytes)
        )
    await announce_disk(ctx, ctx.params.disk_id, marked.project, marked.name, WireDiskState.DELETED)


async def disk_mark_deleting_undo(ctx: Ctx[Params]) -> None:
    """Regions may be half gone: the disk is faulted, for an operator to delete again."""
    await disk_fault(ctx)


DEFINITION: SagaDefinition[Params] = SagaDefinition(
    name="disk_delete",
    version=1,
    params=Params,
    stages=(
        *sequence(Node("disk_mark_deleting", disk_mark_deleting, undo=disk_mark_deleting_undo)),
        *parallel(*(_region_node(index) for index in range(REPLICAS))),
        *sequence(Node("disk_mark_deleted", disk_mark_deleted)),
    ),
    on_stuck=disk_fault,
)
