"""A crucible agent whose data directory fills: a small tmpfs the test mounts and fills
with a filler file until ENOSPC, under a real agent process and a real RabbitMQ; then
with a Nexus replica, a disk create that lands on the full agent.

The agent keeps running and answering, new work fails "out of space", nothing is left
that no disk owns, and creates succeed again once the filler is gone (issue #13 item 6).
Mounting needs root (or CAP_SYS_ADMIN); a test that cannot mount fails and says so.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from nexus.db.migrate import upgrade_async
from schemas import api
from schemas.common import CommandRejected
from schemas.region import (
    RegionGet,
    RegionInfo,
    RegionList,
    RegionListed,
    RegionRef,
    RegionState,
)
from schemas.topology import crucible_queue
from schemas.transport import Transport
from tests.integration.crucible_fixtures import AgentProcess, Events, events, transport
from tests.integration.test_crucible_agent import delete, ensure, region_spec, send
from tests.integration.test_least_privilege import disk_created
from tests.processes import BIN, ApiClient, Crucible, Service, crucible, nexus

pytestmark = pytest.mark.integration

__all__ = ["events", "transport"]  # fixtures, used by name

# Room for the agent's database and its space reserve (8 MiB by default, taken while
# twice that is free); the test fills the rest.
TMPFS_SIZE = "32m"
LIVE = {RegionState.REQUESTED, RegionState.CREATED}


def mount_tmpfs(path: Path, size: str = TMPFS_SIZE) -> None:
    path.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        pytest.fail("cannot mount a tmpfs: no mount command on this host", pytrace=False)
    if result.returncode != 0:
        pytest.fail(
            f"cannot mount a {size} tmpfs at {path} ({' '.join(command)}: "
            f"{result.stderr.strip() or result.returncode}); this test needs root or "
            "CAP_SYS_ADMIN",
            pytrace=False,
        )


def unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
        # Something still holds a file there: detach now, freed once it lets go.
        subprocess.run(["umount", "--lazy", str(path)], capture_output=True, check=False)


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def fill(directory: Path) -> Path:
    """Writes a filler file until the filesystem refuses with ENOSPC."""
    filler = directory / "filler"
    chunk = bytes(1 << 20)
    with filler.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(chunk)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
    assert free_bytes(directory) < 64 * 1024, f"{free_bytes(directory)} bytes still free"
    return filler


def outbox_rows(data_dir: Path) -> int:
    with sqlite3.connect(f"file:{data_dir / 'agent.sqlite'}?mode=ro", uri=True) as db:
        count: int = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
    return count


async def until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def agent_on_tmpfs(tmp_path: Path, rabbitmq_url: str) -> Iterator[AgentProcess]:
    """An agent whose data directory is a tmpfs of its own; killed before the unmount."""
    data_dir = tmp_path / "agent"
    mount_tmpfs(data_dir)
    agent = AgentProcess(
        agent_id=uuid.uuid4(), sled_id=uuid.uuid4(), data_dir=data_dir, amqp_url=rabbitmq_url
    )
    try:
        yield agent
    finally:
        if agent.process is not None and agent.process.poll() is None:
            agent.process.kill()
            agent.process.wait()
        unmount(data_dir)


async def test_a_full_data_directory_fails_creates_out_of_space_and_the_agent_recovers(
    transport: Transport, events: Events, agent_on_tmpfs: AgentProcess
) -> None:
    agent = agent_on_tmpfs
    kept = region_spec()
    await send(transport, agent, ensure(kept))
    agent.start()
    await events.reached(agent.agent_id, kept.id, RegionState.CREATED)
    assert (agent.data_dir / "space.reserve").exists()

    filler = fill(agent.data_dir)
    refused = region_spec()
    answer = await transport.request(ensure(refused), routing_key=agent.queue, timeout=15)

    # Accepted, then failed by the worker, which cannot reserve space for it.
    assert isinstance(answer, RegionInfo), answer
    assert answer.payload.region is not None
    assert answer.payload.region.state is RegionState.REQUESTED
    await events.reached(agent.agent_id, refused.id, RegionState.FAILED)
    assert agent.process is not None and agent.process.poll() is None, agent.log_tail()
    assert not agent.region_dir(refused.id).exists(), "no files of the failed region"

    # Reads are answered; a delete is carried out.
    got = await transport.request(
        RegionGet(source="nexus/test", payload=RegionRef(id=refused.id)),
        routing_key=agent.queue,
        timeout=15,
    )
    assert isinstance(got, RegionInfo) and got.payload.region is not None
    assert got.payload.region.state is RegionState.FAILED
    assert (got.payload.region.failure or "").startswith("out of space: "), got
    listed = await transport.request(
        RegionList(source="nexus/test"), routing_key=agent.queue, timeout=15
    )
    assert isinstance(listed, RegionListed)
    assert {region.id for region in listed.payload.regions} == {kept.id, refused.id}
    await send(transport, agent, delete(kept.id))
    await events.reached(agent.agent_id, kept.id, RegionState.DESTROYED)
    assert not agent.region_dir(kept.id).exists()

    # Space returns: the reserve is taken again and a create succeeds.
    filler.unlink()
    after = region_spec()
    await send(transport, agent, ensure(after))
    await events.reached(agent.agent_id, after.id, RegionState.CREATED)
    assert (agent.data_dir / "space.reserve").exists()
    assert len(list(agent.region_dir(after.id).glob("*.extent"))) == 4
    assert agent.process.poll() is None and agent.starts == 1, agent.log_tail()
    assert "Traceback" not in agent.log_path.read_text(), agent.log_tail(80)


async def test_without_a_reserve_a_create_that_cannot_be_recorded_is_refused_out_of_space(
    transport: Transport, events: Events, agent_on_tmpfs: AgentProcess
) -> None:
    agent = agent_on_tmpfs
    kept = region_spec()
    await send(transport, agent, ensure(kept))
    agent.start("--space-reserve-bytes=0", "--announce-coalesce-seconds=0")
    await events.reached(agent.agent_id, kept.id, RegionState.CREATED)
    # Nothing left to send (the relay would have to delete its rows on the full disk).
    await until(lambda: outbox_rows(agent.data_dir) == 0, "an empty outbox")

    filler = fill(agent.data_dir)
    command = ensure(region_spec())
    answer = await transport.request(command, routing_key=agent.queue, timeout=15)

    assert isinstance(answer, CommandRejected), answer
    assert answer.payload.code == "out_of_space"
    assert answer.payload.message.startswith("out of space: "), answer
    await events.until(lambda: bool(events.rejections(command.id)), "the rejection event")
    assert events.rejections(command.id)[0].payload.code == "out_of_space"
    assert agent.process is not None and agent.process.poll() is None, agent.log_tail()
    assert not agent.region_dir(command.payload.id).exists()
    got = await transport.request(
        RegionGet(source="nexus/test", payload=RegionRef(id=command.payload.id)),
        routing_key=agent.queue,
        timeout=15,
    )
    assert isinstance(got, RegionInfo) and got.payload.region is None

    # The same command once space is back, as Nexus re-sends it to an agent that does
    # not know the region.
    filler.unlink()
    await send(transport, agent, command)
    await events.reached(agent.agent_id, command.payload.id, RegionState.CREATED)
    assert agent.process.poll() is None and agent.starts == 1, agent.log_tail()


# With Nexus: a disk create that lands on the full agent.


@pytest.fixture
async def stack(vhost_url: str, tmp_path: Path) -> AsyncIterator[tuple[list[Crucible], Service]]:
    """Three agents on distinct sleds (so every disk has a region on each), the first on
    a tmpfs of its own, and one Nexus replica on SQLite."""
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'nexus.sqlite3'}"
    await upgrade_async(database_url)
    agents = [crucible(vhost_url, tmp_path) for _ in range(3)]
    full_dir = tmp_path / f"crucible-{agents[0].agent_id}"
    mount_tmpfs(full_dir)
    replica = nexus("r1", database_url=database_url, amqp_url=vhost_url, workdir=tmp_path)
    services = [*(agent.service for agent in agents), replica]
    try:
        for service in services:
            service.start()
        yield agents, replica
    finally:
        for service in services:
            await service.stop()
        unmount(full_dir)


async def regions_at(transport: Transport, agent: Crucible) -> dict[uuid.UUID, RegionState]:
    listed = await transport.request(
        RegionList(source="nexus/test"), routing_key=crucible_queue(agent.agent_id), timeout=15
    )
    assert isinstance(listed, RegionListed), listed
    return {region.id: region.state for region in listed.payload.regions}


async def test_a_disk_create_on_a_full_agent_is_undone_out_of_space_and_leaves_no_orphan(
    stack: tuple[list[Crucible], Service], vhost_url: str, tmp_path: Path
) -> None:
    agents, replica = stack
    full = agents[0]
    full_dir = tmp_path / f"crucible-{full.agent_id}"
    async with Transport(vhost_url, name="test-out-of-space") as transport:
        client = ApiClient(transport)
        first = await disk_created(client)
        assert first.state == "done", first.error
        before = {agent.agent_id: await regions_at(transport, agent) for agent in agents}

        filler = fill(full_dir)
        accepted = await client.create_disk(f"d-{uuid.uuid4().hex[:8]}")
        view = await client.saga_in(accepted.saga_id, {"done", "undone", "stuck"}, timeout=60)
        assert view.state == "undone", view
        assert view.error is not None and "out of space" in view.error, view.error
        assert full.service.running, full.service.log_text()[-3000:]

        # The undo's deletes reach every agent, the full one included: nothing of the
        # disk is left live anywhere.
        async def nothing_new_is_live() -> bool:
            for agent in agents:
                held = await regions_at(transport, agent)
                new = [state for rid, state in held.items() if rid not in before[agent.agent_id]]
                if any(state in LIVE for state in new) or (agent is not full and not new):
                    return False
            return True

        deadline = time.monotonic() + 30
        while not await nothing_new_is_live():
            assert time.monotonic() < deadline, "the undone disk's regions are still live"
            await asyncio.sleep(0.2)
        doctor = await client.request(
            api.Doctor(source="cli/test", payload=api.DoctorRequest(timeout_seconds=10.0)),
            timeout=30,
        )
        assert isinstance(doctor, api.DoctorReply), doctor
        assert doctor.payload.checked_agents == 3
        assert not doctor.payload.unreachable_agents and not doctor.payload.findings, doctor

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
        assert shown.returncode == 0 and "out of space" in timeline, timeline

        # Space returns: the next disk is created on the same three agents.
        filler.unlink()
        again = await client.create_disk(f"d-{uuid.uuid4().hex[:8]}")
        view = await client.saga_in(again.saga_id, {"done", "undone", "stuck"}, timeout=60)
        assert view.state == "done", view.error
    assert all(agent.service.running for agent in agents), "no agent exited"
    assert replica.running, replica.log_text()[-3000:]
