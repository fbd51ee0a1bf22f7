"""The ``peers`` phase: this project's engine against DBOS Transact, same run, same load.

Both engines run disk_create's shape (record, place, three region ensures to trivial
agents, three waits, finalize) against the same PostgreSQL server (a database each)
and the same RabbitMQ node, on this machine, one after the other:

- **ours**: one Nexus replica running the real ``disk_create`` saga, 3 crucible agents
  with ``CRUCIBLE_BACKEND=trivial`` (records, outbox, events and replies as ever, no
  extent files) and no create delay; a disk is created through Nexus's API queue and
  counted done when its ``saga.done`` notice arrives.
- **DBOS**: :mod:`bench.dbos_peer`, one application process running the workflow and
  its load, and 3 trivial agent processes replying with ``DBOSClient.send``.

At each level, ``in_flight`` disks at a time (closed loop), ``count`` in all: throughput
(disks per second from the first start to the last end) and wake overhead (the agent's
send → the workflow resumed; see BENCHMARKS.md for each engine's two ends). CPU
seconds per disk by group of processes say where the time went.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from bench.run import (
    REPO,
    SCALE_DISK_BYTES,
    Servers,
    Stack,
    _commits,
    _cpu,
    _processes,
    _rows,
    _wake_legs,
    saga_stats,
    stack,
    summary,
)

# PostgreSQL's backends come and go with pool connections, and the CPU of one that
# exited is lost to a before/after reading: commits per disk stand for the database.
NOT_COUNTED = ("postgresql",)

WARMUP = 8
# One extent (64 MiB), as the scale phase's disks: ~1,000 disks of 1 GiB would fill the
# agents' 1 TiB and the last ones unwind "no room" (two runs lost 189 of 600 that way).
DISK_BYTES = SCALE_DISK_BYTES


async def closed_loop(running: Stack, in_flight: int, count: int) -> tuple[list[uuid.UUID], float]:
    """``count`` disks created ``in_flight`` at a time, each started when one ends; the
    sagas and the seconds from the first request to the last ``saga.done``."""
    remaining = iter(range(count))
    sagas: list[uuid.UUID] = []

    async def worker() -> None:
        for _ in remaining:
            (saga_id,) = await running.create_disks(1, size_bytes=DISK_BYTES)
            sagas.append(saga_id)
            await running.all_finished([saga_id], timeout=120)

    began = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return sagas, time.monotonic() - began


async def _wakes(running: Stack, sagas: Sequence[uuid.UUID]) -> list[float]:
    """Each region wake of ``sagas``, in ms: the agent's ``occurred_at`` (kept in the
    rendezvous row) → the node's ``resumed`` log entry. Read from the database, not
    from the benchmark's own consumer of the agents' events, which falls behind on
    this loaded machine (at 32 in flight it had taken only two thirds of them a
    minute after the last disk was done)."""
    ids = ",".join(f"'{saga_id}'" for saga_id in sagas)
    rows = await _rows(
        running,
        "SELECT extract(epoch FROM l.at - r.event_occurred_at) * 1000 FROM wait_rendezvous r "
        "JOIN saga_log l ON l.saga_id = r.saga_id AND l.node_name = r.node_name "
        f"AND l.event = 'resumed' WHERE r.saga_id IN ({ids}) AND r.wait_key LIKE 'region:%' "
        "AND r.event_occurred_at IS NOT NULL AND r.resumed_at IS NOT NULL",
    )
    return [float(wake) for (wake,) in rows]


async def ours(
    servers: Servers, levels: Sequence[tuple[int, int]], seed: int, profile: Path | None
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with stack(
        servers,
        database="postgresql",
        replicas=1,
        create_delay="fixed:0",
        seed=seed,
        agent_env={"CRUCIBLE_BACKEND": "trivial"},
    ) as running:
        await closed_loop(running, 4, WARMUP)
        for in_flight, count in levels:
            watched = _processes(running, servers)
            before = _cpu(watched)
            commits_before = await _commits(running)
            spies = []
            if profile is not None and in_flight == max(level for level, _ in levels):
                # The replica, and one of the agents (where most of the CPU goes).
                for name, pid in running.pids().items():
                    if name.startswith("nexus") or name == "crucible-1":
                        spies.append(_py_spy(pid, profile / f"ours-{name}-{in_flight}.txt"))
            sagas, elapsed = await closed_loop(running, in_flight, count)
            for spy in spies:
                _stop(spy)
            cpu = {
                name: after - before.get(name, 0.0)
                for name, after in _cpu(_processes(running, servers)).items()
            }
            commits = await _commits(running) - commits_before
            stats = await saga_stats(running, sagas)
            wakes = await _wakes(running, sagas)
            legs = await _wake_legs(running, sagas)
            results[str(in_flight)] = {
                # Includes heartbeats and announcements: a few per second.
                "commits_per_disk": commits / count,
                "in_flight": in_flight,
                "disks": count,
                "seconds": elapsed,
                "per_second": count / elapsed,
                "wake_ms": summary(wakes),
                # The agent's event → the replica's commit of it (the agent's commit,
                # relay and the broker), and that commit → the node resumed.
                "wake_legs_ms": legs,
                "states": stats.states,
                "cpu_ms_per_disk": {
                    k: 1000 * v / count for k, v in sorted(cpu.items()) if k not in NOT_COUNTED
                },
            }
            _print("ours", results[str(in_flight)])
    return results


async def dbos(
    servers: Servers, levels: Sequence[tuple[int, int]], profile: Path | None
) -> dict[str, Any]:
    name = f"bench_dbos_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(servers.postgres.url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as connection:
        await connection.execute(text(f'CREATE DATABASE "{name}"'))
    await admin.dispose()
    database = servers.database_url(name)
    amqp = servers.vhost()
    workdir = servers.workdir / name
    _mkdir(workdir)
    env = {"PYTHONPATH": str(REPO)}
    python = sys.executable
    peer = ("-m", "bench.dbos_peer")
    await _run([python, *peer, "migrate", "--database", database], env, workdir / "migrate.log")
    queues = [f"crucible.{uuid.uuid4()}" for _ in range(3)]
    agents = [
        await _spawn(
            [python, *peer, "agent", "--database", database, "--amqp", amqp, "--queue", queue],
            env,
            workdir / f"agent-{n}.log",
        )
        for n, queue in enumerate(queues)
    ]
    try:
        for n, agent in enumerate(agents):
            await _until_ready(agent, workdir / f"agent-{n}.log")
        out = workdir / "result.json"
        spec = ",".join(f"{in_flight}:{count}" for in_flight, count in levels)
        watched = {f"agent-{n}": psutil.Process(a.pid) for n, a in enumerate(agents)}
        watched |= {
            f"{group}#{n}": psutil.Process(pid)
            for group, pids in servers.server_pids().items()
            for n, pid in enumerate(pids)
        }
        before = _cpu(watched)
        app = await _spawn(
            [
                *(python, *peer, "app", "--database", database, "--amqp", amqp),
                *("--queues", ",".join(queues), "--levels", spec, "--warmup", str(WARMUP)),
                *("--disk-bytes", str(DISK_BYTES)),
                *("--out", str(out)),
            ],
            env,
            workdir / "app.log",
        )
        spy = _py_spy(app.pid, profile / "dbos-app.txt") if profile is not None else None
        code = await app.wait()
        if spy is not None:
            _stop(spy)
        if code != 0:
            raise RuntimeError(f"the DBOS app exited {code}: {_text(workdir / 'app.log')}")
        cpu = {
            name: after - before.get(name, 0.0)
            for name, after in _cpu({**watched, **_server_processes(servers)}).items()
        }
        found = json.loads(_text(out))
    finally:
        for agent in agents:
            agent.terminate()
        for agent in agents:
            await agent.wait()
    total = sum(level["workflows"] for level in found["levels"]) + WARMUP
    results: dict[str, Any] = {"dbos_version": found["dbos_version"]}
    for level in found["levels"]:
        results[str(level["in_flight"])] = {
            "in_flight": level["in_flight"],
            "disks": level["workflows"],
            "seconds": level["seconds"],
            "per_second": level["per_second"],
            "wake_ms": summary(level["wakes_ms"]),
            "app_cpu_ms_per_disk": 1000 * level["app_cpu_seconds"] / level["workflows"],
            "commits_per_disk": level["commits"] / level["workflows"],
        }
        _print("DBOS", results[str(level["in_flight"])])
    # The agents, PostgreSQL and RabbitMQ over the whole app run (warm-up and all levels).
    results["cpu_ms_per_disk_whole_run"] = {
        k: 1000 * v / total for k, v in sorted(cpu.items()) if k not in NOT_COUNTED
    }
    return results


def _server_processes(servers: Servers) -> dict[str, psutil.Process]:
    """Server processes now (PostgreSQL starts a backend per new connection)."""
    found = {}
    for group, pids in servers.server_pids().items():
        for n, pid in enumerate(pids):
            try:
                found[f"{group}#{n}"] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                continue
    return found


async def peers_phase(
    servers: Servers, levels: Sequence[tuple[int, int]], seed: int, profile: Path | None = None
) -> dict[str, Any]:
    print(
        "- peers: disk_create with trivial agents, this engine and DBOS, "
        + ", ".join(f"{count} disks {in_flight} in flight" for in_flight, count in levels)
    )
    if profile is not None:
        _mkdir(profile)
    # The machine is shared: its load says how much of it the two engines had.
    load_before = os.getloadavg()
    ours_results = await ours(servers, levels, seed, profile)
    load_between = os.getloadavg()
    dbos_results = await dbos(servers, levels, profile)
    return {
        "levels": [{"in_flight": in_flight, "disks": count} for in_flight, count in levels],
        "ours": ours_results,
        "dbos": dbos_results,
        "load_average_1_5_15": {
            "before": load_before,
            "between": load_between,
            "after": os.getloadavg(),
        },
    }


def _print(engine: str, level: dict[str, Any]) -> None:
    wake = level["wake_ms"]
    print(
        f"  {engine:5} {level['in_flight']:>2} in flight: {level['per_second']:.1f} disks/s, "
        f"wake p50 {wake['p50']:.1f} ms, p99 {wake['p99']:.1f} ms (n={wake['n']})"
    )


async def _run(argv: list[str], env: dict[str, str], log: Path) -> None:
    process = await _spawn(argv, env, log)
    if await process.wait() != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed: {_text(log)}")


async def _spawn(argv: list[str], env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )


async def _until_ready(process: asyncio.subprocess.Process, log: Path, timeout: float = 60) -> None:
    """Until the agent printed ``ready`` (it consumes its queue), or fail with its log."""
    deadline = time.monotonic() + timeout
    while "ready" not in _text(log):
        if process.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"a DBOS agent did not start: {_text(log)}")
        await asyncio.sleep(0.1)


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _mkdir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


def _py_spy(pid: int, output: Path) -> subprocess.Popen[bytes]:
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    return subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "-o",
            str(output),
            "--nonblocking",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()
