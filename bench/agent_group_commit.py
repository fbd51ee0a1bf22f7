"""The crucible agent's group commit alone: its store and service, no broker, no Nexus.

    python -m bench.agent_group_commit [--regions 400] [--in-flight 1,16] [--workers 1]
                                       [--rounds 2]

Runs the agent's :class:`crucible_agent.service.RegionService` on its real SQLite store
(``synchronous=FULL``, in a temporary directory on this machine's disk) with the
trivial backend (no extent files), ``--in-flight`` RegionEnsure handlers at a time
(as the consumer's prefetch delivers them), and the relay's part done by hand (the
outbox read and deleted after each round of handlers). Each configuration is run with
the group commit (as the agent runs) and with every write in a transaction of its own
(``AgentStore.grouped`` replaced by ``alone``: the code before it), alternating, in one
process: wall time and CPU time (this process, all threads) per region until its
region is ``created``, and SQLite commits per region. The machine's other load shows in
the absolute numbers; compare the two modes within a run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import event

from crucible_agent.delay import Fixed
from crucible_agent.files import NoFiles
from crucible_agent.service import Faults, RegionService
from crucible_agent.store import AgentStore, Transaction
from schemas.base import Envelope
from schemas.region import RegionEnsure, RegionSpec, RegionState
from schemas.transport import Delivery

T = TypeVar("T")


class Relay:
    def notify(self) -> None:
        pass


class Replier:
    async def reply(self, delivery: Delivery, message: Envelope) -> None:
        pass

    async def publish_event(self, message: Envelope) -> None:
        pass


async def one_run(
    directory: Path, *, regions: int, in_flight: int, workers: int, grouped: bool
) -> dict[str, float]:
    store = await AgentStore.open(directory / f"agent-{uuid.uuid4().hex[:6]}.sqlite")
    commits = [0]

    def counted(*_: Any) -> None:
        commits[0] += 1

    event.listen(store._engine.sync_engine, "commit", counted)
    if not grouped:

        async def alone(body: Callable[[Transaction], Awaitable[T]]) -> T:
            return await store.alone(body)

        store.grouped = alone  # type: ignore[method-assign]
    service = RegionService(
        agent_id=uuid.uuid4(),
        sled_id=uuid.uuid4(),
        capacity_bytes=1 << 50,
        coalesce_seconds=1.0,
        store=store,
        files=NoFiles(directory / "regions"),
        relay=Relay(),
        replier=Replier(),
        faults=Faults(Fixed(0.0)),
        rng=random.Random(1),
        workers=workers,
    )
    specs = [
        RegionSpec(id=uuid.uuid4(), block_size=512, extent_size=131072, extent_count=16)
        for _ in range(regions)
    ]
    pending = iter(specs)

    async def deliverer() -> None:
        for spec in pending:
            command = RegionEnsure(source="nexus/bench", payload=spec)
            await service.handle(
                Delivery(
                    message=command,
                    queue="crucible.bench",
                    routing_key="",
                    reply_to=None,
                    redelivered=False,
                )
            )

    async def relay() -> None:
        # The relay's part: read what is unsent and delete it once "confirmed".
        while True:
            rows = await store.unsent(100)
            if rows:
                await store.mark_sent([row.message_id for row in rows])
            else:
                await asyncio.sleep(0.005)

    relaying = asyncio.create_task(relay())
    commits[0] = 0
    wall, cpu = time.monotonic(), time.process_time()
    await asyncio.gather(*(deliverer() for _ in range(in_flight)))
    while True:
        await service.wait_idle()
        held = await store.regions()
        if sum(r.state is RegionState.CREATED for r in held) == regions:
            break
        await asyncio.sleep(0.01)
    wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    relaying.cancel()
    await asyncio.gather(relaying, return_exceptions=True)
    await service.stop()
    await store.close()
    return {
        "wall_ms": 1000 * wall / regions,
        "cpu_ms": 1000 * cpu / regions,
        "commits": commits[0] / regions,
    }


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for in_flight in args.in_flight:
            for round_ in range(args.rounds):
                for grouped in (False, True):
                    result = await one_run(
                        Path(directory),
                        regions=args.regions,
                        in_flight=in_flight,
                        workers=args.workers,
                        grouped=grouped,
                    )
                    print(
                        f"in flight {in_flight:3d}, workers {args.workers:2d}, round {round_ + 1}, "
                        f"{'grouped' if grouped else 'alone  '}: "
                        f"{result['wall_ms']:6.2f} ms wall/region, "
                        f"{result['cpu_ms']:6.2f} ms CPU/region, "
                        f"{result['commits']:5.2f} commits/region",
                        flush=True,
                    )


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--regions", type=int, default=400)
    parser.add_argument(
        "--in-flight", type=lambda s: [int(n) for n in s.split(",")], default=[1, 16]
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="where the databases go")
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
