"""Nexus's schema on SQLite: migrations round-trip and match the models, records
round-trip, constraints hold, and the engine queues for one connection.

The ``scenario_*`` functions take the URL of a database migrated to head and are
shared with the PostgreSQL tests in ``tests/integration/test_migrations.py``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Enum, Update, delete, func, inspect, literal_column, select, update
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError
from typer.testing import CliRunner

from nexus.cli.main import app
from nexus.db import migrate
from nexus.db.engine import create_engine, create_sessionmaker
from nexus.db.models import (
    Dataset,
    Disk,
    InboxMessage,
    Instance,
    OutboxMessage,
    Region,
    Saga,
    SagaLogEntry,
    Sled,
    UnclaimedEvent,
    Vmm,
    WaitRendezvous,
)
from nexus.db.states import (
    DiskState,
    InstanceState,
    RegionState,
    SagaLogEvent,
    SagaState,
    SledState,
    VmmState,
    WaitState,
)

ALL_TABLES = {
    "datasets",
    "disks",
    "inbox",
    "instances",
    "outbox",
    "region_replacement",
    "regions",
    "region_snapshots",
    "saga_log",
    "sagas",
    "sleds",
    "snapshots",
    "unclaimed_events",
    "vmms",
    "wait_rendezvous",
}
# Two hours east of UTC, so a lost offset would show.
PLUS_TWO = timezone(timedelta(hours=2))


# Shared scenarios -----------------------------------------------------------------


def new_sled() -> Sled:
    sled_id = uuid.uuid4()
    return Sled(
        id=sled_id,
        hostname=f"sled-{sled_id.hex[:8]}",
        queue_name=f"sled.{sled_id}",
        cpus=32,
        memory_bytes=256 << 30,
        state=SledState.ACTIVE,
        last_heartbeat_at=datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=PLUS_TWO),
    )


def new_dataset(sled_id: uuid.UUID) -> Dataset:
    dataset_id = uuid.uuid4()
    return Dataset(
        id=dataset_id,
        sled_id=sled_id,
        queue_name=f"crucible.{dataset_id}",
        capacity_bytes=1 << 40,
        free_bytes=1 << 39,
        last_seen_at=datetime.now(UTC),
    )


def new_saga() -> Saga:
    return Saga(
        id=uuid.uuid4(),
        name="disk_create",
        definition_version=1,
        params={"project": "p", "size_bytes": 1 << 30, "tags": ["a", "b"]},
        state=SagaState.RUNNING,
        lease_owner="replica-a",
        lease_expires_at=datetime.now(UTC) + timedelta(seconds=15),
    )


def new_disk(project: str, name: str, *, saga_id: uuid.UUID | None = None) -> Disk:
    return Disk(
        id=uuid.uuid4(),
        project=project,
        name=name,
        size_bytes=1 << 30,
        block_size=512,
        state=DiskState.CREATING,
        saga_id=saga_id,
    )


def new_project() -> str:
    return f"project-{uuid.uuid4().hex[:12]}"


async def scenario_records_round_trip(url: str) -> None:
    """Every table takes a record and gives back the same values and types."""
    engine = create_engine(url)
    sessions = create_sessionmaker(engine)
    try:
        sled = new_sled()
        dataset = new_dataset(sled.id)
        saga = new_saga()
        instance = Instance(
            id=uuid.uuid4(),
            project=new_project(),
            name="web",
            ncpus=2,
            memory_bytes=1 << 30,
            state=InstanceState.RUNNING,
        )
        vmm = Vmm(
            id=uuid.uuid4(),
            instance_id=instance.id,
            sled_id=sled.id,
            ncpus=2,
            memory_bytes=1 << 30,
            state=VmmState.RUNNING,
            generation=(1 << 63) - 1,
        )
        instance.active_vmm_id = vmm.id
        disk = new_disk(instance.project, "data", saga_id=saga.id)
        disk.state = DiskState.ATTACHED
        disk.attached_instance_id = instance.id
        region = Region(
            id=uuid.uuid4(),
            disk_id=disk.id,
            dataset_id=dataset.id,
            block_size=512,
            extent_size=131072,
            extent_count=16,
            state=RegionState.REQUESTED,
        )
        deadline = datetime.now(PLUS_TWO) + timedelta(minutes=5)
        wait_key = f"region:{region.id}:created"
        message_id = uuid.uuid4()
        body = b'{"type": "region.ensure.v1", "bytes": "\xff\x00"}'
        async with sessions() as session, session.begin():
            # The models declare no relationships, so the ORM does not order inserts
            # by foreign key: referenced rows are flushed first.
            for parent in (sled, dataset, saga, instance, vmm, disk):
                session.add(parent)
                await session.flush()
            session.add(region)
            session.add_all(
                SagaLogEntry(
                    saga_id=saga.id,
                    node_name="regions_ensure",
                    event=event,
                    replica_id="replica-a",
                    data={"attempt": number},
                )
                for number, event in enumerate([SagaLogEvent.STARTED, SagaLogEvent.WAITING])
            )
            session.add(
                WaitRendezvous(
                    wait_key=wait_key,
                    saga_id=saga.id,
                    node_name="regions_ensure",
                    deadline=deadline,
                    parked_at=datetime.now(UTC),
                    state=WaitState.PARKED,
                )
            )
            session.add(
                UnclaimedEvent(
                    wait_key=f"region:{uuid.uuid4()}:created",
                    message_id=uuid.uuid4(),
                    payload={"state": "created"},
                    arrived_at=datetime.now(UTC),
                )
            )
            session.add(
                OutboxMessage(
                    message_id=message_id,
                    exchange="control.commands",
                    routing_key=f"crucible.{dataset.id}",
                    body=body,
                    headers={"type": "region.ensure.v1", "correlation_id": str(saga.id)},
                )
            )
            session.add(InboxMessage(message_id=message_id, consumer="nexus.events"))

        async with sessions() as session:
            stored_sled = await session.get_one(Sled, sled.id)
            assert stored_sled.state is SledState.ACTIVE
            assert stored_sled.last_heartbeat_at == sled.last_heartbeat_at
            assert stored_sled.last_heartbeat_at is not None
            assert stored_sled.last_heartbeat_at.tzinfo is UTC
            assert stored_sled.generation == 1

            stored_saga = await session.get_one(Saga, saga.id)
            assert stored_saga.params == {"project": "p", "size_bytes": 1 << 30, "tags": ["a", "b"]}
            assert (stored_saga.node_outputs, stored_saga.progress) == ({}, {})
            assert stored_saga.version == 1
            assert stored_saga.state is SagaState.RUNNING

            stored_disk = await session.get_one(Disk, disk.id)
            assert stored_disk.attached_instance_id == instance.id
            assert stored_disk.saga_id == saga.id
            assert stored_disk.created_at.tzinfo is UTC

            stored_vmm = await session.get_one(Vmm, vmm.id)
            assert (stored_vmm.state, stored_vmm.generation) == (VmmState.RUNNING, (1 << 63) - 1)
            stored_instance = await session.get_one(Instance, instance.id)
            assert stored_instance.active_vmm_id == vmm.id

            stored_region = await session.get_one(Region, region.id)
            assert (stored_region.dataset_id, stored_region.port_number) == (dataset.id, None)

            log = (
                await session.scalars(
                    select(SagaLogEntry)
                    .where(SagaLogEntry.saga_id == saga.id)
                    .order_by(SagaLogEntry.id)
                )
            ).all()
            assert [entry.event for entry in log] == [SagaLogEvent.STARTED, SagaLogEvent.WAITING]
            assert log[0].id < log[1].id
            assert [entry.data for entry in log] == [{"attempt": 0}, {"attempt": 1}]

            wait = await session.get_one(WaitRendezvous, wait_key)
            assert wait.deadline == deadline
            assert wait.state is WaitState.PARKED

            outbox = (
                await session.scalars(
                    select(OutboxMessage).where(OutboxMessage.message_id == message_id)
                )
            ).one()
            assert outbox.body == body
            assert (outbox.sent_at, outbox.attempts) == (None, 0)
            assert outbox.headers == {"type": "region.ensure.v1", "correlation_id": str(saga.id)}
    finally:
        await engine.dispose()


async def _expect_integrity_error(session: AsyncSession, *records: object) -> None:
    session.add_all(records)
    with pytest.raises(IntegrityError):
        await session.flush()
    await session.rollback()


async def scenario_constraints_hold(url: str) -> None:
    """Foreign keys, live-name uniqueness, state CHECKs and message-id uniqueness."""
    engine = create_engine(url)
    sessions = create_sessionmaker(engine)
    try:
        project = new_project()
        async with sessions() as session:
            dangling = Region(
                id=uuid.uuid4(),
                disk_id=uuid.uuid4(),
                dataset_id=uuid.uuid4(),
                block_size=512,
                extent_size=1,
                extent_count=1,
                state=RegionState.REQUESTED,
            )
            await _expect_integrity_error(session, dangling)

        first = new_disk(project, "data")
        async with sessions() as session, session.begin():
            session.add(first)
        async with sessions() as session:
            await _expect_integrity_error(session, new_disk(project, "data"))
        async with sessions() as session, session.begin():
            # Another project may use the name, and once deleted the name is free.
            session.add(new_disk(new_project(), "data"))
            await session.execute(
                update(Disk).where(Disk.id == first.id).values(state=DiskState.DELETED)
            )
            session.add(new_disk(project, "data"))

        sled = new_sled()
        async with sessions() as session, session.begin():
            session.add(sled)
        async with sessions() as session:
            # Bypass the Python-side enum check to reach the database's.
            with pytest.raises(IntegrityError):
                await session.execute(
                    update(Sled)
                    .where(Sled.id == sled.id)
                    .values(state=literal_column("'exploded'"))
                )
            await session.rollback()
            with pytest.raises(StatementError):
                await session.execute(
                    update(Sled).where(Sled.id == sled.id).values(state="exploded")
                )
            await session.rollback()

        message_id = uuid.uuid4()
        async with sessions() as session, session.begin():
            session.add(InboxMessage(message_id=message_id, consumer="nexus.events"))
            session.add(InboxMessage(message_id=message_id, consumer="nexus.watchers"))
        async with sessions() as session:
            await _expect_integrity_error(
                session, InboxMessage(message_id=message_id, consumer="nexus.events")
            )
            duplicate_outbox = [
                OutboxMessage(
                    message_id=message_id,
                    exchange="control.commands",
                    routing_key="crucible.x",
                    body=b"{}",
                )
                for _ in range(2)
            ]
            await _expect_integrity_error(session, *duplicate_outbox)
    finally:
        await engine.dispose()


async def scenario_saga_version_fences_stale_writers(url: str) -> None:
    """Two replicas that read the same saga version cannot both write it."""
    engine = create_engine(url)
    sessions = create_sessionmaker(engine)
    try:
        saga = new_saga()
        async with sessions() as session, session.begin():
            session.add(saga)
        # Each read ends its transaction: SQLite has one connection to share.
        async with sessions() as first, sessions() as second:
            mine = await first.get_one(Saga, saga.id)
            await first.commit()
            theirs = await second.get_one(Saga, saga.id)
            await second.commit()
            mine.state = SagaState.WAITING
            await first.commit()
            theirs.state = SagaState.UNWINDING
            with pytest.raises(StaleDataError):
                await second.commit()
        async with sessions() as session:
            stored = await session.get_one(Saga, saga.id)
            assert (stored.state, stored.version) == (SagaState.WAITING, 2)
    finally:
        await engine.dispose()


async def scenario_unused_states_dropped(url: str) -> None:
    """Migration 0003 takes a saga's ``failed`` and a wait's ``expired`` out of the
    CHECK constraints and keeps the rows; its downgrade allows them again. ``url`` is
    a database never migrated."""
    await migrate.upgrade_async(url, "0002")
    saga = new_saga()
    wait = WaitRendezvous(
        wait_key=f"region:{uuid.uuid4()}:created", saga_id=saga.id, state=WaitState.PARKED
    )
    engine = create_engine(url)
    sessions = create_sessionmaker(engine)
    try:
        async with sessions() as session, session.begin():
            session.add(saga)
            await session.flush()
            session.add(wait)

        await migrate.upgrade_async(url)
        async with sessions() as session:
            stored_saga = await session.get_one(Saga, saga.id)
            stored_wait = await session.get_one(WaitRendezvous, wait.wait_key)
            assert (stored_saga.state, stored_saga.params) == (SagaState.RUNNING, saga.params)
            assert (stored_wait.state, stored_wait.saga_id) == (WaitState.PARKED, saga.id)
        for dropped in _set_dropped_states(saga.id, wait.wait_key):
            async with sessions() as session:
                with pytest.raises(IntegrityError):
                    await session.execute(dropped)
                await session.rollback()

        await migrate.downgrade_async(url, "0002")
        async with sessions() as session, session.begin():
            for dropped in _set_dropped_states(saga.id, wait.wait_key):
                await session.execute(dropped)
    finally:
        await engine.dispose()


def _set_dropped_states(saga_id: uuid.UUID, wait_key: str) -> list[Update]:
    # Literal values bypass the Python-side enum check to reach the database's.
    return [
        update(Saga).where(Saga.id == saga_id).values(state=literal_column("'failed'")),
        update(WaitRendezvous)
        .where(WaitRendezvous.wait_key == wait_key)
        .values(state=literal_column("'expired'")),
    ]


# SQLite -----------------------------------------------------------------------------


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "nexus.sqlite3"


@pytest.fixture
def sqlite_url(sqlite_path: Path) -> str:
    return f"sqlite+aiosqlite:///{sqlite_path}"


@pytest.fixture
async def migrated_sqlite_url(sqlite_url: str) -> str:
    await migrate.upgrade_async(sqlite_url)
    return sqlite_url


def tables_in(path: Path) -> set[str]:
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {name for (name,) in rows} - {"sqlite_sequence"}


def test_upgrade_downgrade_upgrade_round_trips(sqlite_url: str, sqlite_path: Path) -> None:
    assert migrate.current(sqlite_url) is None

    migrate.upgrade(sqlite_url)
    assert migrate.current(sqlite_url) == migrate.head_revision()
    assert tables_in(sqlite_path) == ALL_TABLES | {"alembic_version"}
    migrate.check(sqlite_url)

    migrate.downgrade(sqlite_url, "base")
    assert migrate.current(sqlite_url) is None
    assert tables_in(sqlite_path) == {"alembic_version"}

    migrate.upgrade(sqlite_url)
    assert migrate.current(sqlite_url) == migrate.head_revision()
    migrate.check(sqlite_url)


def test_check_reports_a_schema_changed_behind_its_back(sqlite_url: str, sqlite_path: Path) -> None:
    migrate.upgrade(sqlite_url)
    with sqlite3.connect(sqlite_path) as connection:
        connection.execute("DROP INDEX ix_regions_disk_id")
    with pytest.raises(migrate.SchemaDriftError, match="ix_regions_disk_id"):
        migrate.check(sqlite_url)


def test_check_reports_a_state_added_without_a_migration(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrate.upgrade(sqlite_url)
    state_type = Sled.__table__.c.state.type
    assert isinstance(state_type, Enum)
    monkeypatch.setattr(state_type, "enums", [*state_type.enums, "retired"])
    with pytest.raises(migrate.SchemaDriftError, match=r"sleds\.state .*retired"):
        migrate.check(sqlite_url)


def test_migrations_refuse_to_commit_over_dangling_references(
    sqlite_url: str, sqlite_path: Path
) -> None:
    migrate.upgrade(sqlite_url)
    # The standard library's connection has foreign keys off, as migrations do.
    with sqlite3.connect(sqlite_path) as connection:
        connection.execute(
            "INSERT INTO saga_log (saga_id, node_name, event, replica_id, at) "
            "VALUES ('0', 'n', 'started', 'r', '2030-01-01 00:00:00')"
        )
    with pytest.raises(RuntimeError, match="dangling foreign keys"):
        migrate.upgrade(sqlite_url)


async def test_unused_states_dropped(sqlite_url: str) -> None:
    await scenario_unused_states_dropped(sqlite_url)


async def test_migrations_run_inside_a_running_event_loop(sqlite_url: str) -> None:
    await migrate.upgrade_async(sqlite_url)
    assert await migrate.current_async(sqlite_url) == migrate.head_revision()
    await migrate.check_async(sqlite_url)
    await migrate.downgrade_async(sqlite_url, "base")
    assert await migrate.current_async(sqlite_url) is None


async def test_records_round_trip(migrated_sqlite_url: str) -> None:
    await scenario_records_round_trip(migrated_sqlite_url)


async def test_constraints_hold(migrated_sqlite_url: str) -> None:
    await scenario_constraints_hold(migrated_sqlite_url)


async def test_saga_version_fences_stale_writers(migrated_sqlite_url: str) -> None:
    await scenario_saga_version_fences_stale_writers(migrated_sqlite_url)


async def test_naive_datetimes_are_refused(migrated_sqlite_url: str) -> None:
    engine = create_engine(migrated_sqlite_url)
    try:
        sled = new_sled()
        sled.last_heartbeat_at = datetime(2030, 1, 1)
        async with create_sessionmaker(engine)() as session:
            session.add(sled)
            with pytest.raises(StatementError, match="naive datetime"):
                await session.flush()
    finally:
        await engine.dispose()


async def test_sqlite_connection_settings(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    try:
        async with engine.connect() as connection:
            pragmas = {
                name: (await connection.exec_driver_sql(f"PRAGMA {name}")).scalar_one()
                for name in ("journal_mode", "foreign_keys", "busy_timeout")
            }
        assert pragmas == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 5000}
    finally:
        await engine.dispose()


async def test_sqlite_transactions_queue_for_one_connection(migrated_sqlite_url: str) -> None:
    engine = create_engine(migrated_sqlite_url)
    inside = peak = 0

    async def transaction(number: int) -> None:
        nonlocal inside, peak
        async with engine.begin() as connection:
            inside += 1
            peak = max(peak, inside)
            await connection.execute(
                delete(InboxMessage).where(InboxMessage.consumer == f"c{number}")
            )
            await asyncio.sleep(0.01)
            inside -= 1

    try:
        await asyncio.gather(*(transaction(number) for number in range(8)))
    finally:
        await engine.dispose()
    assert peak == 1


async def test_sqlite_transaction_takes_the_write_lock_when_it_begins(
    migrated_sqlite_url: str, sqlite_path: Path
) -> None:
    engine = create_engine(migrated_sqlite_url)
    other_process = sqlite3.connect(sqlite_path, timeout=0, isolation_level=None)
    try:
        async with engine.begin() as connection:
            # Only a read so far, yet another writer is already shut out.
            await connection.execute(select(func.count()).select_from(Sled))
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other_process.execute("BEGIN IMMEDIATE")
        other_process.execute("BEGIN IMMEDIATE")
        other_process.execute("ROLLBACK")
    finally:
        other_process.close()
        await engine.dispose()


async def test_in_memory_sqlite_keeps_one_database_for_all_sessions() -> None:
    engine = create_engine("sqlite+aiosqlite://")
    try:
        async with engine.begin() as connection:
            await connection.run_sync(Sled.metadata.create_all)
        sessions = create_sessionmaker(engine)
        sled = new_sled()
        async with sessions() as session, session.begin():
            session.add(sled)
        async with sessions() as session:
            assert (await session.get_one(Sled, sled.id)).hostname == sled.hostname
    finally:
        await engine.dispose()


async def test_schema_has_named_constraints(migrated_sqlite_url: str) -> None:
    engine = create_engine(migrated_sqlite_url)
    try:
        async with engine.connect() as connection:
            foreign_keys = await connection.run_sync(
                lambda sync: inspect(sync).get_foreign_keys("regions")
            )
        assert {key["name"] for key in foreign_keys} == {
            "fk_regions_disk_id_disks",
            "fk_regions_dataset_id_datasets",
        }
    finally:
        await engine.dispose()


# nexusctl db ------------------------------------------------------------------------


def test_cli_upgrades_and_reports_the_revision(sqlite_url: str, sqlite_path: Path) -> None:
    runner = CliRunner()
    head = migrate.head_revision()

    upgraded = runner.invoke(app, ["db", "upgrade", "--url", sqlite_url])
    assert upgraded.exit_code == 0, upgraded.output
    assert f"revision {head} (head)" in upgraded.stdout
    assert tables_in(sqlite_path) == ALL_TABLES | {"alembic_version"}

    current = runner.invoke(app, ["db", "current", "--url", sqlite_url])
    assert current.exit_code == 0, current.output
    assert f"revision {head} (head)" in current.stdout

    checked = runner.invoke(app, ["db", "check", "--url", sqlite_url])
    assert checked.exit_code == 0, checked.output

    downgraded = runner.invoke(app, ["db", "downgrade", "base", "--url", sqlite_url])
    assert downgraded.exit_code == 0, downgraded.output
    assert "no revision" in downgraded.stdout
    assert migrate.current(sqlite_url) is None


def test_cli_url_defaults_to_the_settings(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXUS_DATABASE_URL", sqlite_url)
    result = CliRunner().invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert migrate.current(sqlite_url) == migrate.head_revision()


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["db", "upgrade", "--url", "not a url"], "Could not parse"),
        (["db", "current", "--url", "mysql://root:hunter2@localhost/nexus"], "unsupported"),
        (
            ["db", "upgrade", "--url", "postgresql+asyncpg://nexus:hunter2@127.0.0.1:1/nexus"],
            "postgresql+asyncpg://nexus:***@127.0.0.1:1/nexus",
        ),
    ],
)
def test_cli_errors_are_one_line_without_secrets(arguments: list[str], expected: str) -> None:
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert "hunter2" not in result.output


def test_cli_downgrade_to_an_unknown_revision_fails_cleanly(sqlite_url: str) -> None:
    result = CliRunner().invoke(app, ["db", "downgrade", "nonesuch", "--url", sqlite_url])
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "nonesuch" in result.stderr


def test_cli_reports_invalid_settings_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXUS_LEASE_SECONDS", "-1")
    result = CliRunner().invoke(app, ["db", "current"])
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "lease_seconds" in result.stderr
