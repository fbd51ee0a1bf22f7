"""The service layer on a real SQLite store with an in-memory wire: what is committed."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from schemas.base import Envelope
from schemas.common import CommandRejected
from schemas.instance import (
    VmmEnsure,
    VmmRef,
    VmmSpec,
    VmmState,
    VmmStateChanged,
    VmmStop,
)
from schemas.messages import decode
from schemas.sled import SledRegistered
from schemas.transport import Delivery
from sled_agent.hypervisor import RESTART_REASON
from sled_agent.service import SledAgent
from sled_agent.settings import SledSettings
from sled_agent.store import SledStore

SOURCE = "test/sled-service"


class FakeWire:
    def __init__(self) -> None:
        self.sent: list[Envelope] = []

    async def publish_event(self, message: Envelope) -> None:
        self.sent.append(message)

    async def reply(self, delivery: Delivery, message: Envelope) -> None:
        self.sent.append(message)


class FakeRelay:
    """Counts commits (the agent notifies after each) and lets a test wait for the next."""

    def __init__(self) -> None:
        self.notified = 0
        self.committed = asyncio.Event()

    def notify(self) -> None:
        self.notified += 1
        self.committed.set()


def delivery(message: Envelope, reply_to: str | None = None) -> Delivery:
    return Delivery(
        message=decode(message.model_dump_json().encode()),
        queue="sled.test",
        routing_key="sled.test",
        reply_to=reply_to,
        redelivered=False,
    )


async def outbox_messages(store: SledStore) -> list[Envelope]:
    return [decode(row.body) for row in await store.unsent(1000)]


@asynccontextmanager
async def an_agent(settings: SledSettings) -> AsyncIterator[tuple[SledAgent, SledStore, FakeRelay]]:
    """A recovered agent with its timers and heartbeats running, stopped on exit."""
    store = SledStore(settings.database_path)
    await store.open()
    relay = FakeRelay()
    agent = SledAgent(settings, store, FakeWire(), relay)
    await agent.recover()
    running = asyncio.create_task(agent.run())
    try:
        yield agent, store, relay
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await store.close()


def settings_in(tmp_path: Path) -> SledSettings:
    return SledSettings(
        sled_id=uuid.uuid4(),
        data_dir=tmp_path,
        cpus=4,
        memory_bytes=1 << 32,
        boot_seconds=0.01,
        stop_seconds=0.01,
    )


def a_spec() -> VmmSpec:
    return VmmSpec(
        id=uuid.uuid4(), instance_id=uuid.uuid4(), name="web-1", ncpus=1, memory_bytes=1 << 30
    )


async def until(agent: SledAgent, relay: FakeRelay, vmm_id: uuid.UUID, state: VmmState) -> None:
    async with asyncio.timeout(5):
        while (vm := agent.hypervisor.get(vmm_id)) is None or vm.state is not state:
            relay.committed.clear()
            await relay.committed.wait()


async def test_a_command_is_committed_with_its_event_before_it_returns(tmp_path: Path) -> None:
    settings = settings_in(tmp_path).model_copy(update={"boot_seconds": 60.0})
    async with an_agent(settings) as (agent, store, relay):
        spec = a_spec()
        await agent.handle(delivery(VmmEnsure(source=SOURCE, payload=spec)))
        messages = await outbox_messages(store)
        assert [type(m) for m in messages] == [SledRegistered, VmmStateChanged]
        event = messages[1]
        assert isinstance(event, VmmStateChanged)
        assert event.payload.vmm.state is VmmState.STARTING
        assert relay.notified == 2
        reloaded = await store.load()
        assert [vm.vmm for vm in reloaded] == [event.payload.vmm]


async def test_a_redelivered_refused_command_is_refused_once(tmp_path: Path) -> None:
    async with an_agent(settings_in(tmp_path)) as (agent, store, _):
        start = VmmStop(source=SOURCE, payload=VmmRef(id=uuid.uuid4()))
        await agent.handle(delivery(start, reply_to="amq.gen-test"))
        await agent.handle(delivery(start, reply_to="amq.gen-test"))
        rejections = [m for m in await outbox_messages(store) if isinstance(m, CommandRejected)]
    # One event and one reply, each recorded once.
    assert len(rejections) == 2
    assert {r.payload.code for r in rejections} == {"not_found"}
    assert all(r.causation_id == start.id for r in rejections)


async def test_a_restart_fails_live_vmms_with_the_next_generation(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    spec = a_spec()
    async with an_agent(settings) as (agent, _, relay):
        await agent.handle(delivery(VmmEnsure(source=SOURCE, payload=spec)))
        await until(agent, relay, spec.id, VmmState.RUNNING)

    async with an_agent(settings) as (restarted, store, _):
        vm = restarted.hypervisor.get(spec.id)
        assert vm is not None
        assert (vm.state, vm.generation, vm.vmm.reason) == (VmmState.FAILED, 3, RESTART_REASON)
        events = [m for m in await outbox_messages(store) if isinstance(m, VmmStateChanged)]
    assert [e.payload.vmm.generation for e in events] == [1, 2, 3]
    assert events[-1].payload.vmm == vm.vmm


async def test_a_late_ensure_for_a_stopped_vmm_publishes_nothing(tmp_path: Path) -> None:
    async with an_agent(settings_in(tmp_path)) as (agent, store, relay):
        spec = a_spec()
        ensure = VmmEnsure(source=SOURCE, payload=spec)
        await agent.handle(delivery(ensure))
        await until(agent, relay, spec.id, VmmState.RUNNING)
        await agent.handle(delivery(VmmStop(source=SOURCE, payload=VmmRef(id=spec.id))))
        await until(agent, relay, spec.id, VmmState.DESTROYED)
        before = await outbox_messages(store)
        await agent.handle(delivery(ensure))
        await agent.handle(delivery(VmmEnsure(source=SOURCE, payload=spec)))
        await asyncio.sleep(0.05)
        assert await outbox_messages(store) == before
        vm = agent.hypervisor.get(spec.id)
        assert vm is not None and vm.state is VmmState.DESTROYED


async def test_a_timed_transition_whose_commit_fails_transiently_is_made_once_it_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database fails under the agent's own timers (not a command, which the transport
    retries): the transition is tried again in place, and the agent runs on."""
    async with an_agent(settings_in(tmp_path)) as (agent, store, relay):
        spec = a_spec()
        await agent.handle(delivery(VmmEnsure(source=SOURCE, payload=spec)))
        real_save = store.save
        failures = [
            OperationalError("UPDATE", {}, sqlite3.OperationalError("database or disk is full"))
            for _ in range(3)
        ]

        async def save(*args: Any, **kwargs: Any) -> None:
            if failures:
                raise failures.pop()
            await real_save(*args, **kwargs)

        monkeypatch.setattr(store, "save", save)
        await until(agent, relay, spec.id, VmmState.RUNNING)
        assert failures == []
        assert agent.work_problem(stuck_after=0) is None
        states = [
            m.payload.vmm.state
            for m in await outbox_messages(store)
            if isinstance(m, VmmStateChanged)
        ]
    assert states == [VmmState.STARTING, VmmState.RUNNING]
