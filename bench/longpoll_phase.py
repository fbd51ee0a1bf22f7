"""The ``longpoll`` phase: what the long-poll baseline costs at scale, and what a dead
replica does to it (the strategies phase measures its wake overhead beside the others).

- **scale (a model of Nexus's end)**: 3 long-poll agents (``bench.longpoll agent``,
  trivial backend; the regions polled are unknown to them, see ``run_model``) and one
  process,
  ``bench.longpoll model``, keeping ``regions`` long polls open through the same loop
  the saga uses, without the saga engine. Measured once every poll has been answered
  and asked again: requests per second, polls in flight, memory (RSS) of the model
  and of each agent before and while they hold them, CPU.
- **a replica SIGKILLed while it holds a disk's long polls**: 2 replicas, a disk whose
  regions take ``KILL_DELAY`` seconds; once its three long polls were answered
  "requested" and asked again, the replica that asks is SIGKILLed. Its loops are gone;
  the agents answer into a reply queue that no longer exists; nothing asks until the
  wait's deadline (``KILL_DEADLINE`` here, 300 s by default), when the other
  replica's reconcile asks once. The same is done to an event-driven disk_create, whose
  wake does not depend on the replica that parked it (its event is queued for whichever
  replica consumes it).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from typing import Any

import psutil

from bench.run import (
    LONGPOLL_AGENT,
    REPO,
    Scale,
    Servers,
    Stack,
    _cpu_by_process,
    _cpu_delta,
    _rows,
    _scalar,
    saga_stats,
    stack,
    summary,
)

KILL_DELAY = 10.0
KILL_DEADLINE = 30.0


async def longpoll_phase(servers: Servers, scale: Scale, seed: int) -> dict[str, Any]:
    return {
        "scale": await _scale(servers, scale.parked, seed),
        "kill": {
            "long poll": await _kill(servers, seed, "disk_create_longpoll"),
            "event-driven": await _kill(servers, seed, "disk_create"),
        },
    }


async def _scale(servers: Servers, regions: int, seed: int) -> dict[str, Any]:
    print(f"- long poll at scale: {regions} regions waiting, a model of Nexus's end")
    async with stack(
        servers,
        database="postgresql",
        replicas=1,
        create_delay="fixed:86400",
        seed=seed,
        disk_create_saga="disk_create_longpoll",
        agent_env={"CRUCIBLE_BACKEND": "trivial"},
        agent_argv=LONGPOLL_AGENT,
    ) as running:
        agents = _agents(running)
        processes = {name: psutil.Process(pid) for name, (pid, _) in agents.items()}
        rss_before = {name: p.memory_info().rss / 2**20 for name, p in processes.items()}
        out = servers.workdir / f"longpoll-model-{uuid.uuid4().hex[:6]}.json"
        model = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "bench.longpoll", "model", "--amqp", running.amqp_url),
            *("--agents", ",".join(str(agent_id) for _, agent_id in agents.values())),
            *("--regions", str(regions), "--out", str(out)),
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        )
        # Sampled while the model holds every poll (its settle is 35 s, its window 30 s).
        await asyncio.sleep(45)
        watched = {**processes, "model": psutil.Process(model.pid)}
        before = _cpu_by_process(watched)
        await asyncio.sleep(15)
        cpu = _cpu_delta(watched, before, 15)
        rss_holding = {name: p.memory_info().rss / 2**20 for name, p in processes.items()}
        if await model.wait() != 0:
            raise RuntimeError("the long-poll model failed")
        found = json.loads(out.read_text())
    if found["loops_running"] < regions or found["unanswered"]:
        print(
            f"  ! {found['loops_running']} of {regions} loops running, "
            f"{found['unanswered']} polls unanswered: the figures below are not of {regions}"
        )
    result = {
        **found,
        "agent_rss_mib_before": rss_before,
        "agent_rss_mib_holding": rss_holding,
        "cpu_fraction_holding": cpu,
    }
    print(
        f"  {found['loops_running']} polls in flight, {found['requests_per_second']:.0f} "
        f"requests/s; model RSS {found['rss_mib_before']:.0f} → "
        f"{found['rss_mib_holding']:.0f} MiB; agents "
        + ", ".join(f"{rss_before[n]:.0f} → {rss_holding[n]:.0f} MiB" for n in sorted(processes))
        + "; CPU "
        + ", ".join(f"{k} {v:.2f}" for k, v in sorted(cpu.items()))
    )
    return result


def _agents(running: Stack) -> dict[str, tuple[int, uuid.UUID]]:
    """The crucible agents: name → (pid, agent id)."""
    return {
        child.spec.name: (child.process.pid, uuid.UUID(child.spec.env["CRUCIBLE_AGENT_ID"]))
        for child in running.supervisor.children
        if child.spec.name.startswith("crucible") and child.process.returncode is None
    }


async def _kill(servers: Servers, seed: int, saga: str) -> dict[str, Any]:
    label = "long poll" if saga == "disk_create_longpoll" else "event-driven"
    print(f"- {label}: the replica that parked a disk SIGKILLed while it waits")
    async with stack(
        servers,
        database="postgresql",
        replicas=2,
        create_delay=f"fixed:{KILL_DELAY}",
        seed=seed,
        disk_create_saga=saga,
        nexus_env={"NEXUS_REGION_DEADLINE_SECONDS": str(KILL_DEADLINE)},
        agent_argv=LONGPOLL_AGENT if saga == "disk_create_longpoll" else None,
    ) as running:
        # The control: one disk, no kill.
        (control,) = await running.create_disks(1)
        await running.all_finished([control], timeout=KILL_DEADLINE * 4)
        (victim,) = await running.create_disks(1)
        replica = await _parked_by(running, victim, saga)
        pid = running.pids()[replica]
        psutil.Process(pid).kill()
        killed_at = time.monotonic()
        # A region woken before the kill would make this a wake without one.
        resumed_before_kill = await _resumed(running, victim)
        if resumed_before_kill:
            print(f"  ! {resumed_before_kill} regions had resumed before the kill")
        await running.all_finished([victim], timeout=KILL_DEADLINE * 4 + KILL_DELAY)
        finished_after = time.monotonic() - killed_at
        control_stats = await saga_stats(running, [control])
        killed_stats = await saga_stats(running, [victim])
    control_wake, killed_wake = summary(control_stats.wakes_ms), summary(killed_stats.wakes_ms)
    result: dict[str, Any] = {
        "region_delay_seconds": KILL_DELAY,
        "wait_deadline_seconds": KILL_DEADLINE,
        "replica_killed": replica,
        "disk_finished_seconds_after_kill": finished_after,
        "regions_resumed_before_kill": resumed_before_kill,
        "wake_ms_control": control_wake,
        "wake_ms_killed": killed_wake,
        "requests_per_disk_killed": killed_stats.polls_per_disk,
        "states": killed_stats.states,
    }
    print(
        f"  wake without a kill p50 {control_wake['p50']:.0f} ms; with the "
        f"replica killed {killed_wake['p50']:.0f} ms (max "
        f"{killed_wake['max']:.0f} ms; region ready {KILL_DELAY:.0f} s after "
        f"its ensure, wait deadline {KILL_DEADLINE:.0f} s), {result['states']}"
    )
    return result


async def _parked_by(running: Stack, saga_id: uuid.UUID, saga: str) -> str:
    """The replica that ran the disk's region nodes (its ``waiting`` entries, written
    as the nodes parked), once all three wait; for the long poll, that replica runs
    their loops, and a second more lets their first polls leave."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = await _rows(
            running,
            "SELECT node_name, replica_id FROM saga_log WHERE saga_id = :id "
            "AND event = 'waiting' AND node_name LIKE 'region_%' AND data->>'keys' IS NOT NULL",
            id=saga_id,
        )
        if len({node for node, _ in rows}) == 3:
            (replica,) = {replica for _, replica in rows}
            if saga == "disk_create_longpoll":
                await asyncio.sleep(1.0)
            return str(replica)
        await asyncio.sleep(0.2)
    raise TimeoutError(f"saga {saga_id}'s regions did not all wait in 30 s")


async def _resumed(running: Stack, saga_id: uuid.UUID) -> int:
    return await _scalar(
        running,
        f"SELECT count(*) FROM saga_log WHERE saga_id = '{saga_id}' "
        "AND event = 'resumed' AND node_name LIKE 'region_%'",
    )
