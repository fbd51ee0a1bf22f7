"""Nexus's schema on a real PostgreSQL: the same checks as on SQLite."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from nexus.cli.main import app
from nexus.db import migrate
from nexus.db.engine import create_engine
from tests.unit.test_db_sqlite import (
    ALL_TABLES,
    scenario_constraints_hold,
    scenario_records_round_trip,
    scenario_saga_version_fences_stale_writers,
    scenario_unused_states_dropped,
)

pytestmark = pytest.mark.integration


async def tables_in(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
            )
            return set(rows.scalars())
    finally:
        await engine.dispose()


async def execute(url: str, statement: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text(statement))
    finally:
        await engine.dispose()


@pytest.fixture
async def migrated_postgres_url(fresh_postgres_url: str) -> str:
    await migrate.upgrade_async(fresh_postgres_url)
    return fresh_postgres_url


async def test_upgrade_downgrade_upgrade_round_trips(fresh_postgres_url: str) -> None:
    url = fresh_postgres_url
    assert await migrate.current_async(url) is None

    await migrate.upgrade_async(url)
    assert await migrate.current_async(url) == migrate.head_revision()
    assert await tables_in(url) == ALL_TABLES | {"alembic_version"}
    await migrate.check_async(url)

    await migrate.downgrade_async(url, "base")
    assert await migrate.current_async(url) is None
    assert await tables_in(url) == {"alembic_version"}

    await migrate.upgrade_async(url)
    assert await migrate.current_async(url) == migrate.head_revision()
    await migrate.check_async(url)


async def test_check_reports_a_schema_changed_behind_its_back(
    migrated_postgres_url: str,
) -> None:
    await execute(migrated_postgres_url, "DROP INDEX ix_regions_disk_id")
    with pytest.raises(migrate.SchemaDriftError, match="ix_regions_disk_id"):
        await migrate.check_async(migrated_postgres_url)


async def test_check_reports_a_state_constraint_changed_behind_its_back(
    migrated_postgres_url: str,
) -> None:
    await execute(
        migrated_postgres_url,
        "ALTER TABLE sleds DROP CONSTRAINT ck_sleds_sled_state, "
        "ADD CONSTRAINT ck_sleds_sled_state CHECK (state IN ('active'))",
    )
    with pytest.raises(migrate.SchemaDriftError, match=r"sleds\.state .*unreachable"):
        await migrate.check_async(migrated_postgres_url)


async def test_records_round_trip(migrated_postgres_url: str) -> None:
    await scenario_records_round_trip(migrated_postgres_url)


async def test_constraints_hold(migrated_postgres_url: str) -> None:
    await scenario_constraints_hold(migrated_postgres_url)


async def test_saga_version_fences_stale_writers(migrated_postgres_url: str) -> None:
    await scenario_saga_version_fences_stale_writers(migrated_postgres_url)


async def test_unused_states_dropped(fresh_postgres_url: str) -> None:
    await scenario_unused_states_dropped(fresh_postgres_url)


def test_cli_upgrades_postgres(fresh_postgres_url: str) -> None:
    result = CliRunner().invoke(app, ["db", "upgrade", "--url", fresh_postgres_url])
    assert result.exit_code == 0, result.output
    assert f"revision {migrate.head_revision()} (head)" in result.stdout
    assert migrate.current(fresh_postgres_url) == migrate.head_revision()
