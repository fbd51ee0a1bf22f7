"""Alembic's entry point: migrates the connection it is handed, or opens its own.

``nexus.db.migrate`` hands in a connection (``config.attributes["connection"]``) so
that it controls the event loop. The plain ``alembic -c nexus/db/alembic.ini ...``
command gets none, and this opens one to ``-x url=...`` or NEXUS_DATABASE_URL.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy.engine import Connection

from nexus.db.engine import create_engine
from nexus.db.models import Base, UTCDateTime
from nexus.settings import NexusSettings
from schemas.redact import redact_url


def _render_item(kind: str, obj: Any, _context: AutogenContext) -> str | Literal[False]:
    # A migration must not import application code, which keeps changing after the
    # migration is written; it spells the column type out instead.
    if kind == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _fail_on_dangling_sqlite_references(connection: Connection) -> None:
    # Migrations run with SQLite's foreign keys off (a table rebuild would trip them),
    # so check what they would have checked before committing.
    dangling = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
    if dangling:
        raise RuntimeError(f"migration left rows with dangling foreign keys: {dangling[:5]}")


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,
        compare_type=True,
        render_item=_render_item,
        # SQLite's DDL is transactional too once the driver stops auto-committing
        # (nexus.db.engine sees to that): a failed migration then leaves no trace.
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()
        if connection.dialect.name == "sqlite":
            _fail_on_dangling_sqlite_references(connection)


async def _run_migrations_on_own_engine(url: str) -> None:
    engine = create_engine(url, sqlite_foreign_keys=False)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_migrations)
    finally:
        await engine.dispose()


def main() -> None:
    if context.is_offline_mode():
        raise SystemExit("offline (--sql) migrations are not supported; run them on a database")
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or NexusSettings().database_url
    context.config.print_stdout(f"database: {redact_url(url)}")
    asyncio.run(_run_migrations_on_own_engine(url))


main()
