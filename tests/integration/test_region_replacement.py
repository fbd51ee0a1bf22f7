"""Region replacement with real processes: Nexus replicas on PostgreSQL, four crucible
agents (each on a sled of its own), a sled agent running an instance, and RabbitMQ.

- An expunge during load (disks being created, an instance running): every region of
  the lost dataset is replaced (the attached disk's by a live repair at the VMM's sled,
  reported by events; the detached disks' by Nexus), every disk is again three regions
  on three live sleds, no region of a disk (the VMM's data path) is on the lost dataset,
  and ``nexusctl doctor`` exits 0. Driven through ``nexusctl sled expunge --wait``.
- A replica SIGKILLed inside a node of a replacement: the other replica adopts the saga
  when its lease expires and completes the replacement.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from nexus.db.engine import create_engine
from nexus.db.migrate import upgrade_async
from nexus.db.models import Dataset, Disk, Region, RegionReplacement, Saga
from nexus.replacement_ids import saga_id_for
from schemas import api
from schemas.instance import RepairChanged, RepairState
from schemas.topology import EVENTS_EXCHANGE
from schemas.transport import Delivery, Transport
from tests.processes import BIN, ApiClient, Crucible, Service, crucible, nexus, sled

pytestmark = pytest.mark.integration

CLI = "cli/replacement-test"
FAST = {"lease_seconds": "1.5", "sweep_seconds": "0.2"}
DISK_BYTES = 1 << 30


class Repairs:
    """Every live repair event the sleds publish, seen from a queue of the test's own."""

    def __init__(self) -> None:
        self.seen: list[RepairChanged] = []

    async def on(self, delivery: Delivery) -> None:
        if isinstance(delivery.message, RepairChanged):
            self.seen.append(delivery.message)


@dataclass
class Rack:
    client: ApiClient
    database_url: str
    amqp_url: str
    workdir: Path
    agents: list[Crucible]
    repairs: Repairs

    async def create_disk(self, name: str) -> uuid.UUID:
        return (await self.client.create_disk(name, DISK_BYTES)).saga_id

    async def run_instance(self, name: str, disk: str) -> None:
        reply = await self.client.request(
            api.InstanceCreate(
                source=CLI,
                payload=api.InstanceCreateRequest(
                    project="test", name=name, ncpus=1, memory_bytes=1 << 30, disks=(disk,)
                ),
            )
        )
        assert isinstance(reply, api.AcceptedReply), reply
        view = await self.client.saga_in(reply.payload.saga_id, {"done", "undone", "stuck"})
        assert view.state == "done", view.error

    async def rows(self) -> tuple[list[Disk], list[Region], list[Dataset], list[RegionReplacement]]:
        engine = create_engine(self.database_url)
        try:
            async with engine.connect() as connection:
                disks = (await connection.execute(select(Disk))).all()
                regions = (await connection.execute(select(Region))).all()
                datasets = (await connection.execute(select(Dataset))).all()
                requests = (await connection.execute(select(RegionReplacement))).all()
        finally:
            await engine.dispose()
        return disks, regions, datasets, requests  # type: ignore[return-value]

    async def nexusctl(self, *argv: str) -> tuple[int, str]:
        done = await asyncio.create_subprocess_exec(
            str(BIN / "nexusctl"),
            *argv,
            "--amqp-url",
            self.amqp_url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out = (await done.communicate())[0].decode()
        assert done.returncode is not None
        return done.returncode, out


@pytest.fixture
async def rack(vhost_url: str, fresh_postgres_url: str, tmp_path: Path) -> AsyncIterator[Rack]:
    await upgrade_async(fresh_postgres_url)
    agents = [crucible(vhost_url, tmp_path, create_delay="fixed:0.3") for _ in range(4)]
    vmm_sled = sled(vhost_url, tmp_path, repair_seconds="1.0", heartbeat_seconds="0.3")
    services = [agent.service for agent in agents] + [vmm_sled.service]
    for service in services:
        service.start()
    repairs = Repairs()
    async with Transport(vhost_url, name="test-observer") as transport:
        await transport.declare_topology()
        queue = f"test.repairs.{uuid.uuid4()}"
        await transport.declare_queue(queue, [(EVENTS_EXCHANGE, "instance.*")])
        await transport.consume(queue, repairs.on)
        try:
            yield Rack(
                ApiClient(transport), fresh_postgres_url, vhost_url, tmp_path, agents, repairs
            )
        finally:
            for service in services:
                await service.stop()


async def saga_states(database_url: str) -> dict[uuid.UUID, str]:
    """The replacement sagas and their states."""
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(
                select(Saga.id, Saga.state).where(Saga.name == "region_replacement")
            )
            return {row.id: row.state for row in rows}
    finally:
        await engine.dispose()


def replica(rack: Rack, name: str, **extra: str) -> Service:
    return nexus(
        name,
        database_url=rack.database_url,
        amqp_url=rack.amqp_url,
        workdir=rack.workdir,
        **FAST,
        **extra,
    )


async def until_four_datasets(rack: Rack) -> None:
    for _ in range(300):
        _, _, datasets, _ = await rack.rows()
        if len(datasets) == 4:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("the four crucible agents did not announce themselves")


async def ready_disks(rack: Rack, names: list[str]) -> None:
    sagas = [await rack.create_disk(name) for name in names]
    for saga_id in sagas:
        view = await rack.client.saga_in(saga_id, {"done", "undone", "stuck"})
        assert view.state == "done", view.error


def shared_sled(rack: Rack, regions: list[Region], disks: dict[str, uuid.UUID]) -> uuid.UUID:
    """A crucible sled holding a region of both the attached and a detached disk."""
    by_dataset: dict[uuid.UUID, set[uuid.UUID]] = {}
    for region in regions:
        by_dataset.setdefault(region.dataset_id, set()).add(region.disk_id)
    for agent in rack.agents:
        held = by_dataset.get(agent.agent_id, set())
        if disks["attached"] in held and disks["detached"] in held:
            return agent.sled_id
    raise AssertionError("no dataset holds both disks: four datasets, three regions each")


def assert_replaced(
    disks: list[Disk],
    regions: list[Region],
    datasets: list[Dataset],
    requests: list[RegionReplacement],
    lost_sled: uuid.UUID,
) -> None:
    """Every request complete; every ready disk three live regions on three live sleds,
    none on the lost sled's dataset."""
    assert requests, "the expunge filed no replacement"
    assert {r.state for r in requests} == {"complete"}, [
        (r.state, r.last_failure) for r in requests
    ]
    sled_of = {d.id: d.sled_id for d in datasets}
    lost = {d.id for d in datasets if d.sled_id == lost_sled}
    assert {d.state for d in datasets if d.id in lost} == {"expunged"}
    for disk in disks:
        if disk.state not in ("detached", "attached"):
            continue
        live = [
            r
            for r in regions
            if r.disk_id == disk.id and r.state not in ("destroyed", "tombstoned")
        ]
        assert [r.state for r in live] == ["created"] * 3, (disk.name, live)
        assert len({sled_of[r.dataset_id] for r in live}) == 3, disk.name
        assert not [r for r in live if r.dataset_id in lost], disk.name


async def test_an_expunge_during_load_replaces_every_region_of_the_lost_sled(rack: Rack) -> None:
    a = replica(rack, "replica-a")
    a.start()
    try:
        await until_four_datasets(rack)
        await ready_disks(rack, ["detached", "attached", "spare"])
        await rack.run_instance("vm", "attached")
        _, regions, _, _ = await rack.rows()
        disks_before, _, _, _ = await rack.rows()
        ids = {d.name: d.id for d in disks_before}
        lost_sled = shared_sled(rack, regions, ids)

        # Load: disks being created while the sled is expunged, an instance running.
        creating = [await rack.create_disk(f"load-{index}") for index in range(3)]
        code, out = await rack.nexusctl(
            "sled", "expunge", str(lost_sled), "--yes", "--wait", "--wait-timeout", "60"
        )
        assert code == 0, out
        assert "every region of the sled is replaced" in out, out
        for saga_id in creating:
            # A create that had a region on the lost sled unwinds; the others finish.
            view = await rack.client.saga_in(saga_id, {"done", "undone", "stuck"}, timeout=60)
            assert view.state in ("done", "undone"), view.error

        disks, regions, datasets, requests = await rack.rows()
        assert_replaced(disks, regions, datasets, requests, lost_sled)
        modes = {r.disk_id: r.repair_mode for r in requests}
        assert modes[ids["attached"]] == "live" and modes[ids["detached"]] == "nexus"
        live = next(r for r in requests if r.disk_id == ids["attached"])
        assert live.repair_progress == 100
        # The VMM's sled reported the repair, started to finished, by event.
        steps = [
            e.payload.repair
            for e in rack.repairs.seen
            if e.payload.repair.disk_id == ids["attached"]
        ]
        assert steps[0].state is RepairState.STARTED
        assert steps[-1].state is RepairState.FINISHED
        assert steps[-1].new_region_id == live.new_region_id
        assert [h[0] for h in live.history] == [
            "requested",
            "allocating",
            "running",
            "driving",
            "replacement_done",
            "completing",
            "complete",
        ]

        code, out = await rack.nexusctl("region-replacement", "list")
        assert code == 0 and "complete" in out, out
        code, out = await rack.nexusctl("region-replacement", "show", str(live.id), "--wait")
        assert code == 0 and "driving" in out and "repair: live, 100%" in out, out
        code, out = await rack.nexusctl("doctor")
        assert code == 0, out
    finally:
        await a.stop()
        print(f"--- nexus log ---\n{a.log_text()[-20000:]}")


@pytest.mark.parametrize("crash_node", ["region_ensure", "repair", "swap"])
async def test_a_replica_killed_mid_replacement_is_adopted_by_the_other(
    rack: Rack, crash_node: str
) -> None:
    """A runs the replacement and dies inside ``crash_node``; B, started after, adopts the
    saga once A's lease expires and completes it (the attached disk's live repair too)."""
    a = replica(rack, "replica-a", crash_in_node=crash_node)
    b = replica(rack, "replica-b")
    a.start()
    try:
        await until_four_datasets(rack)
        await ready_disks(rack, ["detached", "attached"])
        await rack.run_instance("vm", "attached")
        disks, regions, _, _ = await rack.rows()
        lost_sled = shared_sled(rack, regions, {d.name: d.id for d in disks})
        expunge = asyncio.create_task(
            rack.client.request(api.SledExpunge(source=CLI, payload=api.SledRef(sled_id=lost_sled)))
        )
        try:
            assert await a.wait_exit(timeout=60) == -signal.SIGKILL
        finally:
            expunge.cancel()
        # A filed the requests and created their sagas in the expunge's transaction, and
        # died inside the node, before any of them was done.
        owners = await saga_states(rack.database_url)
        assert owners and "done" not in owners.values(), owners
        b.start()
        for _ in range(600):
            _, _, _, requests = await rack.rows()
            if requests and {r.state for r in requests} == {"complete"}:
                break
            await asyncio.sleep(0.1)
        disks, regions, datasets, requests = await rack.rows()
        assert_replaced(disks, regions, datasets, requests, lost_sled)
        code, out = await rack.nexusctl("doctor")
        assert code == 0, out
        # B finished the sagas A started (the first attempt of each: adopted, not retried).
        for request in requests:
            assert request.attempts == 1
            saga_id = saga_id_for(request.id, 1)
            assert saga_id in owners
            view = await rack.client.saga(saga_id)
            assert view.state == "done", view.error
            assert view.log[-1].replica == "replica-b"
            assert not [e for e in view.log if e.node == crash_node and e.replica == "replica-a"]
    finally:
        await a.stop()
        await b.stop()
        print(f"--- replica-b log ---\n{b.log_text()[-20000:]}")
