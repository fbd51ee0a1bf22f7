"""The peer engine of the ``peers`` phase: disk_create's shape as a DBOS Transact workflow.

    python -m bench.dbos_peer migrate --database URL
    python -m bench.dbos_peer agent --database URL --amqp URL --queue crucible.<id>
    python -m bench.dbos_peer app --database URL --amqp URL --queues Q1,Q2,Q3 \\
        --levels 1:100,8:200,32:300 --out result.json

DBOS Transact (package ``dbos``) keeps workflows in PostgreSQL; ``DBOS.recv`` waits for
a message that another process sends with ``DBOSClient.send``, woken by LISTEN/NOTIFY.
It is the strongest Python peer for "a durable workflow waits for an external event and
resumes" (issue #19), so the benchmark runs the same saga shape on it, against the same
PostgreSQL server (a database of its own) and RabbitMQ node as this project's engine:

- ``disk_create`` (a workflow): ``record`` (a step: the disk's row), ``place`` (a step:
  three agents, the regions' rows), then for each region, concurrently as this
  project's region stage: ``DBOS.recv_async`` on the region's topic, started before
  ``ensure`` (a step: the command, published to the agent's queue on the same broker)
  as a saga parks before its commands leave; then
  ``finalize`` (a step: the disk and its regions ``created``). Its steps write the
  application's rows with their own transactions, as DBOS steps do; DBOS records each
  step's outcome in its system tables.
- ``agent``: a trivial agent, one process per queue: it answers each command at once
  with ``DBOSClient.send`` (a transaction in DBOS's system database and a NOTIFY). It
  keeps no state of its own, unlike this project's trivial crucible agent (which
  records the region and its event in SQLite and publishes through an outbox).
- ``app``: the DBOS application (the peer of a Nexus replica) and the load: at each
  level, ``in_flight`` workflows at a time (closed loop: one starts when one ends),
  ``count`` in all. It writes throughput and wake overhead per level as JSON.

**Wake overhead** = the moment the workflow's ``recv`` returned minus the moment the
agent was about to call ``DBOSClient.send`` (both ``time.time()`` on this machine,
carried in the message): the agent's durable write, the NOTIFY, DBOS's listener
thread, the wait's wake-up and DBOS's recording of the consumed message. This
project's is the agent's event's ``occurred_at`` (stamped in the agent's transaction)
→ the saga's ``resumed`` log entry. Only ``recv`` calls that were waiting when the
message was sent count; a message already there is no wake-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbos import DBOS, DBOSClient, DBOSConfig, SetWorkflowID
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from schemas.region import RegionEnsure, RegionSpec
from schemas.transport import Delivery, Transport

SOURCE = "nexus/bench-dbos"
# What disk_create asks for a disk of one 64 MiB extent (the peers phase's disks).
BLOCK_SIZE, EXTENT_SIZE = 512, 131072
RECV_TIMEOUT_SECONDS = 120.0


def dbos_url(url: str) -> str:
    """DBOS's URL for a database (``postgresql://``, its own driver) from ours."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def app_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+asyncpg://", 1)


def configure(database: str) -> None:
    config: DBOSConfig = {
        "name": "bench-peer",
        "system_database_url": dbos_url(database),
        "log_level": "WARNING",
        # Its threads' pool: at least the workflows in flight (each recv is a thread
        # while it reads or consumes).
        "sys_db_pool_size": 40,
    }
    DBOS(config=config)


# The application: its tables, steps and workflow.

SCHEMA = """
CREATE TABLE IF NOT EXISTS bench_agents (queue TEXT PRIMARY KEY, free_bytes BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS bench_disks (
    id UUID PRIMARY KEY, name TEXT NOT NULL, size_bytes BIGINT NOT NULL, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS bench_regions (
    id UUID PRIMARY KEY, disk_id UUID NOT NULL, queue TEXT NOT NULL, state TEXT NOT NULL);
"""


@dataclass
class App:
    engine: AsyncEngine
    transport: Transport
    # (level, wake in ms) of every recv that was waiting when its message was sent.
    wakes: list[float] = field(default_factory=list)


_app: App | None = None


def app() -> App:
    assert _app is not None, "the DBOS peer's application is not set up"
    return _app


@DBOS.step()
async def record(disk_id: str, name: str, size_bytes: int) -> None:
    async with app().engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO bench_disks (id, name, size_bytes, state) "
                "VALUES (:id, :name, :size, 'creating') ON CONFLICT (id) DO NOTHING"
            ),
            {"id": disk_id, "name": name, "size": size_bytes},
        )


@DBOS.step()
async def place(disk_id: str) -> list[tuple[str, str]]:
    """Three agents, most free space first, and a region on each: (queue, region id)."""
    async with app().engine.begin() as connection:
        queues = [
            row[0]
            for row in await connection.execute(
                text("SELECT queue FROM bench_agents ORDER BY free_bytes DESC, queue LIMIT 3")
            )
        ]
        placed = [(queue, str(uuid.uuid4())) for queue in queues]
        await connection.execute(
            text(
                "INSERT INTO bench_regions (id, disk_id, queue, state) "
                "VALUES (:id, :disk, :queue, 'requested')"
            ),
            [{"id": region, "disk": disk_id, "queue": queue} for queue, region in placed],
        )
    return placed


@DBOS.step()
async def ensure(queue: str, region_id: str, workflow_id: str, extent_count: int) -> None:
    spec = RegionSpec(
        id=uuid.UUID(region_id),
        block_size=BLOCK_SIZE,
        extent_size=EXTENT_SIZE,
        extent_count=extent_count,
        encrypted=True,
    )
    command = RegionEnsure(source=SOURCE, payload=spec, correlation_id=uuid.UUID(workflow_id))
    await app().transport.send_command(command, queue)


@DBOS.step()
async def finalize(disk_id: str) -> None:
    async with app().engine.begin() as connection:
        await connection.execute(
            text("UPDATE bench_regions SET state = 'created' WHERE disk_id = :id"), {"id": disk_id}
        )
        await connection.execute(
            text("UPDATE bench_disks SET state = 'created' WHERE id = :id"), {"id": disk_id}
        )


async def wait_for(region_id: str) -> None:
    """One region's recv, parked before its command is sent, as a saga parks its region
    nodes in the step that sends their commands."""
    waiting_since = time.time()
    message = await DBOS.recv_async(topic=region_id, timeout_seconds=RECV_TIMEOUT_SECONDS)
    resumed = time.time()
    if message is None:
        raise RuntimeError(f"region {region_id}: no answer in {RECV_TIMEOUT_SECONDS} s")
    sent_at = float(message["sent_at"])
    if sent_at >= waiting_since:
        app().wakes.append((resumed - sent_at) * 1000)


@DBOS.workflow()
async def disk_create(disk_id: str, name: str, size_bytes: int) -> str:
    await record(disk_id, name, size_bytes)
    placed = await place(disk_id)
    workflow_id = DBOS.workflow_id
    assert workflow_id is not None

    async def send_ensures() -> None:
        for queue, region_id in placed:
            extents = max(1, size_bytes // (BLOCK_SIZE * EXTENT_SIZE))
            await ensure(queue, region_id, workflow_id, extents)

    # The three waits start first (their step ids in order), then the commands go out.
    await asyncio.gather(*(wait_for(region_id) for _, region_id in placed), send_ensures())
    await finalize(disk_id)
    return disk_id


# The load.


async def run_level(in_flight: int, count: int, disk_bytes: int) -> dict[str, Any]:
    """``count`` workflows, ``in_flight`` at a time; throughput and wake overhead."""
    started_wakes = len(app().wakes)
    remaining = iter(range(count))

    async def worker() -> None:
        for _ in remaining:
            workflow = uuid.uuid4()
            with SetWorkflowID(str(workflow)):
                handle = await DBOS.start_workflow_async(
                    disk_create, str(uuid.uuid4()), f"d-{workflow.hex[:10]}", disk_bytes
                )
            await handle.get_result()

    commits = await _commits()
    began, cpu = time.monotonic(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.monotonic() - began
    cpu = time.process_time() - cpu
    return {
        # Both databases' (DBOS's system tables and the application's are one database).
        "commits": await _commits() - commits,
        "app_cpu_seconds": cpu,
        "in_flight": in_flight,
        "workflows": count,
        "seconds": elapsed,
        "per_second": count / elapsed,
        "wakes_ms": app().wakes[started_wakes:],
    }


async def _commits() -> int:
    """Transactions committed in this database so far (the statistics lag up to a
    second behind: a level's count is read after a pause)."""
    await asyncio.sleep(1.0)
    async with app().engine.connect() as connection:
        count = await connection.scalar(
            text("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        )
    return int(count or 0)


async def run_app(args: argparse.Namespace) -> dict[str, Any]:
    global _app
    engine = create_async_engine(app_url(args.database), pool_size=40)
    transport = Transport(args.amqp, name="bench-dbos-app")
    await transport.connect()
    await transport.declare_topology()
    queues = args.queues.split(",")
    for queue in queues:
        await transport.declare_command_queue(queue)
    async with engine.begin() as connection:
        for statement in SCHEMA.strip().split(";\n"):
            await connection.execute(text(statement))
        await connection.execute(
            text("INSERT INTO bench_agents VALUES (:queue, :free) ON CONFLICT DO NOTHING"),
            [{"queue": queue, "free": 1 << 40} for queue in queues],
        )
    _app = App(engine, transport)
    configure(args.database)
    DBOS.launch()
    try:
        # Warm-up: connections, the listener, the first statements of each kind.
        await run_level(4, args.warmup, args.disk_bytes)
        levels = []
        for level in args.levels.split(","):
            in_flight, count = (int(part) for part in level.split(":"))
            levels.append(await run_level(in_flight, count, args.disk_bytes))
        return {"dbos_version": _dbos_version(), "levels": levels}
    finally:
        DBOS.destroy()
        await transport.close()
        await engine.dispose()


def _dbos_version() -> str:
    from importlib.metadata import version

    return version("dbos")


# The trivial agent.


async def run_agent(args: argparse.Namespace) -> None:
    client = DBOSClient(system_database_url=dbos_url(args.database))
    transport = Transport(args.amqp, name=f"bench-dbos-agent/{args.queue}")
    await transport.connect()
    await transport.ensure_topology(args.queue)
    stop = asyncio.Event()

    async def on_command(delivery: Delivery) -> None:
        command = delivery.message
        assert isinstance(command, RegionEnsure) and command.correlation_id is not None
        region_id = str(command.payload.id)
        message = {"region_id": region_id, "state": "created", "sent_at": time.time()}
        await asyncio.to_thread(client.send, str(command.correlation_id), message, region_id)

    await transport.consume(args.queue, on_command, prefetch=64)
    print("ready", flush=True)
    try:
        await stop.wait()
    finally:
        await transport.close()
        client.destroy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dbos_peer")
    commands = parser.add_subparsers(dest="command", required=True)
    migrate = commands.add_parser("migrate", help="create DBOS's system tables, then exit")
    migrate.add_argument("--database", required=True)
    agent = commands.add_parser("agent", help="a trivial agent replying with DBOSClient.send")
    agent.add_argument("--database", required=True)
    agent.add_argument("--amqp", required=True)
    agent.add_argument("--queue", required=True)
    load = commands.add_parser("app", help="the DBOS application and its load")
    load.add_argument("--database", required=True)
    load.add_argument("--amqp", required=True)
    load.add_argument("--queues", required=True, help="the agents' queues, comma-separated")
    load.add_argument("--levels", default="1:50,8:100,32:200", help="IN_FLIGHT:COUNT,...")
    load.add_argument("--warmup", type=int, default=8)
    load.add_argument("--disk-bytes", type=int, default=64 << 20)
    load.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "migrate":
        configure(args.database)
        DBOS.launch()
        DBOS.destroy()
    elif args.command == "agent":
        # SIGINT ends an agent; SIGTERM too (the phase's way), by default.
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_agent(args))
    else:
        result = asyncio.run(run_app(args))
        args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
