"""A disk made from a snapshot, against real processes: three crucible agents on three
sleds and one Nexus replica, through the API as ``nexusctl`` sends it.

- The happy path: a snapshot of a disk, then a disk from it: three fresh regions and
  three read-only clones of the running snapshots, each group on the three sleds, the
  disk ready when all six are created; the doctor finds nothing.
- The unwind while the clones copy: one agent fails every create, so the fresh region
  there fails at once while the clones (slowed by ``CRUCIBLE_CLONE_DELAY``) are being
  copied. Their agents refuse to delete them then; the unwind waits for each copy and
  deletes it: nothing of the disk is left live on any agent, the doctor finds nothing,
  and the snapshot, no longer referenced, can be deleted.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nexus.db.migrate import upgrade_async
from schemas import api
from schemas.region import Region, RegionList, RegionListed, RegionState
from schemas.topology import crucible_queue
from schemas.transport import Transport
from tests.processes import ApiClient, Crucible, Service, crucible, nexus

pytestmark = pytest.mark.integration

CLONE_SECONDS = 4.0
LIVE = {RegionState.REQUESTED, RegionState.CREATED}


@pytest.fixture
async def stack(vhost_url: str, tmp_path: Path) -> AsyncIterator[tuple[list[Crucible], Service]]:
    """Three agents on distinct sleds whose clones take ``CLONE_SECONDS``, and one Nexus
    replica on SQLite."""
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'nexus.sqlite3'}"
    await upgrade_async(database_url)
    agents = [crucible(vhost_url, tmp_path, clone_delay=f"fixed:{CLONE_SECONDS}") for _ in range(3)]
    replica = nexus("r1", database_url=database_url, amqp_url=vhost_url, workdir=tmp_path)
    services = [*(agent.service for agent in agents), replica]
    try:
        for service in services:
            service.start()
        yield agents, replica
    finally:
        for service in services:
            await service.stop()


async def until_done(
    client: ApiClient, request: api.DiskCreate | api.SnapshotCreate
) -> api.SagaView:
    """The request's saga once it ends, sent again while the stack is starting (Nexus
    not consuming yet, or no dataset announced yet)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            accepted = await client.request(request.model_copy(update={"id": uuid.uuid4()}))
            assert isinstance(accepted, api.AcceptedReply), accepted
            view = await client.saga_in(
                accepted.payload.saga_id, {"done", "undone", "stuck"}, timeout=60
            )
        except (RuntimeError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
            continue
        if view.state == "done" or time.monotonic() > deadline:
            return view
        await asyncio.sleep(0.5)


def disk_request(name: str, snapshot: str | None = None) -> api.DiskCreate:
    return api.DiskCreate(
        source="cli/test",
        payload=api.DiskCreateRequest(
            project="test", name=name, size_bytes=None if snapshot else 1 << 30, snapshot=snapshot
        ),
    )


async def regions_at(transport: Transport, agent: Crucible) -> dict[uuid.UUID, Region]:
    listed = await transport.request(
        RegionList(source="nexus/test"), routing_key=crucible_queue(agent.agent_id), timeout=15
    )
    assert isinstance(listed, RegionListed), listed
    return {region.id: region for region in listed.payload.regions}


async def doctor_is_clean(client: ApiClient) -> None:
    doctor = await client.request(
        api.Doctor(source="cli/test", payload=api.DoctorRequest(timeout_seconds=10.0)),
        timeout=30,
    )
    assert isinstance(doctor, api.DoctorReply), doctor
    assert doctor.payload.checked_agents == 3
    assert not doctor.payload.unreachable_agents and not doctor.payload.findings, doctor


async def snapshot_of_a_disk(client: ApiClient) -> api.SnapshotView:
    made = await until_done(client, disk_request("source"))
    assert made.state == "done", made.error
    snapshot = await until_done(
        client,
        api.SnapshotCreate(
            source="cli/test",
            payload=api.SnapshotCreateRequest(project="test", name="snap", disk="source"),
        ),
    )
    assert snapshot.state == "done", snapshot.error
    reply = await client.request(
        api.SnapshotGet(source="cli/test", payload=api.ResourceRef(project="test", resource="snap"))
    )
    assert isinstance(reply, api.SnapshotReply), reply
    assert reply.payload.state == "ready"
    return reply.payload


async def test_a_disk_from_a_snapshot_has_three_regions_and_three_clones(
    stack: tuple[list[Crucible], Service], vhost_url: str
) -> None:
    agents, _ = stack
    async with Transport(vhost_url, name="test-from-snapshot") as transport:
        client = ApiClient(transport)
        snapshot = await snapshot_of_a_disk(client)

        started = time.monotonic()
        view = await until_done(client, disk_request("copy", snapshot="snap"))
        took = time.monotonic() - started
        assert view.state == "done", view.error
        assert took >= CLONE_SECONDS, "ready only once the clones are copied"
        disk = await client.request(
            api.DiskGet(source="cli/test", payload=api.ResourceRef(project="test", resource="copy"))
        )
        assert isinstance(disk, api.DiskReply), disk
        assert (disk.payload.state, disk.payload.snapshot_id) == ("detached", snapshot.id)
        assert disk.payload.size_bytes == snapshot.size_bytes

        addresses = {part.snapshot_addr for part in snapshot.parts}
        held = {agent.agent_id: await regions_at(transport, agent) for agent in agents}
        clones = [r for regions in held.values() for r in regions.values() if r.read_only]
        assert len(clones) == 3, held
        assert {c.source for c in clones} == addresses
        assert {c.state for c in clones} == {RegionState.CREATED}
        # One clone and one fresh region of the new disk on each of the three agents.
        assert all(sum(r.read_only for r in regions.values()) == 1 for regions in held.values())
        await doctor_is_clean(client)


async def test_a_failure_while_the_clones_copy_unwinds_to_a_clean_slate(
    stack: tuple[list[Crucible], Service], vhost_url: str
) -> None:
    agents, _ = stack
    async with Transport(vhost_url, name="test-from-snapshot-unwind") as transport:
        client = ApiClient(transport)
        await snapshot_of_a_disk(client)
        before = {agent.agent_id: set(await regions_at(transport, agent)) for agent in agents}
        # From now on the first agent fails every create: the new disk's region there
        # fails at once, while every clone is still being copied.
        failing = agents[0]
        await failing.service.stop()
        failing.service.start({"CRUCIBLE_FAIL_FRACTION": "1"})

        request = disk_request("copy", snapshot="snap")
        deadline = time.monotonic() + 60
        while True:
            accepted = await client.request(request.model_copy(update={"id": uuid.uuid4()}))
            assert isinstance(accepted, api.AcceptedReply), accepted
            view = await client.saga_in(
                accepted.payload.saga_id, {"done", "undone", "stuck"}, timeout=90
            )
            # Until the restarted agent has announced itself again, placement may find
            # only two sleds: that ends undone too, before any region is asked for.
            if view.error is None or "insufficient capacity" not in view.error:
                break
            assert time.monotonic() < deadline, view
            await asyncio.sleep(0.5)
        assert view.state == "undone", view
        assert view.error is not None and "injected failure" in view.error, view.error
        # The unwind asked for the clones while they were being copied, and was refused.
        assert any("while it is being cloned" in a.service.log_text() for a in agents)

        for agent in agents:
            new = {
                rid: r
                for rid, r in (await regions_at(transport, agent)).items()
                if rid not in before[agent.agent_id]
            }
            assert new, f"agent {agent.agent_id} never had the disk's regions"
            assert not [r for r in new.values() if r.state in LIVE], new
        await doctor_is_clean(client)

        # No disk reads from the snapshot any more: it can be deleted.
        deleted = await client.request(
            api.SnapshotDelete(
                source="cli/test", payload=api.ResourceRef(project="test", resource="snap")
            )
        )
        assert isinstance(deleted, api.AcceptedReply), deleted
        gone = await client.saga_in(deleted.payload.saga_id, {"done", "undone", "stuck"})
        assert gone.state == "done", gone.error
