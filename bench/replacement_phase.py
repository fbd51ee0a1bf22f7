"""The ``replacement`` phase: one sled's regions lost, replaced by this project's
event-driven saga and by a model of Omicron's task-driven replacement.

The same setup twice, one fresh stack each (PostgreSQL, 2 Nexus replicas): 3 crucible
agents with no create delay, on which ``disks`` disks are created (every disk has a
region on each of them); ``attached`` of those disks are attached to running instances
(8 to an instance, on the 2 sled agents, whose live repair takes ``repair_seconds``).
Then a 4th crucible agent, the spare, starts: the only sled a replacement region can go
to (the disk uses the other two). Its creates take the phase's region delay, drawn
from the seed (``CRUCIBLE_SEED``), the same draws in both runs. Then the 3rd agent's
sled (no VMM on it) is lost, with one region of every disk:

- **event-driven**: ``SledExpunge`` to Nexus (``nexusctl sled expunge``); each region
  gets a request and its ``region_replacement`` saga at once, which ensures the new
  region and parks on its ``created``, has the volume repaired (by the VMM's sled for an
  attached disk, by event; by Nexus's own step for a detached one), swaps and
  completes. Times are the requests' own (``region_replacement.history``), from the
  moment the expunge was sent.
- **task-driven (Omicron model)**: :mod:`bench.omicron_replacement`, run by this
  process against the same kind of stack, the same spare agent and the same command
  (``RegionEnsure``, re-sent on Omicron's backoff); Nexus is not told. Its tasks' phase
  against the expunge is drawn from the seed. Each request's repair is as long as the
  event-driven one's for the same kind of disk: ``repair_seconds`` attached, 0 detached
  (Nexus's own step records the repair done once the region is created).

Reported per strategy: from the expunge to each region's request filed, its new region
created (``running``), its repair seen done (``replacement_done``) and its request
complete (p50 / max over the regions), and the time until every region was replaced.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bench.omicron_replacement import OmicronModel, Periods, Phase, Request, TransportAgents
from bench.run import SCALE_DISK_BYTES, Scale, Servers, Stack, _rows, stack, summary
from schemas import api
from schemas.region import RegionSpec
from schemas.topology import NEXUS_API_QUEUE

EVENT_DRIVEN = "event-driven"
TASK_DRIVEN = "task-driven (Omicron model)"
# Milestones of a request, in order: Omicron's state names, as this project's.
MILESTONES = ("requested", "running", "replacement_done", "complete")
DISKS_PER_INSTANCE = 8
LOST_AGENT = "crucible-3"


@dataclass(frozen=True)
class LostRegion:
    region_id: uuid.UUID
    disk_id: uuid.UUID
    spec: RegionSpec
    attached: bool


@dataclass(frozen=True)
class Setup:
    running: Stack
    lost_sled: uuid.UUID
    lost: list[LostRegion]
    spare_queue: str


async def replacement_phase(servers: Servers, scale: Scale, seed: int) -> dict[str, Any]:
    periods = Periods(*scale.replacement_periods)
    scaled = periods != Periods()
    note = " (scaled down: Omicron's are 30 s / 10 s)" if scaled else " (Omicron's)"
    print(
        f"- replacement: a sled lost with {scale.replacement_disks} regions "
        f"({scale.replacement_attached} of their disks attached to running instances, live "
        f"repair {scale.replacement_repair_seconds:g} s); new regions' delay "
        f"{scale.region_delay}; Omicron model's tasks every {periods.start_seconds:g} s / "
        f"{periods.driver_seconds:g} s{note}"
    )
    results: dict[str, Any] = {
        "regions": scale.replacement_disks,
        "attached_disks": scale.replacement_attached,
        "region_delay": scale.region_delay,
        "live_repair_seconds": scale.replacement_repair_seconds,
        "periods_seconds": {"start": periods.start_seconds, "driver": periods.driver_seconds},
        "periods_scaled_down": scaled,
    }
    results[EVENT_DRIVEN] = await _event_driven(servers, scale, seed)
    results[TASK_DRIVEN] = await _task_driven(servers, scale, seed, periods)
    _print_side_by_side(results)
    return results


@asynccontextmanager
async def _lost_sled(servers: Servers, scale: Scale, seed: int) -> AsyncIterator[Setup]:
    """The stack, its disks and instances, the spare agent started: ready to lose."""
    async with stack(
        servers,
        database="postgresql",
        replicas=2,
        create_delay="fixed:0",
        seed=seed,
        agent_env={"SLED_REPAIR_SECONDS": str(scale.replacement_repair_seconds)},
        crucible_agents=4,
        held_back=1,
        held_back_env={"CRUCIBLE_CREATE_DELAY": scale.region_delay},
    ) as running:
        names = [f"r-{n:03d}-{uuid.uuid4().hex[:6]}" for n in range(scale.replacement_disks)]
        await _all_done(running, [await _start(running, _disk(name)) for name in names])
        attached = names[: scale.replacement_attached]
        groups = [
            attached[n : n + DISKS_PER_INSTANCE]
            for n in range(0, len(attached), DISKS_PER_INSTANCE)
        ]
        await _all_done(running, [await _start(running, _instance(g)) for g in groups])
        (spare,) = await running.start_held_back()
        lost_agent = next(c for c in running.children if c.name == LOST_AGENT)
        rows = await _rows(
            running,
            "SELECT r.id, r.disk_id, r.block_size, r.extent_size, r.extent_count, d.name "
            "FROM regions r JOIN disks d ON d.id = r.disk_id WHERE r.dataset_id = :dataset",
            dataset=uuid.UUID(lost_agent.env["CRUCIBLE_AGENT_ID"]),
        )
        lost = [
            LostRegion(
                region_id=region_id,
                disk_id=disk_id,
                spec=RegionSpec(
                    id=region_id,
                    block_size=block_size,
                    extent_size=extent_size,
                    extent_count=extent_count,
                ),
                attached=name in attached,
            )
            for region_id, disk_id, block_size, extent_size, extent_count, name in rows
        ]
        assert len(lost) == scale.replacement_disks, f"{len(lost)} regions on {LOST_AGENT}"
        yield Setup(
            running,
            uuid.UUID(lost_agent.env["CRUCIBLE_SLED_ID"]),
            lost,
            f"crucible.{spare}",
        )


async def _event_driven(servers: Servers, scale: Scale, seed: int) -> dict[str, Any]:
    print(f"  {EVENT_DRIVEN}: expunging the sled through Nexus")
    async with _lost_sled(servers, scale, seed) as setup:
        expunged_at = datetime.now(UTC)
        reply = await setup.running.transport.request(
            api.SledExpunge(source="cli/bench", payload=api.SledRef(sled_id=setup.lost_sled)),
            routing_key=NEXUS_API_QUEUE,
            timeout=60,
        )
        assert isinstance(reply, api.SledExpungeReply), reply
        rows = await _until_complete(setup, timeout=scale.replacement_timeout_seconds)
    milestones: dict[str, list[float]] = {m: [] for m in MILESTONES}
    modes: dict[str, int] = {}
    attached = {r.region_id for r in setup.lost if r.attached}
    mismatched = 0
    for old_region_id, history, mode in rows:
        phases = json.loads(history) if isinstance(history, str) else history
        entered = {state: datetime.fromisoformat(at) for state, at, _ in reversed(phases)}
        for milestone in MILESTONES:
            milestones[milestone].append((entered[milestone] - expunged_at).total_seconds())
        modes[mode] = modes.get(mode, 0) + 1
        mismatched += (mode == "live") != (old_region_id in attached)
    if mismatched:
        print(f"  ! {mismatched} regions repaired otherwise than their disk's attachment says")
    return {**_report(milestones), "repair_modes": modes}


async def _until_complete(setup: Setup, timeout: float) -> list[tuple[Any, ...]]:
    """Every lost region's request, once all are complete: (old region, history, repair
    mode). The times are the rows' own; looking every 0.25 s only bounds when this
    process notices."""
    wanted = {r.region_id for r in setup.lost}
    async with asyncio.timeout(timeout):
        while True:
            rows = await _rows(
                setup.running,
                "SELECT old_region_id, history, repair_mode, state FROM region_replacement",
            )
            done = [row[:3] for row in rows if row[0] in wanted and row[3] == "complete"]
            if len(done) == len(wanted):
                return done
            await asyncio.sleep(0.25)


async def _task_driven(
    servers: Servers, scale: Scale, seed: int, periods: Periods
) -> dict[str, Any]:
    print(
        f"  {TASK_DRIVEN}: tasks every {periods.start_seconds:g} s / {periods.driver_seconds:g} s"
    )
    async with _lost_sled(servers, scale, seed) as setup:
        requests = [
            Request(
                old_region_id=lost.region_id,
                spec=lost.spec,
                new_queue=setup.spare_queue,
                repair_seconds=scale.replacement_repair_seconds if lost.attached else 0.0,
            )
            for lost in setup.lost
        ]
        model = OmicronModel(TransportAgents(setup.running.transport), periods, random.Random(seed))
        expunged_at = time.monotonic()
        await model.run(requests, expunged_at, timeout=scale.replacement_timeout_seconds)
    milestones: dict[str, list[float]] = {m: [] for m in MILESTONES}
    for request in requests:
        for milestone in MILESTONES:
            at = request.entered(Phase(milestone))
            assert at is not None, (request, milestone)
            milestones[milestone].append(at - expunged_at)
    return {
        **_report(milestones),
        "start_task_first_tick_s": model.start_offset,
        "driver_task_first_tick_s": model.driver_offset,
        "activations": {task: len(at) for task, at in model.activations.items()},
        "ensures_per_region": summary([float(r.agent_requests) for r in requests]),
    }


def _report(milestones: dict[str, list[float]]) -> dict[str, Any]:
    return {
        "seconds_from_expunge": {m: summary(values) for m, values in milestones.items()},
        "every_region_replaced_s": max(milestones["complete"]),
    }


def _print_side_by_side(results: dict[str, Any]) -> None:
    ours, model = results[EVENT_DRIVEN], results[TASK_DRIVEN]
    width = 34
    print(f"  {'seconds from the expunge (p50 / max)':<40}{EVENT_DRIVEN:<{width}}{TASK_DRIVEN}")
    for milestone in MILESTONES:
        cells = [
            f"{r['seconds_from_expunge'][milestone]['p50']:.1f} / "
            f"{r['seconds_from_expunge'][milestone]['max']:.1f}"
            for r in (ours, model)
        ]
        print(f"  {'  ' + milestone:<40}{cells[0]:<{width}}{cells[1]}")
    print(
        f"  {'every region replaced':<40}{ours['every_region_replaced_s']:<{width}.1f}"
        f"{model['every_region_replaced_s']:.1f}"
    )
    print(
        f"  (model: start task first ticked {model['start_task_first_tick_s']:.1f} s after the "
        f"expunge, the driver {model['driver_task_first_tick_s']:.1f} s; ensures per region "
        f"{model['ensures_per_region']['mean']:.1f}; event-driven repairs "
        f"{ours['repair_modes']})"
    )


def _disk(name: str) -> api.DiskCreate:
    return api.DiskCreate(
        source="cli/bench",
        payload=api.DiskCreateRequest(project="bench", name=name, size_bytes=SCALE_DISK_BYTES),
    )


def _instance(disks: Sequence[str]) -> api.InstanceCreate:
    return api.InstanceCreate(
        source="cli/bench",
        payload=api.InstanceCreateRequest(
            project="bench",
            name=f"i-{uuid.uuid4().hex[:10]}",
            ncpus=1,
            memory_bytes=1 << 28,
            disks=tuple(disks),
        ),
    )


async def _start(running: Stack, request: api.DiskCreate | api.InstanceCreate) -> uuid.UUID:
    reply = await running.transport.request(request, routing_key=NEXUS_API_QUEUE, timeout=60)
    assert isinstance(reply, api.AcceptedReply), reply
    return reply.payload.saga_id


async def _all_done(running: Stack, sagas: Sequence[uuid.UUID]) -> None:
    await running.all_finished(sagas, timeout=300)
    failed = {saga: running.finished[saga] for saga in sagas if running.finished[saga] != "done"}
    assert not failed, f"setup sagas did not finish: {failed}"
