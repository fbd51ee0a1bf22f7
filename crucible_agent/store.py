"""The agent's own state: SQLite in its data directory, through SQLAlchemy Core.

Four tables: ``regions`` (the records, destroyed ones included), ``snapshots`` and
``running_snapshots`` (the same, keyed by region and snapshot name), and ``outbox``
(messages committed with the change that caused them, waiting for the relay). One connection
serves the whole process, one transaction at a time: SQLite has one writer anyway, and
queueing on a lock here is cheaper than contending for the file lock (docs/design.md,
"Measured facts").

What the regions add up to (reserved bytes, count, the lowest free port) is summed in
SQL by :meth:`Transaction.holdings`, not by reading every region record into Python on
each create and announcement (that made a create's CPU grow with the regions held).
A region's reservation is a column of its own (``reserved_bytes``), not part of the
wire's region: the worker sets it when it reserves the space, and gives it back when it
removes the files of a create that failed for want of space.

A sent outbox row is deleted rather than flagged: the broker has the message, and the
table stays as small as what is still in flight.

A write that does not fit in the data directory raises :class:`OutOfSpace` once the
store has released the space reserve (:mod:`crucible_agent.space`), so that the caller
may try it once more in the room that leaves.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Self, TypeVar

from sqlalchemy import (
    Boolean,
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Uuid,
    and_,
    bindparam,
    delete,
    event,
    func,
    insert,
    literal,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool
from sqlalchemy.sql import Select

from crucible_agent.group_commit import GroupCommit
from crucible_agent.regions import FIRST_PORT, LAST_PORT, Holdings
from crucible_agent.space import SpaceReserve, is_out_of_space
from schemas import tracing
from schemas.base import Envelope
from schemas.outbox import OutgoingMessage
from schemas.region import Region, RegionState
from schemas.snapshot import RunningSnapshot, Snapshot, SnapshotState

T = TypeVar("T")
log = logging.getLogger(__name__)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

regions_table = Table(
    "regions",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("block_size", Integer, nullable=False),
    Column("extent_size", Integer, nullable=False),
    Column("extent_count", Integer, nullable=False),
    Column("encrypted", Boolean, nullable=False),
    Column("port_number", Integer, nullable=False),
    Column("read_only", Boolean, nullable=False),
    Column("source", String(255)),
    Column("state", String(16), nullable=False, index=True),
    Column("generation", Integer, nullable=False),
    Column("failure", String(2000)),
    # The space the worker reserved for it (schemas.region.reservation_bytes), 0 until then.
    Column("reserved_bytes", Integer, nullable=False, server_default="0"),
    # The command behind the latest change: work that finishes later (even after a
    # restart) publishes its event in that command's correlation.
    Column("cause_id", Uuid, nullable=False),
    Column("correlation_id", Uuid, nullable=False),
    # ... and that command's trace (schemas.tracing), which the worker's span continues.
    Column("trace_context", String(1000)),
)

snapshots_table = Table(
    "snapshots",
    metadata,
    Column("region_id", Uuid, primary_key=True),
    Column("name", String(128), primary_key=True),
    # ISO 8601 with its offset: SQLite keeps no time zone in a DATETIME.
    Column("created", String(40), nullable=False),
    Column("state", String(16), nullable=False),
    Column("generation", Integer, nullable=False),
)

running_snapshots_table = Table(
    "running_snapshots",
    metadata,
    Column("region_id", Uuid, primary_key=True),
    Column("name", String(128), primary_key=True),
    Column("port_number", Integer, nullable=False),
    Column("state", String(16), nullable=False, index=True),
    Column("generation", Integer, nullable=False),
    Column("failure", String(2000)),
    # As a region's: the command behind the latest change, for the worker's events,
    # and its trace.
    Column("cause_id", Uuid, nullable=False),
    Column("correlation_id", Uuid, nullable=False),
    Column("trace_context", String(1000)),
)

outbox_table = Table(
    "outbox",
    metadata,
    # The relay publishes in this order, which keeps each region's events in
    # generation order on the wire.
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("message_id", Uuid, nullable=False, unique=True),
    Column("message_type", String(100), nullable=False),
    Column("exchange", String(255), nullable=False),
    Column("routing_key", String(255), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("correlation_id", Uuid),
    Column("reply_to", String(255)),
    Column("mandatory", Boolean, nullable=False),
    Column("trace_context", String(1000)),
)

# Columns added since the first release, with their DDL: a database from before gets them.
_ADDED_COLUMNS = (
    ("regions", "trace_context", "VARCHAR(1000)"),
    ("outbox", "trace_context", "VARCHAR(1000)"),
)


# regions.holds_port in SQL; the two must agree (tests/unit/test_crucible_store.py).
_holds_port = regions_table.c.state != RegionState.DESTROYED.value
# snapshots.holds_port in SQL.
_running_holds_port = running_snapshots_table.c.state != RegionState.DESTROYED.value
# No region has this id: the holdings of every region.
_NOBODY = uuid.UUID(int=0)


def _holdings_query() -> Select[int, int, int | None]:
    """Reserved bytes, count and the lowest free port of the regions not destroyed but
    one (``b_except``), in one statement. The lowest free port is the first one, or one
    above a port in use; SQLite builds the set of ports in use once for the ``NOT IN``.
    Running snapshots hold ports too (``get_free_port`` in the real agent skips both)."""
    held = regions_table.c
    running = running_snapshots_table.c
    counted = and_(_holds_port, held.id != bindparam("b_except", type_=Uuid))
    ports = union_all(
        select(held.port_number.label("port")).where(counted),
        select(running.port_number.label("port")).where(_running_holds_port),
    ).subquery()
    candidates = union_all(
        select(literal(FIRST_PORT).label("port")),
        select((ports.c.port + 1).label("port")).where(
            ports.c.port >= FIRST_PORT, ports.c.port < LAST_PORT
        ),
    ).subquery()
    in_use = select(ports.c.port)
    free_port = (
        select(func.min(candidates.c.port))
        .where(candidates.c.port.not_in(in_use))
        .scalar_subquery()
    )
    return select(func.coalesce(func.sum(held.reserved_bytes), 0), func.count(), free_port).where(
        counted
    )


# Built once: the statement is the same on every call.
_HOLDINGS = _holdings_query()


@dataclass(frozen=True)
class Cause:
    message_id: uuid.UUID
    correlation_id: uuid.UUID
    # The trace the command was handled in (empty when tracing is off).
    trace_context: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, command: Envelope) -> Cause:
        return cls(
            message_id=command.id,
            correlation_id=command.correlation_id or command.id,
            trace_context=tracing.current_headers(),
        )


class Transaction:
    """What a command handler or a worker may do inside one committed unit."""

    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection

    async def region(self, region_id: uuid.UUID) -> Region | None:
        result = await self._connection.execute(
            select(regions_table).where(regions_table.c.id == region_id)
        )
        row = result.one_or_none()
        return None if row is None else _region(row)

    async def regions(self, *, except_id: uuid.UUID | None = None) -> list[Region]:
        query = select(regions_table).order_by(regions_table.c.id)
        if except_id is not None:
            query = query.where(regions_table.c.id != except_id)
        return [_region(row) for row in await self._connection.execute(query)]

    async def holdings(self, *, except_id: uuid.UUID = _NOBODY) -> Holdings:
        """What the regions not destroyed add up to, but ``except_id``."""
        result = await self._connection.execute(_HOLDINGS, {"b_except": except_id})
        used_bytes, count, free_port = result.one()
        return Holdings(used_bytes=used_bytes, regions=count, free_port=free_port)

    async def next_work(
        self, order: Sequence[RegionState], taken: Collection[uuid.UUID] = ()
    ) -> Region | None:
        """The first region, by id as the real agent's map is ordered, in the first of
        ``order``'s states that has one, other than those ``taken`` by a worker."""
        for state in order:
            result = await self._connection.execute(
                select(regions_table)
                .where(
                    regions_table.c.state == state.value,
                    regions_table.c.id.not_in(list(taken)),
                )
                .order_by(regions_table.c.id)
                .limit(1)
            )
            row = result.one_or_none()
            if row is not None:
                return _region(row)
        return None

    async def set_reserved(self, region_id: uuid.UUID, reserved_bytes: int) -> None:
        """Records the space ``region_id`` holds; no change of state, so no event."""
        await self._connection.execute(
            update(regions_table)
            .where(regions_table.c.id == region_id)
            .values(reserved_bytes=reserved_bytes)
        )

    async def cause(self, region_id: uuid.UUID) -> Cause:
        result = await self._connection.execute(
            select(
                regions_table.c.cause_id,
                regions_table.c.correlation_id,
                regions_table.c.trace_context,
            ).where(regions_table.c.id == region_id)
        )
        row = result.one()
        return Cause(
            message_id=row.cause_id,
            correlation_id=row.correlation_id,
            trace_context=tracing.loads(row.trace_context),
        )

    async def insert(self, region: Region, cause: Cause) -> None:
        await self._connection.execute(
            insert(regions_table).values(**_columns(region), **_cause_columns(cause))
        )

    async def update(self, region: Region, cause: Cause) -> None:
        # Guarded on the generation before it: a change decided on a stale read fails
        # loudly instead of overwriting a newer one.
        result = await self._connection.execute(
            update(regions_table)
            .where(regions_table.c.id == region.id)
            .where(regions_table.c.generation == region.generation - 1)
            .values(**_columns(region), **_cause_columns(cause))
        )
        if result.rowcount != 1:
            raise StaleRegion(f"region {region.id} is not at generation {region.generation - 1}")

    # Snapshots and running snapshots.

    async def snapshot(self, region_id: uuid.UUID, name: str) -> Snapshot | None:
        snap = snapshots_table.c
        result = await self._connection.execute(
            select(snapshots_table).where(snap.region_id == region_id, snap.name == name)
        )
        row = result.one_or_none()
        return None if row is None else _snapshot(row)

    async def snapshots(self, region_id: uuid.UUID) -> list[Snapshot]:
        """Every snapshot record of the region, deleted ones too, by name."""
        snap = snapshots_table.c
        result = await self._connection.execute(
            select(snapshots_table).where(snap.region_id == region_id).order_by(snap.name)
        )
        return [_snapshot(row) for row in result]

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Inserts a new snapshot, or updates one guarded on the generation before it."""
        snap = snapshots_table.c
        columns = _snapshot_columns(snapshot)
        if snapshot.generation == 1:
            await self._connection.execute(insert(snapshots_table).values(**columns))
            return
        result = await self._connection.execute(
            update(snapshots_table)
            .where(
                snap.region_id == snapshot.region_id,
                snap.name == snapshot.name,
                snap.generation == snapshot.generation - 1,
            )
            .values(**columns)
        )
        if result.rowcount != 1:
            raise StaleRegion(
                f"snapshot {snapshot.name} of region {snapshot.region_id} is not at "
                f"generation {snapshot.generation - 1}"
            )

    async def running_snapshot(self, region_id: uuid.UUID, name: str) -> RunningSnapshot | None:
        run = running_snapshots_table.c
        result = await self._connection.execute(
            select(running_snapshots_table).where(run.region_id == region_id, run.name == name)
        )
        row = result.one_or_none()
        return None if row is None else _running(row)

    async def running_snapshots(self, region_id: uuid.UUID) -> list[RunningSnapshot]:
        run = running_snapshots_table.c
        result = await self._connection.execute(
            select(running_snapshots_table).where(run.region_id == region_id).order_by(run.name)
        )
        return [_running(row) for row in result]

    async def save_running_snapshot(self, running: RunningSnapshot, cause: Cause) -> None:
        """Inserts a new running snapshot, or updates one guarded on the generation
        before it."""
        run = running_snapshots_table.c
        columns = {**_running_columns(running), **_cause_columns(cause)}
        if running.generation == 1:
            await self._connection.execute(insert(running_snapshots_table).values(**columns))
            return
        result = await self._connection.execute(
            update(running_snapshots_table)
            .where(
                run.region_id == running.id,
                run.name == running.name,
                run.generation == running.generation - 1,
            )
            .values(**columns)
        )
        if result.rowcount != 1:
            raise StaleRegion(
                f"running snapshot {running.name} of region {running.id} is not at "
                f"generation {running.generation - 1}"
            )

    async def running_cause(self, region_id: uuid.UUID, name: str) -> Cause:
        run = running_snapshots_table.c
        result = await self._connection.execute(
            select(run.cause_id, run.correlation_id, run.trace_context).where(
                run.region_id == region_id, run.name == name
            )
        )
        row = result.one()
        return Cause(
            message_id=row.cause_id,
            correlation_id=row.correlation_id,
            trace_context=tracing.loads(row.trace_context),
        )

    async def next_running_work(
        self, order: Sequence[RegionState], taken: Collection[tuple[uuid.UUID, str]] = ()
    ) -> RunningSnapshot | None:
        """The first running snapshot, by region id and name, in the first of ``order``'s
        states that has one, other than those ``taken``."""
        run = running_snapshots_table.c
        for state in order:
            result = await self._connection.execute(
                select(running_snapshots_table)
                .where(run.state == state.value)
                .order_by(run.region_id, run.name)
            )
            for row in result:
                found = _running(row)
                if (found.id, found.name) not in taken:
                    return found
        return None

    async def delete_sent(self, message_ids: Sequence[uuid.UUID]) -> None:
        await self._connection.execute(
            delete(outbox_table).where(outbox_table.c.message_id.in_(message_ids))
        )

    async def send(self, message: OutgoingMessage) -> None:
        await self._connection.execute(
            insert(outbox_table).values(
                message_id=message.message_id,
                message_type=message.message_type,
                exchange=message.exchange,
                routing_key=message.routing_key,
                body=message.body,
                correlation_id=message.correlation_id,
                reply_to=message.reply_to,
                mandatory=message.mandatory,
                trace_context=tracing.dumps(message.trace_context),
            )
        )


class _RollBack(Exception):
    """Ends a group's transaction without committing it."""


class StaleRegion(RuntimeError):
    pass


class OutOfSpace(RuntimeError):
    """A write did not fit in the data directory; nothing of it was committed.
    ``freed``: the space reserve was released for it, so trying again may succeed."""

    def __init__(self, message: str, *, freed: bool) -> None:
        super().__init__(message)
        self.freed = freed


class AgentStore:
    """The SQLite adapter; also the outbox store the relay reads."""

    def __init__(
        self,
        engine: AsyncEngine,
        connection: AsyncConnection,
        reserve: SpaceReserve | None = None,
    ) -> None:
        self._engine = engine
        self._connection = connection
        self._reserve = reserve
        self._lock = asyncio.Lock()
        self._open: AbstractAsyncContextManager[Transaction] | None = None
        self.group = GroupCommit(self)

    @classmethod
    async def open(cls, path: Path, *, reserve: SpaceReserve | None = None) -> Self:
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}", poolclass=StaticPool)
        event.listen(engine.sync_engine, "connect", _pragmas)
        connection = await engine.connect()
        async with connection.begin():
            await connection.run_sync(metadata.create_all)
            await _add_reservations(connection)
            await _add_columns(connection)
        return cls(engine, connection, reserve)

    async def close(self) -> None:
        counts = self.group.counts
        log.info(
            "group commit: %d transactions for %d writes, %d run again alone",
            counts.groups,
            counts.members,
            counts.splits,
        )
        async with self._lock:
            await self._connection.close()
            await self._engine.dispose()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """Commits when the block ends, rolls back if it raises. Raises OutOfSpace when
        the data directory had no room for it."""
        async with self._lock:
            try:
                async with self._connection.begin():
                    yield Transaction(self._connection)
            except DBAPIError as error:
                if not is_out_of_space(error):
                    raise
                freed = self._reserve is not None and self._reserve.release()
                raise OutOfSpace(f"data directory full: {error.orig}", freed=freed) from error

    async def grouped(self, body: Callable[[Transaction], Awaitable[T]]) -> T:
        """``body`` in a transaction shared with the writes that arrive with it, committed
        before this returns (:mod:`crucible_agent.group_commit`). On a failure in the
        group, ``body`` runs again alone, where a full disk raises OutOfSpace."""
        return await self.group.run(body)

    # group_commit.Storage: a group is one transaction of :meth:`transaction`, opened by
    # its first member and closed by its last (so what a subclass adds to a transaction,
    # the benchmark's change watch or a test's full disk, applies to groups too).

    async def begin(self) -> Transaction:
        opened = self.transaction()
        tx = await opened.__aenter__()
        self._open = opened
        return tx

    async def end(self, tx: Transaction, *, commit: bool) -> None:
        opened, self._open = self._open, None
        assert opened is not None, "end() without begin()"
        if commit:
            await opened.__aexit__(None, None, None)
        else:
            rollback = _RollBack()
            await opened.__aexit__(_RollBack, rollback, None)

    async def alone(self, body: Callable[[Transaction], Awaitable[T]]) -> T:
        async with self.transaction() as tx:
            return await body(tx)

    def group_error(self, error: BaseException) -> bool:
        return isinstance(error, DBAPIError)

    async def region(self, region_id: uuid.UUID) -> Region | None:
        async with self.transaction() as tx:
            return await tx.region(region_id)

    async def regions(self) -> list[Region]:
        async with self.transaction() as tx:
            return await tx.regions()

    async def figures(self) -> tuple[dict[str, int], int]:
        """Regions by state, and the messages waiting in the outbox (for metrics)."""
        async with self.transaction():
            by_state = await self._connection.execute(
                select(regions_table.c.state, func.count()).group_by(regions_table.c.state)
            )
            counts = {str(state): int(count) for state, count in by_state}
            unsent = await self._connection.scalar(select(func.count()).select_from(outbox_table))
        return counts, int(unsent or 0)

    async def cause(self, region_id: uuid.UUID) -> Cause:
        """The command behind the region's latest change (its record must exist)."""
        async with self.transaction() as tx:
            return await tx.cause(region_id)

    # OutboxStore.

    async def unsent(self, limit: int) -> Sequence[OutgoingMessage]:
        async with self.transaction():
            result = await self._connection.execute(
                select(outbox_table).order_by(outbox_table.c.seq).limit(limit)
            )
            return [_outgoing(row) for row in result]

    async def mark_sent(self, message_ids: Sequence[uuid.UUID]) -> None:
        # Deleting rows is a write too: on a full disk, once more in the reserve's room.
        try:
            await self._delete_sent(message_ids)
        except OutOfSpace as full:
            if not full.freed:
                raise
            await self._delete_sent(message_ids)

    async def _delete_sent(self, message_ids: Sequence[uuid.UUID]) -> None:
        # With the commands and the work being recorded meanwhile: one commit for all.
        await self.grouped(lambda tx: tx.delete_sent(message_ids))


async def _add_reservations(connection: AsyncConnection) -> None:
    """A database from before reservations were recorded gets the column, and its
    regions with files the reservation they would have taken."""
    columns = await connection.exec_driver_sql("PRAGMA table_info(regions)")
    if "reserved_bytes" in {row.name for row in columns}:
        return
    await connection.exec_driver_sql(
        "ALTER TABLE regions ADD COLUMN reserved_bytes INTEGER NOT NULL DEFAULT 0"
    )
    held = regions_table.c
    size = held.block_size * held.extent_size * held.extent_count
    with_files = or_(
        held.state == RegionState.CREATED.value,
        and_(held.state == RegionState.TOMBSTONED.value, held.failure.is_(None)),
    )
    # schemas.region.reservation_bytes, in SQL.
    await connection.execute(
        update(regions_table).where(with_files).values(reserved_bytes=(5 * size + 2) // 4)
    )


async def _add_columns(connection: AsyncConnection) -> None:
    """The nullable columns added since the first release, on a database from before."""
    for table, column, ddl in _ADDED_COLUMNS:
        found = await connection.exec_driver_sql(f"PRAGMA table_info({table})")
        if column not in {row.name for row in found}:
            await connection.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")


def _pragmas(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: readers never block the writer. FULL: a commit survives power loss, not just
    # a killed process; acks and events depend on commits being final.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def _columns(region: Region) -> dict[str, Any]:
    return {
        "id": region.id,
        "block_size": region.block_size,
        "extent_size": region.extent_size,
        "extent_count": region.extent_count,
        "encrypted": region.encrypted,
        "port_number": region.port_number,
        "read_only": region.read_only,
        "source": region.source,
        "state": region.state.value,
        "generation": region.generation,
        "failure": region.failure,
    }


def _cause_columns(cause: Cause) -> dict[str, uuid.UUID | str | None]:
    return {
        "cause_id": cause.message_id,
        "correlation_id": cause.correlation_id,
        "trace_context": tracing.dumps(cause.trace_context),
    }


def _region(row: Row[Any]) -> Region:
    fields = {column: row._mapping[column] for column in Region.model_fields}
    fields["state"] = RegionState(fields["state"])
    return Region(**fields)


def _snapshot_columns(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "region_id": snapshot.region_id,
        "name": snapshot.name,
        "created": snapshot.created.isoformat(),
        "state": snapshot.state.value,
        "generation": snapshot.generation,
    }


def _snapshot(row: Row[Any]) -> Snapshot:
    return Snapshot(
        region_id=row.region_id,
        name=row.name,
        created=datetime.fromisoformat(row.created),
        state=SnapshotState(row.state),
        generation=row.generation,
    )


def _running_columns(running: RunningSnapshot) -> dict[str, Any]:
    return {
        "region_id": running.id,
        "name": running.name,
        "port_number": running.port_number,
        "state": running.state.value,
        "generation": running.generation,
        "failure": running.failure,
    }


def _running(row: Row[Any]) -> RunningSnapshot:
    return RunningSnapshot(
        id=row.region_id,
        name=row.name,
        port_number=row.port_number,
        state=RegionState(row.state),
        generation=row.generation,
        failure=row.failure,
    )


def _outgoing(row: Row[Any]) -> OutgoingMessage:
    return OutgoingMessage(
        message_id=row.message_id,
        message_type=row.message_type,
        exchange=row.exchange,
        routing_key=row.routing_key,
        body=row.body,
        correlation_id=row.correlation_id,
        reply_to=row.reply_to,
        mandatory=row.mandatory,
        trace_context=tracing.loads(row.trace_context),
    )
