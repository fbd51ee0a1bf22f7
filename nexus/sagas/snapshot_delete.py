"""snapshot_delete: mark the snapshot deleting, stop every running snapshot and wait until
each is destroyed, then delete every region's snapshot and wait until each is destroyed,
then mark the snapshot destroyed and remove its parts' rows.

After Omicron's ``nexus/src/app/sagas/snapshot_delete.rs`` and the region snapshot
cleanup it leads to (docs/omicron.md, "Snapshot sagas"): Omicron deletes the snapshot's
record first and leaves the running snapshots and snapshots to the volume's
``resources_to_clean_up``, deleted by a later saga once no volume references them. Here
a disk made from a snapshot is counted on its parts (``volume_references``, written by
the disk-from-snapshot saga): a snapshot still read from is refused, and the teardown is
this saga's own, in the order the agent demands (``nexus/sagas/snapshot_parts.py``).

Nodes, in order:

    snapshot_mark_deleting   ready or faulted → deleting; parts marked ``deleting``
    running_stop             stop every running snapshot; wait until each is destroyed
    snapshots_delete         delete every region's snapshot; wait until each is destroyed
    snapshot_mark_destroyed  the snapshot row stays, ``destroyed``; the parts' rows go

A failure before any running snapshot was stopped puts the snapshot back as it was; one
after leaves it ``faulted`` (not usable, deleted again by an operator), never half
deleted and looking ready.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import cast

from pydantic import BaseModel, Field
from sqlalchemy import Table, delete, select, update

from nexus.db.models import Dataset, RegionSnapshot, Sled, Snapshot
from nexus.db.states import AgentSnapshotState, RegionState, SnapshotState
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
from nexus.sagas.disk_create import DELETE_DEADLINE, REPLICAS
from nexus.sagas.snapshot_create import snapshot_fault
from nexus.sagas.snapshot_parts import (
    Part,
    Teardowns,
    teardown_reconcile,
    teardown_step,
    teardown_woken,
)

region_snapshots = cast(Table, RegionSnapshot.__table__)


class Params(BaseModel):
    snapshot_id: uuid.UUID
    delete_deadline_seconds: float = Field(default=DELETE_DEADLINE.total_seconds(), gt=0)


class Marked(BaseModel):
    project: str
    name: str
    parts: list[Part]


# snapshot_mark_deleting


async def snapshot_mark_deleting(ctx: Ctx[Params]) -> Marked:
    snapshot = await ctx.session.get(Snapshot, ctx.params.snapshot_id, with_for_update=True)
    if snapshot is None:
        raise ActionFailed(f"no snapshot {ctx.params.snapshot_id}")
    if snapshot.state not in (SnapshotState.READY, SnapshotState.FAULTED, SnapshotState.DELETING):
        raise ActionFailed(
            f"snapshot {snapshot.name} is {snapshot.state.value}: only a ready or faulted "
            "snapshot can be deleted"
        )
    rows = (
        await ctx.session.execute(
            select(RegionSnapshot, Dataset.queue_name, Sled.hostname)
            .join(Dataset, Dataset.id == RegionSnapshot.dataset_id)
            .outerjoin(Sled, Sled.id == Dataset.sled_id)
            .where(RegionSnapshot.snapshot_id == snapshot.id)
            .order_by(RegionSnapshot.region_id)
        )
    ).all()
    # Each disk being made from it holds a reference on every part while its clones copy
    # (nexus/sagas/disk_create_from_snapshot.py), and gives them back once it is ready.
    readers = max((part.volume_references for part, _, _ in rows), default=0)
    if readers:
        raise ActionFailed(
            f"snapshot {snapshot.name} is being copied by {readers} disk(s) being made from "
            "it: delete it once they are ready"
        )
    # ``saga_id`` stays the create's: an undo could not tell what to put back.
    snapshot.state = SnapshotState.DELETING
    snapshot.updated_at = ctx.now
    await ctx.session.execute(
        update(region_snapshots)
        .where(region_snapshots.c.snapshot_id == snapshot.id)
        .values(deleting=True)
    )
    parts = [
        Part(
            region_id=part.region_id,
            dataset_id=part.dataset_id,
            queue=queue,
            host=hostname or str(part.dataset_id),
            index=index,
        )
        for index, (part, queue, hostname) in enumerate(rows)
    ]
    return Marked(project=snapshot.project, name=snapshot.name, parts=parts)


async def snapshot_mark_deleting_undo(ctx: Ctx[Params]) -> None:
    """Nothing torn down (every part's snapshot and running snapshot still created): the
    snapshot is ready again, whatever it was. Otherwise it can no longer be read:
    faulted, for an operator to delete again."""
    rows = (
        await ctx.session.execute(
            select(region_snapshots.c.snapshot_state, region_snapshots.c.running_state).where(
                region_snapshots.c.snapshot_id == ctx.params.snapshot_id
            )
        )
    ).all()
    if not intact([(row.snapshot_state, row.running_state) for row in rows]):
        await snapshot_fault(
            ctx, "its delete failed after its parts' teardown began; delete it again"
        )
        return
    await ctx.session.execute(
        update(region_snapshots)
        .where(region_snapshots.c.snapshot_id == ctx.params.snapshot_id)
        .values(deleting=False)
    )
    await ctx.session.execute(
        update(Snapshot)
        .where(Snapshot.id == ctx.params.snapshot_id)
        .values(state=SnapshotState.READY, fault_reason=None, updated_at=ctx.now)
    )


def intact(parts: Sequence[tuple[AgentSnapshotState | None, RegionState | None]]) -> bool:
    """Every one of a disk's parts has its snapshot and its running snapshot created: the
    snapshot can be read (and is ``ready``)."""
    return len(parts) == REPLICAS and all(
        snapshot is AgentSnapshotState.CREATED and running is RegionState.CREATED
        for snapshot, running in parts
    )


# running_stop, snapshots_delete: one teardown phase each, the running snapshots first


def _teardown(ctx: Ctx[Params], *, running: bool) -> Teardowns:
    return Teardowns(
        snapshot_id=ctx.params.snapshot_id,
        parts=ctx.output("snapshot_mark_deleting", Marked).parts,
        running=running,
        snapshots=not running,
        deadline=timedelta(seconds=ctx.params.delete_deadline_seconds),
    )


def _phase_node(name: str, *, running: bool) -> Node[Params]:
    async def action(ctx: Ctx[Params]) -> Wait | None:
        return await teardown_step(ctx, _teardown(ctx, running=running))

    async def resume(ctx: Ctx[Params], wake: WakeUp) -> Wait | None:
        return await teardown_woken(ctx, _teardown(ctx, running=running), wake)

    async def reconcile(ctx: Ctx[Params], keys: Sequence[str]) -> Reconciled:
        return await teardown_reconcile(ctx, _teardown(ctx, running=running), keys)

    return Node(name, action, resume=resume, reconcile=reconcile)


# snapshot_mark_destroyed


async def snapshot_mark_destroyed(ctx: Ctx[Params]) -> None:
    await ctx.session.execute(
        delete(region_snapshots).where(region_snapshots.c.snapshot_id == ctx.params.snapshot_id)
    )
    await ctx.session.execute(
        update(Snapshot)
        .where(Snapshot.id == ctx.params.snapshot_id, Snapshot.state == SnapshotState.DELETING)
        .values(state=SnapshotState.DESTROYED, fault_reason=None, updated_at=ctx.now)
    )


DEFINITION: SagaDefinition[Params] = SagaDefinition(
    name="snapshot_delete",
    version=1,
    params=Params,
    stages=sequence(
        Node("snapshot_mark_deleting", snapshot_mark_deleting, undo=snapshot_mark_deleting_undo),
        _phase_node("running_stop", running=True),
        _phase_node("snapshots_delete", running=False),
        Node("snapshot_mark_destroyed", snapshot_mark_destroyed),
    ),
    on_stuck=snapshot_fault,
)
