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

from crucible_agent import regions
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
    reservation_bytes,
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
        destroy_fail_fraction: float = ...,
        workers: int = ...,
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
        destroy_fail_fraction: float = 0.0,
        workers: int = 1,
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
            faults=Faults(Fixed(delay), fail_fraction, crash_fraction, destroy_fail_fraction),
            rng=random.Random(1),
            crash=crash,
            workers=workers,
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


async def test_a_region_that_cannot_reserve_its_space_fails_from_the_worker_and_keeps_its_port(
    agents: BuildAgent,
) -> None:
    agent = await agents(capacity=15_000)
    asked = region_spec(extent_count=3)  # 12 KiB, which reserves 15 KiB
    command = RegionEnsure(source=SOURCE, payload=asked)
    await agent.service.handle(delivery(command, reply_to="amq.gen-test"))
    (answer,) = [m for m in await agent.outbox() if isinstance(m, RegionInfo)]
    assert answer.payload.region is not None
    assert answer.payload.region.state is RegionState.REQUESTED, "accepted, then decided"
    await settle(agent)

    requested, failed = (e.payload.region for e in await agent.events(asked.id))
    assert (requested.state, failed.state) == (RegionState.REQUESTED, RegionState.FAILED)
    assert failed.failure == "cannot reserve 15360 bytes (1.25 x 12288): 15000 of 15000 free"
    assert failed.port_number == regions.FIRST_PORT
    assert not agent.files.directory(asked.id).exists()

    # The failed region keeps its port until it is destroyed.
    second = region_spec(extent_count=1)
    await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=second)))
    await agent.service.handle(
        delivery(RegionDelete(source=SOURCE, payload=RegionRef(id=asked.id)))
    )
    await settle(agent)
    third = region_spec(extent_count=1)
    await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=third)))
    await settle(agent)
    ports = {region.id: region.port_number for region in await agent.store.regions()}
    assert ports[second.id] == regions.FIRST_PORT + 1
    assert ports[third.id] == regions.FIRST_PORT, "given back by the destroyed region"


async def test_read_only_is_set_whenever_a_source_is(agents: BuildAgent) -> None:
    agent = await agents()
    plain = region_spec()
    clone = region_spec().model_copy(update={"source": "[fd00:1122:3344:101::7]:19000"})
    for spec in (plain, clone):
        await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=spec)))
    await settle(agent)
    read_only = {region.id: region.read_only for region in await agent.store.regions()}
    assert read_only == {plain.id: False, clone.id: True}
    (event,) = [e for e in await agent.events(clone.id) if e.payload.region.generation == 1]
    assert event.payload.region.read_only


async def most_at_once(agent: Agent) -> int:
    """Until the agent is idle: the most regions its workers held at once."""
    most = 0
    idle = asyncio.create_task(settle(agent))
    while not idle.done():
        most = max(most, len(agent.service.taken()))
        await asyncio.sleep(0.005)
    await idle
    return most


async def test_creates_run_one_at_a_time_so_their_delays_queue(agents: BuildAgent) -> None:
    agent = await agents(delay=0.3)
    asked = [region_spec() for _ in range(3)]
    started = asyncio.get_running_loop().time()
    for spec in asked:
        await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=spec)))
    assert await most_at_once(agent) == 1
    # Three delays one after the other (a slower machine only adds to it).
    assert asyncio.get_running_loop().time() - started >= 0.9
    assert {region.state for region in await agent.store.regions()} == {RegionState.CREATED}


async def test_more_workers_create_regions_at_once_and_never_the_same_one_twice(
    agents: BuildAgent,
) -> None:
    """The benchmark's setting (the real agent has one worker): with 3 workers, 3 of
    the 6 creates are under way at once, and each region is created once."""
    agent = await agents(delay=0.3, workers=3)
    asked = [region_spec() for _ in range(6)]
    for spec in asked:
        await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=spec)))
    assert await most_at_once(agent) == 3
    regions = await agent.store.regions()
    assert {region.state for region in regions} == {RegionState.CREATED}
    created = [
        message.payload.region.id
        for message in await agent.outbox()
        if isinstance(message, RegionStateChanged)
        and message.payload.region.state is RegionState.CREATED
    ]
    assert sorted(map(str, created)) == sorted(str(spec.id) for spec in asked)


async def test_a_delete_queued_behind_creates_is_carried_out_before_them(
    agents: BuildAgent,
) -> None:
    agent = await agents(delay=0.2)
    doomed = region_spec()
    await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=doomed)))
    await settle(agent)
    queued = [region_spec() for _ in range(3)]
    for spec in queued:
        await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=spec)))
    # Once the worker is in a create's delay: the first recorded may be taken before the
    # others are (the worker starts at the first record).
    async with asyncio.timeout(5):
        while not agent.service.taken():
            await asyncio.sleep(0.005)
    (under_way,) = agent.service.taken()
    rest = sorted(spec.id for spec in queued if spec.id != under_way)
    await agent.service.handle(
        delivery(RegionDelete(source=SOURCE, payload=RegionRef(id=doomed.id)))
    )
    await settle(agent)

    changes = [
        (m.payload.region.id, m.payload.region.state)
        for m in await agent.outbox()
        if isinstance(m, RegionStateChanged)
    ]
    done = [
        change for change in changes if change[1] in {RegionState.CREATED, RegionState.DESTROYED}
    ]
    # The create under way finishes; the delete goes before the two still queued, which
    # the worker takes in id order, as the real agent's map is ordered.
    assert done == [
        (doomed.id, RegionState.CREATED),
        (under_way, RegionState.CREATED),
        (doomed.id, RegionState.DESTROYED),
        *((region_id, RegionState.CREATED) for region_id in rest),
    ]


async def test_a_failed_destroy_leaves_the_region_failed_until_a_delete_is_sent_again(
    agents: BuildAgent,
) -> None:
    agent = await agents(destroy_fail_fraction=1.0)
    asked = region_spec()
    await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=asked)))
    await settle(agent)
    delete = RegionDelete(source=SOURCE, payload=RegionRef(id=asked.id))
    await agent.service.handle(delivery(delete))
    await settle(agent)

    events = await agent.events(asked.id)
    assert [(e.payload.region.state, e.payload.region.generation) for e in events] == [
        (RegionState.REQUESTED, 1),
        (RegionState.CREATED, 2),
        (RegionState.TOMBSTONED, 3),
        (RegionState.FAILED, 4),
    ]
    failed = events[-1]
    assert failed.routing_key() == "region.failed"
    assert failed.causation_id == delete.id
    assert (failed.payload.region.failure or "").startswith("destroy failed: injected")
    assert len(agent.files.extent_paths(asked.id)) == 3, "the files are still there"
    await agent.service.stop()
    await agent.store.close()

    # The fault is gone; the delete, sent again, tombstones the region again and the
    # worker destroys it.
    restarted = await agents()
    await restarted.service.resume()
    await restarted.service.handle(delivery(delete))
    await settle(restarted)
    (region,) = await restarted.store.regions()
    assert (region.state, region.generation) == (RegionState.DESTROYED, 6)
    assert not restarted.files.directory(asked.id).exists()


async def test_files_that_cannot_be_removed_fail_the_destroy_with_the_reason(
    agents: BuildAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = await agents()
    asked = region_spec()
    await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=asked)))
    await settle(agent)

    def busy(self: RegionFiles, region_id: uuid.UUID) -> None:
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(RegionFiles, "remove", busy)
    await agent.service.handle(
        delivery(RegionDelete(source=SOURCE, payload=RegionRef(id=asked.id)))
    )
    await settle(agent)
    (region,) = await agent.store.regions()
    assert region.state is RegionState.FAILED
    assert region.failure == (
        "destroy failed: could not remove the region's files: [Errno 16] Device or resource busy"
    )
    assert region.port_number == regions.FIRST_PORT


async def test_with_every_port_taken_a_create_is_refused_and_nothing_recorded(
    agents: BuildAgent, tmp_path: Path
) -> None:
    agent = await agents()
    await agent.store.close()
    take_every_port(tmp_path / "agent.sqlite")
    agent = await agents()
    asked = region_spec()
    command = RegionEnsure(source=SOURCE, payload=asked)
    await agent.service.handle(delivery(command, reply_to="amq.gen-test"))
    await settle(agent)

    assert await agent.store.region(asked.id) is None
    assert not agent.files.directory(asked.id).exists()
    rejections = [m for m in await agent.outbox() if isinstance(m, CommandRejected)]
    assert len(rejections) == 2, "one event, one reply"
    assert {(r.payload.code, r.payload.message) for r in rejections} == {
        ("no_free_port", "no free port in 19000-19999")
    }
    assert {r.causation_id for r in rejections} == {command.id}


def take_every_port(database: Path) -> None:
    """Regions on every port of the range, written directly (a thousand creates would
    write a thousand sets of files)."""
    cause = uuid.uuid4().hex
    with sqlite3.connect(database) as db:
        db.executemany(
            "INSERT INTO regions (id, block_size, extent_size, extent_count, encrypted, "
            "port_number, read_only, state, generation, cause_id, correlation_id) "
            "VALUES (?, 512, 1, 1, 1, ?, 0, 'created', 1, ?, ?)",
            [
                (uuid.uuid4().hex, port, cause, cause)
                for port in range(regions.FIRST_PORT, regions.LAST_PORT + 1)
            ],
        )


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
    used = sum(reservation_bytes(spec.size_bytes) for spec in asked)
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
    reserved = reservation_bytes(asked.size_bytes)
    assert (first.payload.free_bytes, first.payload.regions) == (CAPACITY - reserved, 1)
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
    assert announced.payload.regions == 1


async def test_injected_failures_fail_the_create_with_a_reason_and_keep_the_files(
    agents: BuildAgent,
) -> None:
    agent = await agents(fail_fraction=1.0)
    asked = region_spec()
    await agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=asked)))
    await settle(agent)
    (region,) = await agent.store.regions()
    assert region.state is RegionState.FAILED
    assert "injected" in (region.failure or "")
    assert len(agent.files.extent_paths(asked.id)) == 3, "kept until the region is deleted"
    await agent.service.handle(
        delivery(RegionDelete(source=SOURCE, payload=RegionRef(id=asked.id)))
    )
    await settle(agent)
    (region,) = await agent.store.regions()
    assert region.state is RegionState.DESTROYED
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
