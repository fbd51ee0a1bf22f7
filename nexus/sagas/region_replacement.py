"""region_replacement: rebuild one region lost with its dataset elsewhere, phase by phase.

Omicron drives a replacement with three sagas (``region_replacement_start``,
``_drive``, ``_finish`` in ``nexus/src/app/sagas/``) started by two background tasks
that wake every 30 s and 10 s (``nexus/src/app/background/tasks/region_replacement*.rs``)
and look at each request's state. Here one saga walks the request through the same
states (``nexus.db.states.ReplacementState``), and each phase begins the moment the one
before ends: the saga parks on the event that ends a phase (the new region's
``created``, the live repair's ``finished``) and that event resumes it. No task polls.

Nodes, in order (each action beside its undo); the request's state after each:

    claim             requested → allocating: this saga operates the request
                                                          undo: back to requested
    region_alloc      a dataset on a sled the disk does not use yet, space reserved, the
                      new region's row                    undo: row deleted, space back
    region_cleanup    no-op                               undo: delete the new region and
                                                          wait until it is destroyed
    region_ensure     ensure the new region; wait for ``created`` (deadline + reconcile)
    repair_plan       allocating → running; how to repair: ``live`` when the disk is
                      attached to a running VMM, else ``nexus``
    repair            running → driving. live: the VMM's sled repairs the volume (old
                      target → new) and reports started / progress / finished by event;
                      the saga waits for finished. nexus: Nexus's own step (below).
                      Then → replacement_done
    swap              replacement_done → completing: the disk's region set is the new
                      region (the old row ``tombstoned``)   undo: the old row back
    old_region_delete the old region is ``destroyed``: its dataset is expunged, and
                      Omicron treats a region on an expunged dataset as gone (no agent
                      is asked)                             undo: back to tombstoned
    complete          completing → complete; no saga operates it

Any failure unwinds to a clean slate: the request ``requested`` again (its reason in
``last_failure``), the new region deleted at its agent and its row gone. The sweeper then
starts a new attempt after a backoff (:mod:`nexus.replacements`); that retry after a
failure is the one timer, as Omicron's tasks would pick the request up again.

Nexus's repair of a detached disk (Omicron attaches the volume to a Pantry, which
reconciles the new region from the other two): regions here hold no guest data, so
Nexus's step records the repair as done once the new region is created; that is a
documented simplification (``docs/omicron.md``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Literal, cast

from pydantic import BaseModel, Field
from sqlalchemy import Table, bindparam, delete, select, update

from nexus.db.models import (
    FAULT_REASON_LENGTH,
    WAITING_FOR_LENGTH,
    Dataset,
    Disk,
    Instance,
    Region,
    RegionReplacement,
    Saga,
    Sled,
    Vmm,
)
from nexus.db.states import (
    DatasetState,
    RegionState,
    ReplacementState,
    SledState,
    VmmState,
)
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
from nexus.sagas import disk_create, region_deletion
from nexus.sagas.disk_create import (
    DATASET_FRESHNESS,
    DELETE_DEADLINE,
    REGION_DEADLINE,
)
from nexus.waitkeys import is_rejection, region_key, rejection_key, repair_key
from schemas.common import Rejection
from schemas.identity import sled_source
from schemas.instance import (
    RepairChange,
    RepairInfo,
    RepairRef,
    RepairSpec,
    RepairState,
    VolumeRepair,
    VolumeRepairGet,
)
from schemas.region import (
    RegionChange,
    RegionEnsure,
    RegionSpec,
    reservation_bytes,
)
from schemas.region import RegionState as WireRegionState

S = ReplacementState
# How long a live repair may go without its end before the sled is asked.
REPAIR_DEADLINE = timedelta(minutes=5)
requests = cast(Table, RegionReplacement.__table__)
datasets = cast(Table, Dataset.__table__)
regions = cast(Table, Region.__table__)


class Params(BaseModel):
    request_id: uuid.UUID
    disk_id: uuid.UUID
    old_region_id: uuid.UUID
    region_deadline_seconds: float = Field(default=REGION_DEADLINE.total_seconds(), gt=0)
    delete_deadline_seconds: float = Field(default=DELETE_DEADLINE.total_seconds(), gt=0)
    repair_deadline_seconds: float = Field(default=REPAIR_DEADLINE.total_seconds(), gt=0)


class Claimed(BaseModel):
    old_dataset_id: uuid.UUID
    old_region_state: RegionState
    block_size: int
    extent_size: int
    extent_count: int
    new_region_id: uuid.UUID


class Allocated(BaseModel):
    dataset_id: uuid.UUID
    sled_id: uuid.UUID
    queue: str
    # A lost clone's replacement is a clone too: read-only, copied from ``source`` (a
    # surviving clone of the same disk, ``host:port``).
    source: str | None = None


class Ensured(BaseModel):
    region_id: uuid.UUID
    agent_id: uuid.UUID
    port_number: int


class Plan(BaseModel):
    mode: Literal["live", "nexus"]
    repair_id: uuid.UUID
    vmm_id: uuid.UUID | None = None
    sled_id: uuid.UUID | None = None
    queue: str | None = None


class Repaired(BaseModel):
    mode: Literal["live", "nexus"]
    progress: int


# Phases


async def set_phase(
    ctx: Ctx[Params],
    state: ReplacementState,
    waiting_for: str | None,
    *,
    allowed: Sequence[ReplacementState],
    **values: Any,
) -> None:
    """Move the request this saga operates to ``state`` (from one of ``allowed``, or
    ``state`` itself: run again, it changes nothing but ``waiting_for``), recording when
    and what it now waits for. Fails the node when another saga operates it."""
    request = await ctx.session.get(RegionReplacement, ctx.params.request_id, with_for_update=True)
    if request is None:
        raise ActionFailed(f"no region replacement request {ctx.params.request_id}")
    if request.operating_saga_id != ctx.saga_id:
        raise ActionFailed(
            f"region replacement {request.id} is operated by saga {request.operating_saga_id}"
        )
    if request.state != state and request.state not in allowed:
        raise ActionFailed(
            f"region replacement {request.id} is {request.state.value}, not "
            + " or ".join(s.value for s in allowed)
        )
    _record_phase(request, state, waiting_for, ctx)
    for name, value in values.items():
        setattr(request, name, value)


def _record_phase(
    request: RegionReplacement, state: ReplacementState, waiting_for: str | None, ctx: Ctx[Any]
) -> None:
    waiting_for = waiting_for[:WAITING_FOR_LENGTH] if waiting_for else None
    if request.state != state:
        request.state = state
        request.state_changed_at = ctx.now
        request.history = [*request.history, [state.value, ctx.now.isoformat(), waiting_for]]
    request.waiting_for = waiting_for


# claim


async def claim(ctx: Ctx[Params]) -> Claimed:
    """The request is this saga's (Omicron's ``set_region_replacement_allocating``): a
    second saga for it fails here, before it allocates anything."""
    p = ctx.params
    request = await ctx.session.get(RegionReplacement, p.request_id, with_for_update=True)
    if request is None:
        raise ActionFailed(f"no region replacement request {p.request_id}")
    if request.operating_saga_id not in (None, ctx.saga_id) or (
        request.operating_saga_id is None and request.state != S.REQUESTED
    ):
        raise ActionFailed(
            f"region replacement {request.id} is {request.state.value}, operated by saga "
            f"{request.operating_saga_id}"
        )
    old = await ctx.session.get(Region, p.old_region_id)
    if old is None:
        raise ActionFailed(f"no region {p.old_region_id}")
    if request.operating_saga_id is None:
        request.operating_saga_id = ctx.saga_id
        _record_phase(request, S.ALLOCATING, "a dataset for the new region", ctx)
    return Claimed(
        old_dataset_id=old.dataset_id,
        old_region_state=old.state,
        block_size=old.block_size,
        extent_size=old.extent_size,
        extent_count=old.extent_count,
        new_region_id=uuid.uuid5(ctx.saga_id, "new-region"),
    )


async def claim_undo(ctx: Ctx[Params]) -> None:
    """Back to requested, for a later attempt; only if this saga still operates it."""
    request = await ctx.session.get(RegionReplacement, ctx.params.request_id, with_for_update=True)
    if request is None or request.operating_saga_id != ctx.saga_id:
        return
    saga = await ctx.session.get(Saga, ctx.saga_id)
    if saga is not None and saga.error:
        request.last_failure = saga.error[:FAULT_REASON_LENGTH]
    request.operating_saga_id = None
    request.new_region_id = None
    request.new_dataset_id = None
    request.repair_mode = None
    request.repair_progress = None
    _record_phase(request, S.REQUESTED, "a new attempt (the last one unwound)", ctx)


# region_alloc

_CANDIDATES = (
    select(datasets.c.id, datasets.c.sled_id, datasets.c.queue_name)
    .join(Sled, Sled.id == datasets.c.sled_id, isouter=True)
    .where(
        datasets.c.free_bytes >= bindparam("b_bytes"),
        datasets.c.last_seen_at >= bindparam("b_seen"),
        datasets.c.state == DatasetState.ACTIVE.value,
        (Sled.state.is_(None)) | (Sled.state != SledState.EXPUNGED.value),
    )
    .order_by(datasets.c.free_bytes.desc(), datasets.c.id)
)
# Only on a dataset still active, as disk_create.RESERVE (an expunge may commit between
# the candidates' read and this).
RESERVE = (
    update(datasets)
    .where(
        datasets.c.id == bindparam("b_id"),
        datasets.c.free_bytes >= bindparam("b_bytes"),
        datasets.c.state == DatasetState.ACTIVE.value,
    )
    .values(free_bytes=datasets.c.free_bytes - bindparam("b_bytes"))
)
_GIVE_BACK = (
    update(datasets)
    .where(datasets.c.id == bindparam("b_id"))
    .values(free_bytes=datasets.c.free_bytes + bindparam("b_bytes"))
)


async def region_alloc(ctx: Ctx[Params]) -> Allocated:
    """Omicron's ``srrs_alloc_new_region``: one more region for the disk, on a live
    dataset of a sled none of its regions is on (the lost one's included)."""
    claimed = ctx.output("claim", Claimed)
    new_id = claimed.new_region_id
    existing = (
        await ctx.session.execute(
            select(Region.dataset_id, Region.source, Dataset.sled_id, Dataset.queue_name)
            .join(Dataset, Dataset.id == Region.dataset_id)
            .where(Region.id == new_id)
        )
    ).first()
    if existing is not None:
        # Run again: the region is where the first run put it.
        return Allocated(
            dataset_id=existing.dataset_id,
            sled_id=existing.sled_id,
            queue=existing.queue_name,
            source=existing.source,
        )
    # The disk's row is locked: two replacements of one disk place one after the other,
    # so they cannot both pick the same sled.
    await ctx.session.execute(
        select(Disk.id).where(Disk.id == ctx.params.disk_id).with_for_update()
    )
    # A disk made from a snapshot has two groups of regions, each on sleds of its own:
    # three writable ones and three read-only clones (disk_create_from_snapshot). The
    # replacement joins the lost region's group, apart from that group only.
    read_only = bool(
        await ctx.session.scalar(
            select(Region.read_only).where(Region.id == ctx.params.old_region_id)
        )
    )
    used = set(
        (
            await ctx.session.execute(
                select(Dataset.sled_id)
                .join(Region, Region.dataset_id == Dataset.id)
                .where(
                    Region.disk_id == ctx.params.disk_id,
                    Region.state != RegionState.DESTROYED,
                    Region.read_only == read_only,
                )
            )
        ).scalars()
    )
    source = await _clone_source(ctx) if read_only else None
    size = reservation_bytes(claimed.block_size * claimed.extent_size * claimed.extent_count)
    rows = await ctx.session.execute(
        _CANDIDATES, {"b_bytes": size, "b_seen": ctx.now - DATASET_FRESHNESS}
    )
    chosen = next((row for row in rows if row.sled_id not in used), None)
    if chosen is None:
        raise ActionFailed(
            f"insufficient capacity: no live dataset with {size} bytes free on a sled "
            f"disk {ctx.params.disk_id} does not use"
        )
    reserved = await ctx.session.execute(RESERVE, {"b_id": chosen.id, "b_bytes": size})
    if not reserved.rowcount:  # type: ignore[attr-defined]
        raise ActionFailed(
            f"insufficient capacity: dataset {chosen.id} filled up or was expunged meanwhile"
        )
    ctx.session.add(
        Region(
            id=new_id,
            disk_id=ctx.params.disk_id,
            dataset_id=chosen.id,
            block_size=claimed.block_size,
            extent_size=claimed.extent_size,
            extent_count=claimed.extent_count,
            state=RegionState.REQUESTED,
            generation=0,
            read_only=read_only,
            source=source,
        )
    )
    await set_phase(
        ctx,
        S.ALLOCATING,
        f"region {new_id} created by the agent of dataset {chosen.id}",
        allowed=(S.ALLOCATING,),
        new_region_id=new_id,
        new_dataset_id=chosen.id,
    )
    return Allocated(
        dataset_id=chosen.id, sled_id=chosen.sled_id, queue=chosen.queue_name, source=source
    )


async def _clone_source(ctx: Ctx[Params]) -> str:
    """Where a lost clone's replacement copies from: another clone of the disk, created,
    on a live dataset (each clone is a whole read-only copy of the snapshot, served by its
    agent as a read-only downstairs). Not the snapshot's running snapshots: the snapshot
    may be deleted once the disk is ready, and a disk no longer reads from it then."""
    row = (
        await ctx.session.execute(
            select(Region.port_number, Region.dataset_id, Sled.hostname)
            .join(Dataset, Dataset.id == Region.dataset_id)
            .join(Sled, Sled.id == Dataset.sled_id, isouter=True)
            .where(
                Region.disk_id == ctx.params.disk_id,
                Region.read_only.is_(True),
                Region.id != ctx.params.old_region_id,
                Region.state == RegionState.CREATED,
                Region.port_number.is_not(None),
                Dataset.state == DatasetState.ACTIVE,
            )
            .order_by(Region.id)
            .limit(1)
        )
    ).first()
    if row is None:
        raise ActionFailed(
            f"no live clone of disk {ctx.params.disk_id} to copy the lost clone "
            f"{ctx.params.old_region_id} from"
        )
    return f"{row.hostname or row.dataset_id}:{row.port_number}"


async def region_alloc_undo(ctx: Ctx[Params]) -> None:
    """The new region's row goes and its dataset gets its space back: run again, it
    finds no row and gives back nothing."""
    claimed = ctx.output("claim", Claimed)
    gone = (
        await ctx.session.execute(
            delete(regions)
            .where(regions.c.id == claimed.new_region_id)
            .returning(regions.c.dataset_id)
        )
    ).first()
    if gone is None:
        return
    size = reservation_bytes(claimed.block_size * claimed.extent_size * claimed.extent_count)
    await ctx.session.execute(_GIVE_BACK, {"b_id": gone.dataset_id, "b_bytes": size})


# region_cleanup: the undo of the ensure, which can half-succeed, sits on a no-op before it


async def region_cleanup_undo(ctx: Ctx[Params]) -> Wait | None:
    """Delete the new region at its agent, whether or not its ensure finished, and wait
    until the agent confirms it destroyed (Omicron's ``srrs_new_region_ensure_undo``); a
    region whose dataset was expunged meanwhile is gone, and no agent is asked."""
    new_id = ctx.output("claim", Claimed).new_region_id
    row = (
        await ctx.session.execute(
            select(Region.state, Region.generation).where(Region.id == new_id)
        )
    ).first()
    if row is None or row.state == RegionState.DESTROYED:
        return None
    allocated = ctx.output("region_alloc", Allocated)
    dataset = await ctx.session.get(Dataset, allocated.dataset_id)
    if dataset is not None and dataset.state == DatasetState.EXPUNGED:
        # Its dataset was lost meanwhile: the region is gone with it, no agent to ask.
        await ctx.session.execute(
            update(Region).where(Region.id == new_id).values(state=RegionState.DESTROYED)
        )
        return None
    if ctx.resends:
        region_deletion.check_resend(ctx, new_id, "sent again by reconcile")
    queue = allocated.queue
    command_id = await region_deletion.send_delete(ctx, new_id, queue)
    return region_deletion.destroyed_wait(new_id, command_id, _delete_deadline(ctx), row.generation)


async def region_cleanup_undo_resume(ctx: Ctx[Params], wake: WakeUp) -> Wait | None:
    new_id = ctx.output("claim", Claimed).new_region_id
    change = region_deletion.woken_by(wake)
    if change is not None and change.region.state is WireRegionState.FAILED:
        region_deletion.check_resend(ctx, new_id, change.region.failure or "destroy failed")
        queue = ctx.output("region_alloc", Allocated).queue
        again = await region_deletion.send_delete(ctx, new_id, queue, again=True)
        return region_deletion.destroyed_wait(
            new_id, again, _delete_deadline(ctx), change.region.generation, resent=True
        )
    values: dict[str, Any] = {"state": RegionState.DESTROYED}
    if change is not None:
        values["generation"] = change.region.generation
    await ctx.session.execute(update(Region).where(Region.id == new_id).values(**values))
    return None


async def region_cleanup_undo_reconcile(ctx: Ctx[Params], keys: Sequence[str]) -> Reconciled:
    allocated = ctx.output("region_alloc", Allocated)
    return await region_deletion.reconcile_delete(
        ctx, ctx.output("claim", Claimed).new_region_id, allocated.dataset_id, allocated.queue
    )


def _delete_deadline(ctx: Ctx[Params]) -> timedelta:
    return timedelta(seconds=ctx.params.delete_deadline_seconds)


# region_ensure


async def region_ensure(ctx: Ctx[Params]) -> Wait:
    """Omicron's ``srrs_new_region_ensure``, which polls the agent; here the node parks
    on the agent's ``created`` (or ``failed``, or its refusal)."""
    claimed = ctx.output("claim", Claimed)
    allocated = ctx.output("region_alloc", Allocated)
    spec = RegionSpec(
        id=claimed.new_region_id,
        block_size=claimed.block_size,
        extent_size=claimed.extent_size,
        extent_count=claimed.extent_count,
        encrypted=True,
        source=allocated.source,
    )
    command = RegionEnsure(id=ctx.command_id(), payload=spec, **ctx.envelope())
    await ctx.send(command, allocated.queue)
    return Wait(
        keys=(
            region_key(spec.id, WireRegionState.CREATED),
            region_key(spec.id, WireRegionState.FAILED),
            rejection_key(command.id),
        ),
        deadline=timedelta(seconds=ctx.params.region_deadline_seconds),
        rearms=None,
    )


async def region_ensure_reconcile(ctx: Ctx[Params], keys: Sequence[str]) -> Reconciled:
    """The deadline passed with no news of the new region: ask its agent once, as
    ``disk_create`` asks about a region it placed."""
    allocated = ctx.output("region_alloc", Allocated)
    placement = disk_create.Placement(
        dataset_id=allocated.dataset_id,
        queue=allocated.queue,
        region_id=ctx.output("claim", Claimed).new_region_id,
    )
    return await disk_create.reconcile_ensure(ctx, placement)


async def region_ensured(ctx: Ctx[Params], wake: WakeUp) -> Ensured:
    if is_rejection(wake.key):
        rejection = Rejection.model_validate(wake.payload)
        raise ActionFailed(f"region ensure refused ({rejection.code}): {rejection.message}")
    change = RegionChange.model_validate(wake.payload)
    region = change.region
    if region.state is not WireRegionState.CREATED:
        raise ActionFailed(f"region {region.id} {region.state.value}: {region.failure}")
    await disk_create.record_region(ctx, change)
    return Ensured(region_id=region.id, agent_id=change.agent_id, port_number=region.port_number)


# repair_plan


async def repair_plan(ctx: Ctx[Params]) -> Plan:
    """How the volume is repaired: by the sled of the running VMM the disk is attached
    to (Omicron's live repair through Propolis), or by Nexus (Omicron's Pantry)."""
    repair_id = uuid.uuid5(ctx.saga_id, "repair")
    running = (
        await ctx.session.execute(
            select(Vmm.id, Vmm.sled_id, Sled.queue_name)
            .join(Instance, Instance.active_vmm_id == Vmm.id)
            .join(Disk, Disk.attached_instance_id == Instance.id)
            .join(Sled, Sled.id == Vmm.sled_id)
            .where(
                Disk.id == ctx.params.disk_id,
                Vmm.state == VmmState.RUNNING,
                Sled.state != SledState.EXPUNGED,
            )
        )
    ).first()
    if running is None:
        plan = Plan(mode="nexus", repair_id=repair_id)
        waiting = f"Nexus's repair of disk {ctx.params.disk_id} (no running VMM has it)"
    else:
        plan = Plan(
            mode="live",
            repair_id=repair_id,
            vmm_id=running.id,
            sled_id=running.sled_id,
            queue=running.queue_name,
        )
        waiting = f"sled {running.sled_id} to start the live repair of VMM {running.id}"
    await set_phase(
        ctx, S.RUNNING, waiting, allowed=(S.ALLOCATING,), repair_mode=plan.mode, repair_progress=0
    )
    return plan


# repair


async def repair(ctx: Ctx[Params]) -> Repaired | Wait:
    """Omicron's drive saga: the repair is asked for, and its end awaited. A live repair
    parks until the sled's ``finished`` (its progress shows on the request meanwhile)."""
    plan = ctx.output("repair_plan", Plan)
    claimed = ctx.output("claim", Claimed)
    allocated = ctx.output("region_alloc", Allocated)
    if plan.mode == "nexus":
        # Regions hold no guest data here: the new region, created, is the repair.
        await set_phase(
            ctx,
            S.REPLACEMENT_DONE,
            "the disk's regions to be swapped",
            allowed=(S.RUNNING, S.DRIVING),
            repair_progress=100,
        )
        return Repaired(mode="nexus", progress=100)
    assert plan.vmm_id is not None and plan.sled_id is not None and plan.queue is not None
    await set_phase(
        ctx,
        S.DRIVING,
        f"sled {plan.sled_id}: live repair {plan.repair_id} of disk {ctx.params.disk_id} "
        f"in VMM {plan.vmm_id} (finished)",
        allowed=(S.RUNNING,),
    )
    command = VolumeRepair(
        id=ctx.command_id(),
        payload=RepairSpec(
            id=plan.repair_id,
            vmm_id=plan.vmm_id,
            disk_id=ctx.params.disk_id,
            old_region_id=ctx.params.old_region_id,
            new_region_id=claimed.new_region_id,
            new_dataset_id=allocated.dataset_id,
        ),
        **ctx.envelope(),
    )
    await ctx.send(command, plan.queue)
    return Wait(
        keys=(
            repair_key(plan.repair_id, RepairState.FINISHED),
            repair_key(plan.repair_id, RepairState.FAILED),
            rejection_key(command.id),
        ),
        deadline=timedelta(seconds=ctx.params.repair_deadline_seconds),
        rearms=None,
    )


async def repair_resume(ctx: Ctx[Params], wake: WakeUp) -> Repaired:
    if is_rejection(wake.key):
        rejection = Rejection.model_validate(wake.payload)
        raise ActionFailed(f"live repair refused ({rejection.code}): {rejection.message}")
    repaired = RepairChange.model_validate(wake.payload).repair
    if repaired.state is not RepairState.FINISHED:
        raise ActionFailed(f"live repair {repaired.id} {repaired.state.value}: {repaired.reason}")
    await set_phase(
        ctx,
        S.REPLACEMENT_DONE,
        "the disk's regions to be swapped",
        allowed=(S.DRIVING,),
        repair_progress=100,
    )
    return Repaired(mode="live", progress=repaired.progress)


async def repair_reconcile(ctx: Ctx[Params], keys: Sequence[str]) -> Reconciled:
    """The deadline passed with no end of the repair: ask the VMM's sled once."""
    plan = ctx.output("repair_plan", Plan)
    assert plan.sled_id is not None and plan.queue is not None
    if ctx.transport is None:
        return Reconciled.unanswered("no broker connection to ask the sled")
    reply = await ctx.transport.request(
        VolumeRepairGet(payload=RepairRef(id=plan.repair_id), **ctx.envelope()),
        routing_key=plan.queue,
        timeout=10,
        answerer=sled_source(plan.sled_id),
    )
    if not isinstance(reply, RepairInfo):
        return Reconciled.unanswered(f"unexpected reply {reply.TYPE}")
    found = reply.payload.repair
    if found is None:
        return Reconciled.resend(f"sled {plan.sled_id} has no repair {plan.repair_id}")
    if found.id != plan.repair_id:
        return Reconciled.rearm(f"sled {plan.sled_id} answered about another repair")
    change = RepairChange(repair=found).model_dump(mode="json")
    if found.state in (RepairState.FINISHED, RepairState.FAILED):
        return Reconciled.resume(repair_key(found.id, found.state), change, found.generation)
    return Reconciled.rearm(f"repair {found.id} is {found.state.value} at {found.progress}%")


# swap


async def swap(ctx: Ctx[Params]) -> None:
    """Omicron's ``volume_replace_region``: the volume's targets name the new region,
    not the old. Here a disk's volume is its live regions: the old one leaves it."""
    await ctx.session.execute(
        update(Region)
        .where(Region.id == ctx.params.old_region_id, Region.state != RegionState.DESTROYED)
        .values(state=RegionState.TOMBSTONED)
    )
    await set_phase(
        ctx,
        S.COMPLETING,
        f"the old region {ctx.params.old_region_id} to be deleted",
        allowed=(S.REPLACEMENT_DONE,),
    )


async def swap_undo(ctx: Ctx[Params]) -> None:
    claimed = ctx.output("claim", Claimed)
    await ctx.session.execute(
        update(Region)
        .where(Region.id == ctx.params.old_region_id, Region.state == RegionState.TOMBSTONED)
        .values(state=claimed.old_region_state)
    )


# old_region_delete


async def old_region_delete(ctx: Ctx[Params]) -> None:
    """The old region's dataset is expunged: Omicron counts its regions as gone and asks
    no agent (a lost agent would never answer). Its space is not given back: the
    dataset takes no region again."""
    dataset = await ctx.session.get(Dataset, ctx.output("claim", Claimed).old_dataset_id)
    if dataset is None or dataset.state != DatasetState.EXPUNGED:
        raise ActionFailed(
            f"region {ctx.params.old_region_id} is on a dataset that is not expunged: "
            "only a lost region is replaced"
        )
    await ctx.session.execute(
        update(Region)
        .where(Region.id == ctx.params.old_region_id, Region.state == RegionState.TOMBSTONED)
        .values(state=RegionState.DESTROYED)
    )


async def old_region_delete_undo(ctx: Ctx[Params]) -> None:
    await ctx.session.execute(
        update(Region)
        .where(Region.id == ctx.params.old_region_id, Region.state == RegionState.DESTROYED)
        .values(state=RegionState.TOMBSTONED)
    )


# complete


async def complete(ctx: Ctx[Params]) -> None:
    request = await ctx.session.get(RegionReplacement, ctx.params.request_id)
    if request is not None and request.state == S.COMPLETE:
        return  # run again: this saga completed it
    await set_phase(ctx, S.COMPLETE, None, allowed=(S.COMPLETING,), operating_saga_id=None)


# when an undo cannot finish


async def replacement_stuck(ctx: Ctx[Params], why: str) -> None:
    """The new region could not be deleted: the request keeps this saga (``stuck``, for an
    operator), with the reason, rather than a retry placing yet another region."""
    await ctx.session.execute(
        update(RegionReplacement)
        .where(RegionReplacement.id == ctx.params.request_id)
        .values(last_failure=why[:FAULT_REASON_LENGTH], waiting_for="an operator (saga stuck)")
    )


DEFINITION: SagaDefinition[Params] = SagaDefinition(
    name="region_replacement",
    version=1,
    params=Params,
    stages=(
        *sequence(
            Node("claim", claim, undo=claim_undo),
            Node("region_alloc", region_alloc, undo=region_alloc_undo),
            Node(
                "region_cleanup",
                no_op,
                undo=region_cleanup_undo,
                undo_resume=region_cleanup_undo_resume,
                undo_reconcile=region_cleanup_undo_reconcile,
            ),
            Node(
                "region_ensure",
                region_ensure,
                resume=region_ensured,
                reconcile=region_ensure_reconcile,
            ),
            Node("repair_plan", repair_plan),
            Node("repair", repair, resume=repair_resume, reconcile=repair_reconcile),
            Node("swap", swap, undo=swap_undo),
            Node("old_region_delete", old_region_delete, undo=old_region_delete_undo),
            Node("complete", complete),
        ),
    ),
    on_stuck=replacement_stuck,
)
