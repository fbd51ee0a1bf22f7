"""Group commit in the crucible agent: what a group decides (who shares a transaction,
who runs again alone, when a member may return), first on a recording fake storage,
then on the real store and service (ensures delivered together, one of them bad)."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy.exc import OperationalError

from crucible_agent.group_commit import GroupCommit
from crucible_agent.store import AgentStore, Transaction
from schemas.region import RegionEnsure, RegionState, RegionStateChanged
from tests.unit.test_crucible_service import (
    SOURCE,
    BuildAgent,
    agents,  # noqa: F401  (the fixture)
    delivery,
    region_spec,
    settle,
)

T = TypeVar("T")


class DatabaseError(Exception):
    """Stands in for the store's database errors (``group_error``)."""


@dataclass
class FakeTx:
    number: int
    alone: bool
    writes: list[str] = field(default_factory=list)


@dataclass
class FakeStorage:
    """Transactions as lists of writes; what was committed, and in which transaction."""

    log: list[str] = field(default_factory=list)
    committed: list[list[str]] = field(default_factory=list)
    fail_commits: int = 0
    hold_commit: asyncio.Event | None = None
    opened: int = 0

    async def begin(self) -> FakeTx:
        self.opened += 1
        self.log.append(f"begin {self.opened}")
        return FakeTx(self.opened, alone=False)

    async def end(self, tx: FakeTx, *, commit: bool) -> None:
        if not commit:
            self.log.append(f"rollback {tx.number}")
            return
        if self.hold_commit is not None:
            await self.hold_commit.wait()
        if self.fail_commits > 0:
            self.fail_commits -= 1
            self.log.append(f"commit failed {tx.number}")
            raise DatabaseError("disk I/O error")
        self.log.append(f"commit {tx.number}")
        self.committed.append(tx.writes)

    async def alone(self, body: Callable[[FakeTx], Awaitable[T]]) -> T:
        self.opened += 1
        tx = FakeTx(self.opened, alone=True)
        self.log.append(f"alone {tx.number}")
        result = await body(tx)
        self.committed.append(tx.writes)
        return result

    def group_error(self, error: BaseException) -> bool:
        return isinstance(error, DatabaseError)


def writer(
    name: str, runs: list[str], error: BaseException | None = None
) -> Callable[[FakeTx], Awaitable[str]]:
    async def body(tx: FakeTx) -> str:
        runs.append(f"{name} in {'alone' if tx.alone else 'group'} {tx.number}")
        if error is not None and not tx.alone:
            raise error
        tx.writes.append(name)
        return name

    return body


async def together(
    group: GroupCommit[FakeTx], *bodies: Callable[[FakeTx], Awaitable[str]]
) -> list[str | BaseException]:
    """The bodies submitted at once, as concurrent deliveries are."""
    return await asyncio.gather(*(group.run(body) for body in bodies), return_exceptions=True)


async def test_writes_that_arrive_together_share_one_transaction_and_one_commit() -> None:
    storage = FakeStorage()
    group = GroupCommit(storage)
    runs: list[str] = []
    results = await together(group, *(writer(f"w{n}", runs) for n in range(5)))
    assert results == ["w0", "w1", "w2", "w3", "w4"]
    assert storage.log == ["begin 1", "commit 1"]
    assert storage.committed == [["w0", "w1", "w2", "w3", "w4"]]
    assert (group.counts.groups, group.counts.members, group.counts.splits) == (1, 5, 0)


async def test_a_group_is_bounded() -> None:
    storage = FakeStorage()
    group = GroupCommit(storage, max_members=2)
    runs: list[str] = []
    await together(group, *(writer(f"w{n}", runs) for n in range(5)))
    assert storage.committed == [["w0", "w1"], ["w2", "w3"], ["w4"]]


async def test_no_member_returns_before_the_commit() -> None:
    """A command's handler returns (and the transport acks it) only after the commit."""
    storage = FakeStorage(hold_commit=asyncio.Event())
    group = GroupCommit(storage)
    runs: list[str] = []
    members = [asyncio.create_task(group.run(writer(f"w{n}", runs))) for n in range(3)]
    while len(runs) < 3:
        await asyncio.sleep(0)
    for _ in range(10):
        await asyncio.sleep(0)
    assert not any(member.done() for member in members), "returned before the commit"
    assert storage.committed == []
    assert storage.hold_commit is not None
    storage.hold_commit.set()
    assert await asyncio.gather(*members) == ["w0", "w1", "w2"]
    assert storage.committed == [["w0", "w1", "w2"]]


async def test_a_body_that_fails_fails_alone_and_the_others_run_again_alone() -> None:
    storage = FakeStorage()
    group = GroupCommit(storage)
    runs: list[str] = []
    bad = ValueError("a bad command")
    results = await together(
        group, writer("w0", runs), writer("bad", runs, error=bad), writer("w2", runs)
    )
    assert results == ["w0", bad, "w2"]
    # The group (w0, bad) was rolled back; w2 came after it, in a group of its own.
    assert storage.log[:2] == ["begin 1", "rollback 1"]
    assert ["w0"] in storage.committed and ["w2"] in storage.committed
    assert ["w0", "bad"] not in storage.committed
    assert runs.count("bad in group 1") == 1, "the failing body does not run twice"
    assert "w0 in group 1" in runs and any(run.startswith("w0 in alone") for run in runs)
    assert group.counts.splits == 1


async def test_a_failed_commit_runs_every_member_again_alone() -> None:
    storage = FakeStorage(fail_commits=1)
    group = GroupCommit(storage)
    runs: list[str] = []
    results = await together(group, *(writer(f"w{n}", runs) for n in range(3)))
    assert results == ["w0", "w1", "w2"]
    assert storage.log[:2] == ["begin 1", "commit failed 1"]
    assert sorted(storage.committed) == [["w0"], ["w1"], ["w2"]]
    assert group.counts.splits == 3


async def test_a_database_error_in_a_body_runs_that_body_alone_too() -> None:
    """A full disk or an I/O error may be the group's, not the member's own."""
    storage = FakeStorage()
    group = GroupCommit(storage)
    runs: list[str] = []
    results = await together(
        group, writer("w0", runs), writer("db", runs, error=DatabaseError("disk is full"))
    )
    assert results == ["w0", "db"]
    assert sorted(storage.committed) == [["db"], ["w0"]]


async def test_a_member_alone_in_its_group_is_not_run_twice() -> None:
    storage = FakeStorage()
    group = GroupCommit(storage)
    runs: list[str] = []
    (result,) = await together(group, writer("db", runs, error=DatabaseError("disk I/O error")))
    assert isinstance(result, DatabaseError)
    assert runs == ["db in group 1"]
    assert storage.log == ["begin 1", "rollback 1"]


# On the real store and service.


async def test_ensures_delivered_together_are_recorded_in_one_commit_with_their_events(
    agents: BuildAgent,  # noqa: F811
) -> None:
    agent = await agents()
    asked = [region_spec() for _ in range(6)]
    commands = [RegionEnsure(source=SOURCE, payload=spec) for spec in asked]
    before = agent.store.group.counts.groups
    # The same command twice in one group (a redelivery): the second sees the first.
    await asyncio.gather(
        *(agent.service.handle(delivery(command)) for command in [*commands, commands[0]])
    )
    assert agent.store.group.counts.groups - before == 1
    regions = {region.id: region for region in await agent.store.regions()}
    assert set(regions) == {spec.id for spec in asked}
    events = [m for m in await agent.outbox() if isinstance(m, RegionStateChanged)]
    requested = [e for e in events if e.payload.region.state is RegionState.REQUESTED]
    assert sorted(e.payload.region.id for e in requested) == sorted(spec.id for spec in asked)
    await settle(agent)
    assert all(r.state is RegionState.CREATED for r in await agent.store.regions())


async def test_one_bad_ensure_in_a_delivery_batch_fails_only_itself(
    agents: BuildAgent,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    agent = await agents()
    good = [region_spec() for _ in range(3)]
    bad = region_spec()
    real = Transaction.insert

    async def insert(self: Transaction, region: object, cause: object) -> None:
        if getattr(region, "id", None) == bad.id:
            raise KeyError("a bug in one command")
        await real(self, region, cause)  # type: ignore[arg-type]

    monkeypatch.setattr(Transaction, "insert", insert)
    results = await asyncio.gather(
        *(
            agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=spec)))
            for spec in [good[0], bad, *good[1:]]
        ),
        return_exceptions=True,
    )
    assert [type(result) for result in results] == [type(None), KeyError, type(None), type(None)]
    assert agent.store.group.counts.splits >= 1
    recorded = {region.id for region in await agent.store.regions()}
    assert recorded == {spec.id for spec in good}
    outbox_ids = {
        m.payload.region.id for m in await agent.outbox() if isinstance(m, RegionStateChanged)
    }
    assert bad.id not in outbox_ids
    assert {spec.id for spec in good} <= outbox_ids


async def test_a_full_disk_at_a_groups_commit_is_met_by_each_member_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's group: a commit that fails rolls back, and each member's own
    transaction then raises what the store makes of the error (here OutOfSpace)."""
    store = await AgentStore.open(tmp_path / "agent.sqlite")
    try:
        full = OperationalError("COMMIT", {}, sqlite3.OperationalError("database or disk is full"))
        real_end = AgentStore.end
        failed = [0]

        async def end(self: AgentStore, tx: Transaction, *, commit: bool) -> None:
            if commit and failed[0] == 0:
                failed[0] += 1
                await real_end(self, tx, commit=False)
                raise full
            await real_end(self, tx, commit=commit)

        monkeypatch.setattr(AgentStore, "end", end)
        ids = [uuid.uuid4() for _ in range(3)]

        def deleting(message_id: uuid.UUID) -> Callable[[Transaction], Awaitable[None]]:
            return lambda tx: tx.delete_sent([message_id])

        await asyncio.gather(*(store.grouped(deleting(i)) for i in ids))
        assert failed == [1]
        assert store.group.counts.splits == 3
    finally:
        await store.close()


@pytest.mark.parametrize("turns", range(6))
async def test_a_member_cancelled_while_waiting_to_join_leaves_no_group_open(turns: int) -> None:
    """A delivery cancelled (the transport closing) while the group was being passed to
    it: the group is committed all the same and the store is free again."""
    storage = FakeStorage()
    group = GroupCommit(storage)
    release = asyncio.Event()
    runs: list[str] = []

    async def slow(tx: FakeTx) -> str:
        await release.wait()
        tx.writes.append("a")
        return "a"

    first = asyncio.create_task(group.run(slow))
    await asyncio.sleep(0)
    second = asyncio.create_task(group.run(writer("b", runs)))
    await asyncio.sleep(0)
    release.set()
    for _ in range(turns):
        await asyncio.sleep(0)
    second.cancel()
    async with asyncio.timeout(2):
        assert await first == "a"
        await asyncio.gather(second, return_exceptions=True)
        assert await group.run(writer("c", runs)) == "c"
    assert ["a"] in storage.committed or ["a", "b"] in storage.committed
    assert storage.committed[-1] == ["c"]


async def test_a_command_handler_returns_only_after_its_groups_commit(
    agents: BuildAgent,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The transport acks a command when its handler returns: that must be after the
    commit that holds its record and its event."""
    agent = await agents()
    hold = asyncio.Event()
    real_end = AgentStore.end
    committing: list[bool] = []

    async def end(self: AgentStore, tx: Transaction, *, commit: bool) -> None:
        committing.append(commit)
        await hold.wait()
        await real_end(self, tx, commit=commit)

    monkeypatch.setattr(AgentStore, "end", end)
    asked = [region_spec() for _ in range(3)]
    handlers = [
        asyncio.create_task(agent.service.handle(delivery(RegionEnsure(source=SOURCE, payload=s))))
        for s in asked
    ]
    async with asyncio.timeout(5):
        while not committing:
            await asyncio.sleep(0.001)
    for _ in range(20):
        await asyncio.sleep(0.001)
    assert not any(handler.done() for handler in handlers), "returned before the commit"
    hold.set()
    async with asyncio.timeout(5):
        await asyncio.gather(*handlers)
    monkeypatch.setattr(AgentStore, "end", real_end)
    assert {r.id for r in await agent.store.regions()} == {s.id for s in asked}
