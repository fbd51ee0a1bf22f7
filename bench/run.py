"""The benchmark: event-driven waits against polling, the floor, throughput and scale.

    python -m bench.run [--quick] [--out bench/results] [--broker-nodes 3]

Runs the real stack as processes (a private RabbitMQ node, or a cluster of
``--broker-nodes`` nodes, and PostgreSQL cluster,
Nexus replicas, 3 crucible agents, 2 sled agents) in phases that share those servers;
each phase gets a fresh virtual host and database. Writes ``results.json`` and
``wake.png`` into ``--out``. See BENCHMARKS.md for what each number means.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import create_async_engine

from bench.load import load_phase
from bench.polling import nova_fixed
from nexus.db.engine import create_engine, create_sessionmaker
from nexus.db.migrate import upgrade_async
from nexus.db.models import Saga, SagaLogEntry
from nexus.devstack.patroni import PatroniCluster
from nexus.devstack.servers import PostgresCluster, RabbitMQCluster, RabbitMQNode
from nexus.devstack.stack import READINESS_KEYS, Readiness, StackConfig, plan, wait_until_ready
from nexus.devstack.supervisor import ChildSpec, Supervisor
from nexus.saga.executor import SWEEP_CONCURRENCY
from nexus.sagas.disk_create import REPLICAS
from schemas import api
from schemas.base import Envelope
from schemas.brokers import broker_urls
from schemas.instance import VmmState, VmmStateChanged
from schemas.messages import encode
from schemas.progress import SagaProgressed
from schemas.region import RegionState, RegionStateChanged
from schemas.topology import EVENTS_EXCHANGE, NEXUS_API_QUEUE
from schemas.transport import Delivery, Transport

REPO = Path(__file__).resolve().parent.parent
STRATEGIES = {
    "event-driven": "disk_create",
    "backoff (Omicron)": "disk_create_backoff",
    "fixed 3 s (Nova)": "disk_create_fixed",
    "long poll 30 s (omicron#996)": "disk_create_longpoll",
}
# The long-poll baseline's agents: the crucible agent with a long-poll endpoint.
LONGPOLL_AGENT = (sys.executable, "-m", "bench.longpoll", "agent")


POLLERS = ("disk_create_backoff", "disk_create_fixed")


def crucible_argv(saga: str) -> tuple[str, ...] | None:
    """The crucible agents' command for a disk-create saga (None: the usual one)."""
    return LONGPOLL_AGENT if saga == "disk_create_longpoll" else None


@dataclass(frozen=True)
class Scale:
    strategy_disks: int
    region_delay: str
    throughput_disks: int
    parked: int
    parked_delay_seconds: float
    quick: bool = False
    # Instance creates run one at a time while the scale phase's sagas are parked.
    probes: int = 10
    # How long the pollers' request rate is measured once ``parked`` of them wait, and
    # which pollers (polling_scale phase).
    polling_window_seconds: float = 120
    polling_strategies: tuple[str, ...] = ("disk_create_backoff", "disk_create_fixed")
    # Disks created while one agent floods Nexus with stale duplicates (discards phase).
    discard_disks: int = 30
    # The peers phase: (disks in flight, disks) per level, for each engine. Disks are
    # not deleted and a crucible agent has 1,000 ports (one per region): at most ~990
    # disks in all, warm-up included.
    peers_levels: tuple[tuple[int, int], ...] = ((1, 100), (8, 300), (32, 500))
    # The strategies phase's sagas (labels of STRATEGIES).
    strategies: tuple[str, ...] = tuple(STRATEGIES)
    # The replacement phase (bench/replacement_phase.py): regions on the lost sled (one
    # per disk), how many of their disks are attached to running instances, how long a
    # live repair takes, the Omicron model's task periods (start, driver) and how long
    # either strategy may take in all.
    replacement_disks: int = 24
    replacement_attached: int = 8
    replacement_repair_seconds: float = 5.0
    replacement_periods: tuple[float, float] = (30.0, 10.0)
    replacement_timeout_seconds: float = 900.0


QUICK = Scale(
    strategy_disks=4,
    region_delay="lognormal:1.0,0.8,0.2,3",
    throughput_disks=30,
    parked=40,
    parked_delay_seconds=12,
    quick=True,
    # Each probe takes seconds (an instance boots): none in the quick run.
    probes=0,
    polling_window_seconds=5,
    # One poller, one window: the quick run stays under 3 minutes.
    polling_strategies=("disk_create_fixed",),
    discard_disks=8,
    peers_levels=((1, 5), (8, 16), (32, 32)),
    # The long poll's stack would cost the quick run ~25 s: the full run has it.
    strategies=("event-driven", "backoff (Omicron)", "fixed 3 s (Nova)"),
    replacement_disks=6,
    replacement_attached=2,
    replacement_repair_seconds=1.0,
    # Omicron's 30 s / 10 s scaled down tenfold (the phase says so in its output).
    replacement_periods=(3.0, 1.0),
    replacement_timeout_seconds=300.0,
)
FULL = Scale(
    strategy_disks=20,
    region_delay="lognormal:5,1.2,0.2,60",
    throughput_disks=300,
    parked=10_000,
    # Longer than parking 10,000 (about 4 minutes here), the agents taking the 30,000
    # commands (they lag: up to 12 minutes after the first), the idle window and the
    # probes: all wait at once until it passes, counted from each agent's command.
    parked_delay_seconds=1100,
)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else float("nan"),
        "mean": statistics.fmean(values) if values else float("nan"),
    }


# Servers and stacks.


@dataclass
class Servers:
    # One node, or a cluster (--broker-nodes): every service is then given every node.
    rabbitmq: RabbitMQNode | RabbitMQCluster
    # One server, or a replicated one under Patroni (--ha-db): services are then given
    # a multi-host address that finds the primary.
    postgres: PostgresCluster | PatroniCluster
    workdir: Path

    def database_url(self, name: str) -> str:
        """The URL of database ``name`` on the benchmark's PostgreSQL."""
        if isinstance(self.postgres, PatroniCluster):
            return self.postgres.url_for(name).render_as_string(hide_password=False)
        return self.postgres.url.rsplit("/", 1)[0] + f"/{name}"

    def vhost(self) -> str:
        name = f"bench-{uuid.uuid4().hex[:8]}"
        self.rabbitmq.rabbitmqctl("add_vhost", name)
        self.rabbitmq.rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        return ",".join(f"{url.rstrip('/')}/{name}" for url in broker_urls(self.rabbitmq.url))

    async def database(self, kind: str) -> str:
        if kind == "sqlite":
            url = f"sqlite+aiosqlite:///{self.workdir / uuid.uuid4().hex[:8]}.sqlite3"
        else:
            name = f"bench_{uuid.uuid4().hex[:8]}"
            admin = create_async_engine(self.postgres.url, isolation_level="AUTOCOMMIT")
            async with admin.connect() as connection:
                await connection.execute(text(f'CREATE DATABASE "{name}"'))
            await admin.dispose()
            url = self.database_url(name)
        await upgrade_async(url)
        return url

    def server_pids(self) -> dict[str, list[int]]:
        def tree(pid: int | None) -> list[int]:
            if pid is None or not psutil.pid_exists(pid):
                return []
            root = psutil.Process(pid)
            return [root.pid, *(child.pid for child in root.children(recursive=True))]

        nodes = (
            self.rabbitmq.nodes if isinstance(self.rabbitmq, RabbitMQCluster) else [self.rabbitmq]
        )
        rabbits = [getattr(node, "_process", None) for node in nodes]
        if isinstance(self.postgres, PatroniCluster):
            postmasters = [node.postmaster_pid() for node in self.postgres.nodes]
        else:
            pid_file = Path(str(self.postgres._data)) / "postmaster.pid"
            postmasters = [int(pid_file.read_text().split()[0]) if pid_file.exists() else None]
        return {
            "rabbitmq": [pid for rabbit in rabbits for pid in tree(rabbit.pid if rabbit else None)],
            "postgresql": [pid for postmaster in postmasters for pid in tree(postmaster)],
        }


@dataclass
class Stack:
    supervisor: Supervisor
    transport: Transport
    amqp_url: str
    database_url: str
    children: list[ChildSpec]
    ready_at: dict[uuid.UUID, datetime] = field(default_factory=dict)
    # When this process got each region's ``created`` (the agent's event through the
    # broker, to a consumer beside Nexus's queue): splits a wake into its two legs.
    ready_seen_at: dict[uuid.UUID, datetime] = field(default_factory=dict)
    # When each region's agent recorded its ensure command (its ``requested`` event):
    # the end of the command's relay, which begins when the node parks after sending it.
    requested_at: dict[uuid.UUID, datetime] = field(default_factory=dict)
    instance_ready_at: dict[uuid.UUID, datetime] = field(default_factory=dict)
    finished: dict[uuid.UUID, str] = field(default_factory=dict)
    finished_event: asyncio.Event = field(default_factory=asyncio.Event)
    # Crucible agents planned but not started with the stack (see ``stack``).
    held_back: list[ChildSpec] = field(default_factory=list)

    async def start_held_back(self, timeout: float = 60) -> list[uuid.UUID]:
        """Start the held-back crucible agents; return their ids once Nexus has
        recorded each one's dataset (what placement reads), as the stack's readiness
        does for the others: while starting, and only then, the database is looked at
        every 100 ms."""
        ids = [uuid.UUID(spec.env["CRUCIBLE_AGENT_ID"]) for spec in self.held_back]
        for spec in self.held_back:
            await self.supervisor.start(spec)
        engine = create_engine(self.database_url)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    async with engine.connect() as connection:
                        known = set(
                            (
                                await connection.execute(
                                    text("SELECT id FROM datasets WHERE state = 'active'")
                                )
                            ).scalars()
                        )
                    if {str(i) for i in ids} <= {str(k) for k in known}:
                        return ids
                    await asyncio.sleep(0.1)
        finally:
            await engine.dispose()

    def pids(self) -> dict[str, int]:
        return {
            child.spec.name: child.process.pid
            for child in self.supervisor.children
            if child.process.returncode is None
        }

    async def on_event(self, delivery: Delivery) -> None:
        message = delivery.message
        if isinstance(message, VmmStateChanged):
            vmm = message.payload.vmm
            if vmm.state is VmmState.RUNNING:
                self.instance_ready_at.setdefault(vmm.instance_id, message.occurred_at)
        elif isinstance(message, RegionStateChanged):
            if message.payload.region.state is RegionState.REQUESTED:
                self.requested_at.setdefault(message.payload.region.id, message.occurred_at)
            if message.payload.region.state is RegionState.CREATED:
                self.ready_at.setdefault(message.payload.region.id, message.occurred_at)
                self.ready_seen_at.setdefault(message.payload.region.id, datetime.now(UTC))
        elif isinstance(message, SagaProgressed) and message.payload.step.value in (
            "done",
            "undone",
            "stuck",
        ):
            self.finished[message.payload.saga_id] = message.payload.step.value
            self.finished_event.set()

    async def create_disks(
        self, count: int, concurrency: int = 32, size_bytes: int = 1 << 30
    ) -> list[uuid.UUID]:
        gate = asyncio.Semaphore(concurrency)

        async def one(index: int) -> uuid.UUID:
            async with gate:
                reply = await self.transport.request(
                    api.DiskCreate(
                        source="cli/bench",
                        payload=api.DiskCreateRequest(
                            project="bench",
                            name=f"d-{uuid.uuid4().hex[:10]}",
                            size_bytes=size_bytes,
                        ),
                    ),
                    routing_key=NEXUS_API_QUEUE,
                    timeout=60,
                )
                assert isinstance(reply, api.AcceptedReply), reply
                return reply.payload.saga_id

        return await asyncio.gather(*(one(i) for i in range(count)))

    async def probe_wakes(self, count: int) -> list[float]:
        """Wake overhead of ``count`` instance creates run one after the other (the
        instance running at its sled → the saga resumed), while whatever else waits."""
        wakes: list[float] = []
        for _ in range(count):
            reply = await self.transport.request(
                api.InstanceCreate(
                    source="cli/bench",
                    payload=api.InstanceCreateRequest(
                        project="bench",
                        name=f"probe-{uuid.uuid4().hex[:10]}",
                        ncpus=1,
                        memory_bytes=1 << 28,
                    ),
                ),
                routing_key=NEXUS_API_QUEUE,
                timeout=60,
            )
            assert isinstance(reply, api.AcceptedReply), reply
            saga_id, instance_id = reply.payload.saga_id, reply.payload.resource_id
            await self.all_finished([saga_id], timeout=120)
            engine = create_engine(self.database_url)
            async with engine.connect() as connection:
                resumed = await connection.scalar(
                    select(SagaLogEntry.at).where(
                        SagaLogEntry.saga_id == saga_id,
                        SagaLogEntry.node_name == "vmm_ensure",
                        SagaLogEntry.event == "resumed",
                    )
                )
            await engine.dispose()
            ready = self.instance_ready_at.get(instance_id)
            if resumed is not None and ready is not None:
                wakes.append((resumed - ready).total_seconds() * 1000)
        return wakes

    async def all_finished(self, saga_ids: Sequence[uuid.UUID], timeout: float) -> None:
        """Until every saga announced its end (saga.done / undone / stuck events)."""
        wanted = set(saga_ids)
        async with asyncio.timeout(timeout):
            while not wanted <= self.finished.keys():
                self.finished_event.clear()
                await self.finished_event.wait()


@asynccontextmanager
async def stack(
    servers: Servers,
    *,
    database: str,
    replicas: int,
    create_delay: str,
    seed: int,
    disk_create_saga: str = "disk_create",
    nexus_env: dict[str, str] | None = None,
    agent_env: dict[str, str] | None = None,
    agent_argv: tuple[str, ...] | None = None,
    crucible_agents: int = 3,
    held_back: int = 0,
    held_back_env: dict[str, str] | None = None,
) -> AsyncIterator[Stack]:
    """A stack of ``replicas`` Nexus replicas, ``crucible_agents`` crucible agents and 2
    sled agents. The last ``held_back`` crucible agents are not started with it (their
    settings overridden by ``held_back_env``): :meth:`Stack.start_held_back` starts them,
    e.g. a spare sled that takes no region until the ones placed before it are lost."""
    amqp_url = servers.vhost()
    database_url = await servers.database(database)
    state_dir = servers.workdir / f"stack-{uuid.uuid4().hex[:6]}"
    config = StackConfig(
        state_dir=state_dir,
        amqp_url=amqp_url,
        database_url=database_url,
        nexus_replicas=replicas,
        create_delay=create_delay,
        crucible_agents=crucible_agents,
    )
    layout = plan(config)
    extra_nexus = {
        "NEXUS_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(REPO),
        **(nexus_env or {}),
    }
    # `nexus run` with the baselines among its sagas (bench/nexus_replica.py).
    argv = (sys.executable, "-m", "bench.nexus_replica", "--disk-create-saga", disk_create_saga)
    nexus = [ChildSpec(s.name, argv, {**s.env, **extra_nexus}, s.log_path) for s in layout.nexus]
    agents = [
        ChildSpec(
            s.name,
            agent_argv if agent_argv and s.name.startswith("crucible") else s.argv,
            {
                **s.env,
                "CRUCIBLE_SEED": str(seed + n),
                # The workloads' delays are each region's own create time, drawn per
                # region; the real agent's one worker would queue them, and the scale
                # phases (thousands of regions of 12 s) could not run. 64 is the real
                # agent's pool for clones (WORKER_COUNT in crucible's agent/src/main.rs).
                "CRUCIBLE_WORKERS": "64",
                # The code of this checkout, whichever one the venv was installed from.
                "PYTHONPATH": str(REPO),
                "CRUCIBLE_LOG_LEVEL": "WARNING",
                "SLED_LOG_LEVEL": "WARNING",
                **(agent_env or {}),
            },
            s.log_path,
        )
        for n, s in enumerate(layout.agents)
    ]
    later_ids = layout.crucible_ids[len(layout.crucible_ids) - held_back :] if held_back else []
    later = [a for a in agents if a.env.get("CRUCIBLE_AGENT_ID") in {str(i) for i in later_ids}]
    later = [replace(a, env={**a.env, **(held_back_env or {})}) for a in later]
    agents = [a for a in agents if a.name not in {b.name for b in later}]
    layout = replace(
        layout,
        agents=agents,
        crucible_ids=[i for i in layout.crucible_ids if i not in later_ids],
        metrics_files=[p for p in layout.metrics_files if p.stem not in {b.name for b in later}],
    )
    supervisor = Supervisor(lambda spec, code: print(f"  ! {spec.name} exited {code}"))
    transport = Transport(amqp_url, name="bench")
    await transport.connect()
    await transport.declare_topology()
    running = Stack(supervisor, transport, amqp_url, database_url, nexus + agents, held_back=later)
    # Only the ends of sagas: every other progress notice would load the broker and
    # this process for nothing (unrouted notices are dropped by the exchange).
    await transport.subscribe(
        [
            "region.requested",
            "region.created",
            "instance.running",
            "saga.done",
            "saga.undone",
            "saga.stuck",
        ],
        running.on_event,
    )
    readiness = Readiness(layout.crucible_ids, layout.sled_ids)
    await transport.subscribe(READINESS_KEYS, readiness.handle)
    try:
        for spec in nexus + agents:
            await supervisor.start(spec)
        await wait_until_ready(supervisor, layout, readiness, timeout=90)
        yield running
    finally:
        await supervisor.stop()
        await transport.close()


# Reading a phase's sagas back from the database.


@dataclass
class SagaStats:
    wakes_ms: list[float]
    # (when the saga resumed, wake overhead in ms), for "the last ones" of a burst
    wakes_at: list[tuple[datetime, float]]
    polls_per_disk: list[int]
    create_seconds: list[float]
    states: dict[str, int]
    # Of each wake: the agent's event to this process through the broker, in ms.
    delivered_ms: list[float] = field(default_factory=list)
    # Of each region's ensure: the node parked (its command committed to the outbox) →
    # the agent recorded the command (the commit, the outbox relay, the broker).
    relay_ms: list[float] = field(default_factory=list)


async def saga_stats(stack_: Stack, saga_ids: Sequence[uuid.UUID]) -> SagaStats:
    engine = create_engine(stack_.database_url)
    sessions = create_sessionmaker(engine)
    wakes: list[float] = []
    wakes_at: list[tuple[datetime, float]] = []
    delivered: list[float] = []
    relay: list[float] = []
    polls: list[int] = []
    durations: list[float] = []
    states: dict[str, int] = {}
    async with sessions() as session:
        for saga_id in saga_ids:
            saga = await session.get(Saga, saga_id)
            if saga is None:
                continue
            states[saga.state.value] = states.get(saga.state.value, 0) + 1
            log = (
                (
                    await session.execute(
                        SagaLogEntry.__table__.select()
                        .where(SagaLogEntry.saga_id == saga_id)
                        .order_by(SagaLogEntry.id)
                    )
                )
                .mappings()
                .all()
            )
            regions = (saga.node_outputs.get("regions_place") or {}).get("regions", [])
            disk_polls = 0
            for index, placement in enumerate(regions):
                node = f"region_{index}"
                entries = [e for e in log if e["node_name"] == node]
                parked = next((e["at"] for e in entries if e["event"] == "waiting"), None)
                requested = stack_.requested_at.get(uuid.UUID(placement["region_id"]))
                if parked is not None and requested is not None:
                    relay.append((requested - parked).total_seconds() * 1000)
                disk_polls += sum(
                    1
                    for e in entries
                    if e["event"] == "waiting" and (e["data"] or {}).get("rearmed")
                )
                resumed = [e for e in entries if e["event"] == "resumed"]
                if resumed:
                    data = resumed[0]["data"] or {}
                    disk_polls += 1 if data.get("by_reconcile") else 0
                    ready = stack_.ready_at.get(uuid.UUID(placement["region_id"]))
                    if ready is not None:
                        wake_ms = (resumed[0]["at"] - ready).total_seconds() * 1000
                        wakes.append(wake_ms)
                        wakes_at.append((resumed[0]["at"], wake_ms))
                        seen = stack_.ready_seen_at.get(uuid.UUID(placement["region_id"]))
                        if seen is not None:
                            delivered.append((seen - ready).total_seconds() * 1000)
            polls.append(disk_polls + len(regions))
            if saga.state.value == "done" and log:
                durations.append((log[-1]["at"] - saga.created_at).total_seconds())
    await engine.dispose()
    return SagaStats(wakes, wakes_at, polls, durations, states, delivered, relay)


# Phases.


async def strategies_phase(servers: Servers, scale: Scale, seed: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for label, saga in STRATEGIES.items():
        if label not in scale.strategies:
            continue
        print(
            f"- strategy {label}: {scale.strategy_disks} disks, region delay {scale.region_delay}"
        )
        async with stack(
            servers,
            database="postgresql",
            replicas=2,
            create_delay=scale.region_delay,
            seed=seed,
            disk_create_saga=saga,
            nexus_env={
                # A poll is a deadline the sweeper notices: it must look often enough
                # not to slow the baselines down (event-driven sagas never need it, nor
                # the long poll, whose loops run beside the engine).
                "NEXUS_SWEEP_SECONDS": "0.05" if saga in POLLERS else "1.0",
            },
            agent_argv=crucible_argv(saga),
        ) as running:
            started = time.monotonic()
            sagas = await running.create_disks(scale.strategy_disks)
            await running.all_finished(sagas, timeout=900)
            elapsed = time.monotonic() - started
            stats = await saga_stats(running, sagas)
        results[label] = {
            "saga": saga,
            "wake_ms": summary(stats.wakes_ms),
            "wakes_ms": stats.wakes_ms,
            "disk_create_s": summary(stats.create_seconds),
            "requests_per_disk": summary([float(p) for p in stats.polls_per_disk]),
            "relay_ms": summary(stats.relay_ms),
            "states": stats.states,
            "phase_seconds": elapsed,
        }
        print(
            f"  wake p50 {results[label]['wake_ms']['p50']:.1f} ms, "
            f"p99 {results[label]['wake_ms']['p99']:.1f} ms, "
            f"command relay p50 {results[label]['relay_ms']['p50']:.1f} ms, "
            f"requests/disk {results[label]['requests_per_disk']['mean']:.1f}, {stats.states}"
        )
    return results


async def floor_phase(servers: Servers) -> dict[str, Any]:
    """One AMQP hop (publish with confirm → consumed) and one small commit, measured here."""
    url = servers.vhost()
    hops: list[float] = []
    async with Transport(url, name="bench-floor") as transport:
        await transport.declare_topology()
        queue = f"bench.floor.{uuid.uuid4()}"
        await transport.declare_command_queue(queue)
        arrived: asyncio.Queue[float] = asyncio.Queue()

        async def on(delivery: Delivery) -> None:
            await arrived.put(time.perf_counter())

        await transport.consume(queue, on)
        for _ in range(300):
            sent = time.perf_counter()
            await transport.send_command(
                api.SagaGet(source="cli/bench", payload=api.SagaRef(saga_id=uuid.uuid4())), queue
            )
            hops.append((await arrived.get() - sent) * 1000)
    commits: dict[str, list[float]] = {}
    for kind in ("postgresql", "sqlite"):
        engine = create_engine(await servers.database(kind))
        samples: list[float] = []
        async with engine.connect() as connection:
            await connection.execute(text("CREATE TABLE bench_floor (id INTEGER, at TEXT)"))
            await connection.commit()
            for n in range(300):
                begun = time.perf_counter()
                await connection.execute(
                    text("INSERT INTO bench_floor VALUES (:n, :at)"),
                    {"n": n, "at": str(time.time())},
                )
                await connection.commit()
                samples.append((time.perf_counter() - begun) * 1000)
        await engine.dispose()
        commits[kind] = samples
    floor = percentile(hops, 50) + percentile(commits["postgresql"], 50)
    return {
        "amqp_hop_ms": summary(hops),
        "commit_ms": {kind: summary(samples) for kind, samples in commits.items()},
        "floor_ms": floor,
    }


async def throughput_phase(servers: Servers, scale: Scale, seed: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    configurations = [
        ("postgresql, 1 replica", "postgresql", 1),
        ("postgresql, 2 replicas", "postgresql", 2),
        ("sqlite, 1 replica", "sqlite", 1),
    ]
    # The quick run keeps under 3 minutes: each stack costs seconds to start.
    for label, database, replicas in configurations[1:] if scale.quick else configurations:
        print(f"- throughput {label}: {scale.throughput_disks} disks, no region delay")
        async with stack(
            servers, database=database, replicas=replicas, create_delay="fixed:0", seed=seed
        ) as running:
            watched = _processes(running, servers)
            before = _cpu(watched)
            commits_before = await _commits(running)
            started = time.monotonic()
            sagas = await running.create_disks(scale.throughput_disks, concurrency=64)
            await running.all_finished(sagas, timeout=900)
            elapsed = time.monotonic() - started
            commits = await _commits(running) - commits_before
            # Again, for processes started meanwhile (PostgreSQL backends of new pool
            # connections): their whole CPU time belongs to the run.
            now_running = _processes(running, servers)
            cpu = {name: after - before.get(name, 0.0) for name, after in _cpu(now_running).items()}
            stats = await saga_stats(running, sagas)
        rate = len(sagas) / elapsed
        results[label] = {
            "sagas_per_second": rate,
            # PostgreSQL only (SQLite keeps no count); includes heartbeats/announcements.
            "commits_per_saga": commits / len(sagas) if commits else None,
            "seconds": elapsed,
            "states": stats.states,
            "cpu_seconds_per_saga": {
                name: seconds / len(sagas) for name, seconds in sorted(cpu.items())
            },
            "wake_ms": summary(stats.wakes_ms),
            "relay_ms": summary(stats.relay_ms),
        }
        print(
            f"  {rate:.0f} sagas/s, command relay (parked → agent) p50 "
            f"{results[label]['relay_ms']['p50']:.1f} ms, p99 "
            f"{results[label]['relay_ms']['p99']:.1f} ms, {stats.states}"
        )
    return results


async def half_load_phase(
    servers: Servers, rate: float, seed: int, seconds: float
) -> dict[str, Any]:
    """Open-loop arrivals at half the sustained rate; wake overhead under that load."""
    print(f"- wake overhead at half throughput: {rate:.0f} disks/s for {seconds:.0f} s")
    async with stack(
        servers, database="postgresql", replicas=2, create_delay="fixed:0.05", seed=seed
    ) as running:
        sagas: list[uuid.UUID] = []
        tasks = []
        started = time.monotonic()
        count = max(1, int(rate * seconds))
        for n in range(count):
            delay = started + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(running.create_disks(1)))
        for task in tasks:
            sagas += await task
        await running.all_finished(sagas, timeout=600)
        stats = await saga_stats(running, sagas)
    relay = summary(stats.relay_ms)
    print(f"  command relay (parked → agent) p50 {relay['p50']:.1f} ms, p99 {relay['p99']:.1f} ms")
    return {
        "offered_per_second": rate,
        "wake_ms": summary(stats.wakes_ms),
        "relay_ms": relay,
        "states": stats.states,
    }


async def scale_phase(servers: Servers, scale: Scale, seed: int) -> dict[str, Any]:
    """Park N disk_create sagas at once (every region takes longer than parking them all),
    measure the stack while they wait, then the wake overhead as the regions come in."""
    results: dict[str, Any] = {}
    for parked in (10, scale.parked):
        # 10 park in a second; the big run needs regions slower than parking them all.
        delay_seconds = (
            min(scale.parked_delay_seconds, 120.0) if parked == 10 else (scale.parked_delay_seconds)
        )
        print(f"- scale: {parked} sagas parked at once (region delay {delay_seconds} s)")
        delay = f"fixed:{delay_seconds}"
        # The safety-net deadline beyond the delay: a reconcile query while parked would
        # be a request to an agent, which is what this phase counts.
        deadline = {"NEXUS_REGION_DEADLINE_SECONDS": str(delay_seconds + 900)}
        async with stack(
            servers,
            database="postgresql",
            replicas=2,
            create_delay=delay,
            seed=seed,
            nexus_env=deadline,
        ) as running:
            started = time.monotonic()
            sagas = await running.create_disks(parked, concurrency=64, size_bytes=SCALE_DISK_BYTES)
            created = time.monotonic() - started
            print(f"  {parked} created in {created:.0f} s; waiting for the agents to take them")
            # Quiet means: every ensure command consumed by its agent, no outbox backlog.
            if await _until_agents_took_commands(running, servers) is None:
                raise TimeoutError("the agents did not take the ensure commands in 30 minutes")
            quiet_at = time.monotonic()
            watched = _processes(running, servers)
            before = _cpu_by_process(watched)
            window = 4.0 if parked < 100 else 20.0
            await asyncio.sleep(window)
            idle_cpu = _cpu_delta(watched, before, window)
            memory = {
                name: proc.memory_info().rss / 2**20
                for name, proc in watched.items()
                if name.startswith("nexus") and proc.is_running()
            }
            waiting = await _sagas_waiting(running)
            polls_while_parked = await _reconcile_count(running)
            # The same probe in both runs: one wake at a time, with N parked meanwhile.
            probes = await running.probe_wakes(scale.probes) if scale.probes else []
            waiting_after_probes = await _sagas_waiting(running)
            parked_for = time.monotonic() - quiet_at
            if started + delay_seconds < time.monotonic():
                print("  ! the first regions were ready before the measurement ended")
            await running.all_finished(sagas, timeout=delay_seconds * 2 + 1800)
            stats = await saga_stats(running, sagas)
        ordered = [wake for _, wake in sorted(stats.wakes_at)]
        last = ordered[-max(1, len(ordered) // 10) :]
        results[str(parked)] = {
            "parked": parked,
            "sagas_waiting_at_measurement": waiting,
            "create_seconds": created,
            "measured_seconds": parked_for,
            "nexus_rss_mib": memory,
            "idle_cpu_fraction": idle_cpu,
            "agent_requests_while_parked": polls_while_parked,
            "wake_ms": summary(stats.wakes_ms),
            "wake_last_tenth_ms": summary(last),
            "probe_wake_ms": summary(probes) if probes else None,
            "probe_wakes_ms": probes,
            "sagas_waiting_after_probes": waiting_after_probes,
            "states": stats.states,
        }
        print(
            f"  wake p99 {results[str(parked)]['wake_ms']['p99']:.1f} ms, "
            f"requests while parked {polls_while_parked}, {stats.states}"
        )
    return results


async def polling_scale_phase(servers: Servers, scale: Scale, seed: int) -> dict[str, Any]:
    """The baselines with as many disks waiting as the scale phase parks: the requests
    their polls send to the agents per second, and what answering them costs.

    The regions never become ready during the run (the measurement is of waiting, not
    of waking), so every poll is answered "still requested" or times out. Two windows:
    right after the creates (the agents still taking the ensure commands, as in any
    burst), and once the agents have taken them (the pollers' steady state, what the
    scale phase measures for the parked sagas). The stack is stopped after that without
    waiting for the sagas.
    """
    results: dict[str, Any] = {}
    for label, saga in STRATEGIES.items():
        if saga not in scale.polling_strategies:
            continue  # event-driven: the scale phase (no requests while parked)
        print(f"- polling at scale, {label}: {scale.parked} disks waiting")
        async with stack(
            servers,
            database="postgresql",
            replicas=2,
            create_delay="fixed:86400",
            seed=seed,
            disk_create_saga=saga,
            nexus_env={"NEXUS_SWEEP_SECONDS": "0.05"},
        ) as running:
            first_create = datetime.now(UTC)
            started = time.monotonic()
            sagas = await running.create_disks(
                scale.parked, concurrency=64, size_bytes=SCALE_DISK_BYTES
            )
            created = time.monotonic() - started
            print(f"  {scale.parked} created in {created:.0f} s; measuring their polls")
            windows: dict[str, dict[str, Any]] = {}
            if not scale.quick:
                windows["after_creates"] = await _poll_window(running, servers, scale)
                _print_window("after the creates", windows["after_creates"])
            # The polls in flight stay queued: each replica's sweeper asks up to
            # SWEEP_CONCURRENCY at once.
            caught_up = await _until_agents_took_commands(
                running, servers, backlog_allowed=2 * SWEEP_CONCURRENCY
            )
            if caught_up is None:
                print("  ! the agents did not take the ensure commands within 30 minutes")
            else:
                print(f"  the agents took the ensure commands {caught_up:.0f} s later")
                windows["steady"] = await _poll_window(running, servers, scale)
                _print_window("steady", windows["steady"])
            series = await _polls_series(
                running, first_create, datetime.now(UTC), bucket_seconds=10
            )
        results[label] = {
            "saga": saga,
            "disks": len(sagas),
            "create_seconds": created,
            "agents_caught_up_after_seconds": caught_up,
            # What the strategy asks for if every poll ran on time (fixed interval only).
            "requests_per_second_on_schedule": (
                REPLICAS * len(sagas) / nova_fixed(0).total_seconds()
                if saga == "disk_create_fixed"
                else None
            ),
            **windows,
            "requests_per_second_series": series,
        }
    return results


async def _poll_window(stack_: Stack, servers: Servers, scale: Scale) -> dict[str, Any]:
    """Polls sent to the agents over one window, with the stack's CPU meanwhile."""
    watched = _processes(stack_, servers)
    backlog_before = await _agent_backlog(stack_, servers)
    unsent_before = await _outbox_unsent(stack_)
    before = _cpu_by_process(watched)
    start = datetime.now(UTC)
    await asyncio.sleep(scale.polling_window_seconds)
    end = datetime.now(UTC)
    cpu = _cpu_delta(watched, before, scale.polling_window_seconds)
    backlog_after = await _agent_backlog(stack_, servers)
    unsent_after = await _outbox_unsent(stack_)
    answered, failed = await _polls_between(stack_, start, end)
    seconds = (end - start).total_seconds()
    requests = answered + failed
    return {
        "sagas_waiting": await _sagas_waiting(stack_),
        "region_waits": await _scalar(
            stack_, "SELECT count(*) FROM wait_rendezvous WHERE state = 'parked'"
        ),
        "seconds": seconds,
        "requests_per_second": requests / seconds,
        "answered_per_second": answered / seconds,
        "timed_out_per_second": failed / seconds,
        "agent_backlog": {"start": backlog_before, "end": backlog_after},
        "nexus_outbox_unsent": {"start": unsent_before, "end": unsent_after},
        "cpu_fraction": cpu,
        # What one poll costs the agents (all three together), in CPU milliseconds; only
        # meaningful once polls are all they are doing.
        "agent_cpu_ms_per_request": (
            1000 * cpu.get("crucible", 0.0) * seconds / requests if requests else None
        ),
    }


def _print_window(name: str, window: dict[str, Any]) -> None:
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in sorted(window["cpu_fraction"].items()))
    print(
        f"  {name}: {window['requests_per_second']:.1f} requests/s to agents "
        f"({window['timed_out_per_second']:.1f}/s timed out), {window['region_waits']} "
        f"region waits, agent backlog {window['agent_backlog']['start']} -> "
        f"{window['agent_backlog']['end']}, outbox {window['nexus_outbox_unsent']['start']}"
        f" -> {window['nexus_outbox_unsent']['end']}, CPU {cpu}"
    )


async def _until_agents_took_commands(
    stack_: Stack, servers: Servers, *, backlog_allowed: int = 0
) -> float | None:
    """Seconds until Nexus's outbox is sent and the agents' queues hold no more than
    ``backlog_allowed`` messages, or None after 30 minutes."""
    started = time.monotonic()
    report_at = started + 30
    while time.monotonic() - started < 1800:
        backlog = await _agent_backlog(stack_, servers)
        unsent = await _outbox_unsent(stack_)
        if unsent == 0 and backlog <= backlog_allowed:
            return time.monotonic() - started
        if time.monotonic() >= report_at:
            print(f"  {backlog} messages queued for agents, {unsent} outbox rows unsent")
            report_at = time.monotonic() + 30
        await asyncio.sleep(2)
    return None


async def _outbox_unsent(stack_: Stack) -> int:
    return await _scalar(stack_, "SELECT count(*) FROM outbox WHERE sent_at IS NULL")


async def _polls_between(stack_: Stack, start: datetime, end: datetime) -> tuple[int, int]:
    """(polls answered by an agent, polls that got no answer) logged in [start, end): each
    is one request to an agent (the reconcile query re-sends the ensure)."""
    rows = await _rows(
        stack_,
        "SELECT data->>'rearmed' LIKE 'reconcile query failed%' AS failed, count(*) "
        f"FROM saga_log WHERE {_POLLED} AND at >= :start AND at < :end GROUP BY 1",
        start=start,
        end=end,
    )
    counts = {bool(failed): int(count) for failed, count in rows}
    return counts.get(False, 0), counts.get(True, 0)


async def _polls_series(
    stack_: Stack, start: datetime, end: datetime, bucket_seconds: int
) -> list[tuple[float, float]]:
    """(seconds since ``start``, polls per second) in buckets, from the first create on."""
    rows = await _rows(
        stack_,
        "SELECT floor(extract(epoch FROM at - :start) / :bucket) AS n, count(*) "
        f"FROM saga_log WHERE {_POLLED} AND at >= :start AND at < :end GROUP BY 1 ORDER BY 1",
        start=start,
        end=end,
        bucket=bucket_seconds,
    )
    return [(float(n) * bucket_seconds, int(count) / bucket_seconds) for n, count in rows]


# A poll's log entry: the wait re-armed by its reconcile query, answered or not.
_POLLED = "event = 'waiting' AND data->>'rearmed' IS NOT NULL"


# Scale disks are one extent (64 MiB): 10,000 of them fit the agents' 1 TiB each.
SCALE_DISK_BYTES = 64 << 20


async def _agent_backlog(stack_: Stack, servers: Servers) -> int:
    """Messages on the crucible agents' queues not yet taken (ready + unacknowledged)."""
    vhost = stack_.amqp_url.rsplit("/", 1)[1]
    listing = await asyncio.to_thread(
        servers.rabbitmq.rabbitmqctl,
        "list_queues",
        "-p",
        vhost,
        "--quiet",
        "--no-table-headers",
        "name",
        "messages",
    )
    return sum(
        int(count)
        for name, count in (line.split() for line in listing.splitlines() if line.strip())
        if name.startswith("crucible.")
    )


async def _sagas_waiting(stack_: Stack) -> int:
    return await _scalar(stack_, "SELECT count(*) FROM sagas WHERE state = 'waiting'")


async def _scalar(stack_: Stack, sql: str) -> int:
    rows = await _rows(stack_, sql)
    return int(rows[0][0] or 0) if rows else 0


async def _rows(stack_: Stack, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """One query on a connection of its own, to the stack's database."""
    engine = create_engine(stack_.database_url)
    try:
        async with engine.connect() as connection:
            return [tuple(row) for row in await connection.execute(text(sql), params)]
    finally:
        await engine.dispose()


def _cpu_by_process(processes: dict[str, psutil.Process]) -> dict[str, float]:
    found: dict[str, float] = {}
    for name, process in processes.items():
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        found[name] = times.user + times.system
    return found


def _cpu_delta(
    processes: dict[str, psutil.Process], before: dict[str, float], seconds: float
) -> dict[str, float]:
    """Fraction of a core per group, over processes alive at both ends of the window."""
    after = _cpu_by_process(processes)
    totals: dict[str, float] = {}
    for name, value in after.items():
        if name in before:
            group = _group(name)
            totals[group] = totals.get(group, 0.0) + (value - before[name]) / seconds
    return totals


def _group(name: str) -> str:
    """``nexus-2`` → ``nexus``, ``postgresql#3`` → ``postgresql``."""
    return name.split("#")[0].rstrip("0123456789").rstrip("-")


async def _wake_legs(stack_: Stack, saga_ids: Sequence[uuid.UUID]) -> dict[str, Any]:
    """The region wakes of ``saga_ids`` in two legs, from their rendezvous rows: the
    agent's event to the replica's commit of it, and that commit to the saga's resume."""
    ids = ",".join(f"'{saga_id}'" for saga_id in saga_ids)
    rows = await _rows(
        stack_,
        "SELECT event_occurred_at, event_arrived_at, resumed_at FROM wait_rendezvous "
        f"WHERE saga_id IN ({ids}) AND wait_key LIKE 'region:%' AND resumed_at IS NOT NULL "
        "AND event_arrived_at IS NOT NULL AND event_occurred_at IS NOT NULL",
    )
    queued = [(arrived - occurred).total_seconds() * 1000 for occurred, arrived, _ in rows]
    resumed = [(resumed - arrived).total_seconds() * 1000 for _, arrived, resumed in rows]
    return {
        "event_to_commit": summary(queued) if queued else None,
        "commit_to_resume": summary(resumed) if resumed else None,
    }


async def _commits(stack_: Stack) -> int:
    """Transactions committed in the stack's PostgreSQL database so far (0 on SQLite)."""
    if not stack_.database_url.startswith("postgresql"):
        return 0
    return await _scalar(
        stack_, "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
    )


async def _reconcile_count(stack_: Stack) -> int:
    """Requests the reconcile queries sent to agents: polls, and resumes they found."""
    return await _scalar(
        stack_,
        f"SELECT count(*) FROM saga_log WHERE ({_POLLED}) "
        "OR (event = 'resumed' AND data->>'by_reconcile' = 'true')",
    )


def _processes(stack_: Stack, servers: Servers) -> dict[str, psutil.Process]:
    found = {name: psutil.Process(pid) for name, pid in stack_.pids().items()}
    for name, pids in servers.server_pids().items():
        for n, pid in enumerate(pids):
            found[f"{name}#{n}"] = psutil.Process(pid)
    return found


def _cpu(processes: dict[str, psutil.Process]) -> dict[str, float]:
    """CPU seconds so far per group of processes."""
    totals: dict[str, float] = {}
    for name, seconds in _cpu_by_process(processes).items():
        totals[_group(name)] = totals.get(_group(name), 0.0) + seconds
    return totals


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = results["strategies"]
    figure, axis = plt.subplots(figsize=(8, 4.5))
    labels = list(strategies)
    data = [[max(w, 0.01) for w in strategies[label]["wakes_ms"]] or [0.01] for label in labels]
    axis.boxplot(data, whis=(0, 100))
    axis.set_xticks(range(1, len(labels) + 1), labels)
    axis.set_yscale("log")
    axis.set_ylabel("wake overhead, ms (log scale)")
    axis.set_title("Region ready at its agent → saga resumed (same run, same workload)")
    floor = results["floor"]["floor_ms"]
    axis.axhline(floor, linestyle="--", linewidth=1, color="grey")
    axis.text(0.55, floor * 1.15, f"floor {floor:.1f} ms", color="grey")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# Stale duplicates one agent publishes in the discards phase (issue #12 item 6), and
# over how long the live flood is spread (the issue saw 5,000 in 3 s).
FLOOD = 5_000
FLOOD_SECONDS = 3.0


async def discards_phase(servers: Servers, scale: Scale, seed: int) -> dict[str, Any]:
    """One Nexus replica (PostgreSQL); one agent's FLOOD stale duplicates of a region
    event it owns (half at the recorded generation, half one below), then one newer
    change of the same region: the sentinel. The queue is FIFO with one consumer, so
    once the region's row holds the sentinel's generation the replica has taken every
    duplicate before it (read from PostgreSQL every few ms on one connection: nothing
    else is asked of the broker or the replica while it drains).

    The discard rate: the flood and its sentinel queued while the replica is stopped
    (SIGSTOP); FLOOD over the time from its resume to the sentinel in the row. The wake
    overhead: the flood published again, paced over FLOOD_SECONDS, while other disks
    are created, their regions ready 0.5 s after their ensure; the control, as many
    disks created before, with no flood."""
    print(f"- discards: {FLOOD} stale duplicates from one agent, {scale.discard_disks} disks")
    async with stack(
        servers,
        database="postgresql",
        replicas=1,
        create_delay="fixed:0.5",
        seed=seed,
        nexus_env={"NEXUS_EVENT_PREFETCH": os.environ.get("XP", "32")},
    ) as running:
        created: list[RegionStateChanged] = []

        async def capture(delivery: Delivery) -> None:
            if isinstance(delivery.message, RegionStateChanged):
                created.append(delivery.message)

        # Its own connection, closed once the warm-up disk is done: the flood is not
        # consumed by this process more than the stack's own watcher needs.
        async with Transport(running.amqp_url, name="bench-capture") as capturing:
            await capturing.subscribe(["region.created"], capture)
            warm = await running.create_disks(1)
            await running.all_finished(warm, timeout=120)
        original = created[0]
        region = original.payload.region

        def at_generation(generation: int) -> RegionStateChanged:
            changed = region.model_copy(update={"generation": generation})
            return original.model_copy(
                update={
                    "id": uuid.uuid4(),
                    "payload": original.payload.model_copy(update={"region": changed}),
                }
            )

        # Encoded beforehand and published on several connections at once, so that the
        # broker holds a backlog and the replica, not this publisher, sets the pace.
        flood = [
            (message, encode(message))
            for message in (at_generation(region.generation - n % 2) for n in range(FLOOD))
        ]
        publishers = [Transport(running.amqp_url, name=f"bench-flood-{n}") for n in range(4)]
        for publisher in publishers:
            await publisher.connect()

        async def publish(publisher: Transport, share: Sequence[tuple[Envelope, bytes]]) -> None:
            gate = asyncio.Semaphore(128)

            async def one(message: Envelope, body: bytes) -> None:
                async with gate:
                    await publisher.publish_bytes(
                        body,
                        exchange=EVENTS_EXCHANGE,
                        routing_key=original.routing_key(),
                        message_id=message.id,
                        message_type=message.TYPE,
                        mandatory=False,
                    )

            await asyncio.gather(*(one(message, body) for message, body in share))

        async def publish_flood() -> None:
            await asyncio.gather(
                *(publish(p, flood[n :: len(publishers)]) for n, p in enumerate(publishers))
            )

        async def publish_flood_paced() -> None:
            """The flood at FLOOD_SECONDS' pace (the rate the issue measured), in ticks
            of 0.1 s: the offered load does not depend on how much CPU this process gets."""
            ticks = int(FLOOD_SECONDS / 0.1)
            share = -(-FLOOD // ticks)
            begun = time.monotonic()
            for tick in range(ticks):
                chunk = flood[tick * share : (tick + 1) * share]
                await asyncio.gather(
                    *(publish(p, chunk[n :: len(publishers)]) for n, p in enumerate(publishers))
                )
                await asyncio.sleep(max(0.0, begun + (tick + 1) * 0.1 - time.monotonic()))

        async def publish_sentinel(generation: int) -> None:
            sentinel = at_generation(generation)
            await publishers[0].publish_bytes(
                encode(sentinel),
                exchange=EVENTS_EXCHANGE,
                routing_key=original.routing_key(),
                message_id=sentinel.id,
                message_type=sentinel.TYPE,
                mandatory=False,
            )

        engine = create_engine(running.database_url)
        try:
            async with engine.connect() as watching:

                async def sentinel_seen(generation: int) -> float:
                    """Wait until the region's row holds ``generation``; when, monotonic."""
                    query = text("SELECT generation FROM regions WHERE id = :id")
                    while True:
                        recorded = await watching.scalar(query, {"id": region.id})
                        await watching.rollback()
                        if recorded is not None and recorded >= generation:
                            return time.monotonic()
                        await asyncio.sleep(0.005)

                # The replica's own pace: flood and sentinel queued while it is stopped.
                replica = psutil.Process(
                    next(pid for name, pid in running.pids().items() if name.startswith("nexus"))
                )
                commits_before = await _commits(running)
                replica.suspend()
                try:
                    await publish_flood()
                    await publish_sentinel(region.generation + 1)
                finally:
                    resumed = time.monotonic()
                    replica.resume()
                backlog_drained = await sentinel_seen(region.generation + 1) - resumed
                # Heartbeats and announcements commit too: a few, against thousands.
                commits_during_backlog = await _commits(running) - commits_before - 1

                # The control: as many disks with no flood, in the same stack.
                quiet = await running.create_disks(scale.discard_disks)
                await running.all_finished(quiet, timeout=300)
                quiet_stats = await saga_stats(running, quiet)

                # The wake overhead of other disks while the flood arrives at its pace.
                watched = _processes(running, servers) | {"bench": psutil.Process()}
                cpu_before = _cpu_by_process(watched)
                flood_start = datetime.now(UTC)
                started = time.monotonic()

                async def flood_then_sentinel() -> float:
                    await publish_flood_paced()
                    published = time.monotonic() - started
                    await publish_sentinel(region.generation + 2)
                    return published

                flooding = asyncio.create_task(flood_then_sentinel())
                sagas = await running.create_disks(scale.discard_disks)
                published = await flooding
                drained = await sentinel_seen(region.generation + 2) - started
                flood_end = datetime.now(UTC)
                flood_cpu = _cpu_delta(watched, cpu_before, drained)
        finally:
            await engine.dispose()
        for publisher in publishers:
            await publisher.close()
        await running.all_finished(sagas, timeout=300)
        stats = await saga_stats(running, sagas)
        legs = await _wake_legs(running, sagas)
        quiet_legs = await _wake_legs(running, quiet)
    during = [wake for at, wake in stats.wakes_at if flood_start <= at <= flood_end]
    rate = FLOOD / backlog_drained
    result: dict[str, Any] = {
        "flood": FLOOD,
        "disks": scale.discard_disks,
        "backlog_drain_seconds": backlog_drained,
        "discards_per_second": rate,
        "commits_during_backlog": commits_during_backlog,
        "live_flood_publish_seconds": published,
        "live_flood_drain_seconds": drained,
        "live_flood_per_second": FLOOD / drained,
        "wake_ms": summary(stats.wakes_ms),
        "wake_ms_without_flood": summary(quiet_stats.wakes_ms),
        # The first leg of each wake: the agent's event through the broker.
        "delivered_ms": summary(stats.delivered_ms),
        "delivered_ms_without_flood": summary(quiet_stats.delivered_ms),
        "cores_during_flood": flood_cpu,
        # Each wake's legs by the rendezvous row: the agent's event to the replica's
        # commit of it (the queue), and that commit to the saga's resume.
        "legs_ms": legs,
        "legs_ms_without_flood": quiet_legs,
        "wakes_during_flood": len(during),
        "wake_ms_during_flood": summary(during) if during else None,
        "states": stats.states,
    }
    print(
        f"  {rate:.0f} discards/s (a backlog of {FLOOD} drained in {backlog_drained:.2f} s, "
        f"{commits_during_backlog} other commits meanwhile); "
        f"live flood: published in {published:.2f} s, drained in {drained:.2f} s; "
        f"wake p50 {result['wake_ms']['p50']:.0f} ms, p99 {result['wake_ms']['p99']:.0f} ms "
        f"({len(during)} of {len(stats.wakes_ms)} wakes during the flood; without a flood: "
        f"p50 {result['wake_ms_without_flood']['p50']:.0f} ms, "
        f"p99 {result['wake_ms_without_flood']['p99']:.0f} ms); of which agent → broker → "
        f"a consumer p50 {result['delivered_ms']['p50']:.0f} ms, "
        f"p99 {result['delivered_ms']['p99']:.0f} ms (without a flood: "
        f"{result['delivered_ms_without_flood']['p50']:.0f} / "
        f"{result['delivered_ms_without_flood']['p99']:.0f}); legs {legs} "
        f"(without a flood: {quiet_legs}), {stats.states}; cores used "
        f"during the flood: "
        + ", ".join(f"{group} {cores:.2f}" for group, cores in sorted(flood_cpu.items()))
    )
    return result


PHASES = (
    "floor",
    "strategies",
    "throughput",
    "half_load",
    "scale",
    "polling_scale",
    "discards",
    "load",
    "peers",
    "longpoll",
    "replacement",
)
# The quick run stays under 3 minutes: the load and replacement phases run when asked
# for (--only load, --only replacement). With the replacement phase (~40 s, two stacks)
# --quick took 242 s here.
QUICK_PHASES = tuple(phase for phase in PHASES if phase not in ("load", "replacement"))


async def main(
    scale: Scale,
    out: Path,
    seed: int,
    only: Sequence[str] = PHASES,
    broker_nodes: int = 1,
    profile: Path | None = None,
    ha_db: bool = False,
) -> dict[str, Any]:
    workdir = out / "work"
    print(f"starting a private RabbitMQ {_broker(broker_nodes)} and PostgreSQL cluster")
    rabbitmq = RabbitMQCluster(broker_nodes) if broker_nodes > 1 else RabbitMQNode()
    # Durable commits (fsync on), as in production; the dev stack's cluster skips fsync.
    postgres: PostgresCluster | PatroniCluster = (
        PatroniCluster(3, durable=True) if ha_db else PostgresCluster(durable=True)
    )
    servers = Servers(rabbitmq, postgres, workdir)
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
            "rabbitmq": rabbitmq.version,
            "rabbitmq_nodes": broker_nodes,
            "postgresql": "3 nodes under Patroni (synchronous)" if ha_db else "one server",
            "platform": platform.platform(),
        },
        "configuration": scale.__dict__,
        "seed": seed,
    }
    try:
        if "floor" in only:
            results["floor"] = await floor_phase(servers)
            print(f"- floor: {results['floor']['floor_ms']:.2f} ms (hop + commit, p50)")
        if "strategies" in only:
            results["strategies"] = await strategies_phase(servers, scale, seed)
        if "throughput" in only:
            results["throughput"] = await throughput_phase(servers, scale, seed)
        if "half_load" in only and "throughput" in results:
            half = results["throughput"]["postgresql, 2 replicas"]["sagas_per_second"] / 2
            results["half_load"] = await half_load_phase(
                servers, half, seed, seconds=5 if scale.quick else 30
            )
        if "scale" in only:
            results["scale"] = await scale_phase(servers, scale, seed)
        if "polling_scale" in only:
            results["polling_scale"] = await polling_scale_phase(servers, scale, seed)
        if "discards" in only:
            results["discards"] = await discards_phase(servers, scale, seed)
        if "load" in only:
            results["load"] = await load_phase(servers, scale, seed)
        if "peers" in only:
            # Imported here: bench.peers builds on this module.
            from bench.peers import peers_phase

            results["peers"] = await peers_phase(servers, scale.peers_levels, seed, profile)
        if "longpoll" in only and not scale.quick:
            from bench.longpoll_phase import longpoll_phase

            results["longpoll"] = await longpoll_phase(servers, scale, seed)
        if "replacement" in only:
            from bench.replacement_phase import replacement_phase

            results["replacement"] = await replacement_phase(servers, scale, seed)
    finally:
        rabbitmq.close()
        postgres.close()
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    if "floor" in results and "strategies" in results:
        plot(results, out / "wake.png")
    return results


def _broker(nodes: int) -> str:
    return f"{nodes}-node cluster" if nodes > 1 else "node"


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--broker-nodes",
        type=int,
        default=1,
        help="RabbitMQ nodes: more than 1 is a private cluster (every service given every node)",
    )
    parser.add_argument(
        "--ha-db",
        action="store_true",
        help="PostgreSQL replicated: 3 nodes under Patroni with a synchronous standby, the "
        "services given a multi-host address that finds the primary",
    )
    parser.add_argument("--quick", action="store_true", help="a smaller run, under 3 minutes")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--seed", type=int, default=20261124)
    parser.add_argument(
        "--only",
        action="append",
        choices=PHASES,
        help="run only this phase (repeatable; half_load needs throughput); for profiling",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="peers phase: py-spy records (raw, collapsed stacks) of the Nexus replica at "
        "the highest level and of the DBOS application, into this directory",
    )
    parser.add_argument(
        "--peers-levels",
        help="peers phase: IN_FLIGHT:DISKS,... (default 1:100,8:300,32:500; quick 1:5,8:16,32:32)",
    )
    parser.add_argument("--throughput-disks", type=int, help="disks per throughput configuration")
    parser.add_argument(
        "--replacement-periods",
        help="replacement phase: the Omicron model's task periods START,DRIVER in seconds "
        "(default Omicron's 30,10; --quick 3,1)",
    )
    parser.add_argument(
        "--replacement-disks", type=int, help="replacement phase: regions on the lost sled"
    )
    parser.add_argument("--parked", type=int, help="sagas parked at once in the scale phase")
    parser.add_argument("--parked-delay", type=float, help="region delay (s) of the big scale run")
    args = parser.parse_args(argv)
    (args.out / "work").mkdir(parents=True, exist_ok=True)
    # SIGTERM as Ctrl-C: the stacks and servers are stopped on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    scale = QUICK if args.quick else FULL
    if args.throughput_disks or args.parked or args.parked_delay:
        scale = replace(
            scale,
            throughput_disks=args.throughput_disks or scale.throughput_disks,
            parked=args.parked or scale.parked,
            parked_delay_seconds=args.parked_delay or scale.parked_delay_seconds,
        )
    if args.replacement_periods:
        start, driver = (float(part) for part in args.replacement_periods.split(","))
        scale = replace(scale, replacement_periods=(start, driver))
    if args.replacement_disks:
        scale = replace(
            scale,
            replacement_disks=args.replacement_disks,
            replacement_attached=min(scale.replacement_attached, args.replacement_disks),
        )
    if args.peers_levels:
        levels = tuple(
            (int(in_flight), int(disks))
            for in_flight, disks in (level.split(":") for level in args.peers_levels.split(","))
        )
        scale = replace(scale, peers_levels=levels)
    phases = args.only or (QUICK_PHASES if args.quick else PHASES)
    asyncio.run(
        main(scale, args.out, args.seed, phases, args.broker_nodes, args.profile, args.ha_db)
    )
    print(
        f"wrote {args.out / 'results.json'} and {args.out / 'wake.png'} "
        f"in {time.monotonic() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli())
