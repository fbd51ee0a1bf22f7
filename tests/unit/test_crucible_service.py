"""The crucible agent's service on its real SQLite store and real files, with no broker:
the outbox is read back from the database, replies are collected in memory."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest
from sqlalchemy.exc import OperationalError

from crucible_agent.delay import Fixed
from crucible_agent.files import MANIFEST, RegionFiles
from crucible_agent.service import Faults, RegionService, event_id
from crucible_agent.store import AgentStore, Cause, Transaction
from schemas.base import Envelope
from schemas.common import CommandRejected
from schemas.messages import Message, decode
from schemas.region import (
    RegionDelete,
    RegionEnsure,
    RegionGet,
    RegionInfo,
    RegionList,
    RegionListed,
    RegionRef,
    RegionSpec,
    RegionState,
    RegionStateChanged,
)
from schemas.sled import AgentAnnounced
from schemas.transport import Delivery

SOURCE = "nexus/test"
CAPACITY = 1 << 30


class CountingRelay:
    def __init__(self) -> None:
        self.notified = 0

    def notify(self) -> None:
        self.notified += 1


@dataclass
class CollectingReplier:
    replies: list[Envelope] = field(default_factory=list)
    # Published directly, not through the outbox.
    events: list[Envelope] = field(default_factory=list)

    async def reply(self, delivery: Delivery, message: Envelope) -> None:
        self.replies.append(message)

    async def publish_event(self, message: Envelope) -> None:
        self.events.append(message)


class InjectedCrash(Exception):
    """Stands in for SIGKILL: the work stops where it is and nothing else runs."""


@dataclass
class Agent:
    service: RegionService
    store: AgentStore
    files: RegionFiles
    replier: CollectingReplier

    async def outbox(self) -> list[Message]:
        return [decode(row.body) for row in await self.store.unsent(1000)]

    async def events(self, region_id: uuid.UUID) -> list[RegionStateChanged]:
        return [
            message
            for message in await self.outbox()
            if isinstance(message, RegionStateChanged) and message.payload.region.id == region_id
        ]


class BuildAgent(Protocol):
    async def __call__(
        self,
        delay: float = ...,
        fail_fraction: float = ...,
        crash_fraction: float = ...,
        capacity: int = ...,
        coalesce: float = ...,
    ) -> Agent: ...


@pytest.fixture
async def agents(tmp_path: Path) -> AsyncIterator[BuildAgent]:
    """Builds agents on ``data_dir`` (a second one is a restart); closes them after."""
    agent_id, sled_id = uuid.uuid4(), uuid.uuid4()
    opened: list[Agent] = []

    async def build(
        delay: float = 0.0,
        fail_fraction: float = 0.0,
        crash_fraction: float = 0.0,
        capacity: int = CAPACITY,
        coalesce: float = 0.0,
    ) -> Agent:
        store = await AgentStore.open(tmp_path / "agent.sqlite")
        files = RegionFiles(tmp_path / "regions")
        replier = CollectingReplier()

        def crash() -> None:
            raise InjectedCrash

        service = RegionService(
            agent_id=agent_id,
            sled_id=sled_id,
            capacity_bytes=capacity,
            coalesce_seconds=coalesce,
            store=store,
            files=files,
            relay=CountingRelay(),
            replier=replier,
            faults=Faults(Fixed(delay), fail_fraction, crash_fraction),
            rng=random.Random(1),
            crash=crash,
        )
        agent = Agent(service, store, files, replier)
        opened.append(agent)
        return agent

    yield build
    for agent in opened:
        await agent.service.stop()
        await agent.store.close()


def delivery(message: Message, reply_to: str | None = None) -> Delivery:
    return Delivery(
        message=message, queue="crucible.test", routing_key="", reply_to=reply_to, redelivered=False
    )


def region_spec(extent_count: int = 3) -> RegionSpec:
    return RegionSpec(id=uuid.uuid4(), block_size=512, extent_size=8, extent_count=extent_count)


async def settle(agent: Agent) -> None:
    """Until the background work started so far has finished."""
    await agent.service.wait_idle()


async def test_ensure_twice_makes_one_region_one_set_of_files_and_one_event_per_change(
    agents: BuildAgent,
) -> None:
    agent = await agents()
    asked = region_spec()
    command = RegionEnsure(source=SOURCE, payload=asked)
    await agent.service.handle(delivery(command))
    await agent.service.handle(delivery(command))
    await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=asked)))
    await settle(agent)

    (region,) = await agent.store.regions()
    assert (region.state, region.generation) == (RegionState.CREATED, 2)
    events = await agent.events(asked.id)
    assert [(e.payload.region.state, e.payload.region.generation) for e in events] == [
        (RegionState.REQUESTED, 1),
        (RegionState.CREATED, 2),
    ]
    assert [e.id for e in events] == [
        event_id(agent.service.agent_id, e.payload.region) for e in events
    ]
    assert all(e.causation_id == command.id for e in events)
    extents = agent.files.extent_paths(asked.id)
    assert len(extents) == 3
    assert all(path.stat().st_size == 8 * 512 for path in extents)
    assert (agent.files.directory(asked.id) / MANIFEST).exists()


async def test_conflicting_parameters_are_rejected_and_change_nothing(
    agents: BuildAgent,
) -> None:
    agent = await agents()
    asked = region_spec()
    await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=asked)))
    await settle(agent)
    before = await agent.store.regions()
    files_before = agent.files.extent_paths(asked.id)

    clash = RegionEnsure(source=SOURCE, payload=asked.model_copy(update={"extent_count": 4}))
    await agent.service.handle(delivery(clash, reply_to="amq.gen-test"))

    assert await agent.store.regions() == before
    assert agent.files.extent_paths(asked.id) == files_before
    rejections = [m for m in await agent.outbox() if isinstance(m, CommandRejected)]
    assert len(rejections) == 2, "one event, one reply"
    assert {r.payload.code for r in rejections} == {"conflict"}
    assert {r.causation_id for r in rejections} == {clash.id}
    assert "extent_count" in rejections[0].payload.message


async def test_a_create_deleted_while_it_waits_stays_tombstoned_then_is_destroyed(
    agents: BuildAgent,
) -> None:
    agent = await agents(delay=0.2)
    asked = region_spec()
    await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=asked)))
    delete = RegionDelete(source=SOURCE, payload=RegionRef(id=asked.id))
    await agent.service.handle(delivery(delete))
    await asyncio.sleep(0.4)
    await agent.service.handle(delivery(delete))
    await settle(agent)

    states = [e.payload.region.state for e in await agent.events(asked.id)]
    assert states == [RegionState.REQUESTED, RegionState.TOMBSTONED, RegionState.DESTROYED]
    assert not agent.files.directory(asked.id).exists()


async def test_delete_of_an_unknown_region_is_rejected_as_not_found(
    agents: BuildAgent,
) -> None:
    agent = await agents()
    await agent.service.handle(
        delivery(RegionDelete(source=SOURCE, payload=RegionRef(id=uuid.uuid4())))
    )
    (rejected,) = [m for m in await agent.outbox() if isinstance(m, CommandRejected)]
    assert rejected.payload.code == "not_found"


async def test_a_region_too_big_for_the_capacity_fails_and_announces_nothing_new(
    agents: BuildAgent,
) -> None:
    agent = await agents(capacity=10_000)
    asked = region_spec(extent_count=3)  # 12 KiB
    await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=asked)))
    await settle(agent)
    (event,) = await agent.events(asked.id)
    assert event.payload.region.state is RegionState.FAILED
    assert "does not fit" in (event.payload.region.failure or "")
    assert not agent.files.directory(asked.id).exists()
    assert not [m for m in await agent.outbox() if isinstance(m, AgentAnnounced)]


async def announcements(agent: Agent) -> list[AgentAnnounced]:
    return [m for m in await agent.outbox() if isinstance(m, AgentAnnounced)]


async def test_a_burst_of_changes_is_announced_once_after_the_wait_with_the_capacity_left(
    agents: BuildAgent,
) -> None:
    agent = await agents(coalesce=0.3)
    asked = [region_spec() for _ in range(3)]
    for spec in asked:
        await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=spec)))
    assert not await announcements(agent), "not before the wait is over"
    await settle(agent)
    (announced,) = await announcements(agent)
    used = sum(spec.size_bytes for spec in asked)
    assert (announced.payload.free_bytes, announced.payload.regions) == (CAPACITY - used, 3)


async def test_a_change_after_an_announcement_is_announced_again(agents: BuildAgent) -> None:
    agent = await agents(coalesce=0.1)
    asked = region_spec()
    await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=asked)))
    await settle(agent)
    await agent.service.handle(
        delivery(RegionDelete(source=SOURCE, payload=RegionRef(id=asked.id)))
    )
    await settle(agent)
    first, second = await announcements(agent)
    assert (first.payload.free_bytes, first.payload.regions) == (CAPACITY - asked.size_bytes, 1)
    assert (second.payload.free_bytes, second.payload.regions) == (CAPACITY, 0)


async def test_an_announcement_still_waiting_at_a_stop_is_made_at_the_next_start(
    agents: BuildAgent,
) -> None:
    agent = await agents(coalesce=60.0)
    asked = region_spec()
    await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=asked)))
    await agent.service.stop()
    await agent.service.wait_idle()
    assert not await announcements(agent)

    restarted = await agents(coalesce=60.0)
    await restarted.service.resume()
    (announced,) = await announcements(restarted)
    assert announced.payload.free_bytes == CAPACITY - asked.size_bytes


async def test_injected_failures_fail_the_create_with_a_reason(
    agents: BuildAgent,
) -> None:
    agent = await agents(fail_fraction=1.0)
    asked = region_spec()
    await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=asked)))
    await settle(agent)
    (region,) = await agent.store.regions()
    assert region.state is RegionState.FAILED
    assert "injected" in (region.failure or "")
    assert not agent.files.directory(asked.id).exists()


async def test_a_crash_mid_create_is_resumed_by_the_next_start(
    agents: BuildAgent,
) -> None:
    first = await agents(crash_fraction=1.0)
    asked = region_spec(extent_count=4)
    await first.service.handle(delivery(RegionEnsure(source=SOURCE, payload=asked)))
    await settle(first)
    assert len(first.files.extent_paths(asked.id)) == 2, "died halfway through the extents"
    assert not (first.files.directory(asked.id) / MANIFEST).exists()
    await first.store.close()

    second = await agents()
    await second.service.resume()
    await settle(second)
    (region,) = await second.store.regions()
    assert (region.state, region.generation) == (RegionState.CREATED, 2)
    assert len(second.files.extent_paths(asked.id)) == 4
    assert (second.files.directory(asked.id) / MANIFEST).exists()
    assert [e.payload.region.generation for e in await second.events(asked.id)] == [1, 2]


async def test_get_and_list_answer_from_the_records(
    agents: BuildAgent,
) -> None:
    agent = await agents()
    asked = region_spec()
    await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=asked)))
    await settle(agent)
    unknown = uuid.uuid4()
    get = RegionGet(source=SOURCE, payload=RegionRef(id=asked.id))
    await agent.service.handle(delivery(get, reply_to="amq.gen-test"))
    await agent.service.handle(
        delivery(RegionGet(source=SOURCE, payload=RegionRef(id=unknown)), reply_to="amq.gen-test")
    )
    await agent.service.handle(delivery(RegionList(source=SOURCE), reply_to="amq.gen-test"))

    found, missing, listed = agent.replier.replies
    assert isinstance(found, RegionInfo) and isinstance(missing, RegionInfo)
    assert found.causation_id == get.id
    assert found.payload.region is not None
    assert found.payload.region.state is RegionState.CREATED
    assert (missing.payload.region_id, missing.payload.region) == (unknown, None)
    assert isinstance(listed, RegionListed)
    assert [region.id for region in listed.payload.regions] == [asked.id]


def failing_cause(monkeypatch: pytest.MonkeyPatch, errors: list[Exception]) -> list[int]:
    """The store's read of a region's cause, which only background work makes, fails with
    each of ``errors`` in turn, then works; returns the count of calls."""
    calls = [0]
    real = Transaction.cause

    async def cause(self: Transaction, region_id: uuid.UUID) -> Cause:
        calls[0] += 1
        if calls[0] <= len(errors):
            raise errors[calls[0] - 1]
        return await real(self, region_id)

    monkeypatch.setattr(Transaction, "cause", cause)
    return calls


async def test_region_work_failing_on_a_transient_error_is_run_again_until_done(
    agents: BuildAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk_io = OperationalError("SELECT", {}, sqlite3.OperationalError("disk I/O error"))
    full = OperationalError("UPDATE", {}, sqlite3.OperationalError("database or disk is full"))
    calls = failing_cause(monkeypatch, [disk_io, full, disk_io])
    agent = await agents()
    asked = region_spec()
    await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=asked)))
    async with asyncio.timeout(10):
        await settle(agent)

    (region,) = await agent.store.regions()
    assert (region.state, region.generation) == (RegionState.CREATED, 2)
    assert calls[0] == 4
    assert agent.service.work_problem(stuck_after=0) is None


async def test_region_work_failing_on_its_own_error_stops_the_agent_and_is_resumed(
    agents: BuildAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing_cause(monkeypatch, [KeyError("a bug")])
    agent = await agents()
    asked = region_spec()
    await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=asked)))
    with pytest.raises(RuntimeError, match="region work failed") as failed:
        async with asyncio.timeout(10):
            await agent.service.failed()
    assert isinstance(failed.value.__cause__, KeyError)
    (region,) = await agent.store.regions()
    assert region.state == RegionState.REQUESTED, "the outcome was not recorded"
    await agent.service.stop()
    await agent.store.close()

    restarted = await agents()
    await restarted.service.resume()
    async with asyncio.timeout(10):
        await settle(restarted)
    (region,) = await restarted.store.regions()
    assert (region.state, region.generation) == (RegionState.CREATED, 2)
