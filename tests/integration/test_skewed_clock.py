"""A replica whose clock is 30 s off decides by the database's clock, not its own.

Real processes: Nexus replicas started under Debian's ``faketime``, PostgreSQL, the
broker, crucible and sled agents. Each test would fail with every replica deciding by
its own clock (issue #13): a replica 30 s ahead adopts a live saga as soon as it is up,
one 30 s behind writes leases the others find expired at once, and heartbeats stamped
by a replica 30 s behind make a live sled look silent to the other.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text

from nexus.db.engine import create_engine
from nexus.db.migrate import upgrade_async
from nexus.db.states import SledState
from schemas.transport import Transport
from tests.integration.sled_fixtures import SledFactory, sled_agents
from tests.processes import ApiClient, Crucible, Service, crucible, nexus

pytestmark = pytest.mark.integration

__all__ = ["sled_agents"]

LEASE = 8.0
SWEEP = 0.2
SETTINGS = {"lease_seconds": str(LEASE), "sweep_seconds": str(SWEEP)}


@pytest.fixture
async def stack(
    vhost_url: str, fresh_postgres_url: str, tmp_path: Path
) -> AsyncIterator[tuple[list[Crucible], ApiClient, str]]:
    await upgrade_async(fresh_postgres_url)
    agents = [crucible(vhost_url, tmp_path, create_delay="fixed:0.2") for _ in range(3)]
    for agent in agents:
        agent.service.start()
    async with Transport(vhost_url, name="test-client") as transport:
        await transport.declare_topology()
        try:
            yield agents, ApiClient(transport), fresh_postgres_url
        finally:
            for agent in agents:
                await agent.service.stop()


async def first_seen(database_url: str, query: str, timeout: float, **values: object) -> float:
    """Seconds until ``query`` first returns a row (the test watches the database)."""
    engine = create_engine(database_url)
    started = time.monotonic()
    try:
        while time.monotonic() - started < timeout:
            async with engine.connect() as connection:
                if (await connection.execute(text(query), values)).first() is not None:
                    return time.monotonic() - started
            await asyncio.sleep(0.05)
        raise TimeoutError(f"not seen within {timeout}s: {query}")
    finally:
        await engine.dispose()


async def saga_of_disk(database_url: str, name: str) -> uuid.UUID:
    """The disk_create saga of the disk named ``name`` (its row commits before the node runs)."""
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            found = await connection.scalar(
                text("SELECT id FROM sagas WHERE name = 'disk_create' AND params->>'name' = :name"),
                {"name": name},
            )
    finally:
        await engine.dispose()
    assert found is not None, f"no disk_create saga for disk {name}"
    return uuid.UUID(str(found))


@pytest.mark.parametrize(
    ("owner_skew", "adopter_skew"),
    [(None, "+30s"), ("-30s", None)],
    ids=["adopter 30 s ahead", "owner 30 s behind"],
)
async def test_a_lease_is_adopted_when_it_expires_by_the_databases_clock(
    stack: tuple[list[Crucible], ApiClient, str],
    vhost_url: str,
    tmp_path: Path,
    owner_skew: str | None,
    adopter_skew: str | None,
) -> None:
    _, client, database_url = stack
    owner = nexus(
        "replica-a",
        database_url=database_url,
        amqp_url=vhost_url,
        workdir=tmp_path,
        crash_in_node="disk_record",
        clock_skew=owner_skew,
        **SETTINGS,
    )
    adopter = nexus(
        "replica-b",
        database_url=database_url,
        amqp_url=vhost_url,
        workdir=tmp_path,
        clock_skew=adopter_skew,
        **SETTINGS,
    )
    owner.start()
    name = f"d-{uuid.uuid4().hex[:8]}"
    # The owner may die in the node before its reply leaves (the saga it spawned can
    # outrun the reply's publish): the saga is found by its disk's name, not the reply.
    create = asyncio.create_task(client.create_disk(name))
    try:
        # The owner fenced the saga (its lease runs LEASE from then) and died in the node.
        assert await owner.wait_exit(timeout=30) == -signal.SIGKILL
        saga_id = await saga_of_disk(database_url, name)
        adopter.start()
        adopted_after = await first_seen(
            database_url,
            "SELECT 1 FROM saga_log WHERE saga_id = :saga AND replica_id = 'replica-b'",
            timeout=LEASE + 20,
            saga=saga_id,
        )
        view = await client.saga_in(saga_id, {"done", "undone", "stuck"}, timeout=60)
    finally:
        create.cancel()
        await adopter.stop()
        await owner.stop()

    assert adopted_after >= LEASE - 1.0, (
        f"adopted {adopted_after:.1f}s after the owner died: its lease ({LEASE}s) was live"
    )
    assert adopted_after <= LEASE + 4.0, f"adopted only after {adopted_after:.1f}s"
    assert view.state == "done", view.error


async def test_heartbeats_judged_by_a_replica_behind_do_not_make_a_live_sled_unreachable(
    vhost_url: str,
    fresh_postgres_url: str,
    tmp_path: Path,
    sled_agents: SledFactory,
) -> None:
    await upgrade_async(fresh_postgres_url)
    settings = {"sled_timeout_seconds": "3", "sweep_seconds": str(SWEEP)}
    replicas: list[Service] = [
        nexus(
            name,
            database_url=fresh_postgres_url,
            amqp_url=vhost_url,
            workdir=tmp_path,
            clock_skew=skew,
            **settings,
        )
        for name, skew in (("replica-a", None), ("replica-b", "-30s"))
    ]
    for replica in replicas:
        replica.start()
    sled = sled_agents(vhost_url, **{"heartbeat-seconds": "0.5"})
    sled.start()
    engine = create_engine(fresh_postgres_url)
    states: list[str] = []
    try:
        await first_seen(
            fresh_postgres_url,
            "SELECT 1 FROM sleds WHERE id = :sled AND state = 'active'",
            timeout=30,
            sled=sled.sled_id,
        )
        watched = time.monotonic()
        # Both replicas take heartbeats from the shared queue; judged over 4 timeouts.
        while time.monotonic() - watched < 12:
            async with engine.connect() as connection:
                state = (
                    await connection.execute(
                        text("SELECT state FROM sleds WHERE id = :sled"), {"sled": sled.sled_id}
                    )
                ).scalar_one()
            states.append(state)
            await asyncio.sleep(0.1)
    finally:
        await engine.dispose()
        for replica in replicas:
            await replica.stop()

    assert all(replica.exits == [0] or replica.exits == [-signal.SIGTERM] for replica in replicas)
    assert SledState.UNREACHABLE.value not in states, (
        f"a live sled was marked unreachable {states.count('unreachable')} times of {len(states)}"
    )
