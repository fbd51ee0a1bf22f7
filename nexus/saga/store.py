"""The engine's store: every SQL statement on ``sagas`` and ``saga_log``, behind one port.

``SagaStore`` opens steps; a ``StepTx`` is one step's transaction. A step starts by
*fencing* the saga row (``WHERE lease_owner = me AND version = seen``, bumping the
version and extending the lease) or by claiming it, so a replica that lost its lease
cannot write and two replicas never act on the same state. What the step decides is
written when it commits, in this order: the outbox rows its nodes sent, the saga row
(once, however many nodes ran), then its log entries. The wait rows go through
``nexus.saga.rendezvous``, in the same transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, bindparam, func, insert, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from nexus.db.models import Saga, SagaLogEntry
from nexus.db.states import SagaLogEvent, SagaState
from nexus.saga import rendezvous
from nexus.saga.errors import LeaseLost
from nexus.saga.outbox import Outbox
from nexus.saga.position import Position, SagaRow
from schemas import tracing
from schemas.base import Envelope

sagas = cast(Table, Saga.__table__)
saga_log = cast(Table, SagaLogEntry.__table__)

# States a replica may claim a saga in.
CLAIMABLE = (SagaState.RUNNING.value, SagaState.WAITING.value, SagaState.UNWINDING.value)


@dataclass(frozen=True)
class Due:
    """What a sweep found to do."""

    # Sagas with a wait whose deadline passed.
    expired: list[uuid.UUID]
    # Sagas woken by an event, or whose lease expired, that nobody runs.
    runnable: set[uuid.UUID]
    # Of those, the ones whose expired lease another replica held (a claim adopts
    # them), with their saga names.
    adoptable: Mapping[uuid.UUID, str] = field(default_factory=dict)


class StepTx:
    """One step's transaction. The saga row's write and the log entries go last."""

    def __init__(self, session: AsyncSession, store: SagaStore, now: datetime) -> None:
        self.session = session
        self._store = store
        self.now = now
        self._write: SagaRow | None = None
        self._release = False
        self._entries: list[dict[str, Any]] = []
        self._outbox: list[dict[str, Any]] = []

    @property
    def sent(self) -> bool:
        return bool(self._outbox)

    async def claim(self, saga_id: uuid.UUID) -> SagaRow | None:
        """Take the saga's lease if it is free, ours or expired (and we can run it)."""
        store = self._store
        found = (
            await self.session.execute(
                store.claim_statement,
                {
                    "b_id": saga_id,
                    "b_owner": store.replica_id,
                    "b_now": self.now,
                    "b_expires": self.now + store.lease,
                },
            )
        ).first()
        return _row(found) if found is not None else None

    async def fence(self, row: SagaRow) -> SagaRow:
        """Lock the saga row for this transaction if we still own it; bump its version."""
        store = self._store
        fenced = (
            await self.session.execute(
                _FENCE,
                {
                    "b_id": row.id,
                    "b_owner": store.replica_id,
                    "b_version": row.version,
                    "b_now": self.now,
                    "b_expires": self.now + store.lease,
                },
            )
        ).first()
        if fenced is None:
            raise LeaseLost(str(row.id))
        return _row(fenced)

    def write(self, row: SagaRow, *, release: bool = False) -> SagaRow:
        """Leave the saga row as ``row`` says, written once when the step commits.

        The fence locked the row, so nothing else can change it before then. ``release``
        lets the saga go (no lease): it parked, ended, or needs an operator.
        """
        self._write = row
        self._release = self._release or release
        return row

    def log(
        self,
        saga_id: uuid.UUID,
        node: str,
        event: SagaLogEvent,
        at: datetime,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        self._entries.append(
            {
                "saga_id": saga_id,
                "node_name": node,
                "event": event.value,
                "replica_id": self._store.replica_id,
                "at": at,
                "data": dict(data) if data else None,
            }
        )

    def send(self, message: Envelope, exchange: str, routing_key: str, mandatory: bool) -> None:
        """A message that leaves once this transaction has committed (the outbox)."""
        self._outbox.append(
            self._store.outbox.row(
                message, exchange=exchange, routing_key=routing_key, mandatory=mandatory
            )
        )

    # The rendezvous (``nexus.saga.rendezvous``), in this transaction.

    async def park(
        self,
        saga_id: uuid.UUID,
        node: str,
        keys: Sequence[str],
        deadline: datetime,
        min_generation: int,
    ) -> None:
        await rendezvous.park(
            self.session,
            saga_id=saga_id,
            node=node,
            keys=keys,
            deadline=deadline,
            min_generation=min_generation,
            now=self.now,
        )

    async def ready(self, saga_id: uuid.UUID) -> list[rendezvous.ReadyWait]:
        return await rendezvous.ready_waits(self.session, saga_id)

    async def resolve(self, saga_id: uuid.UUID, node: str) -> None:
        await rendezvous.resolve(self.session, saga_id=saga_id, node=node, now=self.now)

    async def force_ready(self, key: str, payload: Mapping[str, Any], generation: int) -> None:
        await rendezvous.force_ready(
            self.session, key=key, payload=payload, generation=generation, now=self.now
        )

    async def rearm(self, saga_id: uuid.UUID, node: str, deadline: datetime) -> None:
        await rendezvous.rearm(self.session, saga_id=saga_id, node=node, deadline=deadline)

    async def release_waits(self, saga_id: uuid.UUID) -> None:
        await rendezvous.release(self.session, saga_id)

    async def _commit_writes(self) -> None:
        await self._store.outbox.add_rows(self.session, self._outbox)
        row = self._write
        if row is not None:
            await self.session.execute(
                _WRITE_RELEASING if self._release else _WRITE,
                {
                    "b_id": row.id,
                    "b_version": row.version,
                    "b_state": row.state.value,
                    "b_progress": row.position.dump(),
                    "b_outputs": dict(row.outputs),
                    "b_error": row.error,
                },
            )
        if self._entries:
            await self.session.execute(_LOG_INSERT, self._entries)


class SagaStore:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        replica_id: str,
        lease: timedelta,
        outbox: Outbox,
        runnable: Sequence[tuple[str, int]],
    ) -> None:
        self._sessions = sessions
        self.replica_id = replica_id
        self.lease = lease
        self.outbox = outbox
        # Only sagas whose (name, version) this replica has a definition for.
        self._runnable = tuple_(sagas.c.name, sagas.c.definition_version).in_(list(runnable))
        self.claim_statement = _claim_statement(self._runnable)

    @asynccontextmanager
    async def step(self, now: datetime) -> AsyncIterator[StepTx]:
        async with self._sessions.begin() as session:
            tx = StepTx(session, self, now)
            yield tx
            await tx._commit_writes()
        if tx.sent:
            # Woken after the commit: before it, the relay's query would not see the rows.
            self.outbox.committed()

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncSession]:
        """A session outside any step (a reconcile query asks an agent meanwhile)."""
        async with self._sessions() as session:
            yield session

    async def create(
        self,
        session: AsyncSession,
        *,
        saga_id: uuid.UUID,
        name: str,
        version: int,
        params: Mapping[str, Any],
        now: datetime,
    ) -> SagaRow:
        """Insert a running saga leased to this replica, in the caller's transaction.

        The trace it is created in (the API request's) is kept with its parameters, so
        that its nodes continue that trace on whichever replica runs them."""
        position = Position()
        trace = tracing.current_headers()
        if trace:
            params = {**params, tracing.SAGA_TRACE_PARAM: trace}
        await session.execute(
            insert(sagas).values(
                id=saga_id,
                name=name,
                definition_version=version,
                params=dict(params),
                state=SagaState.RUNNING.value,
                node_outputs={},
                progress=position.dump(),
                lease_owner=self.replica_id,
                lease_expires_at=now + self.lease,
                version=1,
                created_at=now,
                updated_at=now,
            )
        )
        return SagaRow(
            id=saga_id,
            name=name,
            definition_version=version,
            params=params,
            position=position,
            outputs={},
            version=1,
            error=None,
        )

    async def due(self, now: datetime, limit: int) -> Due:
        async with self._sessions() as session:
            expired = await rendezvous.expired(session, now, limit)
            woken = await rendezvous.woken_but_waiting(session, limit)
            orphaned = (
                await session.execute(
                    select(sagas.c.id, sagas.c.name, sagas.c.lease_owner)
                    .where(
                        sagas.c.state.in_([SagaState.RUNNING.value, SagaState.UNWINDING.value]),
                        or_(sagas.c.lease_owner.is_(None), sagas.c.lease_expires_at < now),
                        self._runnable,
                    )
                    .limit(limit)
                )
            ).all()
            return Due(
                expired=expired,
                runnable={*woken, *(row.id for row in orphaned)},
                adoptable={
                    row.id: row.name
                    for row in orphaned
                    if row.lease_owner is not None and row.lease_owner != self.replica_id
                },
            )

    async def sweep_unclaimed(self, *, older_than: datetime, now: datetime) -> int:
        async with self._sessions.begin() as session:
            return await rendezvous.sweep_unclaimed(session, older_than=older_than, now=now)

    async def unrunnable(self) -> list[tuple[str, int, int]]:
        """Claimable sagas of a (name, version) this replica has no definition for."""
        async with self._sessions() as session:
            rows = await session.execute(
                select(sagas.c.name, sagas.c.definition_version, func.count())
                .where(sagas.c.state.in_(CLAIMABLE), ~self._runnable)
                .group_by(sagas.c.name, sagas.c.definition_version)
            )
            return [(r[0], r[1], r[2]) for r in rows]


# Hot statements, built once (building one costs more CPU than running it).

_ROW_COLUMNS = (
    sagas.c.id,
    sagas.c.name,
    sagas.c.definition_version,
    sagas.c.params,
    sagas.c.state,
    sagas.c.node_outputs,
    sagas.c.progress,
    sagas.c.version,
    sagas.c.error,
)


def _claim_statement(runnable: Any) -> Any:
    return (
        update(sagas)
        .where(
            sagas.c.id == bindparam("b_id"),
            sagas.c.state.in_(CLAIMABLE),
            or_(
                sagas.c.lease_owner.is_(None),
                sagas.c.lease_owner == bindparam("b_owner"),
                sagas.c.lease_expires_at < bindparam("b_now"),
            ),
            runnable,
        )
        .values(
            lease_owner=bindparam("b_owner"),
            lease_expires_at=bindparam("b_expires"),
            version=sagas.c.version + 1,
            updated_at=bindparam("b_now"),
        )
        .returning(*_ROW_COLUMNS)
    )


_FENCE = (
    update(sagas)
    .where(
        sagas.c.id == bindparam("b_id"),
        sagas.c.lease_owner == bindparam("b_owner"),
        sagas.c.version == bindparam("b_version"),
    )
    .values(
        version=sagas.c.version + 1,
        lease_expires_at=bindparam("b_expires"),
        updated_at=bindparam("b_now"),
    )
    .returning(*_ROW_COLUMNS)
)


def _write_statement(release: bool) -> Any:
    values: dict[str, Any] = {
        "state": bindparam("b_state", type_=sagas.c.state.type),
        "progress": bindparam("b_progress", type_=sagas.c.progress.type),
        "node_outputs": bindparam("b_outputs", type_=sagas.c.node_outputs.type),
        "error": bindparam("b_error", type_=sagas.c.error.type),
    }
    if release:
        values |= {"lease_owner": None, "lease_expires_at": None}
    return (
        update(sagas)
        .where(sagas.c.id == bindparam("b_id"), sagas.c.version == bindparam("b_version"))
        .values(**values)
    )


_WRITE = _write_statement(release=False)
_WRITE_RELEASING = _write_statement(release=True)
_LOG_INSERT = insert(saga_log)


def _row(found: Any) -> SagaRow:
    return SagaRow(
        id=found.id,
        name=found.name,
        definition_version=found.definition_version,
        params=found.params,
        position=Position.of(found.state, found.progress or {}),
        outputs=found.node_outputs or {},
        version=found.version,
        error=found.error,
    )
