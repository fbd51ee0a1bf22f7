"""Instances as VMMs, with real processes: one Nexus replica, two sled agents, PostgreSQL
and RabbitMQ (issue #14, item 1; Omicron's instance_start.rs and instance_watcher.rs).

- a stop destroys the VMM and frees its sled: a new instance takes the room, and a later
  start of the stopped one is a new VMM, on the other sled;
- the original start of an instance, delivered again after its VMM ended, changes
  nothing at the sled or at Nexus;
- a running instance cannot be deleted, and asking does not reach its sled;
- a lost sled (heartbeats gone past NEXUS_SLED_EXPUNGE_SECONDS) fails its instances
  within that threshold, found by no poll of any sled.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from nexus.db.engine import create_engine
from nexus.db.migrate import upgrade_async
from nexus.db.models import OutboxMessage, Vmm
from nexus.liveness import LOST_REASON
from schemas import api
from schemas.instance import VmmEnsure
from schemas.messages import Message, decode
from schemas.topology import COMMANDS_EXCHANGE, NEXUS_API_QUEUE
from schemas.transport import Transport
from tests.integration.sled_fixtures import SledFactory, SledProcess, sled_agents
from tests.processes import ApiClient, Service, nexus

pytestmark = pytest.mark.integration

__all__ = ["sled_agents"]

CLI = "cli/vmm-test"
EXPUNGE_SECONDS = 3.0
SETTINGS = {
    "sweep_seconds": "0.2",
    "sled_timeout_seconds": "1",
    "sled_expunge_seconds": str(EXPUNGE_SECONDS),
}
# Each sled has room for one instance of INSTANCE_CPUS.
SLED_FLAGS = {"cpus": "2", "heartbeat-seconds": "0.3", "boot-seconds": "0.2"}
INSTANCE_CPUS = 2


@dataclass
class Rack:
    client: ApiClient
    transport: Transport
    database_url: str
    sleds: list[SledProcess]

    async def create(self, name: str) -> api.SagaView:
        accepted = await self.client.request(
            api.InstanceCreate(
                source=CLI,
                payload=api.InstanceCreateRequest(
                    project="vmm", name=name, ncpus=INSTANCE_CPUS, memory_bytes=1 << 30
                ),
            )
        )
        assert isinstance(accepted, api.AcceptedReply), accepted
        return await self.client.saga_in(accepted.payload.saga_id, {"done", "undone", "stuck"})

    async def act(self, name: str, action: api.InstanceAction) -> Message:
        """The reply to the request: accepted (then the saga's end), or an error."""
        request = api.InstanceAct(
            source=CLI,
            payload=api.InstanceActionRequest(project="vmm", resource=name, action=action),
        )
        return await self.transport.request(request, routing_key=NEXUS_API_QUEUE, timeout=10)

    async def act_to_end(self, name: str, action: api.InstanceAction) -> api.SagaView:
        reply = await self.act(name, action)
        assert isinstance(reply, api.AcceptedReply), reply
        return await self.client.saga_in(reply.payload.saga_id, {"done", "undone", "stuck"})

    async def instance(self, name: str) -> api.InstanceView:
        reply = await self.client.request(
            api.InstanceList(source=CLI, payload=api.ProjectFilter(project="vmm"))
        )
        assert isinstance(reply, api.InstanceListReply)
        (view,) = [i for i in reply.payload if i.name == name]
        return view

    async def vmms_of(self, instance_id: uuid.UUID) -> list[Vmm]:
        engine = create_engine(self.database_url)
        try:
            async with engine.connect() as connection:
                rows = await connection.execute(
                    select(Vmm).where(Vmm.instance_id == instance_id).order_by(Vmm.created_at)
                )
                return list(rows.all())  # type: ignore[arg-type]
        finally:
            await engine.dispose()

    async def ensures_sent(self) -> list[VmmEnsure]:
        engine = create_engine(self.database_url)
        try:
            async with engine.connect() as connection:
                bodies = (
                    await connection.execute(select(OutboxMessage.body).order_by(OutboxMessage.id))
                ).scalars()
                messages = [decode(body) for body in bodies]
        finally:
            await engine.dispose()
        return [m for m in messages if isinstance(m, VmmEnsure)]


@pytest.fixture
async def rack(
    vhost_url: str, fresh_postgres_url: str, tmp_path: Path, sled_agents: SledFactory
) -> AsyncIterator[Rack]:
    await upgrade_async(fresh_postgres_url)
    replica: Service = nexus(
        "replica-a",
        database_url=fresh_postgres_url,
        amqp_url=vhost_url,
        workdir=tmp_path,
        **SETTINGS,
    )
    replica.start()
    sleds = [sled_agents(vhost_url, **SLED_FLAGS) for _ in range(2)]
    for sled in sleds:
        sled.start()
    try:
        async with Transport(vhost_url, name="test-client") as transport:
            await transport.declare_topology()
            client = ApiClient(transport)
            yield Rack(client, transport, fresh_postgres_url, sleds)
    finally:
        await replica.stop()
        print(f"--- nexus log ---\n{replica.log_text()[-20000:]}")


async def until_sleds_registered(rack: Rack) -> None:
    """Nexus has both sleds (a create before that would find no room)."""
    deadline = time.monotonic() + 30
    engine = create_engine(rack.database_url)
    try:
        while time.monotonic() < deadline:
            async with engine.connect() as connection:
                count = len(
                    (
                        await connection.exec_driver_sql(
                            "SELECT id FROM sleds WHERE state = 'active'"
                        )
                    ).all()
                )
            if count == len(rack.sleds):
                return
            await asyncio.sleep(0.1)
    finally:
        await engine.dispose()
    raise TimeoutError("the sleds did not register")


async def test_a_stop_frees_the_sled_and_the_next_start_is_a_new_vmm_elsewhere(
    rack: Rack,
) -> None:
    await until_sleds_registered(rack)
    assert (await rack.create("a")).state == "done"
    assert (await rack.create("b")).state == "done"
    a, b = await rack.instance("a"), await rack.instance("b")
    assert a.state == b.state == "running"
    assert {a.sled_id, b.sled_id} == {sled.sled_id for sled in rack.sleds}
    # Both sleds are full: a third instance finds no room, and its create unwinds.
    full = await rack.create("c")
    assert full.state == "undone" and "insufficient capacity" in (full.error or "")

    # A running instance cannot be deleted; the sled hears nothing of it.
    ensures_before = len(await rack.ensures_sent())
    refused = await rack.act("a", api.InstanceAction.DELETE)
    assert isinstance(refused, api.ApiError)
    assert refused.payload.code == api.ErrorCode.CONFLICT
    assert "only a stopped or failed instance can be deleted" in refused.payload.message
    assert (await rack.instance("a")).state == "running"

    # The stop destroys a's VMM and frees its sled: c now fits there.
    assert (await rack.act_to_end("a", api.InstanceAction.STOP)).state == "done"
    stopped = await rack.instance("a")
    assert (stopped.state, stopped.sled_id, stopped.vmm_id) == ("stopped", None, None)
    (first_vmm,) = await rack.vmms_of(a.id)
    assert (first_vmm.state, first_vmm.sled_id) == ("destroyed", a.sled_id)
    assert (await rack.create("c")).state == "done"
    assert (await rack.instance("c")).sled_id == a.sled_id
    assert len(await rack.ensures_sent()) == ensures_before + 1  # c's only

    # a cannot start while both sleds are full; once b stops, it starts as a new VMM on
    # b's sled, not the one it ran on before.
    assert (await rack.act_to_end("a", api.InstanceAction.START)).state == "undone"
    assert (await rack.act_to_end("b", api.InstanceAction.STOP)).state == "done"
    assert (await rack.act_to_end("a", api.InstanceAction.START)).state == "done"
    restarted = await rack.instance("a")
    assert restarted.state == "running"
    assert (restarted.sled_id, restarted.vmm_id) == (b.sled_id, (await rack.vmms_of(a.id))[-1].id)
    assert restarted.vmm_id != first_vmm.id

    # a's first start, delivered again (same message id) to the sled it went to, now that
    # that VMM has ended: nothing starts there, and Nexus keeps a on its new VMM.
    (original,) = [e for e in await rack.ensures_sent() if e.payload.id == first_vmm.id]
    await rack.transport.publish(
        original, exchange=COMMANDS_EXCHANGE, routing_key=f"sled.{a.sled_id}"
    )
    stop_of_b = await rack.act("b", api.InstanceAction.STOP)  # b is stopped: nothing to do
    assert isinstance(stop_of_b, api.InstanceReply)
    await asyncio.sleep(1.0)  # several boots' time
    vmms = await rack.vmms_of(a.id)
    # (The start that found no room failed before it recorded a VMM.)
    assert [vmm.state for vmm in vmms] == ["destroyed", "running"]
    again = await rack.instance("a")
    assert (again.state, again.vmm_id, again.sled_id) == ("running", vmms[-1].id, b.sled_id)
    # c still has its sled's room to itself: the late start did not take it.
    assert (await rack.instance("c")).state == "running"
    # The agent did take the late start (it was not refused on the way), and let it be.
    (old_sled,) = [sled for sled in rack.sleds if sled.sled_id == a.sled_id]
    handled = [line for line in old_sled.logs().splitlines() if str(original.id) in line]
    assert any("no change" in line for line in handled), handled


async def test_a_lost_sled_fails_its_instances_within_its_threshold(rack: Rack) -> None:
    await until_sleds_registered(rack)
    assert (await rack.create("lost")).state == "done"
    view = await rack.instance("lost")
    (doomed,) = [sled for sled in rack.sleds if sled.sled_id == view.sled_id]

    doomed.signal(signal.SIGKILL)
    killed = time.monotonic()
    await doomed.wait()
    while (await rack.instance("lost")).state != "failed":
        assert time.monotonic() - killed < EXPUNGE_SECONDS + 3.0, "not failed in time"
        await asyncio.sleep(0.1)
    took = time.monotonic() - killed
    # The last heartbeat came at most one beat before the kill, and the sweeper looks
    # every 0.2 s: within the threshold, plus those.
    assert took <= EXPUNGE_SECONDS + 0.3 + 0.2 + 0.5, f"failed after {took:.1f}s"
    failed = await rack.instance("lost")
    assert (failed.sled_id, failed.vmm_id) == (None, None)
    (vmm,) = await rack.vmms_of(view.id)
    assert (vmm.state, vmm.reason) == ("failed", LOST_REASON)
    # Failed instances can be deleted, and started again as a new VMM on a live sled.
    assert (await rack.act_to_end("lost", api.InstanceAction.START)).state == "done"
    again = await rack.instance("lost")
    assert again.state == "running" and again.sled_id != doomed.sled_id


async def test_an_operator_expunges_a_live_sled_for_good(rack: Rack) -> None:
    """``nexusctl sled expunge`` of a sled whose agent still runs: its instance fails at
    once (no threshold), the sled stays expunged though its heartbeats go on, a second
    expunge changes nothing, and the instance starts again on the other sled."""
    await until_sleds_registered(rack)
    assert (await rack.create("kept")).state == "done"
    view = await rack.instance("kept")
    assert view.sled_id is not None

    reply = await rack.client.request(
        api.SledExpunge(source=CLI, payload=api.SledRef(sled_id=view.sled_id))
    )
    assert isinstance(reply, api.SledExpungeReply), reply
    assert (reply.payload.changed, reply.payload.vmms_failed) == (True, 1)
    assert reply.payload.sled.state == "expunged" and reply.payload.sled.live_vmms == 0
    failed = await rack.instance("kept")
    assert (failed.state, failed.sled_id, failed.vmm_id) == ("failed", None, None)
    (vmm,) = await rack.vmms_of(view.id)
    assert (vmm.state, vmm.reason) == ("failed", LOST_REASON)

    # Its agent lives and beats (every 0.3 s) through several sweeps: still expunged.
    await asyncio.sleep(1.5)
    listed = await rack.client.request(api.SledList(source=CLI))
    assert isinstance(listed, api.SledListReply)
    states = {sled.id: sled.state for sled in listed.payload}
    assert states[view.sled_id] == "expunged"
    assert {state for sled_id, state in states.items() if sled_id != view.sled_id} == {"active"}

    again = await rack.client.request(
        api.SledExpunge(source=CLI, payload=api.SledRef(sled_id=view.sled_id))
    )
    assert isinstance(again, api.SledExpungeReply)
    assert (again.payload.changed, again.payload.vmms_failed) == (False, 0)
    unknown = await rack.transport.request(
        api.SledExpunge(source=CLI, payload=api.SledRef(sled_id=uuid.uuid4())),
        routing_key=NEXUS_API_QUEUE,
        timeout=10,
    )
    assert isinstance(unknown, api.ApiError) and unknown.payload.code == api.ErrorCode.NOT_FOUND

    assert (await rack.act_to_end("kept", api.InstanceAction.START)).state == "done"
    restarted = await rack.instance("kept")
    assert restarted.state == "running" and restarted.sled_id != view.sled_id
