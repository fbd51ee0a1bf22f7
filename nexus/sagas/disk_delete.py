"""disk_delete: mark the disk deleting, delete its regions, wait for each, mark it deleted.

Nodes, in order:

    disk_mark_deleting   detached → deleting (an attached disk is refused, and so is
                         one with snapshots: its regions hold them)
    region_0..5          ask the region's agent to delete it; wait for ``destroyed``
                         (a failed destroy is asked again, ``nexus/sagas/region_deletion.py``);
                         a disk has 3 regions, or 6 when made from a snapshot (3 of them
                         clones): the nodes past its last region do nothing
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
from sqlalchemy.ext.asyncio import AsyncSession

from nexus.db.models import Dataset, Disk, Region, Snapshot
from nexus.db.states import DatasetState, DiskState, RegionState, SnapshotState
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
from nexus.sagas import region_deletion
from nexus.sagas.disk_create import DELETE_DEADLINE, REPLICAS, announce_disk, disk_fault
from schemas.progress import DiskState as WireDiskState
from schemas.region import RegionState as WireRegionState
from schemas.region import reservation_bytes

# The most regions a disk has: three, and three clones when made from a snapshot.
MAX_REGIONS = 2 * REPLICAS


class Params(BaseModel):
    disk_id: uuid.UUID
    region_deadline_seconds: float = Field(default=DELETE_DEADLINE.total_seconds(), gt=0)


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
    kept = await snapshots_of(ctx.session, disk.id)
    if kept:
        raise ActionFailed(snapshots_block(disk.name, kept))
    disk.state = DiskState.DELETING
    disk.saga_id = ctx.saga_id
    disk.updated_at = ctx.now
    rows = await ctx.session.execute(
        select(Region, Dataset.queue_name)
        .join(Dataset, Dataset.id == Region.dataset_id)
        # A region lost with its dataset and replaced is no longer the disk's.
        .where(
            Region.disk_id == disk.id,
            (Region.state != RegionState.DESTROYED) | (Dataset.state != DatasetState.EXPUNGED),
        )
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


async def snapshots_of(session: AsyncSession, disk_id: uuid.UUID) -> list[str]:
    """The names of the disk's snapshots that are not destroyed."""
    rows = await session.execute(
        select(Snapshot.name)
        .where(Snapshot.disk_id == disk_id, Snapshot.state != SnapshotState.DESTROYED)
        .order_by(Snapshot.name)
    )
    return list(rows.scalars())


def snapshots_block(disk: str, names: list[str]) -> str:
    """Why a disk with snapshots is not deleted. Its regions hold the snapshots, and an
    agent refuses to delete a region with snapshots (Omicron's ``region_delete``: "must
    delete snapshots first!"), so the saga would only get stuck: the delete is refused."""
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"disk {disk} has {len(names)} snapshot(s) ({shown}): delete them first"


# region_0..5


def _region(ctx: Ctx[Params]) -> DiskRegion | None:
    index = int(ctx.node.rsplit("_", 1)[1])
    regions = ctx.output("disk_mark_deleting", Marked).regions
    return regions[index] if index < len(regions) else None


async def region_delete(ctx: Ctx[Params]) -> Wait | None:
    region = _region(ctx)
    if region is None:
        return None
    known = (
        await ctx.session.execute(
            select(Region.state, Region.generation).where(Region.id == region.region_id)
        )
    ).first()
    if known is not None and known.state == RegionState.DESTROYED:
        # Its agent confirmed it already (an earlier delete of this disk got this far).
        return None
    dataset = await ctx.session.get(Dataset, region.dataset_id)
    if dataset is not None and dataset.state == DatasetState.EXPUNGED:
        # Lost with its dataset: gone, as Omicron counts it; no lost agent is asked.
        await ctx.session.execute(
            update(Region).where(Region.id == region.region_id).values(state=RegionState.DESTROYED)
        )
        return None
    if ctx.resends:
        region_deletion.check_resend(ctx, region.region_id, "sent again by reconcile")
    command_id = await region_deletion.send_delete(ctx, region.region_id, region.queue)
    generation = known.generation if known is not None else 0
    return region_deletion.destroyed_wait(region.region_id, command_id, _deadline(ctx), generation)


async def region_delete_resume(ctx: Ctx[Params], wake: WakeUp) -> Wait | None:
    """Destroyed, or never there: done. A failed destroy: ask again (Omicron re-requests
    the delete too, ``delete_crucible_region`` in ``nexus/src/app/crucible.rs``)."""
    region = _region(ctx)
    assert region is not None
    change = region_deletion.woken_by(wake)
    if change is None or change.region.state is not WireRegionState.FAILED:
        return None
    region_deletion.check_resend(ctx, region.region_id, change.region.failure or "destroy failed")
    again = await region_deletion.send_delete(ctx, region.region_id, region.queue, again=True)
    return region_deletion.destroyed_wait(
        region.region_id, again, _deadline(ctx), change.region.generation, resent=True
    )


async def region_delete_reconcile(ctx: Ctx[Params], keys: Sequence[str]) -> Reconciled:
    region = _region(ctx)
    assert region is not None
    return await region_deletion.reconcile_delete(
        ctx, region.region_id, region.dataset_id, region.queue
    )


def _deadline(ctx: Ctx[Params]) -> timedelta:
    return timedelta(seconds=ctx.params.region_deadline_seconds)


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
            .values(free_bytes=Dataset.free_bytes + reservation_bytes(region.size_bytes))
        )
    await announce_disk(ctx, ctx.params.disk_id, marked.project, marked.name, WireDiskState.DELETED)


async def disk_mark_deleting_undo(ctx: Ctx[Params]) -> None:
    """Regions may be half gone: the disk is faulted, for an operator to delete again."""
    await disk_fault(ctx, "its delete failed after its regions' deletes began; delete it again")


DEFINITION: SagaDefinition[Params] = SagaDefinition(
    name="disk_delete",
    # 2: six region nodes (a disk made from a snapshot has six regions).
    version=2,
    params=Params,
    stages=(
        *sequence(Node("disk_mark_deleting", disk_mark_deleting, undo=disk_mark_deleting_undo)),
        *parallel(*(_region_node(index) for index in range(MAX_REGIONS))),
        *sequence(Node("disk_mark_deleted", disk_mark_deleted)),
    ),
    on_stuck=disk_fault,
)
