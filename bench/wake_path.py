"""Where a wake-up's time goes: agent → Nexus, then Nexus's own part.

    python -m bench.wake_path [--disks 12] [--delay uniform:0.3,1.5]

Starts the real stack (private RabbitMQ and PostgreSQL, 2 Nexus replicas, 3 crucible
agents, 2 sled agents), creates disks one after the other and splits each region's
wake overhead in two, from the rendezvous rows:

- *transit*: the region's ``occurred_at`` at the agent (stamped inside the agent's
  transaction, before its commit) → the Nexus consumer starting to record it: the
  agent's SQLite commit, its outbox relay, the publish with confirm, the delivery;
- *Nexus*: recording it (one PostgreSQL transaction) → the saga's node resumed: the
  commit, the claim, the resume up to its log entry.

Spread region delays keep a disk's three regions from being ready at the same moment
(with a fixed delay they are, and the three wake-ups queue behind each other).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from sqlalchemy import text

from bench.run import Servers, percentile, stack
from nexus.db.engine import create_engine
from nexus.devstack.servers import PostgresCluster, RabbitMQNode


async def measure(disks: int, delay: str) -> tuple[list[float], list[float]]:
    workdir = Path(tempfile.mkdtemp(prefix="wake-path-"))
    servers = Servers(RabbitMQNode(), PostgresCluster(durable=True), workdir)
    try:
        async with stack(
            servers, database="postgresql", replicas=2, create_delay=delay, seed=1
        ) as running:
            for _ in range(disks):
                ids = await running.create_disks(1)
                await running.all_finished(ids, timeout=60)
            engine = create_engine(running.database_url)
            async with engine.connect() as connection:
                rows = (
                    await connection.execute(
                        text(
                            "SELECT extract(epoch FROM event_arrived_at - event_occurred_at)"
                            " * 1000 AS transit,"
                            " extract(epoch FROM resumed_at - event_arrived_at) * 1000 AS nexus"
                            " FROM wait_rendezvous"
                            " WHERE resumed_at IS NOT NULL AND event_occurred_at IS NOT NULL"
                        )
                    )
                ).all()
            await engine.dispose()
    finally:
        servers.rabbitmq.close()
        servers.postgres.close()
    return [float(r.transit) for r in rows], [float(r.nexus) for r in rows]


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--disks", type=int, default=12)
    parser.add_argument("--delay", default="uniform:0.3,1.5")
    args = parser.parse_args(argv)
    transit, nexus = asyncio.run(measure(args.disks, args.delay))
    total = [a + b for a, b in zip(transit, nexus, strict=True)]
    print(f"{len(total)} wake-ups")
    for label, values in (("transit", transit), ("nexus", nexus), ("total", total)):
        print(
            f"{label:8} p50 {percentile(values, 50):6.1f} ms   p99 {percentile(values, 99):6.1f} ms"
            f"   mean {sum(values) / len(values):6.1f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(cli())
