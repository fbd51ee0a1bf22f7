"""disk_create_from_snapshot: a disk whose data starts as a snapshot's.

Omicron's ``disk_create`` with ``DiskSource::Snapshot`` gives the new volume the
snapshot's volume as its ``read_only_parent``: reads of blocks never written go to the
snapshot's running snapshots (``region_snapshot.snapshot_addr``), and the volume's own
three regions take the writes (``nexus/src/app/sagas/disk_create.rs``,
``sdc_create_volume_record``). Here the disk gets that read-only layer as regions of
its own: three **clones**, each a region ensured with ``source`` = one running
snapshot's address, which the crucible agent copies through its clone pool (slower
than a create) and serves read-only; beside them three **fresh** regions, as
``disk_create`` makes them. The disk is ``detached`` (ready) once all six are created.

Every wait is ``disk_create``'s: the ensure goes out through the outbox, the node parks
on ``region:<id>:created`` (or ``:failed``, or the command's refusal), and at the
deadline one reconcile asks the agent, re-arming while it says the region (a clone
still copying) is being created.

The snapshot is read while it is held (docs/omicron.md, "Disks from a snapshot"):

- ``regions_place`` takes the snapshot only if it is ``ready`` and none of its region
  snapshots is ``deleting``, and counts a volume reference on each region snapshot
  (Omicron's ``volume_references``) in the same transaction;
- ``disk_finalize`` (the clones have copied everything) and ``regions_place``'s undo
  give the references back;
- ``snapshot_delete`` is refused while a reference is held (its first node, which
  locks the snapshot's row as ``regions_place`` does): a clone must not lose its source
  while it copies.

Unwinding deletes all six regions and waits until each is destroyed, as
``disk_create``'s does. A clone still copying cannot be deleted: its agent refuses
(``unavailable``, as the real agent's ``DataFile::destroy`` answers 503 for a region
``Creating``). The undo then parks until the clone is created or failed (re-armed for
as long as its agent says it is copying) and deletes it again, under an id of its own.

Nodes, in order (each action beside its undo):

    ids              the disk's six region ids, generated once
    source_get       the snapshot: ready, its running snapshots' addresses, its geometry
    disk_record      the disk row, ``creating``, with its snapshot    undo: delete it
    regions_place    three fresh regions on distinct sleds, three     undo: delete region
                     clones on distinct sleds; reserve their space;   rows, give back space
                     take a reference on each region snapshot         and the references
    regions_cleanup  no-op                                            undo: delete the six
                                                                      regions, wait for each
    region_0..2      ensure a fresh region, wait for it   (the six side by side)
    clone_0..2       ensure a clone of running snapshot i, wait for it
    disk_finalize    the disk becomes ``detached``; the references are given back
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any, cast

from pydantic import BaseModel
from sqlalchemy import Table, bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from nexus.db.models import Disk, Region, RegionSnapshot, Snapshot
from nexus.db.states import DiskState, SnapshotState
from nexus.db.states import RegionState as RowRegionState
from nexus.saga.definition import (
    ActionFailed,
    Ctx,
    Node,
    Reconciled,
    SagaDefinition,
    Wait,
    WakeUp,
    no_op,
    parallel,
    sequence,
)
from nexus.sagas import disk_create, region_deletion
from nexus.sagas.disk_create import (
    REPLICAS,
    Placed,
    Placement,
    announce_disk,
    disk_fault,
    region_geometry,
)
from nexus.waitkeys import is_rejection, region_key, region_of, rejection_key
from schemas.common import Rejection
from schemas.identity import crucible_source
from schemas.progress import DiskState as WireDiskState
from schemas.region import (
    CLONING_REFUSAL,
    RegionChange,
    RegionDelete,
    RegionGet,
    RegionInfo,
    RegionRef,
    RegionSpec,
    reservation_bytes,
)
from schemas.region import RegionState as WireRegionState

datasets = disk_create.datasets
regions = disk_create.regions
snapshots = cast(Table, Snapshot.__table__)
region_snapshots = cast(Table, RegionSnapshot.__table__)


class Params(disk_create.Params):
    """``disk_create``'s, with the snapshot; ``size_bytes`` is at least the snapshot's
    and ``block_size`` is the snapshot's (the API checks both, as Omicron's does)."""

    snapshot_id: uuid.UUID


class SourcePart(BaseModel):
    """One region's part of the snapshot: its running snapshot, which a clone copies."""

    region_id: uuid.UUID
    dataset_id: uuid.UUID
    address: str


class Source(BaseModel):
    snapshot_id: uuid.UUID
    block_size: int
    extent_size: int
    extent_count: int
    parts: list[SourcePart]


# ids


async def ids(ctx: Ctx[Params]) -> disk_create.Ids:
    # Fresh regions first, then the clones; derived from the saga, so a re-run agrees.
    return disk_create.Ids(
        region_ids=[uuid.uuid5(ctx.saga_id, f"region:{index}") for index in range(2 * REPLICAS)]
    )


# source_get


async def source_get(ctx: Ctx[Params]) -> Source:
    """The snapshot as a source: ready, with a running snapshot serving each of its
    regions. Read only; ``regions_place`` takes it under a lock."""
    return await read_source(ctx.session, ctx.params.snapshot_id)


async def read_source(session: AsyncSession, snapshot_id: uuid.UUID) -> Source:
    """The snapshot's running snapshots and geometry, or ActionFailed saying why it
    cannot be a disk's source (the API answers the same reason before a saga starts)."""
    snapshot = await session.get(Snapshot, snapshot_id)
    if snapshot is None:
        raise ActionFailed(f"no snapshot {snapshot_id}")
    if snapshot.state is not SnapshotState.READY:
        raise ActionFailed(
            f"snapshot {snapshot.name} is {snapshot.state.value}; only a ready snapshot "
            "can be a disk's source"
        )
    parts = (
        (
            await session.execute(
                select(RegionSnapshot)
                .where(RegionSnapshot.snapshot_id == snapshot_id)
                .order_by(RegionSnapshot.region_id)
            )
        )
        .scalars()
        .all()
    )
    serving = [
        part
        for part in parts
        if part.snapshot_addr is not None
        and part.running_state is RowRegionState.CREATED
        and not part.deleting
    ]
    if len(serving) != REPLICAS or len(parts) != REPLICAS:
        raise ActionFailed(
            f"snapshot {snapshot.name} has {len(serving)} of {REPLICAS} running snapshots "
            "serving; it cannot be a disk's source"
        )
    return Source(
        snapshot_id=snapshot.id,
        block_size=snapshot.block_size,
        extent_size=snapshot.extent_size,
        extent_count=snapshot.extent_count,
        parts=[
            SourcePart(
                region_id=part.region_id,
                dataset_id=part.dataset_id,
                address=cast(str, part.snapshot_addr),
            )
            for part in serving
        ],
    )


# disk_record


async def disk_record(ctx: Ctx[Params]) -> None:
    await disk_create.record_disk(ctx, create_snapshot_id=ctx.params.snapshot_id)


# regions_place

# Guarded on the snapshot's state: the row lock it takes orders this against a
# snapshot_delete marking it deleting (which then sees the references taken here).
_HOLD_SNAPSHOT = (
    update(snapshots)
    .where(
        snapshots.c.id == bindparam("b_snapshot_id"),
        snapshots.c.state == SnapshotState.READY.value,
    )
    .values(updated_at=bindparam("b_now"))
)
_TAKE_REFERENCES = (
    update(region_snapshots)
    .where(
        region_snapshots.c.snapshot_id == bindparam("b_snapshot_id"),
        region_snapshots.c.deleting.is_(False),
    )
    .values(volume_references=region_snapshots.c.volume_references + 1)
)
_GIVE_REFERENCES = (
    update(region_snapshots)
    .where(
        region_snapshots.c.snapshot_id == bindparam("b_snapshot_id"),
        region_snapshots.c.volume_references > 0,
    )
    .values(volume_references=region_snapshots.c.volume_references - 1)
)
_PLACED = (
    select(regions.c.id, regions.c.dataset_id, datasets.c.queue_name)
    .join(datasets, datasets.c.id == regions.c.dataset_id)
    .where(regions.c.disk_id == bindparam("b_disk_id"))
)
_COUNT_REGIONS = select(func.count()).where(regions.c.disk_id == bindparam("b_disk_id"))


async def regions_place(ctx: Ctx[Params]) -> Placed:
    """Six placements, the three fresh regions first: each group on three live datasets
    on distinct sleds (a fresh region and a clone may share one), their space reserved
    in one pass over the datasets in id order, as every placement locks them."""
    p = ctx.params
    source = ctx.output("source_get", Source)
    region_ids = ctx.output("ids", disk_create.Ids).region_ids
    extent_size, extent_count = region_geometry(p.size_bytes, p.block_size)
    placed_before = {
        row.id: row for row in await ctx.session.execute(_PLACED, {"b_disk_id": p.disk_id})
    }
    if placed_before:
        # Run again: where the first run put them, which is where their commands go.
        return Placed(
            regions=[
                Placement(
                    dataset_id=placed_before[region_id].dataset_id,
                    queue=placed_before[region_id].queue_name,
                    region_id=region_id,
                )
                for region_id in region_ids
            ],
            extent_size=extent_size,
            extent_count=extent_count,
        )
    held = await ctx.session.execute(
        _HOLD_SNAPSHOT, {"b_snapshot_id": source.snapshot_id, "b_now": ctx.now}
    )
    referenced = await ctx.session.execute(_TAKE_REFERENCES, {"b_snapshot_id": source.snapshot_id})
    if not held.rowcount or referenced.rowcount != len(source.parts):  # type: ignore[attr-defined]
        raise ActionFailed(f"snapshot {source.snapshot_id} is no longer ready: it is being deleted")
    fresh_bytes = reservation_bytes(extent_size * extent_count * p.block_size)
    clone_bytes = reservation_bytes(source.extent_size * source.extent_count * source.block_size)
    candidates = list(
        await ctx.session.execute(
            disk_create.CANDIDATES,
            {
                "b_bytes": min(fresh_bytes, clone_bytes),
                "b_seen": ctx.now - disk_create.DATASET_FRESHNESS,
            },
        )
    )
    room = {dataset.id: dataset.free_bytes for dataset in candidates}
    fresh = _choose(candidates, room, fresh_bytes, "fresh regions")
    clones = _choose(candidates, room, clone_bytes, "clones")
    placements = [
        Placement(dataset_id=dataset.id, queue=dataset.queue_name, region_id=region_id)
        for dataset, region_id in zip([*fresh, *clones], region_ids, strict=True)
    ]
    need: dict[uuid.UUID, int] = {}
    for index, placement in enumerate(placements):
        size = fresh_bytes if index < REPLICAS else clone_bytes
        need[placement.dataset_id] = need.get(placement.dataset_id, 0) + size
    for dataset_id in sorted(need):
        reserved = await ctx.session.execute(
            disk_create.RESERVE, {"b_id": dataset_id, "b_bytes": need[dataset_id]}
        )
        if not reserved.rowcount:  # type: ignore[attr-defined]
            raise ActionFailed(
                f"insufficient capacity: dataset {dataset_id} filled up or was expunged meanwhile"
            )
    await ctx.session.execute(
        disk_create.INSERT_REGIONS,
        [
            {
                "id": placement.region_id,
                "disk_id": p.disk_id,
                "dataset_id": placement.dataset_id,
                "block_size": p.block_size if index < REPLICAS else source.block_size,
                "extent_size": extent_size if index < REPLICAS else source.extent_size,
                "extent_count": extent_count if index < REPLICAS else source.extent_count,
                "state": RowRegionState.REQUESTED,
                "generation": 0,
                "read_only": index >= REPLICAS,
                "source": None if index < REPLICAS else source.parts[index - REPLICAS].address,
            }
            for index, placement in enumerate(placements)
        ],
    )
    return Placed(regions=placements, extent_size=extent_size, extent_count=extent_count)


def _choose(candidates: list[Any], room: dict[uuid.UUID, int], size: int, what: str) -> list[Any]:
    """``REPLICAS`` datasets on distinct sleds with ``size`` left in ``room`` (the most
    room first, as ``disk_create`` ranks them), taking it from ``room``."""
    chosen: list[Any] = []
    for dataset in sorted(candidates, key=lambda d: (-room[d.id], d.id)):
        if room[dataset.id] >= size and dataset.sled_id not in {c.sled_id for c in chosen}:
            chosen.append(dataset)
            room[dataset.id] -= size
        if len(chosen) == REPLICAS:
            return chosen
    raise ActionFailed(
        f"insufficient capacity: need {REPLICAS} live datasets on distinct sleds with "
        f"{size} bytes free for the {what}, found {len(chosen)}"
    )


async def regions_place_undo(ctx: Ctx[Params]) -> None:
    """``disk_create``'s undo (delete the rows, give back their space), and the
    references back when it deleted any: run again, it finds none and gives back nothing."""
    had = await ctx.session.scalar(_COUNT_REGIONS, {"b_disk_id": ctx.params.disk_id})
    await disk_create.regions_place_undo(_as_disk_create(ctx))
    if had:
        await release_references(ctx)


async def release_references(ctx: Ctx[Params]) -> None:
    await ctx.session.execute(_GIVE_REFERENCES, {"b_snapshot_id": ctx.params.snapshot_id})


# regions_cleanup: the undo of the six ensures, on a no-op before them


async def regions_cleanup_undo(ctx: Ctx[Params]) -> Wait | None:
    """``disk_create``'s: delete every region not confirmed destroyed, and wait for each
    in turn (a clone's wait: :func:`_for_clones`)."""
    return _for_clones(ctx, await disk_create.regions_cleanup_undo(_as_disk_create(ctx)))


async def regions_cleanup_undo_resume(ctx: Ctx[Params], wake: WakeUp) -> Wait | None:
    """An agent answered: a clone copied (or failed) is deleted now; a failed destroy is
    asked again; a region destroyed (or never there) is recorded, and the undo waits for
    the next region until none is left."""
    placements = ctx.output("regions_place", Placed).regions
    known = {p.region_id: g for p, g in await disk_create.undestroyed(_as_disk_create(ctx))}
    if is_rejection(wake.key):
        rejection = Rejection.model_validate(wake.payload)
        region_id = _refused_region(ctx, rejection.command_id)
        if rejection.code == CLONING_REFUSAL:
            row = await ctx.session.get(Region, region_id)
            if row is not None and row.state is RowRegionState.REQUESTED:
                return _copied_wait(ctx, region_id, row.generation)
            # Copied since it refused (its event recorded meanwhile): delete it now.
            placement = next(p for p in placements if p.region_id == region_id)
            return await _delete_copied(ctx, placement, known.get(region_id, 0))
    change = region_deletion.woken_by(wake)
    if change is None:
        # The agent never had the region: nothing to delete, nothing to wait for.
        generation = known.get(region_id, 0)
    else:
        region_id, generation = change.region.id, change.region.generation
        placement = next(p for p in placements if p.region_id == region_id)
        match change.region.state:
            case WireRegionState.CREATED:
                return await _delete_copied(ctx, placement, generation)
            case WireRegionState.FAILED:
                region_deletion.check_resend(ctx, region_id, change.region.failure or "failed")
                again = await region_deletion.send_delete(
                    ctx, region_id, placement.queue, again=True
                )
                return region_deletion.destroyed_wait(
                    region_id, again, _delete_deadline(ctx), generation, resent=True
                )
    await ctx.session.execute(
        disk_create.RECORD_DESTROYED, {"b_id": region_id, "b_generation": generation}
    )
    base = _as_disk_create(ctx)
    return _for_clones(
        ctx, disk_create.next_destroyed_wait(base, await disk_create.undestroyed(base))
    )


def _for_clones(ctx: Ctx[Params], wait: Wait | None) -> Wait | None:
    """The wait for the next region's delete; for a clone, one that any answer to any
    delete sent to it wakes: its refusal may have come while it copied, under the id the
    delete had then (generation 1, below the ``created`` Nexus may have learnt since)."""
    clones = {p.region_id for p in ctx.output("regions_place", Placed).regions[REPLICAS:]}
    if wait is None or region_of(wait.keys[0]) not in clones:
        return wait
    region_id = region_of(wait.keys[0])
    refusals = tuple(rejection_key(i) for i in ctx.command_ids_so_far(str(region_id)))
    return replace(
        wait,
        keys=(
            region_key(region_id, WireRegionState.DESTROYED),
            region_key(region_id, WireRegionState.FAILED),
            *refusals,
        ),
        min_generation=0,
    )


def _refused_region(ctx: Ctx[Params], command_id: uuid.UUID) -> uuid.UUID:
    """The region whose delete (under any of its ids so far) the agent refused."""
    for placement in ctx.output("regions_place", Placed).regions:
        suffix = str(placement.region_id)
        if command_id in {
            *ctx.command_ids_so_far(suffix),
            ctx.resend_id(suffix),
            *ctx.command_ids_so_far(f"{suffix}:copied"),
        }:
            return placement.region_id
    raise ActionFailed(f"a refusal of command {command_id}, which this undo did not send")


def _copied_wait(ctx: Ctx[Params], region_id: uuid.UUID, known_generation: int) -> Wait:
    """Wait for a clone that refused its delete while it copied to be created or failed:
    either can be deleted. For as long as its agent says it is copying (a clone may
    take long)."""
    return Wait(
        keys=(
            region_key(region_id, WireRegionState.CREATED),
            region_key(region_id, WireRegionState.FAILED),
        ),
        deadline=_delete_deadline(ctx),
        min_generation=known_generation,
        rearms=None,
    )


async def _delete_copied(ctx: Ctx[Params], placement: Placement, generation: int) -> Wait:
    """A clone is copied: delete it, under an id of its own, and wait for it destroyed."""
    command = RegionDelete(
        id=ctx.command_id(f"{placement.region_id}:copied"),
        payload=RegionRef(id=placement.region_id),
        **ctx.envelope(),
    )
    await ctx.send(command, placement.queue)
    return region_deletion.destroyed_wait(
        placement.region_id, command.id, _delete_deadline(ctx), generation
    )


async def regions_cleanup_undo_reconcile(ctx: Ctx[Params], keys: Sequence[str]) -> Reconciled:
    """A clone's copy had no news by its deadline: ask its agent, re-arming while it
    copies. Any other wait is ``disk_create``'s reconcile of a delete."""
    region_id = region_of(keys[0])
    if keys[0] != region_key(region_id, WireRegionState.CREATED):
        return await disk_create.regions_cleanup_undo_reconcile(_as_disk_create(ctx), keys)
    placement = next(
        p for p in ctx.output("regions_place", Placed).regions if p.region_id == region_id
    )
    if ctx.transport is None:
        return Reconciled.unanswered("no broker connection to ask the agent")
    reply = await ctx.transport.request(
        RegionGet(payload=RegionRef(id=region_id), **ctx.envelope()),
        routing_key=placement.queue,
        timeout=10,
        answerer=crucible_source(placement.dataset_id),
    )
    if not isinstance(reply, RegionInfo):
        return Reconciled.unanswered(f"unexpected reply {reply.TYPE}")
    found = reply.payload.region
    if reply.payload.region_id != region_id or (found is not None and found.id != region_id):
        return Reconciled.rearm(f"agent {placement.dataset_id} answered about another region")
    if found is not None and found.state is WireRegionState.REQUESTED:
        return Reconciled.rearm(f"clone {region_id} is still copying")
    if found is not None and found.state in (WireRegionState.CREATED, WireRegionState.FAILED):
        change = RegionChange(agent_id=reply.payload.agent_id, region=found)
        return Reconciled.resume(
            region_key(region_id, found.state), change.model_dump(mode="json"), found.generation
        )
    # Gone, or on its way: the undo runs again, and its delete says which.
    state = "not there" if found is None else found.state.value
    return Reconciled.resend(f"clone {region_id} is {state}")


def _as_disk_create(ctx: Ctx[Params]) -> Ctx[disk_create.Params]:
    """The context as ``disk_create``'s steps take it: these params extend theirs (the
    context is invariant in its params only because its type says so)."""
    return cast(Ctx[disk_create.Params], ctx)


def _delete_deadline(ctx: Ctx[Params]) -> timedelta:
    return timedelta(seconds=ctx.params.delete_deadline_seconds)


# region_0..2: disk_create's nodes (placements 0..2)


def _region_node(index: int) -> Node[Any]:
    return Node(
        f"region_{index}",
        disk_create.region_ensure,
        resume=disk_create.region_ensure_resume,
        reconcile=disk_create.region_ensure_reconcile,
    )


# clone_0..2: placements 3..5, each copying part i of the snapshot


def _clone(ctx: Ctx[Params]) -> tuple[int, Placement]:
    index = int(ctx.node.rsplit("_", 1)[1])
    return index, ctx.output("regions_place", Placed).regions[REPLICAS + index]


async def clone_ensure(ctx: Ctx[Params]) -> Wait:
    index, placement = _clone(ctx)
    source = ctx.output("source_get", Source)
    spec = RegionSpec(
        id=placement.region_id,
        block_size=source.block_size,
        extent_size=source.extent_size,
        extent_count=source.extent_count,
        encrypted=True,
        source=source.parts[index].address,
    )
    return await disk_create.send_ensure(ctx, placement, spec)


async def clone_ensure_reconcile(ctx: Ctx[Params], keys: Any) -> Reconciled:
    return await disk_create.reconcile_ensure(ctx, _clone(ctx)[1])


def _clone_node(index: int) -> Node[Any]:
    return Node(
        f"clone_{index}",
        clone_ensure,
        resume=disk_create.region_ensure_resume,
        reconcile=clone_ensure_reconcile,
    )


# disk_finalize


async def disk_finalize(ctx: Ctx[Params]) -> None:
    """Ready; the clones hold the snapshot's data, so the references go back. Guarded on
    the disk's state: run again, it gives back nothing."""
    p = ctx.params
    ready = await ctx.session.execute(
        update(Disk)
        .where(Disk.id == p.disk_id, Disk.state == DiskState.CREATING)
        .values(state=DiskState.DETACHED, updated_at=ctx.now)
    )
    if ready.rowcount:  # type: ignore[attr-defined]
        await release_references(ctx)
    await announce_disk(ctx, p.disk_id, p.project, p.name, WireDiskState.DETACHED)


DEFINITION: SagaDefinition[Params] = SagaDefinition(
    name="disk_create_from_snapshot",
    version=1,
    params=Params,
    stages=(
        *sequence(
            Node("ids", ids),
            Node("source_get", source_get),
            Node("disk_record", disk_record, undo=disk_create.disk_record_undo),
            Node("regions_place", regions_place, undo=regions_place_undo),
            Node(
                "regions_cleanup",
                no_op,
                undo=regions_cleanup_undo,
                undo_resume=regions_cleanup_undo_resume,
                undo_reconcile=regions_cleanup_undo_reconcile,
            ),
        ),
        *parallel(
            *(_region_node(index) for index in range(REPLICAS)),
            *(_clone_node(index) for index in range(REPLICAS)),
        ),
        *sequence(Node("disk_finalize", disk_finalize)),
    ),
    on_stuck=disk_fault,
)
