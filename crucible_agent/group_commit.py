"""Group commit: writes that arrive together share one SQLite transaction and one fsync.

Commands are delivered concurrently (the consumer's prefetch: each delivery is a task
of its own) and the workers record their outcomes concurrently too. With
``synchronous=FULL`` every commit is an fsync and a round trip to the store's thread,
and under load the agent spent most of its time on them (BENCHMARKS.md, "Group commit
in the crucible agent"). So a write is a *member* of a group: the members take turns
running their bodies in one open transaction, and the last of them (the one that finds
no other member waiting for its turn, or the group full) commits for all.

What each member keeps:

- **Its own task.** A member's body runs in the caller's task and context (its trace,
  its log fields), not in a flusher's.
- **Commit before return.** :meth:`GroupCommit.run` returns only after the group's
  commit: a command handler that returns is acked by the transport, so a command is
  acked only once its record and its outbox rows are durable.
- **Split on failure.** If a member's body raises, or the commit fails, the whole group
  is rolled back and the other members run their bodies again alone, each in a
  transaction of its own (the store's ordinary one, which turns a full disk into
  ``OutOfSpace``). The member whose body raised gets its own error, as it would have
  alone; only a database error (which may be the group's, not its own) makes it run
  alone too. So one bad command fails only itself and never makes the others fail,
  requeue or dead-letter. Nobody runs twice unless a group failed.

Bodies are decide-then-apply (they read, decide, write) and must not do irreversible
work outside the database: a split runs them twice. Their reads see what the members
before them in the group wrote, as if they had committed one after the other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

TxT = TypeVar("TxT")
TxT_co = TypeVar("TxT_co", covariant=True)
T = TypeVar("T")

# Members of one group at most: a bound on how long a group keeps the store from others.
MAX_MEMBERS = 64


class Storage(Protocol[TxT]):
    """What a group needs of the store."""

    async def begin(self) -> TxT:
        """Takes the store for this group (no other transaction meanwhile) and opens its
        transaction."""

    async def end(self, tx: TxT, *, commit: bool) -> None:
        """Commits (``commit``) or rolls back ``tx`` and gives the store back; raises if
        the commit failed (the store is given back all the same)."""

    async def alone(self, body: Callable[[TxT], Awaitable[T]]) -> T:
        """``body`` in a transaction of its own."""

    def group_error(self, error: BaseException) -> bool:
        """Whether ``error``, raised by a body, may be the group's rather than the body's
        own (the database failed: a full disk, an I/O error)."""


@dataclass
class _Group(Generic[TxT]):
    tx: TxT
    members: int = 0
    failed: bool = False
    # True once committed, False once rolled back.
    done: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass
class Counts:
    """What grouping did, for the benchmark and the metrics."""

    groups: int = 0
    members: int = 0
    splits: int = 0


class GroupCommit(Generic[TxT]):
    def __init__(self, storage: Storage[TxT], *, max_members: int = MAX_MEMBERS) -> None:
        self._storage = storage
        self._max_members = max_members
        # One body at a time: they share the store's one connection.
        self._turn = asyncio.Lock()
        self._waiting = 0
        self._group: _Group[TxT] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self.counts = Counts()

    async def run(self, body: Callable[[TxT], Awaitable[T]]) -> T:
        """``body`` in the open group's transaction (or a new group's); returns its
        result once that transaction committed. On a split, ``body`` runs again alone."""
        self._waiting += 1
        try:
            await self._turn.acquire()
        except BaseException:
            self._waiting -= 1
            if self._waiting == 0 and self._group is not None:
                # A member may have passed the open group on to this one: close it.
                closing = asyncio.create_task(self._close_orphan())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
            raise
        self._waiting -= 1
        try:
            group = self._group
            if group is None:
                group = self._group = _Group(await self._storage.begin())
                self.counts.groups += 1
            group.members += 1
            self.counts.members += 1
            try:
                result = await body(group.tx)
            except BaseException as error:
                group.failed = True
                await self._end(group)
                if group.members == 1 or not self._storage.group_error(error):
                    raise
                # The database failed, not the body: alone, as the others (below).
                ran = False
            else:
                ran = True
                if self._waiting == 0 and group.members < self._max_members:
                    # Deliveries that came in with this one are tasks ready to run: one
                    # turn of the event loop lets them join before the commit.
                    try:
                        await asyncio.sleep(0)
                    except asyncio.CancelledError:
                        await self._end(group)
                        raise
                if self._waiting == 0 or group.members >= self._max_members:
                    await self._end(group)
        finally:
            self._turn.release()
        if await asyncio.shield(group.done) and ran:
            return result
        self.counts.splits += 1
        return await self._storage.alone(body)

    async def _close_orphan(self) -> None:
        async with self._turn:
            if self._group is not None and self._waiting == 0:
                await self._end(self._group)

    async def _end(self, group: _Group[TxT]) -> None:
        """Commits the group (rolls it back if a member failed) and tells its members;
        shielded: a member cancelled meanwhile must not leave the transaction open."""
        self._group = None
        await asyncio.shield(self._finish(group))

    async def _finish(self, group: _Group[TxT]) -> None:
        committed = False
        try:
            await self._storage.end(group.tx, commit=not group.failed)
            committed = not group.failed
        except Exception:
            # Every member runs again alone and meets the error, if it lasts, on its own.
            committed = False
        finally:
            group.done.set_result(committed)
