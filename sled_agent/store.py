"""The sled agent's own database: its VMMs and its outbox, in SQLite in its data dir.

One connection, used under a lock (SQLite wants one writer: docs/design.md, "Measured
facts"). A state change and the messages it causes are written in one transaction, so an
event exists exactly when its change does. Rows leave the outbox once the broker
confirmed them: sent messages are deleted rather than kept, so the file does not grow
with the sled's age.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy import (
    Boolean,
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    delete,
    event,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool

from schemas import tracing
from schemas.instance import Vmm, VmmSpec
from schemas.outbox import OutgoingMessage
from sled_agent.hypervisor import VM, Cause

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# Every VMM the sled ever ran, ended ones included: an ended VMM's record is what makes a
# late ``vmm.ensure`` for it change nothing (sled_agent/hypervisor.py).
vmms = Table(
    "vmms",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("spec", Text, nullable=False),
    Column("vmm", Text, nullable=False),
    Column("correlation_id", String(36)),
    Column("causation_id", String(36)),
)

outbox = Table(
    "outbox",
    metadata,
    # The rowid: messages leave in the order their transactions wrote them.
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("message_id", String(36), nullable=False, unique=True),
    Column("message_type", String(100), nullable=False),
    Column("exchange", String(255), nullable=False),
    Column("routing_key", String(255), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("correlation_id", String(36)),
    Column("reply_to", String(255)),
    Column("mandatory", Boolean, nullable=False),
    # The trace the message was written in (schemas.tracing); added after the first release.
    Column("trace_context", String(1000)),
)


def _sqlite_pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: a commit is one append; FULL: a committed change survives the machine, not
    # only the process (the agent promises an event for every committed change).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


class SledStore:
    """VMMs and outbox rows; an :class:`schemas.outbox.OutboxStore`."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._engine: AsyncEngine | None = None
        self._connection: AsyncConnection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._engine = create_async_engine(
            f"sqlite+aiosqlite:///{self._path}", poolclass=StaticPool
        )
        event.listen(self._engine.sync_engine, "connect", _sqlite_pragmas)
        self._connection = await self._engine.connect()
        async with self._transaction() as connection:
            # The instances of an agent from before VMMs: a restart fails every guest
            # anyway, and Nexus knows none of them by a VMM id, so there is nothing to keep.
            await connection.execute(text("DROP TABLE IF EXISTS instances"))
            await connection.run_sync(metadata.create_all)
            columns = await connection.exec_driver_sql("PRAGMA table_info(outbox)")
            if "trace_context" not in {row.name for row in columns}:
                await connection.exec_driver_sql(
                    "ALTER TABLE outbox ADD COLUMN trace_context VARCHAR(1000)"
                )

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        if self._connection is None:
            raise RuntimeError("the store is not open; call open() first")
        async with self._lock, self._connection.begin():
            yield self._connection

    async def load(self) -> list[VM]:
        async with self._transaction() as connection:
            rows = (await connection.execute(select(vmms))).all()
        return [
            VM(
                spec=VmmSpec.model_validate_json(row.spec),
                vmm=Vmm.model_validate_json(row.vmm),
                cause=Cause(_uuid_or_none(row.correlation_id), _uuid_or_none(row.causation_id)),
            )
            for row in rows
        ]

    async def save(self, vms: Sequence[VM], messages: Sequence[OutgoingMessage]) -> None:
        """VMMs and the messages their changes cause, in one transaction."""
        async with self._transaction() as connection:
            for vm in vms:
                values = {
                    "spec": vm.spec.model_dump_json(),
                    "vmm": vm.vmm.model_dump_json(),
                    "correlation_id": _str_or_none(vm.cause.correlation_id),
                    "causation_id": _str_or_none(vm.cause.causation_id),
                }
                upsert = sqlite_insert(vmms).values(id=str(vm.id), **values)
                await connection.execute(
                    upsert.on_conflict_do_update(index_elements=[vmms.c.id], set_=values)
                )
            for message in messages:
                # A message id already waiting (a redelivered command's rejection) is
                # the same message: keep one.
                row = (
                    insert(outbox)
                    .prefix_with("OR IGNORE")
                    .values(
                        message_id=str(message.message_id),
                        message_type=message.message_type,
                        exchange=message.exchange,
                        routing_key=message.routing_key,
                        body=message.body,
                        correlation_id=_str_or_none(message.correlation_id),
                        reply_to=message.reply_to,
                        mandatory=message.mandatory,
                        trace_context=tracing.dumps(message.trace_context),
                    )
                )
                await connection.execute(row)

    # OutboxStore.

    async def unsent(self, limit: int) -> Sequence[OutgoingMessage]:
        async with self._transaction() as connection:
            rows = (
                await connection.execute(select(outbox).order_by(outbox.c.seq).limit(limit))
            ).all()
        return [
            OutgoingMessage(
                message_id=uuid.UUID(row.message_id),
                message_type=row.message_type,
                exchange=row.exchange,
                routing_key=row.routing_key,
                body=row.body,
                correlation_id=_uuid_or_none(row.correlation_id),
                reply_to=row.reply_to,
                mandatory=row.mandatory,
                trace_context=tracing.loads(row.trace_context),
            )
            for row in rows
        ]

    async def mark_sent(self, message_ids: Sequence[uuid.UUID]) -> None:
        async with self._transaction() as connection:
            await connection.execute(
                delete(outbox).where(outbox.c.message_id.in_([str(i) for i in message_ids]))
            )

    async def unsent_count(self) -> int:
        async with self._transaction() as connection:
            return (await connection.execute(select(func.count()).select_from(outbox))).scalar_one()


def _str_or_none(value: uuid.UUID | None) -> str | None:
    return str(value) if value is not None else None


def _uuid_or_none(value: str | None) -> uuid.UUID | None:
    return uuid.UUID(value) if value else None
