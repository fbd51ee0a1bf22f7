"""Fixtures shared by the whole suite: real RabbitMQ and PostgreSQL servers, and Nexus's
database on SQLite and on PostgreSQL.

Servers start lazily, once per session, only when a test asks for one. Which server each
test run used is printed in the terminal summary, so a CI log shows that the tests ran
against real servers and which ones.
"""

from __future__ import annotations

import random
import shutil
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest

from nexus.db.migrate import upgrade_async
from tests.harness.servers import (
    SERVERS_ENV,
    NotSupportedInMode,
    PatroniPostgres,
    PostgresServer,
    PrivatePostgresCluster,
    PrivateRabbitMQCluster,
    PrivateRabbitMQNode,
    RabbitMQServer,
    ServerUnavailable,
    provide_ha_postgres,
    provide_postgres,
    provide_rabbitmq,
    provide_rabbitmq_cluster,
    server_mode,
)
from tests.saga_support import Database

# Before the test modules import them: a failed assert in these helpers then shows its
# values, as a test's own does.
pytest.register_assert_rewrite("tests.saga_triad", "tests.saga_scenarios")

_SERVERS_USED = pytest.StashKey[list[str]]()
_Server = TypeVar("_Server", RabbitMQServer, PostgresServer, PrivateRabbitMQCluster)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--race-trials",
        type=int,
        default=200,
        help="trials of each randomized race test (default 200; thousands for a soak)",
    )
    parser.addoption(
        "--chaos-operations",
        type=int,
        default=36,
        help="disk creates of the chaos test (default 36; 300 for the long run)",
    )
    parser.addoption(
        "--chaos-seed",
        type=int,
        default=None,
        help="seed of the chaos test, to replay a run (default: a new one, printed)",
    )
    parser.addoption(
        "--chaos-faults",
        default="all",
        help="the chaos test's faults beside its SIGKILLs, each done at least once: all "
        "(default), none, or a comma-separated list of rabbitmq-restart, postgres-stop, "
        "postgres-kill, sigstop, clock-skew, disk-full",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SERVERS_USED] = []


@pytest.fixture(scope="session")
def race_trials(request: pytest.FixtureRequest) -> int:
    return int(request.config.getoption("--race-trials"))


@pytest.fixture(scope="session")
def chaos_operations(request: pytest.FixtureRequest) -> int:
    return int(request.config.getoption("--chaos-operations"))


@pytest.fixture(scope="session")
def chaos_faults(request: pytest.FixtureRequest) -> str:
    return str(request.config.getoption("--chaos-faults"))


@pytest.fixture
def chaos_seed(request: pytest.FixtureRequest) -> int:
    given = request.config.getoption("--chaos-seed")
    return int(given) if given is not None else random.SystemRandom().randrange(1 << 32)


# Fixtures that stop, start or kill their server: always a private process of the test's
# own, whatever TEST_SERVERS says. Tests that use them are marked `private_servers`, so a
# run that must use other servers (TEST_SERVERS=testcontainers) deselects them by name.
_PRIVATE_SERVER_FIXTURES = {
    "restartable_rabbitmq",
    "restartable_postgres",
    "ha_postgres",
    "rabbitmq_cluster",
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _PRIVATE_SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.private_servers)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    used = terminalreporter.config.stash.get(_SERVERS_USED, [])
    if used:
        # Which source served the servers, by the mode that chose it and by each server.
        try:
            mode = server_mode()
        except ServerUnavailable as exc:
            mode = str(exc)
        terminalreporter.write_sep("=", f"servers used ({SERVERS_ENV}={mode})")
        for line in used:
            terminalreporter.write_line(line)


def _refuse_private_in_containers_only_mode(fixture: str) -> None:
    try:
        mode = server_mode()
    except ServerUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    if mode == "testcontainers":
        pytest.fail(
            f"{fixture} is a private server the test stops or kills, which "
            f"{SERVERS_ENV}=testcontainers rules out: deselect such tests with "
            "-m 'not private_servers'",
            pytrace=False,
        )


def _provide_or_fail(provide: Callable[[], _Server]) -> _Server:
    try:
        return provide()
    except ServerUnavailable as exc:
        message = str(exc)
    # Failing outside the except block keeps the report to the one message that says what
    # was tried. A missing server is a broken environment, never a reason to skip a test.
    pytest.fail(message, pytrace=False)


def _serve(request: pytest.FixtureRequest, provide: Callable[[], _Server]) -> Iterator[_Server]:
    server = _provide_or_fail(provide)
    request.config.stash[_SERVERS_USED].append(server.describe())
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def rabbitmq_server(request: pytest.FixtureRequest) -> Iterator[RabbitMQServer]:
    """The session's RabbitMQ: from TEST_RABBITMQ_URL, testcontainers or a private node."""
    yield from _serve(request, provide_rabbitmq)


@pytest.fixture(scope="session")
def rabbitmq_url(rabbitmq_server: RabbitMQServer) -> str:
    """``amqp://`` URL of the session's RabbitMQ."""
    return rabbitmq_server.url


@pytest.fixture
def vhost_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """``amqp://`` URL of a new, empty virtual host, deleted afterwards.

    For tests that run Nexus: its queues (``nexus.events``, ``nexus.api``) have fixed
    names, and events left there by earlier tests (announcements of agents long gone)
    would be consumed as if they were current. A server given by URL cannot be asked
    for a virtual host, so those tests then use a private node.
    """
    yield from _new_vhost(request)


@pytest.fixture(scope="module")
def module_vhost_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """``vhost_url`` for a module whose tests share one rack of processes."""
    yield from _new_vhost(request)


def _new_vhost(request: pytest.FixtureRequest) -> Iterator[str]:
    server: RabbitMQServer = request.getfixturevalue("rabbitmq_server")
    name = f"test-{uuid.uuid4().hex[:12]}"
    try:
        server.rabbitmqctl("add_vhost", name)
    except NotSupportedInMode:
        server = request.getfixturevalue("restartable_rabbitmq")
        server.rabbitmqctl("add_vhost", name)
    base = urlsplit(server.url)
    server.rabbitmqctl("set_permissions", "-p", name, base.username or "guest", ".*", ".*", ".*")
    yield urlunsplit(base._replace(path=f"/{name}"))
    try:
        server.rabbitmqctl("delete_vhost", name)
    except Exception as error:
        warnings.warn(f"could not delete virtual host {name}: {error}", stacklevel=1)


@pytest.fixture(scope="session")
def restartable_rabbitmq(request: pytest.FixtureRequest) -> Iterator[RabbitMQServer]:
    """A RabbitMQ node that tests may stop and start: the session's own when it is a
    private node, otherwise a private node started for the tests that need one."""
    _refuse_private_in_containers_only_mode("restartable_rabbitmq")
    shared: RabbitMQServer = request.getfixturevalue("rabbitmq_server")
    if shared.restartable:
        yield shared
    else:
        yield from _serve(request, PrivateRabbitMQNode)


@pytest.fixture(scope="module")
def rabbitmq_cluster(request: pytest.FixtureRequest) -> Iterator[PrivateRabbitMQCluster]:
    """A private 3-node RabbitMQ cluster of the module's own, whose nodes its tests may
    kill, stop and start (three Erlang VMs: only the tests that need a cluster start one)."""
    yield from _serve(request, provide_rabbitmq_cluster)


@pytest.fixture(scope="session")
def postgres_server(request: pytest.FixtureRequest) -> Iterator[PostgresServer]:
    """The session's PostgreSQL: from TEST_POSTGRES_URL, testcontainers or a private cluster."""
    yield from _serve(request, provide_postgres)


@pytest.fixture(scope="module")
def restartable_postgres(request: pytest.FixtureRequest) -> Iterator[PrivatePostgresCluster]:
    """A private PostgreSQL cluster of the module's own, which its tests may stop (at
    once, as a crash would: ``stop_immediately``) and start again on the same port and
    data; never the session's server, which other tests share."""
    _refuse_private_in_containers_only_mode("restartable_postgres")
    try:
        cluster = PrivatePostgresCluster()
    except ServerUnavailable as exc:
        pytest.fail(f"no private PostgreSQL cluster for the tests: {exc}", pytrace=False)
    request.config.stash[_SERVERS_USED].append(f"{cluster.describe()}, restartable")
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def ha_postgres(request: pytest.FixtureRequest) -> Iterator[PatroniPostgres]:
    """A replicated PostgreSQL of the test's own (3 nodes under Patroni, one etcd), which
    it may crash node by node; every process is killed afterwards, whatever happened."""
    _refuse_private_in_containers_only_mode("ha_postgres")
    try:
        cluster = provide_ha_postgres()
    except ServerUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    request.config.stash[_SERVERS_USED].append(cluster.describe())
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """``postgresql+asyncpg://`` URL of the server's maintenance database."""
    return postgres_server.url


@pytest.fixture
def fresh_postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """``postgresql+asyncpg://`` URL of a new, empty database, dropped after the test."""
    url = postgres_server.create_database()
    yield url
    try:
        postgres_server.drop_database(url)
    except Exception as exc:
        warnings.warn(f"could not drop test database {url}: {exc!r}", stacklevel=1)


@pytest.fixture(scope="session")
async def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated once, for the tests to copy: a migration costs more than
    most tests that need one."""
    path = tmp_path_factory.mktemp("migrated") / "nexus.sqlite3"
    await upgrade_async(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
async def database(
    request: pytest.FixtureRequest, tmp_path: Path, migrated_sqlite: Path
) -> AsyncIterator[Database]:
    """Nexus's database, migrated and empty: a test that takes it runs once on SQLite and
    once on PostgreSQL (marked ``integration``, and given a database of its own)."""
    if request.param == "sqlite":
        path = shutil.copy(migrated_sqlite, tmp_path)
        db = Database(f"sqlite+aiosqlite:///{path}")
    else:
        db = await Database.migrated(request.getfixturevalue("fresh_postgres_url"))
    yield db
    await db.close()
