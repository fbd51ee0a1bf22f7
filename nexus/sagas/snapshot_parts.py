"""A snapshot's parts on the crucible agents: each region's snapshot and the running
snapshot (read-only downstairs) serving it; what ``snapshot_create`` and
``snapshot_delete`` share.

Nexus writes a region's ``region_snapshots`` row *before* it asks the agent to take the
snapshot, in the same transaction as the command, and marks the row's running snapshot
``requested`` (generation 0) in the transaction that asks to run it. So the rows say what
was asked even when the agent has not answered yet, and the event intake
(``nexus/events.py``) keeps them current by generation.

Tearing down (an unwound create, a delete) follows the real agent's rules
(``crucible_agent/snapshots.py``): a snapshot cannot be deleted while a running snapshot
of it is not ``destroyed``, so every running snapshot is stopped and confirmed
``destroyed`` first, then every snapshot is deleted and confirmed ``destroyed``. A
command whose outcome Nexus has not heard yet (generation 0) is waited for before it is
undone: a stop or a delete that overtook its run or take would change nothing, and the
run or take would then leave something behind. A stop or a delete of something the
agent does not have changes nothing and sends no event; the deadline's reconcile asks
the agent, and a "not there" ends that wait.

A part on an expunged dataset is written off, as Omicron counts a region on an expunged
disk gone: its agent is not asked or waited for (seen while adding a sled expunge to
the chaos test: a teardown would wait for ever on the SIGKILLed agent of an expunged
sled, its reconcile unanswered at every deadline).

:func:`decide_teardown` decides (no I/O); :func:`teardown_step` applies its decision.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any, cast

from pydantic import BaseModel
from sqlalchemy import Table, select, update

from nexus.db.models import Dataset, RegionSnapshot
from nexus.db.states import AgentSnapshotState, DatasetState, RegionState
from nexus.saga.definition import ActionFailed, Ctx, Reconciled, Wait, WakeUp
from nexus.waitkeys import is_rejection, rejection_key, running_snapshot_key, snapshot_key
from schemas.base import command_id
from schemas.common import Rejection
from schemas.identity import crucible_source
from schemas.region import RegionState as WireRegionState
from schemas.snapshot import (
    RegionSnapshotChange,
    RegionSnapshotCreate,
    RegionSnapshotDelete,
    RegionSnapshotGet,
    RegionSnapshotsInfo,
    RunningSnapshotChange,
    RunningSnapshotRun,
    RunningSnapshotStop,
    SnapshotRef,
)
from schemas.snapshot import SnapshotState as WireSnapshotState

region_snapshots = cast(Table, RegionSnapshot.__table__)

# How often a stop or delete is sent again before the saga gives up.
MAX_RESENDS = 5
# A refusal that means the agent has no such region: nothing there to undo.
NOT_FOUND = "not_found"


class Part(BaseModel):
    """One region of the disk, where its snapshot is taken and served."""

    region_id: uuid.UUID
    dataset_id: uuid.UUID
    queue: str
    # The sled's hostname (the dataset's id when its sled never registered): the host of
    # the running snapshot's address.
    host: str
    # The forward node that takes its snapshot and the one that runs it (their command
    # ids, for the refusals an unwind waits on).
    index: int


def agent_name(snapshot_id: uuid.UUID) -> str:
    """The name the agents know a snapshot by: its id."""
    return str(snapshot_id)


def snapshot_addr(host: str, port: int) -> str:
    return f"{host}:{port}"


def ref(snapshot_id: uuid.UUID, part: Part) -> SnapshotRef:
    return SnapshotRef(region_id=part.region_id, name=agent_name(snapshot_id))


def forward_ids(saga_id: uuid.UUID, node: str) -> tuple[uuid.UUID, ...]:
    """Every id a forward node's command may have left under (first send, re-sends)."""
    return tuple(command_id(saga_id, node, attempt) for attempt in range(MAX_RESENDS + 1))


# What Nexus knows of each part, and the teardown's decision.


@dataclass(frozen=True)
class PartState:
    region_id: uuid.UUID
    snapshot_state: AgentSnapshotState | None
    snapshot_generation: int
    running_state: RegionState | None
    running_generation: int


class Awaiting(StrEnum):
    # A run Nexus asked for and has not heard of: its outcome first.
    RUN = "run"
    # A stop: until destroyed.
    STOP = "stop"
    # A take Nexus asked for and has not heard of: its outcome first.
    TAKE = "take"
    # A delete: until destroyed.
    DELETE = "delete"


@dataclass(frozen=True)
class Teardown:
    """Send these stops and deletes (region ids), then wait on ``wait`` (None: done)."""

    stops: tuple[uuid.UUID, ...] = ()
    deletes: tuple[uuid.UUID, ...] = ()
    wait: tuple[uuid.UUID, Awaiting, int] | None = None
    blocked: str | None = None


def _running_left(part: PartState) -> bool:
    return part.running_state is not None and part.running_state is not RegionState.DESTROYED


def _snapshot_left(part: PartState) -> bool:
    # A row is the record of a take that was asked; ``destroyed`` is the only end.
    return part.snapshot_state is not AgentSnapshotState.DESTROYED


def decide_teardown(parts: Sequence[PartState], *, running: bool, snapshots: bool) -> Teardown:
    """The next step of a teardown: every running snapshot destroyed first (when
    ``running``), then every snapshot (when ``snapshots``). One wait at a time, on the
    first part left; the commands for every part that can take one now go out together."""
    if running:
        left = [p for p in parts if _running_left(p)]
        failed = [p for p in left if p.running_state is RegionState.FAILED]
        if failed:
            return Teardown(
                blocked=f"the running snapshot of region {failed[0].region_id} failed: its "
                "agent keeps it (and so the snapshot) for an operator"
            )
        if left:
            stops = tuple(
                p.region_id
                for p in left
                if p.running_generation > 0
                and p.running_state in (RegionState.REQUESTED, RegionState.CREATED)
            )
            first = left[0]
            what = Awaiting.RUN if first.running_generation == 0 else Awaiting.STOP
            return Teardown(stops=stops, wait=(first.region_id, what, first.running_generation))
    if snapshots:
        left = [p for p in parts if _snapshot_left(p)]
        if left:
            deletes = tuple(
                p.region_id for p in left if p.snapshot_state is AgentSnapshotState.CREATED
            )
            first = left[0]
            what = Awaiting.TAKE if first.snapshot_generation == 0 else Awaiting.DELETE
            return Teardown(
                deletes=deletes, wait=(first.region_id, what, first.snapshot_generation)
            )
    return Teardown()


async def part_states(
    ctx: Ctx[Any], snapshot_id: uuid.UUID, parts: Sequence[Part]
) -> list[PartState]:
    """The recorded parts, in the parts' order (a part with no row was never asked for)."""
    rows = {
        row.region_id: row
        for row in await ctx.session.execute(
            select(region_snapshots).where(region_snapshots.c.snapshot_id == snapshot_id)
        )
    }
    return [
        PartState(
            region_id=part.region_id,
            snapshot_state=row.snapshot_state,
            snapshot_generation=row.snapshot_generation,
            running_state=row.running_state,
            running_generation=row.running_generation,
        )
        for part in parts
        if (row := rows.get(part.region_id)) is not None
    ]


# Applying a teardown.


@dataclass(frozen=True)
class Teardowns:
    """One teardown: which snapshot, its parts, which phases, and the saga that made it
    (the create whose forward commands an unwind may wait on; None: unknown)."""

    snapshot_id: uuid.UUID
    parts: Sequence[Part]
    running: bool
    snapshots: bool
    deadline: timedelta
    creator: uuid.UUID | None = None

    def part(self, region_id: uuid.UUID) -> Part:
        return next(p for p in self.parts if p.region_id == region_id)


def _stop_suffix(region_id: uuid.UUID) -> str:
    return f"stop:{region_id}"


def _delete_suffix(region_id: uuid.UUID) -> str:
    return f"delete:{region_id}"


async def teardown_step(ctx: Ctx[Any], t: Teardowns) -> Wait | None:
    """Send what the teardown needs now and wait for the next confirmation; None when
    every part is torn down. Run again (a re-run, a reconcile's re-send), it sends the same
    commands under the same ids (the outbox keeps one of each), or new ids after a
    re-send."""
    if ctx.resends > MAX_RESENDS:
        raise ActionFailed(
            f"snapshot {t.snapshot_id}: its parts are not torn down after {ctx.resends} re-sends"
        )
    await write_off_lost(ctx, t.snapshot_id, t.parts)
    decided = decide_teardown(
        await part_states(ctx, t.snapshot_id, t.parts), running=t.running, snapshots=t.snapshots
    )
    if decided.blocked is not None:
        raise ActionFailed(decided.blocked)
    for region_id in decided.stops:
        part = t.part(region_id)
        command = RunningSnapshotStop(
            id=ctx.command_id(_stop_suffix(region_id)),
            payload=ref(t.snapshot_id, part),
            **ctx.envelope(),
        )
        await ctx.send(command, part.queue)
    for region_id in decided.deletes:
        part = t.part(region_id)
        delete = RegionSnapshotDelete(
            id=ctx.command_id(_delete_suffix(region_id)),
            payload=ref(t.snapshot_id, part),
            **ctx.envelope(),
        )
        await ctx.send(delete, part.queue)
    if decided.wait is None:
        return None
    region_id, what, known = decided.wait
    return Wait(
        keys=_keys(ctx, t, t.part(region_id), what),
        deadline=t.deadline,
        min_generation=known,
        rearms=None,
    )


def _keys(ctx: Ctx[Any], t: Teardowns, part: Part, what: Awaiting) -> tuple[str, ...]:
    name = agent_name(t.snapshot_id)
    match what:
        case Awaiting.RUN:
            forward = (
                forward_ids(t.creator, f"running_{part.index}") if t.creator is not None else ()
            )
            return (
                running_snapshot_key(part.region_id, name, WireRegionState.CREATED),
                running_snapshot_key(part.region_id, name, WireRegionState.FAILED),
                running_snapshot_key(part.region_id, name, WireRegionState.DESTROYED),
                rejection_key(ctx.command_id(_stop_suffix(part.region_id))),
                *(rejection_key(i) for i in forward),
            )
        case Awaiting.STOP:
            return (
                running_snapshot_key(part.region_id, name, WireRegionState.DESTROYED),
                running_snapshot_key(part.region_id, name, WireRegionState.FAILED),
                rejection_key(ctx.command_id(_stop_suffix(part.region_id))),
            )
        case Awaiting.TAKE:
            forward = (
                forward_ids(t.creator, f"snapshot_{part.index}") if t.creator is not None else ()
            )
            return (
                snapshot_key(part.region_id, name, WireSnapshotState.CREATED),
                snapshot_key(part.region_id, name, WireSnapshotState.DESTROYED),
                rejection_key(ctx.command_id(_delete_suffix(part.region_id))),
                *(rejection_key(i) for i in forward),
            )
        case Awaiting.DELETE:
            return (
                snapshot_key(part.region_id, name, WireSnapshotState.DESTROYED),
                rejection_key(ctx.command_id(_delete_suffix(part.region_id))),
            )


async def teardown_woken(ctx: Ctx[Any], t: Teardowns, wake: WakeUp) -> Wait | None:
    """Record what woke the wait (the event intake recorded an agent's event already; a
    reconcile's finding or a refusal it did not), then take the next step."""
    if is_rejection(wake.key):
        await _record_refusal(ctx, t, Rejection.model_validate(wake.payload))
    elif wake.key.startswith("running_snapshot:"):
        change = RunningSnapshotChange.model_validate(wake.payload).running_snapshot
        await record_running(ctx, t.snapshot_id, change.id, change.state, change.generation)
    else:
        taken = RegionSnapshotChange.model_validate(wake.payload).snapshot
        await record_snapshot(ctx, t.snapshot_id, taken.region_id, taken.state, taken.generation)
    return await teardown_step(ctx, t)


async def _record_refusal(ctx: Ctx[Any], t: Teardowns, rejection: Rejection) -> None:
    """A refusal of a stop or a delete because the agent has nothing there (``not_found``),
    or of the run or take being waited for (nothing was made): that part is gone. Any
    other refusal of a stop or a delete fails the node."""
    region_id = _commanded_region(ctx, t, rejection.command_id)
    match rejection.command_type:
        case RunningSnapshotRun.TYPE:
            await _gone(ctx, t.snapshot_id, region_id, running=True)
        case RegionSnapshotCreate.TYPE:
            await _gone(ctx, t.snapshot_id, region_id, running=False)
        case RunningSnapshotStop.TYPE | RegionSnapshotDelete.TYPE if rejection.code == NOT_FOUND:
            await _gone(
                ctx,
                t.snapshot_id,
                region_id,
                running=rejection.command_type == RunningSnapshotStop.TYPE,
            )
        case _:
            raise ActionFailed(
                f"{rejection.command_type} of region {region_id} refused "
                f"({rejection.code}): {rejection.message}"
            )


def _commanded_region(ctx: Ctx[Any], t: Teardowns, refused: uuid.UUID) -> uuid.UUID:
    for part in t.parts:
        candidates = {
            ctx.command_id(_stop_suffix(part.region_id)),
            ctx.command_id(_delete_suffix(part.region_id)),
        }
        if t.creator is not None:
            candidates |= set(forward_ids(t.creator, f"running_{part.index}"))
            candidates |= set(forward_ids(t.creator, f"snapshot_{part.index}"))
        if refused in candidates:
            return part.region_id
    raise ActionFailed(f"a refusal of command {refused}, which this teardown did not wait for")


async def expunged_datasets(ctx: Ctx[Any], parts: Sequence[Part]) -> set[uuid.UUID]:
    """The datasets of ``parts`` that are expunged: their agents are written off."""
    found = await ctx.session.scalars(
        select(Dataset.id).where(
            Dataset.id.in_({part.dataset_id for part in parts}),
            Dataset.state == DatasetState.EXPUNGED,
        )
    )
    return set(found)


async def write_off_lost(ctx: Ctx[Any], snapshot_id: uuid.UUID, parts: Sequence[Part]) -> None:
    """Record every part on an expunged dataset gone: its snapshot and any running
    snapshot ``destroyed`` (nothing was ever asked of a running snapshot still None)."""
    lost = await expunged_datasets(ctx, parts)
    for part in parts:
        if part.dataset_id not in lost:
            continue
        await _gone(ctx, snapshot_id, part.region_id, running=True, asked_only=True)
        await _gone(ctx, snapshot_id, part.region_id, running=False)


async def _gone(
    ctx: Ctx[Any],
    snapshot_id: uuid.UUID,
    region_id: uuid.UUID,
    *,
    running: bool,
    asked_only: bool = False,
) -> None:
    """The agent has no such running snapshot (or snapshot): recorded ``destroyed``."""
    values: dict[str, Any] = (
        {"running_state": RegionState.DESTROYED.value}
        if running
        else {"snapshot_state": AgentSnapshotState.DESTROYED.value}
    )
    query = update(region_snapshots).where(
        region_snapshots.c.snapshot_id == snapshot_id,
        region_snapshots.c.region_id == region_id,
    )
    if asked_only:
        query = query.where(region_snapshots.c.running_state.is_not(None))
    await ctx.session.execute(query.values(**values))


async def record_snapshot(
    ctx: Ctx[Any],
    snapshot_id: uuid.UUID,
    region_id: uuid.UUID,
    state: WireSnapshotState,
    generation: int,
) -> None:
    """As the event intake records it: by generation."""
    await ctx.session.execute(
        update(region_snapshots)
        .where(
            region_snapshots.c.snapshot_id == snapshot_id,
            region_snapshots.c.region_id == region_id,
            region_snapshots.c.snapshot_generation < generation,
        )
        .values(snapshot_state=state.value, snapshot_generation=generation)
    )


async def record_running(
    ctx: Ctx[Any],
    snapshot_id: uuid.UUID,
    region_id: uuid.UUID,
    state: WireRegionState,
    generation: int,
) -> None:
    await ctx.session.execute(
        update(region_snapshots)
        .where(
            region_snapshots.c.snapshot_id == snapshot_id,
            region_snapshots.c.region_id == region_id,
            region_snapshots.c.running_generation < generation,
        )
        .values(running_state=state.value, running_generation=generation)
    )


# The one question at a deadline.


async def ask_agent(ctx: Ctx[Any], snapshot_id: uuid.UUID, part: Part) -> RegionSnapshotsInfo | str:
    """The part's agent's answer about this snapshot, or why there is none. Only the
    agent of the region's dataset may answer."""
    if ctx.transport is None:
        return "no broker connection to ask the agent"
    reply = await ctx.transport.request(
        RegionSnapshotGet(payload=ref(snapshot_id, part), **ctx.envelope()),
        routing_key=part.queue,
        timeout=10,
        answerer=crucible_source(part.dataset_id),
    )
    if not isinstance(reply, RegionSnapshotsInfo):
        return f"unexpected reply {reply.TYPE}"
    if reply.payload.region_id != part.region_id or reply.payload.agent_id != part.dataset_id:
        return f"agent {part.dataset_id} answered about something else"
    return reply


async def teardown_reconcile(ctx: Ctx[Any], t: Teardowns, keys: Sequence[str]) -> Reconciled:
    """A teardown's wait passed its deadline: ask the part's agent what it has."""
    kind, region, _, state = _parse(keys[0])
    part = t.part(region)
    if await expunged_datasets(ctx, [part]):
        # Its agent is written off: the part is gone (the next step records it so).
        stop = kind == "running_snapshot"
        return _absent(
            ctx, t, part, RunningSnapshotStop.TYPE if stop else RegionSnapshotDelete.TYPE
        )
    info = await ask_agent(ctx, t.snapshot_id, part)
    if isinstance(info, str):
        return Reconciled.unanswered(info)
    name = agent_name(t.snapshot_id)
    agent = info.payload.agent_id
    if kind == "running_snapshot":
        running = next((r for r in info.payload.running_snapshots if r.name == name), None)
        if running is None or running.state is WireRegionState.DESTROYED:
            return _absent(ctx, t, part, RunningSnapshotStop.TYPE)
        change = RunningSnapshotChange(agent_id=agent, running_snapshot=running)
        payload = change.model_dump(mode="json")
        if running.state is WireRegionState.FAILED:
            return Reconciled.resume(
                running_snapshot_key(region, name, running.state), payload, running.generation
            )
        if state == WireRegionState.CREATED.value:  # waiting for a run's outcome
            if running.state is WireRegionState.CREATED:
                return Reconciled.resume(
                    running_snapshot_key(region, name, running.state), payload, running.generation
                )
            return Reconciled.rearm(f"running snapshot of region {region} is {running.state.value}")
        if running.state is WireRegionState.TOMBSTONED:
            return Reconciled.rearm(f"running snapshot of region {region} is still stopping")
        return Reconciled.resend(
            f"running snapshot of region {region} is {running.state.value}: no stop came"
        )
    taken = next((s for s in info.payload.snapshots if s.name == name), None)
    if taken is None:
        return _absent(ctx, t, part, RegionSnapshotDelete.TYPE)
    if state == WireSnapshotState.CREATED.value:  # waiting for a take's outcome
        found = RegionSnapshotChange(agent_id=agent, snapshot=taken)
        return Reconciled.resume(
            snapshot_key(region, name, WireSnapshotState.CREATED),
            found.model_dump(mode="json"),
            taken.generation,
        )
    return Reconciled.resend(f"snapshot of region {region} is still there: no delete came")


def _absent(ctx: Ctx[Any], t: Teardowns, part: Part, command_type: str) -> Reconciled:
    """The agent has nothing there: resume on the wait's key for a refusal of the stop
    (or delete) as ``not_found`` (every teardown wait has that key, sent or not)."""
    suffix = _stop_suffix if command_type == RunningSnapshotStop.TYPE else _delete_suffix
    gone = Rejection(
        command_id=ctx.command_id(suffix(part.region_id)),
        command_type=command_type,
        code=NOT_FOUND,
        message="the agent has no such snapshot or running snapshot",
    )
    return Reconciled.resume(rejection_key(gone.command_id), gone.model_dump(mode="json"), 1)


def _parse(key: str) -> tuple[str, uuid.UUID, str, str]:
    """(kind, region, name, state) of a snapshot or running snapshot key."""
    kind, rest = key.split(":", 1)
    region, rest = rest.split(":", 1)
    name, _, state = rest.rpartition(":")
    return kind, uuid.UUID(region), name, state
