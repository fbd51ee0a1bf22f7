"""Nexus's settings and database URLs: defaults, environment, and no password in sight."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from nexus.db.engine import PostgresTimeouts, create_engine, with_async_driver
from nexus.settings import NexusSettings
from schemas.redact import redact_url, redact_urls_in

FIELDS = (
    "REPLICA_ID",
    "DATABASE_URL",
    "AMQP_URL",
    "LEASE_SECONDS",
    "LOG_LEVEL",
    "DB_LOCK_TIMEOUT_SECONDS",
    "DB_STATEMENT_TIMEOUT_SECONDS",
    "DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS",
    "AMQP_HEARTBEAT_SECONDS",
)


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for field in FIELDS:
        monkeypatch.delenv(f"NEXUS_{field}", raising=False)
    return monkeypatch


def test_defaults(clean_environment: pytest.MonkeyPatch) -> None:
    settings = NexusSettings()
    assert settings.replica_id == f"{socket.gethostname()}-{os.getpid()}"
    assert settings.database_url == "sqlite+aiosqlite:///./var/nexus.sqlite3"
    assert settings.amqp_url == "amqp://guest:guest@localhost:5672/"
    assert settings.lease_seconds == 15
    assert settings.region_deadline_seconds == 300
    assert settings.log_level == "INFO"


def test_environment_overrides(clean_environment: pytest.MonkeyPatch) -> None:
    clean_environment.setenv("NEXUS_REPLICA_ID", "nexus-2")
    clean_environment.setenv("NEXUS_DATABASE_URL", "postgresql+asyncpg://n:pw@db/nexus")
    clean_environment.setenv("NEXUS_LEASE_SECONDS", "2.5")
    clean_environment.setenv("NEXUS_LOG_LEVEL", "debug")
    clean_environment.setenv("NEXUS_REGION_DEADLINE_SECONDS", "1200")
    settings = NexusSettings()
    assert settings.region_deadline_seconds == 1200
    assert settings.replica_id == "nexus-2"
    assert settings.database_url == "postgresql+asyncpg://n:pw@db/nexus"
    assert settings.lease_seconds == 2.5
    assert settings.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("lease", "lock", "statement", "idle", "heartbeat"),
    [
        # The default lease: a frozen replica costs the others at most 1 s of database
        # waits, and its broker connection is closed within the lease.
        (15.0, 1.0, 5.0, 1.0, 5),
        # The tests' and the chaos test's short lease.
        (2.0, 1.0, 2.0, 1.0, 1),
        # Shorter still: half the lease, and the least heartbeat AMQP has.
        (1.0, 0.5, 1.0, 0.5, 1),
    ],
)
def test_the_frozen_replica_limits_are_sized_from_the_lease(
    clean_environment: pytest.MonkeyPatch,
    lease: float,
    lock: float,
    statement: float,
    idle: float,
    heartbeat: int,
) -> None:
    settings = NexusSettings(lease_seconds=lease)
    assert settings.postgres_timeouts() == PostgresTimeouts(
        lock_seconds=lock, statement_seconds=statement, idle_in_transaction_seconds=idle
    )
    assert settings.amqp_heartbeat == heartbeat


def test_the_frozen_replica_limits_can_be_set_or_turned_off(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    clean_environment.setenv("NEXUS_DB_LOCK_TIMEOUT_SECONDS", "0.25")
    clean_environment.setenv("NEXUS_DB_STATEMENT_TIMEOUT_SECONDS", "0")
    clean_environment.setenv("NEXUS_DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS", "3")
    clean_environment.setenv("NEXUS_AMQP_HEARTBEAT_SECONDS", "0")
    settings = NexusSettings()
    timeouts = settings.postgres_timeouts()
    assert timeouts == PostgresTimeouts(
        lock_seconds=0.25, statement_seconds=0, idle_in_transaction_seconds=3
    )
    assert settings.amqp_heartbeat == 0
    # PostgreSQL takes milliseconds; 0 is no limit, and a positive one never rounds to 0.
    assert timeouts.server_settings() == {
        "lock_timeout": "250",
        "statement_timeout": "0",
        "idle_in_transaction_session_timeout": "3000",
    }
    assert PostgresTimeouts(0.0001, 0.0001, 0.0001).server_settings() == dict.fromkeys(
        ("lock_timeout", "statement_timeout", "idle_in_transaction_session_timeout"), "1"
    )


async def test_sqlite_takes_no_postgres_timeouts(tmp_path: Path) -> None:
    engine = create_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'nexus.sqlite3'}",
        timeouts=NexusSettings(lease_seconds=2).postgres_timeouts(),
    )
    try:
        async with engine.connect() as connection:
            assert (await connection.exec_driver_sql("SELECT 1")).scalar_one() == 1
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("LEASE_SECONDS", "0"),
        ("LOG_LEVEL", "LOUD"),
        ("REGION_DEADLINE_SECONDS", "0"),
        ("DB_LOCK_TIMEOUT_SECONDS", "-1"),
        ("DB_STATEMENT_TIMEOUT_SECONDS", "-1"),
        ("DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS", "-1"),
        ("AMQP_HEARTBEAT_SECONDS", "-1"),
        ("AMQP_HEARTBEAT_SECONDS", "1.5"),
    ],
)
def test_invalid_values_are_refused(
    clean_environment: pytest.MonkeyPatch, field: str, value: str
) -> None:
    clean_environment.setenv(f"NEXUS_{field}", value)
    with pytest.raises(ValidationError):
        NexusSettings()


def test_repr_shows_no_password(clean_environment: pytest.MonkeyPatch) -> None:
    settings = NexusSettings(
        database_url="postgresql+asyncpg://nexus:db-secret@db/nexus",
        amqp_url="amqps://nexus:mq-secret@mq:5671/%2f",
    )
    for text in (repr(settings), str(settings)):
        assert "db-secret" not in text
        assert "mq-secret" not in text
        assert "postgresql+asyncpg://nexus:***@db/nexus" in text
        assert "amqps://nexus:***@mq:5671/%2f" in text


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("amqp://guest:guest@localhost:5672/", "amqp://guest:***@localhost:5672/"),
        ("postgresql+asyncpg://n:p@ss@db:5432/x", "postgresql+asyncpg://n:***@db:5432/x"),
        # Should have been percent-encoded; hidden all the same.
        ("postgresql://n:a/b#c?d@db/x", "postgresql://n:***@db/x"),
        ("postgresql://n@db/x", "postgresql://n@db/x"),
        ("postgresql://db/x", "postgresql://db/x"),
        ("sqlite+aiosqlite:///./var/nexus.sqlite3", "sqlite+aiosqlite:///./var/nexus.sqlite3"),
        ("n:secret@db", "***"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_redact_urls_in_text() -> None:
    message = "cannot reach 'amqp://u:s3cret@mq:5672/' nor postgresql://u:s3cret@db/x."
    assert redact_urls_in(message) == (
        "cannot reach 'amqp://u:***@mq:5672/' nor postgresql://u:***@db/x."
    )


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("sqlite:///x.db", "sqlite+aiosqlite"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite"),
        ("postgresql://db/x", "postgresql+asyncpg"),
        ("postgresql+asyncpg://db/x", "postgresql+asyncpg"),
    ],
)
def test_urls_get_the_async_driver(url: str, driver: str) -> None:
    assert with_async_driver(url).drivername == driver


def test_other_databases_are_refused() -> None:
    with pytest.raises(ValueError, match="unsupported database 'mysql'"):
        create_engine("mysql://root@localhost/nexus")


async def test_default_database_is_created_under_var(
    clean_environment: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_environment.chdir(tmp_path)
    engine = create_engine(NexusSettings().database_url)
    try:
        async with engine.connect() as connection:
            await connection.exec_driver_sql("SELECT 1")
    finally:
        await engine.dispose()
    assert (tmp_path / "var" / "nexus.sqlite3").is_file()
