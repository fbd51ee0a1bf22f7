"""snapshot_create: record the snapshot, flush the disk's VMM, take a snapshot of each
region, run a read-only downstairs for each, mark the snapshot ready.

After Omicron's ``nexus/src/app/sagas/snapshot_create.rs`` (docs/omicron.md, "Snapshot
sagas"): the disk's upstairs is asked to flush (Omicron's ``ssc_send_snapshot_request_to_
sled_agent``; a detached disk has no upstairs here, where Omicron attaches it to a
pantry), each region's agent takes the snapshot (Omicron's flush takes it in every
downstairs at once, and ``ssc_get_snapshot_details`` checks it), each starts a running
snapshot (``ssc_start_running_snapshot``) whose address is recorded in
``region_snapshots``, and the snapshot becomes ``ready`` (``ssc_finalize_snapshot_record``).
Omicron calls each agent and retries on a backoff; here every command goes through the
outbox and the node parks on the agent's event, with a deadline whose reconcile asks the
agent once.

Unwinding waits too: ``parts_cleanup``'s undo stops every running snapshot and parks
until each is ``destroyed``, then deletes every snapshot and parks until each is
``destroyed`` (``nexus/sagas/snapshot_parts.py``), and only then are the rows removed.
An unwind that cannot finish leaves the saga stuck and the snapshot ``faulted``.

Nodes, in order (each action beside its undo):

    snapshot_record   the snapshot row, ``creating``; the disk's regions    undo: delete it
                      and the VMM that has it attached, if any
    parts_cleanup     no-op                                  undo: stop every running
                                                             snapshot, wait; delete every
                                                             snapshot, wait; delete the rows
    disk_flush        the VMM flushes the disk; wait for its ``instance.disk_flushed``
    snapshot_0..2     record the part, ask for its snapshot; wait  (side by side)
    running_0..2      ask for its running snapshot; wait; record its address  (side by side)
    snapshot_finalize the snapshot becomes ``ready``
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, cast

from pydantic import BaseModel, Field
from sqlalchemy import Table, delete, select, update

from nexus.db.engine import upsert_insert
from nexus.db.models import (
    FAULT_REASON_LENGTH,
    Dataset,
    Disk,
    Instance,
    Region,
    RegionSnapshot,
    Sled,
    Snapshot,
    Vmm,
)
from nexus.db.states import (
    ENDED_VMM_STATES,
    DatasetState,
    DiskState,
    RegionState,
    SnapshotState,
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
    parallel,
    sequence,
)
from nexus.sagas.disk_create import DELETE_DEADLINE, REPLICAS
from nexus.sagas.snapshot_parts import (
    Part,
    Teardowns,
    agent_name,
    ask_agent,
    expunged_datasets,
    record_running,
    record_snapshot,
    ref,
    snapshot_addr,
    teardown_reconcile,
    teardown_step,
    teardown_woken,
)
from nexus.waitkeys import (
    disk_flush_key,
    is_rejection,
    rejection_key,
    running_snapshot_key,
    snapshot_key,
)
from schemas.common import Rejection
from schemas.identity import sled_source
from schemas.instance import (
    ENDED_VMM_STATES as WIRE_ENDED_VMM_STATES,
)
from schemas.instance import (
    DiskFlushed,
    DiskSnapshotRequest,
    VmmDiskSnapshot,
    VmmGet,
    VmmInfo,
    VmmRef,
)
from schemas.instance import VmmState as WireVmmState
from schemas.region import RegionState as WireRegionState
from schemas.snapshot import (
    RegionSnapshotChange,
    RegionSnapshotCreate,
    RunningSnapshotChange,
    RunningSnapshotRun,
)
from schemas.snapshot import SnapshotState as WireSnapshotState
from schemas.topology import sled_queue

snapshots = cast(Table, Snapshot.__table__)
region_snapshots = cast(Table, RegionSnapshot.__table__)
# How long a snapshot or a running snapshot may take before its agent is asked; the
# agent's event, not this deadline, is what resumes the saga.
PART_DEADLINE = timedelta(minutes=5)
# How long a flush may take before the sled is asked.
FLUSH_DEADLINE = timedelta(minutes=1)
# A refusal of the flush that means the VMM is gone from its sled: it stopped, and a
# stopped VMM's volume was flushed as it stopped. Any other refusal fails the saga.
VMM_GONE = "not_found"


class Params(BaseModel):
    snapshot_id: uuid.UUID
    project: str
    name: str
    disk_id: uuid.UUID
    part_deadline_seconds: float = Field(default=PART_DEADLINE.total_seconds(), gt=0)
    # Re-arms while an agent says "still working"; None: no bound.
    part_max_rearms: int | None = Field(default=None, ge=0)
    flush_deadline_seconds: float = Field(default=FLUSH_DEADLINE.total_seconds(), gt=0)
    # How long the unwind waits for a stop's or a delete's confirmation before asking.
    delete_deadline_seconds: float = Field(default=DELETE_DEADLINE.total_seconds(), gt=0)


class FlushTarget(BaseModel):
    vmm_id: uuid.UUID
    sled_id: uuid.UUID
    queue: str


class Recorded(BaseModel):
    parts: list[Part]
    flush: FlushTarget | None


class Flushed(BaseModel):
    # False: nothing to flush (a detached disk, or its VMM had stopped).
    flushed: bool


class Taken(BaseModel):
    region_id: uuid.UUID
    generation: int


class Running(BaseModel):
    region_id: uuid.UUID
    snapshot_addr: str


# snapshot_record


async def snapshot_record(ctx: Ctx[Params]) -> Recorded:
    """Check the disk can be snapshotted, and record the snapshot ``creating``. The
    disk's row is locked, as disk_delete locks it: a delete that begins meanwhile sees
    this snapshot and refuses."""
    p = ctx.params
    disk = await ctx.session.get(Disk, p.disk_id, with_for_update=True)
    if disk is None:
        raise ActionFailed(f"no disk {p.disk_id}")
    if disk.state not in (DiskState.DETACHED, DiskState.ATTACHED):
        raise ActionFailed(
            f"disk {disk.name} is {disk.state.value}: only a detached or attached disk can "
            "be snapshotted"
        )
    clash = await ctx.session.scalar(
        select(Snapshot.id).where(
            Snapshot.project == p.project,
            Snapshot.name == p.name,
            Snapshot.state != SnapshotState.DESTROYED,
            Snapshot.id != p.snapshot_id,
        )
    )
    if clash is not None:
        raise ActionFailed(f"a snapshot named {p.name} already exists in project {p.project}")
    rows = (
        await ctx.session.execute(
            select(Region, Dataset.queue_name, Dataset.sled_id, Sled.hostname)
            .join(Dataset, Dataset.id == Region.dataset_id)
            .outerjoin(Sled, Sled.id == Dataset.sled_id)
            .where(Region.disk_id == disk.id)
            .order_by(Region.id)
        )
    ).all()
    live = [row for row in rows if row[0].state == RegionState.CREATED]
    lost = await ctx.session.scalar(
        select(Dataset.id).where(
            Dataset.id.in_({row[0].dataset_id for row in live}),
            Dataset.state == DatasetState.EXPUNGED,
        )
    )
    if lost is not None:
        raise ActionFailed(
            f"disk {disk.name} has a region on expunged dataset {lost}, being replaced: "
            "snapshot it once the replacement is complete"
        )
    if len(live) != REPLICAS:
        raise ActionFailed(
            f"disk {disk.name} has {len(live)} created regions of {REPLICAS}: cannot snapshot it"
        )
    first = live[0][0]
    parts = [
        Part(
            region_id=region.id,
            dataset_id=region.dataset_id,
            queue=queue,
            host=hostname or str(region.dataset_id),
            index=index,
        )
        for index, (region, queue, _, hostname) in enumerate(live)
    ]
    await ctx.session.execute(
        upsert_insert(ctx.session, snapshots)
        .values(
            id=p.snapshot_id,
            project=p.project,
            name=p.name,
            disk_id=disk.id,
            size_bytes=disk.size_bytes,
            block_size=disk.block_size,
            extent_size=first.extent_size,
            extent_count=first.extent_count,
            state=SnapshotState.CREATING,
            saga_id=ctx.saga_id,
            created_at=ctx.now,
            updated_at=ctx.now,
        )
        .on_conflict_do_nothing(index_elements=[snapshots.c.id])
    )
    return Recorded(parts=parts, flush=await _flush_target(ctx, disk))


async def _flush_target(ctx: Ctx[Params], disk: Disk) -> FlushTarget | None:
    """The VMM running the instance the disk is attached to, if any has not ended."""
    if disk.attached_instance_id is None:
        return None
    instance = await ctx.session.get(Instance, disk.attached_instance_id)
    if instance is None or instance.active_vmm_id is None:
        return None
    vmm = await ctx.session.get(Vmm, instance.active_vmm_id)
    if vmm is None or vmm.state in ENDED_VMM_STATES:
        return None
    return FlushTarget(vmm_id=vmm.id, sled_id=vmm.sled_id, queue=sled_queue(vmm.sled_id))


async def snapshot_record_undo(ctx: Ctx[Params]) -> None:
    await ctx.session.execute(delete(Snapshot).where(Snapshot.id == ctx.params.snapshot_id))


# parts_cleanup: the undo of the steps that can half-succeed sits on a no-op before them


def _teardown(ctx: Ctx[Params]) -> Teardowns:
    return Teardowns(
        snapshot_id=ctx.params.snapshot_id,
        parts=ctx.output("snapshot_record", Recorded).parts,
        running=True,
        snapshots=True,
        deadline=timedelta(seconds=ctx.params.delete_deadline_seconds),
        creator=ctx.saga_id,
    )


async def _remove_parts(ctx: Ctx[Params]) -> None:
    await ctx.session.execute(
        delete(region_snapshots).where(region_snapshots.c.snapshot_id == ctx.params.snapshot_id)
    )


async def parts_cleanup_undo(ctx: Ctx[Params]) -> Wait | None:
    wait = await teardown_step(ctx, _teardown(ctx))
    if wait is None:
        await _remove_parts(ctx)
    return wait


async def parts_cleanup_undo_resume(ctx: Ctx[Params], wake: WakeUp) -> Wait | None:
    wait = await teardown_woken(ctx, _teardown(ctx), wake)
    if wait is None:
        await _remove_parts(ctx)
    return wait


async def parts_cleanup_undo_reconcile(ctx: Ctx[Params], keys: Sequence[str]) -> Reconciled:
    return await teardown_reconcile(ctx, _teardown(ctx), keys)


# disk_flush


async def disk_flush(ctx: Ctx[Params]) -> Flushed | Wait:
    target = ctx.output("snapshot_record", Recorded).flush
    if target is None:
        return Flushed(flushed=False)
    p = ctx.params
    command = VmmDiskSnapshot(
        id=ctx.command_id(),
        payload=DiskSnapshotRequest(id=target.vmm_id, disk_id=p.disk_id, snapshot_id=p.snapshot_id),
        **ctx.envelope(),
    )
    await ctx.send(command, target.queue)
    return Wait(
        keys=(disk_flush_key(target.vmm_id, p.snapshot_id), rejection_key(command.id)),
        deadline=timedelta(seconds=p.flush_deadline_seconds),
        rearms=p.part_max_rearms,
    )


async def disk_flush_resume(ctx: Ctx[Params], wake: WakeUp) -> Flushed:
    if is_rejection(wake.key):
        rejection = Rejection.model_validate(wake.payload)
        if rejection.code == VMM_GONE:
            return Flushed(flushed=False)
        raise ActionFailed(f"the disk's flush was refused ({rejection.code}): {rejection.message}")
    DiskFlushed.model_validate(wake.payload)
    return Flushed(flushed=True)


async def disk_flush_reconcile(ctx: Ctx[Params], keys: Sequence[str]) -> Reconciled:
    """No word of the flush: ask the sled about the VMM. Gone or ended: nothing to flush;
    running: the flush is sent again (it changes nothing but the disk's cache)."""
    target = ctx.output("snapshot_record", Recorded).flush
    assert target is not None
    if ctx.transport is None:
        return Reconciled.unanswered("no broker connection to ask the sled")
    reply = await ctx.transport.request(
        VmmGet(payload=VmmRef(id=target.vmm_id), **ctx.envelope()),
        routing_key=target.queue,
        timeout=10,
        answerer=sled_source(target.sled_id),
    )
    if not isinstance(reply, VmmInfo):
        return Reconciled.unanswered(f"unexpected reply {reply.TYPE}")
    vmm = reply.payload.vmm
    if vmm is None or vmm.state in WIRE_ENDED_VMM_STATES:
        gone = Rejection(
            command_id=ctx.command_id(),
            command_type=VmmDiskSnapshot.TYPE,
            code=VMM_GONE,
            message=f"VMM {target.vmm_id} has ended",
        )
        return Reconciled.resume(rejection_key(gone.command_id), gone.model_dump(mode="json"), 1)
    if vmm.state is WireVmmState.RUNNING:
        return Reconciled.resend(f"VMM {vmm.id} runs and no flush came")
    return Reconciled.rearm(f"VMM {vmm.id} is {vmm.state.value}")


# snapshot_0..2


def _part(ctx: Ctx[Params]) -> Part:
    index = int(ctx.node.rsplit("_", 1)[1])
    return ctx.output("snapshot_record", Recorded).parts[index]


def _part_deadline(ctx: Ctx[Params]) -> timedelta:
    return timedelta(seconds=ctx.params.part_deadline_seconds)


async def snapshot_take(ctx: Ctx[Params]) -> Wait:
    """Record the part (the record that the take was asked) and ask for its snapshot,
    in one transaction."""
    part = _part(ctx)
    await ctx.session.execute(
        upsert_insert(ctx.session, region_snapshots)
        .values(
            dataset_id=part.dataset_id,
            region_id=part.region_id,
            snapshot_id=ctx.params.snapshot_id,
            volume_references=0,
            deleting=False,
            snapshot_generation=0,
            running_generation=0,
            created_at=ctx.now,
        )
        .on_conflict_do_nothing(
            index_elements=[
                region_snapshots.c.dataset_id,
                region_snapshots.c.region_id,
                region_snapshots.c.snapshot_id,
            ]
        )
    )
    command = RegionSnapshotCreate(
        id=ctx.command_id(), payload=ref(ctx.params.snapshot_id, part), **ctx.envelope()
    )
    await ctx.send(command, part.queue)
    name = agent_name(ctx.params.snapshot_id)
    return Wait(
        keys=(
            snapshot_key(part.region_id, name, WireSnapshotState.CREATED),
            rejection_key(command.id),
        ),
        deadline=_part_deadline(ctx),
        rearms=ctx.params.part_max_rearms,
    )


async def snapshot_take_resume(ctx: Ctx[Params], wake: WakeUp) -> Taken:
    part = _part(ctx)
    if is_rejection(wake.key):
        rejection = Rejection.model_validate(wake.payload)
        raise ActionFailed(
            f"the snapshot of region {part.region_id} was refused ({rejection.code}): "
            f"{rejection.message}"
        )
    taken = RegionSnapshotChange.model_validate(wake.payload).snapshot
    # A reconcile's finding: the event intake has not recorded it.
    await record_snapshot(
        ctx, ctx.params.snapshot_id, part.region_id, taken.state, taken.generation
    )
    return Taken(region_id=part.region_id, generation=taken.generation)


async def snapshot_take_reconcile(ctx: Ctx[Params], keys: Sequence[str]) -> Reconciled:
    part = _part(ctx)
    if await expunged_datasets(ctx, [part]):
        return Reconciled.fail(f"region {part.region_id}'s dataset was expunged")
    info = await ask_agent(ctx, ctx.params.snapshot_id, part)
    if isinstance(info, str):
        return Reconciled.unanswered(info)
    name = agent_name(ctx.params.snapshot_id)
    taken = next((s for s in info.payload.snapshots if s.name == name), None)
    if taken is not None:
        change = RegionSnapshotChange(agent_id=info.payload.agent_id, snapshot=taken)
        return Reconciled.resume(
            snapshot_key(part.region_id, name, WireSnapshotState.CREATED),
            change.model_dump(mode="json"),
            taken.generation,
        )
    if info.payload.region_state is not WireRegionState.CREATED:
        state = info.payload.region_state
        return Reconciled.fail(
            f"region {part.region_id} is {state.value if state else 'unknown to its agent'}"
        )
    # The take never reached the agent: it is idempotent, so send it again.
    return Reconciled.resend(f"agent {part.dataset_id} has no snapshot {name}")


# running_0..2


async def running_start(ctx: Ctx[Params]) -> Wait:
    """Mark the part's running snapshot asked for (``requested`` at generation 0, below
    any the agent sends) and ask for it, in one transaction."""
    part = _part(ctx)
    await ctx.session.execute(
        update(region_snapshots)
        .where(
            region_snapshots.c.snapshot_id == ctx.params.snapshot_id,
            region_snapshots.c.region_id == part.region_id,
            region_snapshots.c.running_state.is_(None),
        )
        .values(running_state=RegionState.REQUESTED.value, running_generation=0)
    )
    command = RunningSnapshotRun(
        id=ctx.command_id(), payload=ref(ctx.params.snapshot_id, part), **ctx.envelope()
    )
    await ctx.send(command, part.queue)
    name = agent_name(ctx.params.snapshot_id)
    return Wait(
        keys=(
            running_snapshot_key(part.region_id, name, WireRegionState.CREATED),
            running_snapshot_key(part.region_id, name, WireRegionState.FAILED),
            rejection_key(command.id),
        ),
        deadline=_part_deadline(ctx),
        rearms=ctx.params.part_max_rearms,
    )


async def running_start_resume(ctx: Ctx[Params], wake: WakeUp) -> Running:
    part = _part(ctx)
    if is_rejection(wake.key):
        rejection = Rejection.model_validate(wake.payload)
        raise ActionFailed(
            f"the running snapshot of region {part.region_id} was refused ({rejection.code}): "
            f"{rejection.message}"
        )
    running = RunningSnapshotChange.model_validate(wake.payload).running_snapshot
    await record_running(
        ctx, ctx.params.snapshot_id, part.region_id, running.state, running.generation
    )
    if running.state is not WireRegionState.CREATED:
        raise ActionFailed(
            f"the running snapshot of region {part.region_id} is {running.state.value}: "
            f"{running.failure}"
        )
    address = snapshot_addr(part.host, running.port_number)
    await ctx.session.execute(
        update(region_snapshots)
        .where(
            region_snapshots.c.snapshot_id == ctx.params.snapshot_id,
            region_snapshots.c.region_id == part.region_id,
        )
        .values(snapshot_addr=address, port_number=running.port_number)
    )
    return Running(region_id=part.region_id, snapshot_addr=address)


async def running_start_reconcile(ctx: Ctx[Params], keys: Sequence[str]) -> Reconciled:
    part = _part(ctx)
    if await expunged_datasets(ctx, [part]):
        return Reconciled.fail(f"region {part.region_id}'s dataset was expunged")
    info = await ask_agent(ctx, ctx.params.snapshot_id, part)
    if isinstance(info, str):
        return Reconciled.unanswered(info)
    name = agent_name(ctx.params.snapshot_id)
    running = next((r for r in info.payload.running_snapshots if r.name == name), None)
    if running is None:
        return Reconciled.resend(f"agent {part.dataset_id} runs no snapshot {name}")
    change = RunningSnapshotChange(agent_id=info.payload.agent_id, running_snapshot=running)
    if running.state in (WireRegionState.CREATED, WireRegionState.FAILED):
        return Reconciled.resume(
            running_snapshot_key(part.region_id, name, running.state),
            change.model_dump(mode="json"),
            running.generation,
        )
    if running.state is WireRegionState.REQUESTED:
        return Reconciled.rearm(f"the running snapshot of region {part.region_id} is starting")
    return Reconciled.fail(
        f"the running snapshot of region {part.region_id} is {running.state.value}"
    )


# snapshot_finalize


async def snapshot_finalize(ctx: Ctx[Params]) -> None:
    await ctx.session.execute(
        update(Snapshot)
        .where(Snapshot.id == ctx.params.snapshot_id, Snapshot.state == SnapshotState.CREATING)
        .values(state=SnapshotState.READY, updated_at=ctx.now)
    )


# when an undo cannot finish


async def snapshot_fault(ctx: Ctx[Any], why: str) -> None:
    """Cleanup is impossible: the snapshot is faulted with the reason, for an operator
    (``nexusctl snapshot delete`` tries again), never left ``creating`` or ``deleting``."""
    await ctx.session.execute(
        update(Snapshot)
        .where(Snapshot.id == ctx.params.snapshot_id)
        .values(
            state=SnapshotState.FAULTED,
            fault_reason=why[:FAULT_REASON_LENGTH],
            updated_at=ctx.now,
        )
    )


def _take_node(index: int) -> Node[Params]:
    return Node(
        f"snapshot_{index}",
        snapshot_take,
        resume=snapshot_take_resume,
        reconcile=snapshot_take_reconcile,
    )


def _running_node(index: int) -> Node[Params]:
    return Node(
        f"running_{index}",
        running_start,
        resume=running_start_resume,
        reconcile=running_start_reconcile,
    )


DEFINITION: SagaDefinition[Params] = SagaDefinition(
    name="snapshot_create",
    version=1,
    params=Params,
    stages=(
        *sequence(
            Node("snapshot_record", snapshot_record, undo=snapshot_record_undo),
            Node(
                "parts_cleanup",
                no_op,
                undo=parts_cleanup_undo,
                undo_resume=parts_cleanup_undo_resume,
                undo_reconcile=parts_cleanup_undo_reconcile,
            ),
            Node(
                "disk_flush", disk_flush, resume=disk_flush_resume, reconcile=disk_flush_reconcile
            ),
        ),
        *parallel(*(_take_node(index) for index in range(REPLICAS))),
        *parallel(*(_running_node(index) for index in range(REPLICAS))),
        *sequence(Node("snapshot_finalize", snapshot_finalize)),
    ),
    on_stuck=snapshot_fault,
)
