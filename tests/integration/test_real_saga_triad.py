"""The saga test triad against real processes, for issue #15's sagas.

One rack for the module: a private RabbitMQ virtual host, Nexus's SQLite database, four
crucible agents (each on a sled of its own: three for a disk, one more for a region
replacement to go to) and a sled agent. Only the Nexus replica is restarted between
cases, with the fault flags of ``tests.crashing_nexus`` each case needs; every case
works on a disk or snapshot of its own. ``tests/real_triad.py`` says what each case
checks, ``tests/real_scenarios.py`` what each saga leaves.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import closing

import pytest

from nexus.db.migrate import upgrade_async
from schemas.transport import Transport
from tests.processes import sled
from tests.real_scenarios import SCENARIOS
from tests.real_triad import Prepared, Rack, RealScenario, new_agent, run_case

pytestmark = pytest.mark.integration

AGENTS = 4


@pytest.fixture(scope="module")
async def rack(
    module_vhost_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Rack]:
    started = time.monotonic()
    workdir = tmp_path_factory.mktemp("real-triad")
    database = workdir / "nexus.sqlite3"
    await upgrade_async(f"sqlite+aiosqlite:///{database}")
    agents = [new_agent(module_vhost_url, workdir) for _ in range(AGENTS)]
    the_sled = sled(module_vhost_url, workdir)
    async with Transport(module_vhost_url, name="test: triad") as transport:
        await transport.declare_topology()
        built = Rack(module_vhost_url, database, workdir, transport, agents, the_sled)
        try:
            for agent in agents:
                agent.service.start()
            the_sled.service.start()
            await built.nexus_with(())
            await until_known(built, agents=AGENTS, sleds=1)
            yield built
        finally:
            await built.stop_nexus()
            for service in [agent.service for agent in built.agents] + [the_sled.service]:
                await service.stop()
            print(
                f"\nreal saga triad: {time.monotonic() - started:.1f} s in all, "
                f"{built.restarts} Nexus processes"
            )


@pytest.fixture(scope="module")
def prepared() -> Iterator[Prepared]:
    made = Prepared()
    yield made
    for saga, seconds in made.seconds.items():
        print(f"real saga triad: {saga}: {seconds:.1f} s")


async def until_known(rack: Rack, *, agents: int, sleds: int, timeout: float = 60.0) -> None:
    """Until Nexus has recorded every agent's dataset and the sled as active (each
    announces itself at start; Nexus records it when it consumes the event)."""
    deadline = time.monotonic() + timeout
    while True:
        with closing(sqlite3.connect(rack.database, timeout=30)) as connection:
            datasets = connection.execute("SELECT count(*) FROM datasets").fetchone()[0]
            active = connection.execute(
                "SELECT count(*) FROM sleds WHERE state = 'active'"
            ).fetchone()[0]
        if datasets >= agents and active >= sleds:
            return
        assert rack.nexus is not None and rack.nexus.running, rack.nexus and rack.nexus.log_text()
        assert time.monotonic() < deadline, (
            f"after {timeout}s Nexus knows {datasets} datasets of {agents}, {active} active "
            f"sleds of {sleds}"
        )
        await asyncio.sleep(0.2)


@pytest.mark.parametrize(
    ("scenario", "case"),
    [pytest.param(s, c, id=f"{s.label}-{c}") for s in SCENARIOS for c in s.cases()],
)
async def test_the_triad_on_real_processes(
    rack: Rack, prepared: Prepared, scenario: RealScenario, case: str
) -> None:
    await run_case(rack, prepared, scenario, case)
