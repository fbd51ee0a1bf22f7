"""The crucible agent on a data directory that fills, played by a fake filesystem: its
real SQLite store and files, but every write is charged to a fake amount of free space,
and a write that does not fit fails as it would on a full disk (SQLite's "database or
disk is full", ENOSPC from the region files). The real thing, on a tmpfs the test fills,
is tests/integration/test_crucible_out_of_space.py."""

from __future__ import annotations

import errno
import random
import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
from sqlalchemy.exc import OperationalError

from crucible_agent.delay import Fixed
from crucible_agent.files import RegionFiles
from crucible_agent.service import Faults, RegionService
from crucible_agent.space import SpaceReserve, is_out_of_space
from crucible_agent.store import AgentStore, Cause, Transaction
from schemas.base import Envelope
from schemas.common import CommandRejected
from schemas.outbox import OutgoingMessage
from schemas.region import (
    Region,
    RegionDelete,
    RegionEnsure,
    RegionGet,
    RegionInfo,
    RegionList,
    RegionListed,
    RegionRef,
    RegionState,
)
from tests.unit.test_crucible_service import (
    SOURCE,
    Agent,
    CollectingReplier,
    CountingRelay,
    delivery,
    region_spec,
    settle,
)

# What one committed write costs the fake filesystem, and what sealing a region does
# (its manifest; the extents are sparse and cost nothing, as on a real filesystem).
WRITE_BYTES = 4096
SEAL_BYTES = 4096
RESERVE = 64 * 1024
REPLY_TO = "amq.gen-test"


@dataclass
class FakeFilesystem:
    free: int

    def take(self, size: int) -> None:
        if size > self.free:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.free -= size

    def fill(self) -> None:
        """As a filler file written until ENOSPC does."""
        self.free = 0


def sqlite_full() -> OperationalError:
    """SQLite's error on a full disk, as SQLAlchemy hands it on."""
    error = sqlite3.OperationalError("database or disk is full")
    error.sqlite_errorcode = sqlite3.SQLITE_FULL
    error.sqlite_errorname = "SQLITE_FULL"
    return OperationalError("COMMIT", None, error)


class ChargedTransaction(Transaction):
    wrote = False

    async def insert(self, region: Region, cause: Cause) -> None:
        self.wrote = True
        await super().insert(region, cause)

    async def update(self, region: Region, cause: Cause) -> None:
        self.wrote = True
        await super().update(region, cause)

    async def send(self, message: OutgoingMessage) -> None:
        self.wrote = True
        await super().send(message)


class ChargedStore(AgentStore):
    """A transaction that writes fails at its commit when the filesystem has no room."""

    filesystem: FakeFilesystem

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        async with super().transaction():
            charged = ChargedTransaction(self._connection)
            yield charged
            if charged.wrote:
                try:
                    self.filesystem.take(WRITE_BYTES)
                except OSError:
                    raise sqlite_full() from None


class ChargedFiles(RegionFiles):
    def __init__(self, root: Path, filesystem: FakeFilesystem) -> None:
        super().__init__(root)
        self._filesystem = filesystem

    def seal(self, region: Region) -> None:
        self._filesystem.take(SEAL_BYTES)
        super().seal(region)


class ChargedReserve(SpaceReserve):
    """The real reserve file, but its size is charged to the fake filesystem."""

    def __init__(self, path: Path, size: int, filesystem: FakeFilesystem) -> None:
        super().__init__(path, size)
        self._filesystem = filesystem

    def free_bytes(self) -> int:
        return self._filesystem.free

    def _allocate(self) -> None:
        self._filesystem.take(self.size)
        super()._allocate()

    def release(self) -> bool:
        released = super().release()
        if released:
            self._filesystem.free += self.size
        return released


@dataclass
class FullAgent(Agent):
    filesystem: FakeFilesystem
    reserve: SpaceReserve

    def direct(self, kind: type[Envelope]) -> list[Any]:
        """What the agent published directly (not through its outbox)."""
        return [message for message in self.replier.events if isinstance(message, kind)]

    def replies(self, kind: type[Envelope]) -> list[Any]:
        return [message for message in self.replier.replies if isinstance(message, kind)]


class BuildAgent(Protocol):
    async def __call__(self, reserve: int = ...) -> FullAgent: ...


@pytest.fixture
async def agents(tmp_path: Path) -> AsyncIterator[BuildAgent]:
    opened: list[FullAgent] = []

    async def build(reserve: int = RESERVE) -> FullAgent:
        filesystem = FakeFilesystem(free=1 << 20)
        space = ChargedReserve(tmp_path / "space.reserve", reserve, filesystem)
        store = await ChargedStore.open(tmp_path / "agent.sqlite", reserve=space)
        store.filesystem = filesystem
        files = ChargedFiles(tmp_path / "regions", filesystem)
        replier = CollectingReplier()
        service = RegionService(
            agent_id=uuid.uuid4(),
            sled_id=uuid.uuid4(),
            capacity_bytes=1 << 30,
            # Announcements write too: after the file work here, not racing it.
            coalesce_seconds=0.3,
            store=store,
            files=files,
            relay=CountingRelay(),
            replier=replier,
            faults=Faults(Fixed(0.0)),
            rng=random.Random(1),
            reserve=space,
        )
        await service.resume()
        agent = FullAgent(service, store, files, replier, filesystem, space)
        opened.append(agent)
        return agent

    yield build
    for agent in opened:
        await agent.service.stop()
        await agent.store.close()


async def ensure(agent: Agent, spec: Any) -> RegionEnsure:
    command = RegionEnsure(source=SOURCE, payload=spec, correlation_id=uuid.uuid4())
    await agent.service.handle(delivery(command, reply_to=REPLY_TO))
    await settle(agent)
    return command


async def stored(agent: Agent, region_id: uuid.UUID) -> Region:
    region = await agent.store.region(region_id)
    assert region is not None
    return region


async def test_a_create_on_a_full_disk_fails_out_of_space_and_the_agent_recovers(
    agents: BuildAgent,
) -> None:
    agent = await agents()
    assert agent.reserve.held
    kept = region_spec()
    await ensure(agent, kept)
    assert (await stored(agent, kept.id)).state is RegionState.CREATED

    agent.filesystem.fill()
    refused = region_spec()
    command = await ensure(agent, refused)

    # Recorded in the room the released reserve left, then failed by the worker, which
    # cannot reserve space for it; each with its event; no files.
    region = await stored(agent, refused.id)
    assert region.state is RegionState.FAILED
    assert (region.failure or "").startswith("out of space: ")
    assert [e.payload.region.state for e in await agent.events(refused.id)] == [
        RegionState.REQUESTED,
        RegionState.FAILED,
    ]
    assert not agent.files.directory(refused.id).exists()
    assert not agent.reserve.held
    (answer,) = [
        m
        for m in await agent.outbox()
        if isinstance(m, RegionInfo) and m.causation_id == command.id
    ]
    assert answer.payload.region is not None
    assert answer.payload.region.state is RegionState.REQUESTED

    # Reads are answered, deletes recorded and carried out.
    get = RegionGet(source=SOURCE, payload=RegionRef(id=refused.id))
    await agent.service.handle(delivery(get, reply_to=REPLY_TO))
    await agent.service.handle(delivery(RegionList(source=SOURCE), reply_to=REPLY_TO))
    (got,) = agent.replies(RegionInfo)
    assert got.causation_id == get.id and got.payload.region == region
    (listed,) = agent.replies(RegionListed)
    assert {r.id for r in listed.payload.regions} == {kept.id, refused.id}
    for region_id in (kept.id, refused.id):
        await agent.service.handle(
            delivery(RegionDelete(source=SOURCE, payload=RegionRef(id=region_id)))
        )
    await settle(agent)
    assert (await stored(agent, kept.id)).state is RegionState.DESTROYED
    assert (await stored(agent, refused.id)).state is RegionState.DESTROYED
    assert not agent.files.directory(kept.id).exists()

    # Still short of space: the next create fails before any file is written.
    another = region_spec()
    await ensure(agent, another)
    assert ((await stored(agent, another.id)).failure or "").startswith("out of space: ")
    assert not agent.files.directory(another.id).exists()

    # Space comes back: the reserve is taken again and creates succeed.
    agent.filesystem.free = 1 << 20
    after = region_spec()
    await ensure(agent, after)
    assert (await stored(agent, after.id)).state is RegionState.CREATED
    assert agent.reserve.held
    assert not agent.direct(CommandRejected), "everything was recorded"


async def test_extent_files_that_do_not_fit_are_removed_and_the_region_fails_out_of_space(
    agents: BuildAgent,
) -> None:
    agent = await agents()
    # Room for the ``requested`` record, none for the region's manifest.
    agent.filesystem.free = WRITE_BYTES
    spec = region_spec()
    await ensure(agent, spec)

    region = await stored(agent, spec.id)
    assert region.state is RegionState.FAILED
    assert (region.failure or "").startswith("out of space: could not write the extent files")
    assert "No space left on device" in (region.failure or "")
    assert [e.payload.region.state for e in await agent.events(spec.id)] == [
        RegionState.REQUESTED,
        RegionState.FAILED,
    ]
    assert not agent.files.directory(spec.id).exists(), "no half-written region is left"
    assert not agent.reserve.held, "released to record the failure"


async def test_without_room_for_a_record_the_create_is_refused_out_of_space_directly(
    agents: BuildAgent,
) -> None:
    agent = await agents(reserve=0)
    agent.filesystem.fill()
    spec = region_spec()
    command = await ensure(agent, spec)

    assert await agent.store.region(spec.id) is None
    assert not agent.files.directory(spec.id).exists()
    (rejected,) = agent.direct(CommandRejected)
    assert rejected.payload.command_id == command.id
    assert rejected.payload.code == "out_of_space"
    assert rejected.payload.message.startswith("out of space: ")
    assert rejected.correlation_id == command.correlation_id
    (answer,) = agent.replies(CommandRejected)
    assert answer.payload == rejected.payload

    # A delete of what it never recorded is answered too; announcing does not fail.
    await agent.service.handle(
        delivery(RegionDelete(source=SOURCE, payload=RegionRef(id=spec.id)), reply_to=REPLY_TO)
    )
    assert [r.payload.code for r in agent.direct(CommandRejected)] == [
        "out_of_space",
        "not_found",
    ]
    await agent.service.announce()

    # The same command again once space is back (a redelivery, or Nexus re-sending it).
    agent.filesystem.free = 1 << 20
    await agent.service.handle(delivery(command, reply_to=REPLY_TO))
    await settle(agent)
    assert (await stored(agent, spec.id)).state is RegionState.CREATED


def test_out_of_space_is_told_from_other_failures(tmp_path: Path) -> None:
    assert is_out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert is_out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_out_of_space(sqlite_full())
    db = sqlite3.connect(tmp_path / "small.sqlite")
    db.execute("CREATE TABLE filler (data BLOB)")
    db.execute("PRAGMA max_page_count = 4")
    with pytest.raises(sqlite3.OperationalError) as real:
        for _ in range(10):
            db.execute("INSERT INTO filler VALUES (?)", (bytes(2000),))
    assert is_out_of_space(real.value), "SQLite's own SQLITE_FULL"
    try:
        raise RuntimeError("wrapped") from OSError(errno.ENOSPC, "No space left on device")
    except RuntimeError as wrapped:
        assert is_out_of_space(wrapped)
    assert not is_out_of_space(OSError(errno.EIO, "Input/output error"))
    assert not is_out_of_space(sqlite3.OperationalError("database is locked"))
    assert not is_out_of_space(ValueError("no"))
