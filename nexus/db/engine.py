"""Async engines configured for how Nexus uses each database."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, ExceptionContext, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry

_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}
# How long a writer waits for another process's write lock before "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 5_000
# How long a coroutine waits for this process's one SQLite connection.
SQLITE_CONNECTION_WAIT_SECONDS = 30


@dataclass(frozen=True)
class PostgresTimeouts:
    """Limits the PostgreSQL server keeps on each of a replica's connections; 0 is none.

    A replica that stops running (SIGSTOP, a paused VM, a stuck disk) keeps its open
    transaction, and with it its row locks, until it runs again; whoever needs those rows
    waits. The server ends such a transaction after ``idle_in_transaction_seconds``
    (closing the connection, which releases the locks), gives up a wait for a lock after
    ``lock_seconds`` and a statement after ``statement_seconds``. ``NexusSettings``
    sizes them from the lease (RELIABILITY.md, "A frozen replica").
    """

    lock_seconds: float
    statement_seconds: float
    idle_in_transaction_seconds: float

    def server_settings(self) -> dict[str, str]:
        """The session settings, in milliseconds, as asyncpg sends them at connect."""
        return {
            "lock_timeout": _milliseconds(self.lock_seconds),
            "statement_timeout": _milliseconds(self.statement_seconds),
            "idle_in_transaction_session_timeout": _milliseconds(self.idle_in_transaction_seconds),
        }


def create_engine(
    url: str | URL,
    *,
    echo: bool = False,
    sqlite_foreign_keys: bool = True,
    timeouts: PostgresTimeouts | None = None,
) -> AsyncEngine:
    """An engine for ``url``: one serialised connection for SQLite, a pool otherwise.

    SQLite allows one writer at a time, and a pool of writers contending for its lock
    measured p99 latencies of hundreds of milliseconds with no gain in throughput, so
    every coroutine queues for a single connection instead. Each transaction starts
    with ``BEGIN IMMEDIATE``, taking the write lock up front: another process sharing
    the file then waits (``busy_timeout``) instead of failing mid-transaction when a
    read would have to become a write.

    ``sqlite_foreign_keys=False`` is for migrations only: SQLite rebuilds a table to
    alter it, which must not cascade or fail on the rows that reference it.

    ``timeouts`` are set on every PostgreSQL connection of the pool (a replica's; not a
    migration's, whose statements may rightly run long). SQLite, for one replica, has no
    such settings: a writer there waits for the file's lock up to ``busy_timeout``.
    """
    parsed = with_async_driver(url)
    if parsed.get_backend_name() != "sqlite":
        # Pre-ping: after a server restart, a stale pooled connection is replaced
        # before use instead of failing one transaction; one round trip per checkout.
        # No pre-ping: it costs three round trips per checkout, on every transaction of
        # every saga step. A connection that died (server restart) fails its statement
        # once, is dropped from the pool, and the saga step is retried from its lease.
        connect_args: dict[str, Any] = {}
        if timeouts is not None:
            connect_args["server_settings"] = timeouts.server_settings()
        engine = _create_async_engine(
            parsed, echo=echo, pool_size=10, max_overflow=20, connect_args=connect_args
        )
        _drop_connections_to_a_read_only_server(engine)
        return engine

    _create_parent_directory(parsed)
    engine = _create_async_engine(
        parsed,
        echo=echo,
        # Also for ":memory:", where the dialect would pick a pool that shares one
        # connection between concurrent transactions instead of queueing them.
        poolclass=AsyncAdaptedQueuePool,
        pool_size=1,
        max_overflow=0,
        pool_timeout=SQLITE_CONNECTION_WAIT_SECONDS,
    )
    _use_sqlite_pragmas_and_immediate_transactions(engine, foreign_keys=sqlite_foreign_keys)
    return engine


def with_async_driver(url: str | URL) -> URL:
    """``url`` parsed, with the async driver Nexus uses when it names none."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend not in _ASYNC_DRIVERS:
        raise ValueError(
            f"unsupported database {backend!r}: use sqlite+aiosqlite:// or postgresql+asyncpg://"
        )
    if parsed.drivername == backend:
        return parsed.set(drivername=_ASYNC_DRIVERS[backend])
    return parsed


def upsert_insert(session: AsyncSession, table: Any) -> Any:
    """An INSERT with ``on_conflict_do_*`` for the session's database (both dialects have
    one, with the same API, but SQLAlchemy keeps them apart)."""
    return upsert_for(session.get_bind().dialect.name, table)


def upsert_for(dialect: str, table: Any) -> Any:
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # Objects stay readable after commit: a handler commits, then publishes from them.
    return async_sessionmaker(engine, expire_on_commit=False)


def _milliseconds(seconds: float) -> str:
    # Rounded up: a small positive limit must not become 0, which means none.
    return str(math.ceil(seconds * 1000))


def _create_parent_directory(url: URL) -> None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    Path(database).parent.mkdir(parents=True, exist_ok=True)


# read_only_sql_transaction: a write on a server that is not (or no longer) the primary.
_READ_ONLY_SQLSTATE = "25006"


def _drop_connections_to_a_read_only_server(engine: AsyncEngine) -> None:
    """A write refused as read-only counts as a lost connection: the pool discards it and
    every connection older than it, so the next attempt connects afresh and the
    multi-host address (``target_session_attrs=read-write``) finds the current primary.

    With Patroni, a demoted primary restarts and so closes its connections; this covers a
    connection that still reaches a server after it stopped accepting writes. The error
    is transient either way (:mod:`schemas.transient`): the work runs again.
    """

    @event.listens_for(engine.sync_engine, "handle_error")
    def _on_error(context: ExceptionContext) -> None:
        error = context.original_exception
        codes = {getattr(error, "sqlstate", None), getattr(error.__cause__, "sqlstate", None)}
        if _READ_ONLY_SQLSTATE in codes:
            context.is_disconnect = True


def _use_sqlite_pragmas_and_immediate_transactions(
    engine: AsyncEngine, *, foreign_keys: bool
) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Stop the sqlite3 driver from issuing its own (deferred, DML-only) BEGIN, so
        # that the "begin" hook below is the only one.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # WAL lets readers in other processes proceed while one writes.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
