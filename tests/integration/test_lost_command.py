"""A command that never reached its agent is sent again at the deadline (real processes).

A Nexus replica and three crucible agents run as processes. One agent is stopped, a
disk is created, and the region ensure waiting in that agent's queue is purged before
the agent starts again: it never hears of the region. At the region deadline Nexus
asks it once, hears "unknown", and sends the (idempotent) ensure again under a new id;
the agent creates the region and the disk is done. Before issue #13 the reconcile took
"unknown" as a failure and the disk create was undone.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from nexus.db.engine import create_engine
from nexus.db.migrate import upgrade_async
from schemas.topology import crucible_queue
from schemas.transport import Transport
from tests.processes import ApiClient, Crucible, crucible, nexus

pytestmark = pytest.mark.integration

REGION_DEADLINE = 3.0
LEASE = 4.0


@pytest.fixture
async def rack(
    vhost_url: str, fresh_postgres_url: str, tmp_path: Path
) -> AsyncIterator[tuple[list[Crucible], ApiClient, Transport, str]]:
    await upgrade_async(fresh_postgres_url)
    agents = [crucible(vhost_url, tmp_path, create_delay="fixed:0.2") for _ in range(3)]
    replica = nexus(
        "replica-a",
        database_url=fresh_postgres_url,
        amqp_url=vhost_url,
        workdir=tmp_path,
        lease_seconds=str(LEASE),
        sweep_seconds="0.2",
        region_deadline_seconds=str(REGION_DEADLINE),
    )
    for agent in agents:
        agent.service.start()
    replica.start()
    try:
        async with Transport(vhost_url, name="test-client") as transport:
            await transport.declare_topology()
            yield agents, ApiClient(transport), transport, fresh_postgres_url
    finally:
        await replica.stop()
        for agent in agents:
            await agent.service.stop()


async def test_an_ensure_that_never_reached_its_agent_is_sent_again_and_the_disk_completes(
    rack: tuple[list[Crucible], ApiClient, Transport, str],
) -> None:
    agents, client, transport, database_url = rack
    deaf = agents[0]
    engine = create_engine(database_url)
    try:
        await _until(engine, "SELECT count(*) = 3 FROM datasets")
        await deaf.service.stop()
        accepted = await client.create_disk(f"d-{uuid.uuid4().hex[:8]}")
        queue = await transport.channel.get_queue(crucible_queue(deaf.agent_id), ensure=False)
        # Wait until Nexus has sent the ensure to the stopped agent's queue, then lose it.
        started = time.monotonic()
        while (await queue.declare()).message_count == 0:
            assert time.monotonic() - started < 20, "no ensure reached the stopped agent"
            await asyncio.sleep(0.05)
        purged_at = time.monotonic()
        await queue.purge()
        deaf.service.start()

        view = await client.saga_in(accepted.saga_id, {"done", "undone", "stuck"}, timeout=60)
        finished_after = time.monotonic() - purged_at
        async with engine.connect() as connection:
            resent = (
                await connection.execute(
                    text(
                        "SELECT count(*) FROM saga_log WHERE saga_id = :saga "
                        "AND event = 'waiting' AND CAST(data AS TEXT) LIKE '%resent%'"
                    ),
                    {"saga": accepted.saga_id},
                )
            ).scalar_one()
            at_deaf = (
                await connection.execute(
                    text(
                        "SELECT count(*) FROM regions WHERE disk_id = :disk "
                        "AND dataset_id = :agent AND state = 'created'"
                    ),
                    {"disk": accepted.resource_id, "agent": deaf.agent_id},
                )
            ).scalar_one()
    finally:
        await engine.dispose()

    assert view.state == "done", view.error
    assert resent == 1, "the lost ensure was sent again, once"
    # The deadline, one reconcile (bounded by half the lease), the create, and a sweep.
    assert finished_after < REGION_DEADLINE + LEASE / 2 + 5, f"done {finished_after:.1f}s later"
    assert at_deaf == 1, "the agent that lost the command holds its region"


async def _until(engine: AsyncEngine, query: str, timeout: float = 30.0) -> None:
    started = time.monotonic()
    while True:
        async with engine.connect() as connection:
            if (await connection.execute(text(query))).scalar_one():
                return
        assert time.monotonic() - started < timeout, f"not true within {timeout}s: {query}"
        await asyncio.sleep(0.1)
