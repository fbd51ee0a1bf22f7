"""Region waits with real processes: an unwind's lost delete is sent again until the
region is destroyed, and a region slower than three deadlines still completes its disk.

A Nexus replica and three crucible agents run as processes, with short deadlines.

- One agent fails every create, so the disk create unwinds. Another agent is stopped
  once its region is created, and the delete the unwind sends it is purged from its
  queue before it starts again. At the delete deadline Nexus asks it, hears "created",
  and sends the delete again; the agent destroys the region, the saga ends ``undone``,
  no region row is left, and the doctor finds nothing (no orphan at any agent).
- Every agent takes longer than three region deadlines to create. At each deadline
  Nexus asks, hears "requested", and re-arms; ``nexusctl saga show`` shows since when
  the node waits and how many reconciles it made; the disk completes.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from nexus.db.engine import create_engine
from nexus.db.migrate import upgrade_async
from schemas import api
from schemas.topology import crucible_queue
from schemas.transport import Transport
from tests.processes import BIN, ApiClient, Crucible, Service, crucible, nexus

pytestmark = pytest.mark.integration

DEADLINE = 1.5
LEASE = 4.0

Rack = tuple[list[Crucible], ApiClient, Transport, str]


async def _rack(
    vhost_url: str,
    database_url: str,
    tmp_path: Path,
    agents_do: list[tuple[str, str]],
    **more: str,
) -> AsyncIterator[Rack]:
    """A replica and one agent per (create delay, fail fraction), each with ``more``
    settings (the n-th agent's ``seed`` is ``more["seed"]`` plus n)."""
    await upgrade_async(database_url)
    agents = [
        crucible(
            vhost_url,
            tmp_path,
            create_delay=delay,
            fail_fraction=fail,
            # Any: mypy cannot tell these str settings from the agent_id keyword.
            **cast(
                dict[str, Any],
                more | ({"seed": str(int(more["seed"]) + n)} if "seed" in more else {}),
            ),
        )
        for n, (delay, fail) in enumerate(agents_do)
    ]
    replica: Service = nexus(
        "replica-a",
        database_url=database_url,
        amqp_url=vhost_url,
        workdir=tmp_path,
        lease_seconds=str(LEASE),
        sweep_seconds="0.2",
        region_deadline_seconds=str(DEADLINE),
        delete_deadline_seconds=str(DEADLINE),
    )
    for agent in agents:
        agent.service.start()
    replica.start()
    try:
        async with Transport(vhost_url, name="test-client") as transport:
            await transport.declare_topology()
            yield agents, ApiClient(transport), transport, database_url
    finally:
        await replica.stop()
        for agent in agents:
            await agent.service.stop()


@pytest.fixture
async def failing_rack(
    vhost_url: str, fresh_postgres_url: str, tmp_path: Path
) -> AsyncIterator[Rack]:
    """The first agent fails every create after 2 s; the others create in 0.2 s."""
    settings = [("fixed:2.0", "1.0")] + [("fixed:0.2", "0.0")] * 2
    async for rack in _rack(vhost_url, fresh_postgres_url, tmp_path, settings):
        yield rack


@pytest.fixture
async def slow_rack(vhost_url: str, fresh_postgres_url: str, tmp_path: Path) -> AsyncIterator[Rack]:
    """Every agent takes longer than three region deadlines to create a region."""
    settings = [(f"fixed:{3 * DEADLINE + 2.5}", "0.0")] * 3
    async for rack in _rack(vhost_url, fresh_postgres_url, tmp_path, settings):
        yield rack


@pytest.fixture
async def destroy_failing_rack(
    vhost_url: str, fresh_postgres_url: str, tmp_path: Path
) -> AsyncIterator[Rack]:
    """Every agent's destroys fail half the time (seeded draws: the same every run)."""
    settings = [("fixed:0.2", "0.0")] * 3
    async for rack in _rack(
        vhost_url,
        fresh_postgres_url,
        tmp_path,
        settings,
        destroy_fail_fraction="0.5",
        seed="7",
    ):
        yield rack


async def test_a_failed_destroy_is_sent_again_until_the_agent_destroys_the_region(
    destroy_failing_rack: Rack, vhost_url: str
) -> None:
    """Real agents whose destroys fail (recorded ``failed``, as the real agent does):
    disk_delete sends each failed delete again until the agent says ``destroyed``; the
    disk is deleted, every region is recorded destroyed, and the doctor finds no orphan."""
    _, client, _, database_url = destroy_failing_rack
    engine = create_engine(database_url)
    try:
        await _until(engine, "SELECT count(*) = 3 FROM datasets")
        name = f"d-{uuid.uuid4().hex[:8]}"
        created = await client.create_disk(name)
        assert (await client.saga_in(created.saga_id, {"done", "undone", "stuck"})).state == "done"
        reply = await client.request(
            api.DiskDelete(
                source="cli/test", payload=api.ResourceRef(project="test", resource=name)
            )
        )
        assert isinstance(reply, api.AcceptedReply), reply
        deleted = await client.saga_in(
            reply.payload.saga_id, {"done", "undone", "stuck"}, timeout=90
        )
        async with engine.connect() as connection:
            # Woken by a failed destroy, then waiting again on a delete sent again.
            failed_destroys = await _scalar(
                connection,
                "SELECT count(*) FROM saga_log WHERE saga_id = :saga AND event = 'resumed' "
                "AND CAST(data AS TEXT) LIKE :woken_by_failed",
                saga=reply.payload.saga_id,
                woken_by_failed='%:failed"%',
            )
            # disk_delete keeps its regions' rows, as history, once destroyed.
            live = await _scalar(
                connection,
                "SELECT count(*) FROM regions WHERE disk_id = :disk AND state != 'destroyed'",
                disk=created.resource_id,
            )
        doctor = await client.request(
            api.Doctor(source="cli/test", payload=api.DoctorRequest(timeout_seconds=10.0)),
            timeout=30,
        )
    finally:
        await engine.dispose()

    assert deleted.state == "done", deleted.error
    assert failed_destroys >= 1, "no destroy failed: the seeds no longer draw a failure"
    assert live == 0
    assert isinstance(doctor, api.DoctorReply), doctor
    assert not doctor.payload.findings, doctor
    assert await _nexusctl_doctor(vhost_url) == 0


async def test_a_delete_lost_during_an_unwind_is_sent_again_until_destroyed(
    failing_rack: Rack, vhost_url: str
) -> None:
    agents, client, transport, database_url = failing_rack
    deaf = agents[1]
    engine = create_engine(database_url)
    try:
        await _until(engine, "SELECT count(*) = 3 FROM datasets")
        accepted = await client.create_disk(f"d-{uuid.uuid4().hex[:8]}")
        # Once the deaf agent's region is created, stop it: the unwind's delete waits in
        # its queue, and is lost there.
        created_at_deaf = (
            "SELECT count(*) = 1 FROM regions WHERE dataset_id = "
            f"'{deaf.agent_id}' AND state = 'created'"
        )
        await _until(engine, created_at_deaf)
        await deaf.service.stop()
        queue = await transport.channel.get_queue(crucible_queue(deaf.agent_id), ensure=False)
        started = time.monotonic()
        while (await queue.declare()).message_count == 0:
            assert time.monotonic() - started < 30, "no delete reached the stopped agent"
            await asyncio.sleep(0.05)
        await queue.purge()
        waiting = await client.saga(accepted.saga_id)
        deaf.service.start()

        view = await client.saga_in(accepted.saga_id, {"done", "undone", "stuck"}, timeout=90)
        async with engine.connect() as connection:
            resent = await _scalar(
                connection,
                "SELECT count(*) FROM saga_log WHERE saga_id = :saga AND node_name = "
                "'regions_cleanup' AND event = 'waiting' AND CAST(data AS TEXT) LIKE '%resent%'",
                saga=accepted.saga_id,
            )
            rows = await _scalar(
                connection,
                "SELECT count(*) FROM regions WHERE disk_id = :disk",
                disk=accepted.resource_id,
            )
        doctor = await client.request(
            api.Doctor(source="cli/test", payload=api.DoctorRequest(timeout_seconds=10.0)),
            timeout=30,
        )
    finally:
        await engine.dispose()

    assert waiting.state == "waiting", "the unwind waited for the deletes"
    assert view.state == "undone", view.error
    assert resent >= 1, "the lost delete was sent again"
    assert rows == 0, "every region row removed once its agent confirmed destroyed"
    assert isinstance(doctor, api.DoctorReply), doctor
    assert doctor.payload.checked_agents == 3
    assert not doctor.payload.unreachable_agents and not doctor.payload.findings, doctor
    assert await _nexusctl_doctor(vhost_url) == 0


async def test_a_region_slower_than_three_deadlines_still_completes_its_disk(
    slow_rack: Rack, vhost_url: str
) -> None:
    _, client, _, database_url = slow_rack
    engine = create_engine(database_url)
    try:
        await _until(engine, "SELECT count(*) = 3 FROM datasets")
        accepted = await client.create_disk(f"d-{uuid.uuid4().hex[:8]}")
        # Past two deadlines, the nodes still wait, each asked at least once.
        started = time.monotonic()
        while True:
            view = await client.saga(accepted.saga_id)
            if view.waiting_for and min(w.reconciles for w in view.waiting_for) >= 2:
                break
            assert time.monotonic() - started < 30, f"no second reconcile: {view.waiting_for}"
            await asyncio.sleep(0.2)
        shown = await _nexusctl("saga", "show", str(accepted.saga_id), amqp_url=vhost_url)

        done = await client.saga_in(accepted.saga_id, {"done", "undone", "stuck"}, timeout=60)
        async with engine.connect() as connection:
            rearmed = await _scalar(
                connection,
                "SELECT count(*) FROM saga_log WHERE saga_id = :saga AND event = 'waiting' "
                "AND CAST(data AS TEXT) LIKE '%still being created%'",
                saga=accepted.saga_id,
            )
    finally:
        await engine.dispose()

    assert done.state == "done", done.error
    # Three regions, each re-armed at three deadlines at least (the create takes longer).
    assert rearmed >= 3 * 3, f"re-armed {rearmed} times"
    since = {w.node: w.since for w in view.waiting_for}
    assert set(since) == {"region_0", "region_1", "region_2"}
    assert all(s <= view.updated_at for s in since.values())
    assert "waiting since" in shown and "reconciles" in shown, shown


async def _nexusctl(*args: str, amqp_url: str) -> str:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "nexusctl"),
        *args,
        "--amqp-url",
        amqp_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "250"},
    )
    output = (await process.communicate())[0].decode()
    assert process.returncode == 0, output
    return output


async def _nexusctl_doctor(amqp_url: str) -> int:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "nexusctl"),
        "doctor",
        "--amqp-url",
        amqp_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    await process.communicate()
    assert process.returncode is not None
    return process.returncode


async def _scalar(connection: AsyncConnection, query: str, **params: object) -> int:
    return int((await connection.execute(text(query), params)).scalar_one())


async def _until(engine: AsyncEngine, query: str, timeout: float = 30.0) -> None:
    started = time.monotonic()
    while True:
        async with engine.connect() as connection:
            if (await connection.execute(text(query))).scalar_one():
                return
        assert time.monotonic() - started < timeout, f"not true within {timeout}s: {query}"
        await asyncio.sleep(0.1)
