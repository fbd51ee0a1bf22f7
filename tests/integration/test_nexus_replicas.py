"""Nexus replicas as real processes on PostgreSQL and RabbitMQ, with real crucible agents.

A saga is resumed by whichever replica consumes its event; a replica SIGKILLed inside
any node leaves a lease that expires, and another replica finishes the saga.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nexus.db.migrate import upgrade_async
from nexus.sagas import disk_create
from schemas.region import RegionStateChanged
from schemas.topology import EVENTS_EXCHANGE
from schemas.transport import Delivery, Transport
from tests.integration.test_skewed_clock import saga_of_disk
from tests.processes import BIN, ApiClient, Crucible, Service, crucible, nexus

pytestmark = pytest.mark.integration

# Short leases and sweeps so that adoption after a crash takes seconds.
FAST = {"lease_seconds": "1.5", "sweep_seconds": "0.2"}


class RegionEvents:
    """Every region notification the agents publish, seen from a queue of the test's own."""

    def __init__(self) -> None:
        self.by_region: dict[uuid.UUID, list[RegionStateChanged]] = defaultdict(list)

    async def on(self, delivery: Delivery) -> None:
        if isinstance(delivery.message, RegionStateChanged):
            self.by_region[delivery.message.payload.region.id].append(delivery.message)


@pytest.fixture
async def stack(
    vhost_url: str, fresh_postgres_url: str, tmp_path: Path
) -> AsyncIterator[tuple[list[Crucible], ApiClient, RegionEvents, Path, str]]:
    await upgrade_async(fresh_postgres_url)
    agents = [crucible(vhost_url, tmp_path, create_delay="fixed:0.5") for _ in range(3)]
    for agent in agents:
        agent.service.start()
    events = RegionEvents()
    async with Transport(vhost_url, name="test-observer") as transport:
        await transport.declare_topology()
        queue = f"test.regions.{uuid.uuid4()}"
        await transport.declare_queue(queue, [(EVENTS_EXCHANGE, "region.*")])
        await transport.consume(queue, events.on)
        try:
            yield agents, ApiClient(transport), events, tmp_path, fresh_postgres_url
        finally:
            for agent in agents:
                await agent.service.stop()


def replica(name: str, stack_dir: Path, database_url: str, amqp_url: str, **extra: str) -> Service:
    return nexus(
        name, database_url=database_url, amqp_url=amqp_url, workdir=stack_dir, **FAST, **extra
    )


async def test_a_saga_started_on_one_replica_finishes_on_the_one_that_consumed_its_events(
    stack: tuple[list[Crucible], ApiClient, RegionEvents, Path, str], vhost_url: str
) -> None:
    _, client, _, workdir, database_url = stack
    a = replica("replica-a", workdir, database_url, vhost_url)
    b = replica("replica-b", workdir, database_url, vhost_url)
    a.start()
    try:
        accepted = await client.create_disk(f"d-{uuid.uuid4().hex[:8]}")
        await client.saga_in(accepted.saga_id, {"waiting"})
        # A stops consuming; the regions' notifications wait in nexus.events for B.
        assert await a.stop(signal.SIGTERM) == 0
        b.start()
        view = await client.saga_in(accepted.saga_id, {"done"})
        shown = await asyncio.create_subprocess_exec(
            str(BIN / "nexusctl"),
            "saga",
            "show",
            str(accepted.saga_id),
            "--amqp-url",
            vhost_url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        timeline = (await shown.communicate())[0].decode()
    finally:
        await a.stop()
        await b.stop()

    assert shown.returncode == 0, timeline
    assert "replica-a" in timeline and "replica-b" in timeline, timeline

    by_node = {(entry.node, entry.event): entry.replica for entry in view.log}
    assert by_node[("ids", "succeeded")] == "replica-a"
    for index in range(3):
        assert by_node[(f"region_{index}", "waiting")] == "replica-a"
        assert by_node[(f"region_{index}", "resumed")] == "replica-b"
    assert by_node[("disk_finalize", "succeeded")] == "replica-b"
    assert {entry.replica for entry in view.log} == {"replica-a", "replica-b"}


@pytest.mark.parametrize("crash_node", disk_create.DEFINITION.node_names)
async def test_a_replica_killed_inside_any_node_is_replaced_and_effects_happen_once(
    stack: tuple[list[Crucible], ApiClient, RegionEvents, Path, str],
    vhost_url: str,
    crash_node: str,
) -> None:
    agents, client, events, workdir, database_url = stack
    a = replica("replica-a", workdir, database_url, vhost_url, crash_in_node=crash_node)
    b = replica("replica-b", workdir, database_url, vhost_url)
    a.start()
    try:
        name = f"d-{uuid.uuid4().hex[:8]}"
        # A dies in its node, possibly before its reply leaves (the saga it spawned can
        # outrun the reply's publish): the saga is found by its disk's name.
        create = asyncio.create_task(client.create_disk(name))
        try:
            assert await a.wait_exit(timeout=30) == -signal.SIGKILL
            saga_id = await saga_of_disk(database_url, name)
        finally:
            create.cancel()
        b.start()
        view = await client.saga_in(saga_id, {"done", "undone", "stuck"}, timeout=60)
    finally:
        await a.stop()
        await b.stop()

    assert view.state == "done", view.error
    replicas = {entry.replica for entry in view.log}
    assert "replica-b" in replicas
    assert not [e for e in view.log if e.node == crash_node and e.replica == "replica-a"], (
        "the node A died in left no trace: its transaction rolled back"
    )
    region_ids = {
        uuid.UUID(e.detail.split("region:")[1].split(":")[0])
        for e in view.log
        if e.event == "resumed" and e.detail
    }
    assert len(region_ids) == 3
    for region_id in region_ids:
        published = events.by_region[region_id]
        generations = sorted({(e.payload.region.generation, e.id) for e in published})
        assert [g for g, _ in generations] == [1, 2], (
            f"region {region_id}: one effect per generation, got {generations}"
        )
    files = [
        path
        for agent in agents
        for path in (workdir / f"crucible-{agent.agent_id}" / "regions").glob("*")
        if path.is_dir() and uuid.UUID(path.name) in region_ids
    ]
    assert len(files) == 3, "one set of region files per region"
