"""One crucible agent's CPU per region create, with nothing else of the stack running.

    python -m bench.agent_micro [--regions 300] [--rounds 3] [--in-flight 16]
                                [--log-level WARNING] [--py-spy out.svg]

Starts a private RabbitMQ node and one ``crucible-agent run`` process (create delay
``fixed:0``, logging as in the benchmark), then, per round, sends ``--regions``
RegionEnsure commands the way the disk-create saga does (1 GiB: 16 extents of 64 MiB),
at most ``--in-flight`` at a time, and waits for each region's ``region.created``. It
prints the agent process's CPU seconds per region (user + system, from the first
command until the agent is quiet again) and the wall time per round, and counts the
capacity announcements seen. Regions are kept, so later rounds show whether the cost
grows with the number of regions an agent holds. The machine's other load shows in the
absolute numbers: compare runs made back to back.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from nexus.devstack.servers import RabbitMQNode
from schemas.region import RegionEnsure, RegionSpec, RegionState, RegionStateChanged
from schemas.sled import AgentAnnounced
from schemas.topology import crucible_queue
from schemas.transport import Delivery, Transport

AGENT = Path(sys.executable).parent / "crucible-agent"
SOURCE = "nexus/agent-micro"
# What a disk-create saga asks for a 1 GiB disk.
BLOCK_SIZE = 512
EXTENT_SIZE = 131072
EXTENT_COUNT = 16
# How long the agent must stay idle after the last create before its CPU is read: long
# enough for work that trails the last event (announcements, outbox bookkeeping).
SETTLE_SECONDS = 2.0
READY_SECONDS = 30.0


@dataclass
class Watch:
    """Events from the agent under test: created regions and capacity announcements."""

    agent_id: uuid.UUID
    created: set[uuid.UUID] = field(default_factory=set)
    failed: dict[uuid.UUID, str | None] = field(default_factory=dict)
    announcements: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_event(self, delivery: Delivery) -> None:
        message = delivery.message
        match message:
            case RegionStateChanged() if message.payload.agent_id == self.agent_id:
                region = message.payload.region
                if region.state is RegionState.CREATED:
                    self.created.add(region.id)
                elif region.state is RegionState.FAILED:
                    self.failed[region.id] = region.failure
            case AgentAnnounced() if message.payload.agent_id == self.agent_id:
                self.announcements += 1
        self.changed.set()


@dataclass(frozen=True)
class Round:
    regions: int
    cpu_seconds: float
    wall_seconds: float
    announcements: int

    def line(self, number: int) -> str:
        return (
            f"round {number}: {self.regions} regions, "
            f"{self.cpu_seconds / self.regions * 1000:.2f} ms CPU/region, "
            f"{self.wall_seconds / self.regions * 1000:.2f} ms wall/region, "
            f"{self.announcements} announcements"
        )


async def wait_for(watch: Watch, condition: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"timed out waiting for {what}")
        watch.changed.clear()
        try:
            async with asyncio.timeout(min(remaining, 0.5)):
                await watch.changed.wait()
        except TimeoutError:
            pass


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def one_round(
    transport: Transport,
    watch: Watch,
    process: psutil.Process,
    *,
    regions: int,
    in_flight: int,
) -> Round:
    queue = crucible_queue(watch.agent_id)
    ids = [uuid.uuid4() for _ in range(regions)]
    before_announcements = watch.announcements
    created_before = len(watch.created)
    cpu_before = cpu_seconds(process)
    started = time.monotonic()

    def room(sent: int) -> bool:
        return sent - (len(watch.created) - created_before) < in_flight

    for index, region_id in enumerate(ids):
        await wait_for(
            watch,
            functools.partial(room, index),
            "room in flight",
            60.0,
        )
        spec = RegionSpec(
            id=region_id,
            block_size=BLOCK_SIZE,
            extent_size=EXTENT_SIZE,
            extent_count=EXTENT_COUNT,
            encrypted=True,
        )
        await transport.send_command(RegionEnsure(source=SOURCE, payload=spec), queue)
    wanted = set(ids)
    await wait_for(
        watch, lambda: wanted <= watch.created | watch.failed.keys(), f"{regions} regions", 300.0
    )
    wall = time.monotonic() - started
    failed = wanted & watch.failed.keys()
    if failed:
        raise RuntimeError(f"{len(failed)} creates failed: {watch.failed[next(iter(failed))]}")
    await asyncio.sleep(SETTLE_SECONDS)
    return Round(
        regions=regions,
        cpu_seconds=cpu_seconds(process) - cpu_before,
        wall_seconds=wall,
        announcements=watch.announcements - before_announcements,
    )


def start_agent(
    amqp_url: str, data_dir: Path, agent_id: uuid.UUID, log_level: str
) -> subprocess.Popen[bytes]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CRUCIBLE_")}
    env |= {
        "CRUCIBLE_AGENT_ID": str(agent_id),
        "CRUCIBLE_SLED_ID": str(uuid.uuid4()),
        "CRUCIBLE_DATA_DIR": str(data_dir),
        "CRUCIBLE_CAPACITY_BYTES": str(1 << 50),
        "CRUCIBLE_AMQP_URL": amqp_url,
        "CRUCIBLE_CREATE_DELAY": "fixed:0",
        "CRUCIBLE_LOG_LEVEL": log_level,
    }
    with (data_dir.parent / "agent.log").open("ab") as log:
        return subprocess.Popen(
            [str(AGENT), "run"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def start_profiler(pid: int, output: Path, output_format: str) -> subprocess.Popen[bytes]:
    py_spy = shutil.which(
        "py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    if py_spy is None:
        raise RuntimeError("py-spy is not installed")
    return subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "-o", str(output), "--format", output_format],
        stdin=subprocess.DEVNULL,
    )


async def measure(args: argparse.Namespace, amqp_url: str, work_dir: Path) -> list[Round]:
    agent_id = uuid.uuid4()
    transport = Transport(amqp_url, name="agent-micro")
    await transport.connect()
    agent: subprocess.Popen[bytes] | None = None
    profiler: subprocess.Popen[bytes] | None = None
    try:
        await transport.declare_topology()
        await transport.declare_command_queue(crucible_queue(agent_id))
        watch = Watch(agent_id)
        await transport.subscribe(["region.*", "agent.announced"], watch.on_event)
        agent = start_agent(amqp_url, work_dir / "agent", agent_id, args.log_level)
        await wait_for(watch, lambda: watch.announcements > 0, "the agent", READY_SECONDS)
        await asyncio.sleep(SETTLE_SECONDS)
        if args.py_spy is not None:
            profiler = start_profiler(agent.pid, args.py_spy, args.py_spy_format)
            await asyncio.sleep(1.0)
        process = psutil.Process(agent.pid)
        rounds = []
        for number in range(1, args.rounds + 1):
            result = await one_round(
                transport, watch, process, regions=args.regions, in_flight=args.in_flight
            )
            print(result.line(number), flush=True)
            rounds.append(result)
        return rounds
    finally:
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(timeout=60)
        if agent is not None:
            agent.terminate()
            try:
                agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        await transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regions", type=int, default=300, help="region creates per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=16, help="creates outstanding at once")
    parser.add_argument("--log-level", default="WARNING", help="the agent's (the benchmark's)")
    parser.add_argument("--py-spy", type=Path, default=None, help="record a profile here")
    parser.add_argument(
        "--py-spy-format",
        default="flamegraph",
        choices=["flamegraph", "raw", "speedscope"],
        help="raw: collapsed stacks, one a line",
    )
    args = parser.parse_args()
    rabbitmq = RabbitMQNode()
    try:
        with tempfile.TemporaryDirectory(prefix="agent-micro-") as work:
            rounds = asyncio.run(measure(args, rabbitmq.url, Path(work)))
    finally:
        rabbitmq.close()
    total = sum(r.cpu_seconds for r in rounds) / sum(r.regions for r in rounds)
    print(f"all rounds: {total * 1000:.2f} ms CPU/region")


if __name__ == "__main__":
    main()
