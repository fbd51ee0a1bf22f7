"""disk_create: record the disk, place three regions, ensure them, wait, mark it ready.

The fix for the problem this project exists for: Omicron's disk-create saga re-requests
each region on an exponential backoff until it is created. Here the ensure command
goes out through the outbox, the node *parks* on ``region:<id>:created`` (or
``:failed``), and whichever Nexus replica consumes the crucible agent's notification
resumes it at once. The deadline is only a safety net: a reconcile query, and while
the agent says the region is still being created the wait re-arms (for as long as it
says so, unless ``region_max_rearms`` bounds it).

Unwinding waits too: ``regions_cleanup``'s undo deletes the regions and parks until each
agent confirms ``destroyed`` (a failed destroy is requested again), as Omicron's
``sdc_regions_ensure_undo`` does by polling (``nexus/src/app/sagas/disk_create.rs``,
``delete_crucible_regions`` in ``nexus/src/app/crucible.rs``); only then does
``regions_place``'s undo remove the region rows. An unwind that cannot destroy a region
leaves the saga stuck and the disk ``faulted``.

Nodes, in order (each action beside its undo):

    ids              the disk's region ids, generated once
    disk_record      the disk row, ``creating``              undo: delete it
    regions_place    three datasets on distinct sleds        undo: delete region rows,
                                                             give back their space
    regions_cleanup  no-op                                   undo: delete the regions and
                                                             wait until each is destroyed
    region_0..2      ensure one region, wait for it  (side by side)
    disk_finalize    the disk becomes ``detached`` (ready)
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, cast

from pydantic import BaseModel, Field
from sqlalchemy import Table, bindparam, delete, insert, select, update

from nexus.db.engine import upsert_insert
from nexus.db.models import FAULT_REASON_LENGTH, Dataset, Disk, Region
from nexus.db.states import DatasetState, DiskState, RegionState
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
from nexus.sagas import region_deletion
from nexus.waitkeys import is_rejection, region_key, region_of, rejection_key
from schemas.common import Rejection
from schemas.identity import crucible_source
from schemas.progress import DiskProgress, DiskUpdated
from schemas.progress import DiskState as WireDiskState
from schemas.region import (
    RegionChange,
    RegionEnsure,
    RegionGet,
    RegionInfo,
    RegionRef,
    RegionSpec,
    reservation_bytes,
)
from schemas.region import RegionState as WireRegionState

# Regions per disk, each on its own sled.
REPLICAS = 3
disks = cast(Table, Disk.__table__)
datasets = cast(Table, Dataset.__table__)
regions = cast(Table, Region.__table__)
# Crucible's default: 64 MiB extents at 512-byte blocks.
EXTENT_BYTES = 64 << 20
# How long a region may take before the one reconcile query; generous on purpose,
# since notifications, not this deadline, are what resume the saga.
REGION_DEADLINE = timedelta(minutes=5)
# How long a region delete may take before its agent is asked.
DELETE_DEADLINE = timedelta(minutes=2)
# Agents announce themselves every 30 s by default: one silent for longer than this
# is presumed gone and gets no new regions.
DATASET_FRESHNESS = timedelta(minutes=2)


class Params(BaseModel):
    disk_id: uuid.UUID
    project: str
    name: str
    size_bytes: int = Field(gt=0)
    block_size: int
    region_deadline_seconds: float = Field(default=REGION_DEADLINE.total_seconds(), gt=0)
    # Re-arms of a region's wait while its agent says "still being created"; None: no
    # bound, the saga never abandons a live agent.
    region_max_rearms: int | None = Field(default=None, ge=0)
    # How long the unwind waits for a delete's confirmation before asking the agent.
    delete_deadline_seconds: float = Field(default=DELETE_DEADLINE.total_seconds(), gt=0)


class Ids(BaseModel):
    region_ids: list[uuid.UUID]


class Placement(BaseModel):
    dataset_id: uuid.UUID
    queue: str
    region_id: uuid.UUID


class Placed(BaseModel):
    regions: list[Placement]
    extent_size: int
    extent_count: int


class Ensured(BaseModel):
    region_id: uuid.UUID
    agent_id: uuid.UUID
    port_number: int


# ids


async def ids(ctx: Ctx[Params]) -> Ids:
    # Derived from the saga: a re-run returns what the first run decided.
    return Ids(region_ids=[uuid.uuid5(ctx.saga_id, f"region:{index}") for index in range(REPLICAS)])


# disk_record


async def disk_record(ctx: Ctx[Params]) -> None:
    await record_disk(ctx)


async def record_disk(ctx: Ctx[Any], *, create_snapshot_id: uuid.UUID | None = None) -> None:
    """The disk's row, ``creating``, and its announcement (``disk_record`` of both
    disk-create sagas)."""
    p = ctx.params
    # Idempotent: a node that runs again finds its row (one statement either way).
    await ctx.session.execute(
        upsert_insert(ctx.session, disks)
        .values(
            id=p.disk_id,
            project=p.project,
            name=p.name,
            size_bytes=p.size_bytes,
            block_size=p.block_size,
            state=DiskState.CREATING,
            saga_id=ctx.saga_id,
            create_snapshot_id=create_snapshot_id,
            created_at=ctx.now,
            updated_at=ctx.now,
        )
        .on_conflict_do_nothing(index_elements=[disks.c.id])
    )
    await announce_disk(ctx, p.disk_id, p.project, p.name, WireDiskState.CREATING)


async def disk_record_undo(ctx: Ctx[Params]) -> None:
    await ctx.session.execute(delete(Disk).where(Disk.id == ctx.params.disk_id))


# regions_place


def region_geometry(size_bytes: int, block_size: int) -> tuple[int, int]:
    """(extent_size in blocks, extent_count) covering ``size_bytes``."""
    extent_size = max(1, EXTENT_BYTES // block_size)
    extent_count = max(1, math.ceil(size_bytes / (extent_size * block_size)))
    return extent_size, extent_count


# Built once: every disk runs them (building a statement costs more than running it).
CANDIDATES = (
    select(datasets.c.id, datasets.c.sled_id, datasets.c.queue_name, datasets.c.free_bytes)
    .where(
        datasets.c.free_bytes >= bindparam("b_bytes"),
        datasets.c.last_seen_at >= bindparam("b_seen"),
        datasets.c.state == DatasetState.ACTIVE.value,
    )
    .order_by(datasets.c.free_bytes.desc(), datasets.c.id)
)
_PLACED = (
    select(regions.c.id, regions.c.dataset_id, datasets.c.queue_name)
    .join(datasets, datasets.c.id == regions.c.dataset_id)
    .where(regions.c.disk_id == bindparam("b_disk_id"))
)
# Only on a dataset still active: a placement that read it active may reserve after a
# concurrent expunge committed (the UPDATE waits for the expunge's row lock, then
# PostgreSQL checks this WHERE on the row as the expunge left it). Without the state
# here the region went to the expunged dataset after the expunge had listed its
# regions, and its create waited for the lost agent for ever (found by the chaos test).
RESERVE = (
    update(datasets)
    .where(
        datasets.c.id == bindparam("b_id"),
        datasets.c.free_bytes >= bindparam("b_bytes"),
        datasets.c.state == DatasetState.ACTIVE.value,
    )
    .values(free_bytes=datasets.c.free_bytes - bindparam("b_bytes"))
)
INSERT_REGIONS = insert(regions)
_DELETE_REGIONS = (
    delete(regions)
    .where(regions.c.disk_id == bindparam("b_disk_id"))
    .returning(
        regions.c.dataset_id,
        (regions.c.extent_size * regions.c.extent_count * regions.c.block_size).label("size_bytes"),
    )
)
_GIVE_BACK = (
    update(datasets)
    .where(datasets.c.id == bindparam("b_id"))
    .values(free_bytes=datasets.c.free_bytes + bindparam("b_bytes"))
)


async def regions_place(ctx: Ctx[Params]) -> Placed:
    p = ctx.params
    extent_size, extent_count = region_geometry(p.size_bytes, p.block_size)
    # What each region takes from its dataset, as the agent reserves it.
    region_bytes = reservation_bytes(extent_size * extent_count * p.block_size)
    region_ids = ctx.output("ids", Ids).region_ids
    placed_before = {
        row.id: row for row in await ctx.session.execute(_PLACED, {"b_disk_id": p.disk_id})
    }
    if placed_before:
        # Run again: the regions are where the first run put them, which is where their
        # commands must go (a new choice would see less free space and differ).
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
    rows = await ctx.session.execute(
        CANDIDATES, {"b_bytes": region_bytes, "b_seen": ctx.now - DATASET_FRESHNESS}
    )
    chosen: list[Any] = []
    for dataset in rows:
        if dataset.sled_id not in {c.sled_id for c in chosen}:
            chosen.append(dataset)
        if len(chosen) == REPLICAS:
            break
    if len(chosen) < REPLICAS:
        raise ActionFailed(
            f"insufficient capacity: need {REPLICAS} live datasets on distinct sleds with "
            f"{region_bytes} bytes free, found {len(chosen)}"
        )
    placements = [
        Placement(dataset_id=dataset.id, queue=dataset.queue_name, region_id=region_id)
        for dataset, region_id in zip(chosen, region_ids, strict=True)
    ]
    # Reserve the space now, so concurrent placements do not overcommit; datasets are
    # locked in id order by every saga, so two placements cannot deadlock.
    for placement in sorted(placements, key=lambda p: p.dataset_id):
        reserved = await ctx.session.execute(
            RESERVE, {"b_id": placement.dataset_id, "b_bytes": region_bytes}
        )
        if not reserved.rowcount:  # type: ignore[attr-defined]
            raise ActionFailed(
                f"insufficient capacity: dataset {placement.dataset_id} filled up or was "
                "expunged meanwhile"
            )
    await ctx.session.execute(
        INSERT_REGIONS,
        [
            {
                "id": placement.region_id,
                "disk_id": p.disk_id,
                "dataset_id": placement.dataset_id,
                "block_size": p.block_size,
                "extent_size": extent_size,
                "extent_count": extent_count,
                "state": RegionState.REQUESTED,
                "generation": 0,
            }
            for placement in placements
        ],
    )
    return Placed(regions=placements, extent_size=extent_size, extent_count=extent_count)


async def regions_place_undo(ctx: Ctx[Params]) -> None:
    """Delete the disk's region rows and give back the space of those it deleted: run
    again, it finds none and gives back nothing."""
    deleted = await ctx.session.execute(_DELETE_REGIONS, {"b_disk_id": ctx.params.disk_id})
    freed: dict[uuid.UUID, int] = {}
    for region in deleted:
        freed[region.dataset_id] = freed.get(region.dataset_id, 0) + reservation_bytes(
            region.size_bytes
        )
    # Datasets in id order, as every saga locks them.
    for dataset_id in sorted(freed):
        await ctx.session.execute(_GIVE_BACK, {"b_id": dataset_id, "b_bytes": freed[dataset_id]})


# regions_cleanup: the undo of a step that can half-succeed sits on a no-op before it

_REGION_ROWS = (
    select(regions.c.id, regions.c.state, regions.c.generation, datasets.c.state.label("lost"))
    .join(datasets, datasets.c.id == regions.c.dataset_id)
    .where(regions.c.disk_id == bindparam("b_disk_id"))
)
# A confirmation the event intake has not recorded (reconcile found it): by generation.
RECORD_DESTROYED = (
    update(regions)
    .where(
        regions.c.id == bindparam("b_id"),
        regions.c.generation <= bindparam("b_generation"),
        regions.c.state != RegionState.DESTROYED,
    )
    .values(state=RegionState.DESTROYED, generation=bindparam("b_generation"))
)


async def regions_cleanup_undo(ctx: Ctx[Params]) -> Wait | None:
    """Ask every agent whose region is not yet confirmed destroyed to delete it, whether
    or not its ensure finished; then wait for the confirmations. Run again by reconcile
    (a delete lost, a failed destroy), it sends the deletes again under new ids."""
    left = await undestroyed(ctx)
    if ctx.resends and left:
        region_deletion.check_resend(ctx, left[0][0].region_id, "sent again by reconcile")
    for placement, _ in left:
        await region_deletion.send_delete(ctx, placement.region_id, placement.queue)
    return next_destroyed_wait(ctx, left)


async def regions_cleanup_undo_resume(ctx: Ctx[Params], wake: WakeUp) -> Wait | None:
    """An agent answered a delete: record a confirmation, re-send a failed destroy, and
    wait for the next region until none is left."""
    placements = ctx.output("regions_place", Placed).regions
    change = region_deletion.woken_by(wake)
    if change is None:
        # The agent never had the region: nothing to delete, nothing to wait for.
        region_id = rejected_region(ctx, wake, placements)
        known = {placement.region_id: gen for placement, gen in await undestroyed(ctx)}
        generation = known.get(region_id, 0)
    else:
        region_id, generation = change.region.id, change.region.generation
        # A failed destroy is sent again, unless the region's dataset was expunged
        # meanwhile (not among those left): its agent is gone, and so is the region.
        left = {placement.region_id for placement, _ in await undestroyed(ctx)}
        if change.region.state is WireRegionState.FAILED and region_id in left:
            region_deletion.check_resend(ctx, region_id, change.region.failure or "destroy failed")
            placement = next(p for p in placements if p.region_id == region_id)
            again = await region_deletion.send_delete(ctx, region_id, placement.queue, again=True)
            return region_deletion.destroyed_wait(
                region_id, again, _delete_deadline(ctx), generation, resent=True
            )
    await ctx.session.execute(RECORD_DESTROYED, {"b_id": region_id, "b_generation": generation})
    return next_destroyed_wait(ctx, await undestroyed(ctx))


async def regions_cleanup_undo_reconcile(ctx: Ctx[Params], keys: Sequence[str]) -> Reconciled:
    region_id = region_of(keys[0])
    placement = next(
        p for p in ctx.output("regions_place", Placed).regions if p.region_id == region_id
    )
    return await region_deletion.reconcile_delete(
        ctx, region_id, placement.dataset_id, placement.queue
    )


async def undestroyed(ctx: Ctx[Any]) -> list[tuple[Placement, int]]:
    """The placed regions whose agent has not confirmed them destroyed, in placement
    order, each with the generation Nexus knows of it. A region on an expunged dataset is
    gone with it (as Omicron counts it): no lost agent is asked or waited for."""
    rows = {
        row.id: row
        for row in await ctx.session.execute(_REGION_ROWS, {"b_disk_id": ctx.params.disk_id})
        if row.lost != DatasetState.EXPUNGED.value
    }
    return [
        (placement, rows[placement.region_id].generation)
        for placement in ctx.output("regions_place", Placed).regions
        if placement.region_id in rows and rows[placement.region_id].state != RegionState.DESTROYED
    ]


def next_destroyed_wait(ctx: Ctx[Any], left: list[tuple[Placement, int]]) -> Wait | None:
    """Wait on the first region left, one at a time: the deletes are all out, so the
    others' confirmations are usually in by then and resume at once."""
    if not left:
        return None
    placement, generation = left[0]
    return region_deletion.destroyed_wait(
        placement.region_id,
        ctx.command_id(str(placement.region_id)),
        _delete_deadline(ctx),
        generation,
    )


def rejected_region(ctx: Ctx[Any], wake: WakeUp, placements: list[Placement]) -> uuid.UUID:
    """The region whose delete (under any of its ids so far) the agent refused."""
    refused = Rejection.model_validate(wake.payload).command_id
    for placement in placements:
        suffix = str(placement.region_id)
        if refused in {ctx.command_id(suffix), ctx.resend_id(suffix)}:
            return placement.region_id
    raise ActionFailed(f"a refusal of command {refused}, which this undo did not send")


def _delete_deadline(ctx: Ctx[Any]) -> timedelta:
    return timedelta(seconds=ctx.params.delete_deadline_seconds)


# region_0..2


def _placement(ctx: Ctx[Params]) -> Placement:
    index = int(ctx.node.rsplit("_", 1)[1])
    return ctx.output("regions_place", Placed).regions[index]


async def region_ensure(ctx: Ctx[Params]) -> Wait:
    placed = ctx.output("regions_place", Placed)
    placement = _placement(ctx)
    spec = RegionSpec(
        id=placement.region_id,
        block_size=ctx.params.block_size,
        extent_size=placed.extent_size,
        extent_count=placed.extent_count,
        encrypted=True,
    )
    return await send_ensure(ctx, placement, spec)


async def send_ensure(ctx: Ctx[Any], placement: Placement, spec: RegionSpec) -> Wait:
    """Ask the placement's agent for the region and wait for it created (or failed, or
    the command refused)."""
    command = RegionEnsure(id=ctx.command_id(), payload=spec, **ctx.envelope())
    await ctx.send(command, placement.queue)
    return Wait(
        keys=(
            region_key(placement.region_id, WireRegionState.CREATED),
            region_key(placement.region_id, WireRegionState.FAILED),
            rejection_key(command.id),
        ),
        deadline=timedelta(seconds=ctx.params.region_deadline_seconds),
        rearms=ctx.params.region_max_rearms,
    )


# What woke a region's wait, recorded on its row by generation, as the event intake
# records an event: when a reconcile found it, the event may come long after the saga
# has gone on (found by the chaos test: a disk ready while its regions' rows still
# said ``requested``, and a snapshot of it refused); when the event woke it, the intake
# has recorded it and this changes nothing.
_RECORD_REGION = (
    update(regions)
    .where(regions.c.id == bindparam("b_id"), regions.c.generation < bindparam("b_generation"))
    .values(
        state=bindparam("b_state", type_=regions.c.state.type),
        generation=bindparam("b_generation"),
        port_number=bindparam("b_port"),
    )
)


async def record_region(ctx: Ctx[Any], change: RegionChange) -> None:
    region = change.region
    await ctx.session.execute(
        _RECORD_REGION,
        {
            "b_id": region.id,
            "b_state": region.state.value,
            "b_generation": region.generation,
            "b_port": region.port_number,
        },
    )


async def region_ensure_resume(ctx: Ctx[Params], wake: WakeUp) -> Ensured:
    if is_rejection(wake.key):
        rejection = Rejection.model_validate(wake.payload)
        raise ActionFailed(f"region ensure refused ({rejection.code}): {rejection.message}")
    change = RegionChange.model_validate(wake.payload)
    region = change.region
    if region.state is not WireRegionState.CREATED:
        raise ActionFailed(f"region {region.id} {region.state.value}: {region.failure}")
    await record_region(ctx, change)
    return Ensured(region_id=region.id, agent_id=change.agent_id, port_number=region.port_number)


async def region_ensure_reconcile(ctx: Ctx[Params], keys: Any) -> Reconciled:
    """The deadline passed with no notification: ask the agent once."""
    return await reconcile_ensure(ctx, _placement(ctx))


async def reconcile_ensure(ctx: Ctx[Any], placement: Placement) -> Reconciled:
    """A region's ensure had no answer by its deadline: what its agent says of it."""
    if ctx.transport is None:
        return Reconciled.rearm("no broker connection to ask the agent")
    # Only the agent of the dataset Nexus placed the region on may answer.
    reply = await ctx.transport.request(
        RegionGet(payload=RegionRef(id=placement.region_id), **ctx.envelope()),
        routing_key=placement.queue,
        timeout=10,
        answerer=crucible_source(placement.dataset_id),
    )
    if not isinstance(reply, RegionInfo):
        return Reconciled.unanswered(f"unexpected reply {reply.TYPE}")
    if reply.payload.region is None:
        # The ensure never reached it (lost, or still in Nexus's outbox while the
        # database was down): it is idempotent, so send it again.
        return Reconciled.resend(
            f"agent {placement.dataset_id} has no region {placement.region_id}"
        )
    region = reply.payload.region
    if region.id != placement.region_id or reply.payload.agent_id != placement.dataset_id:
        return Reconciled.rearm(f"agent {placement.dataset_id} answered about something else")
    change = RegionChange(agent_id=reply.payload.agent_id, region=region).model_dump(mode="json")
    if region.state is WireRegionState.CREATED:
        return Reconciled.resume(region_key(region.id, region.state), change, region.generation)
    if region.state is WireRegionState.REQUESTED:
        return Reconciled.rearm(f"region {region.id} is still being created")
    return Reconciled.fail(f"region {region.id} is {region.state.value}")


def _region_node(index: int) -> Node[Params]:
    return Node(
        f"region_{index}",
        region_ensure,
        resume=region_ensure_resume,
        reconcile=region_ensure_reconcile,
    )


# disk_finalize


async def disk_finalize(ctx: Ctx[Params]) -> None:
    lost = await ctx.session.scalar(
        select(regions.c.id)
        .join(datasets, datasets.c.id == regions.c.dataset_id)
        .where(
            regions.c.disk_id == ctx.params.disk_id,
            datasets.c.state == DatasetState.EXPUNGED.value,
        )
        .limit(1)
    )
    if lost is not None:
        # Expunged while the disk was being made: it unwinds, rather than come up ready
        # with a region already lost.
        raise ActionFailed(f"region {lost} was lost with its dataset before the disk was ready")
    await ctx.session.execute(
        update(Disk)
        .where(Disk.id == ctx.params.disk_id, Disk.state == DiskState.CREATING)
        .values(state=DiskState.DETACHED, updated_at=ctx.now)
    )
    p = ctx.params
    await announce_disk(ctx, p.disk_id, p.project, p.name, WireDiskState.DETACHED)


# when an undo cannot finish


async def disk_fault(ctx: Ctx[Any], why: str) -> None:
    """Cleanup is impossible: the disk is faulted with the reason, for an operator, not
    left half made or half deleted (``disk_delete`` ends the same way)."""
    await ctx.session.execute(
        update(Disk)
        .where(Disk.id == ctx.params.disk_id)
        .values(state=DiskState.FAULTED, fault_reason=why[:FAULT_REASON_LENGTH], updated_at=ctx.now)
    )


# helpers


async def announce_disk(
    ctx: Ctx[Any],
    disk_id: uuid.UUID,
    project: str,
    name: str,
    state: WireDiskState,
) -> None:
    """Tell watchers the disk changed state (through the outbox, with the node)."""
    event = DiskUpdated(
        id=ctx.command_id(state.value),
        payload=DiskProgress(
            disk_id=disk_id,
            project=project,
            name=name,
            state=state,
            # Milliseconds of the node's clock: increases with every change of one disk.
            generation=max(1, int(ctx.now.timestamp() * 1000)),
        ),
        **ctx.envelope(),
    )
    await ctx.publish(event, event.routing_key())


DEFINITION: SagaDefinition[Params] = SagaDefinition(
    name="disk_create",
    version=1,
    params=Params,
    stages=(
        *sequence(
            Node("ids", ids),
            Node("disk_record", disk_record, undo=disk_record_undo),
            Node("regions_place", regions_place, undo=regions_place_undo),
            Node(
                "regions_cleanup",
                no_op,
                undo=regions_cleanup_undo,
                undo_resume=regions_cleanup_undo_resume,
                undo_reconcile=regions_cleanup_undo_reconcile,
            ),
        ),
        *parallel(*(_region_node(index) for index in range(REPLICAS))),
        *sequence(Node("disk_finalize", disk_finalize)),
    ),
    on_stuck=disk_fault,
)
