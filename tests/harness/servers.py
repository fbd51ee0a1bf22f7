"""Real RabbitMQ and PostgreSQL servers for the test suite.

Each server comes from the first of these that works:

1. an existing server named by an environment variable (``TEST_RABBITMQ_URL``,
   ``TEST_POSTGRES_URL``);
2. a testcontainers container, when a Docker engine answers (images ``TEST_RABBITMQ_IMAGE``,
   ``TEST_POSTGRES_IMAGE``, by default the official ones);
3. a private server process on free loopback ports in a temporary directory
   (``nexus.devstack.servers``, which ``nexusctl dev run-all`` uses too).

``TEST_SERVERS`` narrows the choice: ``testcontainers`` uses containers only (and fails
when they cannot start, rather than fall back), ``private`` never uses containers (a
Docker engine that happens to answer is ignored); unset or ``auto``, the order above.

Everything here is synchronous so that pytest fixtures built on it are plain
functions; the few asynchronous client calls run on their own event loop in a
worker thread, which works whether or not the calling thread has a loop running.
"""

from __future__ import annotations

import abc
import functools
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from nexus.devstack.patroni import PatroniCluster
from nexus.devstack.servers import (
    STARTUP_TIMEOUT,
    PostgresCluster,
    RabbitMQCluster,
    RabbitMQNode,
    amqp_server_version,
    children_of,
    postgres_server_version,
    process_alive,
    process_exists,
    run_sync,
    wait_for_amqp,
    wait_for_postgres,
)
from nexus.devstack.servers import (
    ServerUnavailable as ServerUnavailable,  # the fixtures catch it from here
)

RABBITMQ_URL_ENV = "TEST_RABBITMQ_URL"
POSTGRES_URL_ENV = "TEST_POSTGRES_URL"
# Where no registry is reachable, scripts/docker/images.sh builds stand-ins from Debian's
# packages (eventplane-rabbitmq:dev, eventplane-postgres:dev) and the testcontainers run
# names them here.
RABBITMQ_IMAGE = os.environ.get("TEST_RABBITMQ_IMAGE") or "rabbitmq:3.13"
POSTGRES_IMAGE = os.environ.get("TEST_POSTGRES_IMAGE") or "postgres:15"

SERVERS_ENV = "TEST_SERVERS"
SERVER_MODES = ("auto", "testcontainers", "private")


def server_mode() -> str:
    """``TEST_SERVERS``: which sources the harness may use (module docstring)."""
    mode = os.environ.get(SERVERS_ENV) or "auto"
    if mode not in SERVER_MODES:
        expected = ", ".join(SERVER_MODES)
        raise ServerUnavailable(f"{SERVERS_ENV}={mode!r}: expected one of {expected}")
    return mode


class NotSupportedInMode(Exception):
    """The operation needs a server process that this harness owns (a private one)."""


def redact(url: str) -> str:
    """``url`` with its password replaced, for messages that end up in CI logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


@functools.cache
def docker_unavailable_reason() -> str | None:
    """Why testcontainers cannot be used here, or None when a Docker engine answers."""
    try:
        from testcontainers.core.docker_client import DockerClient

        # The timeout bounds the ping: a stale DOCKER_HOST must not hang the session.
        DockerClient(timeout=3).client.ping()
    except Exception as exc:
        return f"no Docker engine answers ({type(exc).__name__}: {exc})"
    return None


def _unavailable(what: str, attempts: list[str]) -> ServerUnavailable:
    tried = "\n".join(f"  - {attempt}" for attempt in attempts)
    return ServerUnavailable(f"no {what} for the tests; tried, in order:\n{tried}")


# RabbitMQ ---------------------------------------------------------------------------------


class RabbitMQServer(abc.ABC):
    """A RabbitMQ server the tests may use; ``url`` is an ``amqp://`` URL."""

    mode: str
    version: str

    @property
    @abc.abstractmethod
    def url(self) -> str: ...

    @property
    def restartable(self) -> bool:
        return False

    def describe(self) -> str:
        parts = urlsplit(self.url)
        return f"real RabbitMQ {self.version} ({self.mode}, {parts.hostname}:{parts.port})"

    def start(self) -> None:
        raise NotSupportedInMode(f"cannot start a RabbitMQ server in mode {self.mode!r}")

    def stop(self) -> None:
        raise NotSupportedInMode(f"cannot stop a RabbitMQ server in mode {self.mode!r}")

    @contextmanager
    def outage(self) -> Iterator[None]:
        """Stop the server for the duration of the block and start it again after it."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def rabbitmqctl(self, *args: str) -> str:
        """Run ``rabbitmqctl ARGS`` against this server and return its standard output."""
        raise NotSupportedInMode(f"cannot run rabbitmqctl in mode {self.mode!r}")

    @abc.abstractmethod
    def close(self) -> None:
        """Release whatever this harness started; the server is unusable afterwards."""


class ExternalRabbitMQ(RabbitMQServer):
    mode = RABBITMQ_URL_ENV

    def __init__(self, url: str) -> None:
        self._url = url
        try:
            self.version = run_sync(amqp_server_version(url))
        except Exception as exc:
            raise ServerUnavailable(
                f"{RABBITMQ_URL_ENV}={redact(url)} does not accept AMQP: {exc!r}"
            ) from exc

    @property
    def url(self) -> str:
        return self._url

    def close(self) -> None:
        """Nothing to release: the server belongs to whoever named it."""


class ContainerRabbitMQ(RabbitMQServer):
    mode = f"testcontainers {RABBITMQ_IMAGE}"

    def __init__(self) -> None:
        # RabbitMqContainer waits for readiness with pika, a client this project does not
        # use, so a plain container is started and probed with aio-pika instead.
        from testcontainers.core.container import DockerContainer

        self._container = DockerContainer(RABBITMQ_IMAGE).with_exposed_ports(5672)
        self._container.start()
        try:
            host = self._container.get_container_host_ip()
            port = self._container.get_exposed_port(5672)
            self._url = f"amqp://guest:guest@{host}:{port}/"
            self.version = wait_for_amqp(self._url, STARTUP_TIMEOUT)
        except BaseException:
            self._container.stop()
            raise

    @property
    def url(self) -> str:
        return self._url

    def rabbitmqctl(self, *args: str) -> str:
        result = self._container.exec(["rabbitmqctl", *args])
        output = result.output.decode(errors="replace")
        if result.exit_code != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {output}")
        return output

    def close(self) -> None:
        self._container.stop()


class PrivateRabbitMQNode(RabbitMQNode, RabbitMQServer):
    mode = "private node"


class PrivateRabbitMQCluster(RabbitMQCluster, RabbitMQServer):
    """A private cluster of RabbitMQ nodes (``nexus.devstack.servers.RabbitMQCluster``):
    ``url`` names every node, comma-separated; ``nodes`` each may be killed, stopped and
    started again."""

    mode = "private cluster"


CLUSTER_SIZE = 3


def provide_rabbitmq_cluster() -> PrivateRabbitMQCluster:
    """A private 3-node cluster on this machine; never an external server or a container,
    since the tests kill its nodes."""
    try:
        return PrivateRabbitMQCluster(CLUSTER_SIZE)
    except ServerUnavailable as exc:
        raise _unavailable(
            f"{CLUSTER_SIZE}-node RabbitMQ cluster", [f"private cluster: {exc}"]
        ) from None


def _containers_only(what: str) -> None:
    """In mode ``testcontainers``, a server URL variable would be a second source."""
    for variable in (RABBITMQ_URL_ENV, POSTGRES_URL_ENV):
        if os.environ.get(variable):
            raise ServerUnavailable(
                f"{SERVERS_ENV}=testcontainers, but {variable} names a {what} server: unset one"
            )


_Container = TypeVar("_Container", "ContainerRabbitMQ", "ContainerPostgres")


def _only_container(start: Callable[[], _Container], image: str) -> _Container:
    """A container, or why there is none: mode ``testcontainers`` has no fallback."""
    reason = docker_unavailable_reason()
    if reason is not None:
        raise ServerUnavailable(f"{SERVERS_ENV}=testcontainers: {reason}")
    try:
        return start()
    except Exception as exc:
        raise ServerUnavailable(
            f"{SERVERS_ENV}=testcontainers: {image} did not start: {exc!r}"
        ) from exc


def provide_rabbitmq() -> RabbitMQServer:
    """The first RabbitMQ server that works, in the order the module docstring gives."""
    mode = server_mode()
    if mode == "testcontainers":
        _containers_only("RabbitMQ")
        return _only_container(ContainerRabbitMQ, RABBITMQ_IMAGE)
    url = os.environ.get(RABBITMQ_URL_ENV)
    if url:
        # A server the user named explicitly is never silently replaced by another one.
        return ExternalRabbitMQ(url)
    attempts = [f"{RABBITMQ_URL_ENV}: not set"]
    reason = "not tried: TEST_SERVERS=private" if mode == "private" else docker_unavailable_reason()
    if reason is None:
        try:
            return ContainerRabbitMQ()
        except Exception as exc:
            attempts.append(f"testcontainers {RABBITMQ_IMAGE}: {exc!r}")
    else:
        attempts.append(f"testcontainers: {reason}")
    try:
        return PrivateRabbitMQNode()
    except ServerUnavailable as exc:
        attempts.append(f"private node: {exc}")
    raise _unavailable("RabbitMQ", attempts)


# PostgreSQL -------------------------------------------------------------------------------


def _asyncpg_url(url: str) -> URL:
    return make_url(url).set(drivername="postgresql+asyncpg")


async def _admin_statement(url: URL, statement: str) -> None:
    # CREATE/DROP DATABASE refuse to run inside a transaction block.
    engine = create_async_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(text(statement))
    finally:
        await engine.dispose()


class PostgresServer(abc.ABC):
    """A PostgreSQL server on which the tests may CREATE DATABASE."""

    mode: str
    version: str

    @property
    @abc.abstractmethod
    def admin_url(self) -> URL:
        """A URL, with the asyncpg driver, of a maintenance database on the server."""

    @property
    def url(self) -> str:
        """``admin_url`` as a string for ``create_async_engine``."""
        return self.admin_url.render_as_string(hide_password=False)

    def describe(self) -> str:
        where = f"{self.admin_url.host}:{self.admin_url.port}"
        return f"real PostgreSQL {self.version} ({self.mode}, {where})"

    def create_database(self) -> str:
        """Create an empty, uniquely named database; return its ``postgresql+asyncpg`` URL."""
        name = f"test_{uuid.uuid4().hex[:16]}"
        run_sync(_admin_statement(self.admin_url, f'CREATE DATABASE "{name}"'))
        return self.admin_url.set(database=name).render_as_string(hide_password=False)

    def drop_database(self, url: str) -> None:
        name = make_url(url).database
        # FORCE ends sessions that a test left open, which would otherwise block the drop.
        run_sync(_admin_statement(self.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def start(self) -> None:
        raise NotSupportedInMode(f"cannot start a PostgreSQL server in mode {self.mode!r}")

    def stop(self) -> None:
        raise NotSupportedInMode(f"cannot stop a PostgreSQL server in mode {self.mode!r}")

    @abc.abstractmethod
    def close(self) -> None:
        """Release whatever this harness started; the server is unusable afterwards."""


class ExternalPostgres(PostgresServer):
    mode = POSTGRES_URL_ENV

    def __init__(self, url: str) -> None:
        self._url = _asyncpg_url(url)
        try:
            self.version = run_sync(postgres_server_version(self._url))
        except Exception as exc:
            raise ServerUnavailable(
                f"{POSTGRES_URL_ENV}={redact(url)} does not accept connections: {exc!r}"
            ) from exc

    @property
    def admin_url(self) -> URL:
        return self._url

    def close(self) -> None:
        """Nothing to release: the server belongs to whoever named it."""


class ContainerPostgres(PostgresServer):
    mode = f"testcontainers {POSTGRES_IMAGE}"

    def __init__(self) -> None:
        from testcontainers.community.postgres import PostgresContainer

        self._container = PostgresContainer(POSTGRES_IMAGE, driver=None)
        self._container.start()
        try:
            self._url = _asyncpg_url(self._container.get_connection_url())
            self.version = wait_for_postgres(self._url, STARTUP_TIMEOUT)
        except BaseException:
            self._container.stop()
            raise

    @property
    def admin_url(self) -> URL:
        return self._url

    def close(self) -> None:
        self._container.stop()


class PrivatePostgresCluster(PostgresCluster, PostgresServer):
    mode = "private cluster"

    def stop_immediately(self) -> None:
        """Stop the server as a crash would: ``pg_ctl stop -m immediate`` cuts every
        client off without a checkpoint. ``start()`` brings it back on the same port and
        data directory, through crash recovery."""
        self._run("pg_ctl", "-D", str(self._data), "-m", "immediate", "-w", "stop")

    def kill(self) -> str:
        """SIGKILL the postmaster, as the OOM killer would; what was killed.

        Its backends find their postmaster gone and exit by themselves; any still there
        after the wait are killed too, since a new postmaster cannot start while they
        hold the old shared memory. ``start()`` then brings it back through crash
        recovery.
        """
        pid = self.postmaster_pid()
        if pid is None or not process_alive(pid):
            raise RuntimeError(f"no postmaster to kill (its pid file says {pid})")
        children = children_of(pid)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + POSTMASTER_GONE_TIMEOUT
        while (process_exists(pid) or any(process_alive(child) for child in children)) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        stragglers = [child for child in children if process_alive(child)]
        for child in stragglers:
            with suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        if process_exists(pid):
            raise RuntimeError(
                f"the killed postmaster {pid} was not reaped within "
                f"{POSTMASTER_GONE_TIMEOUT:g}s; PostgreSQL cannot start again until it is"
            )
        return f"postmaster {pid} and {len(children)} children" + (
            f" ({len(stragglers)} killed after it)" if stragglers else ""
        )

    def postmaster_pid(self) -> int | None:
        try:
            return int((self._data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    @property
    def running(self) -> bool:
        pid = self.postmaster_pid()
        return pid is not None and process_alive(pid)

    @property
    def log_path(self) -> Path:
        return self._dir / "log"


# Orphaned backends notice their postmaster's death within moments, and the machine's
# init reaps the dead postmaster within a few seconds (until it does, the postmaster
# still "exists", and a new one refuses its lock file).
POSTMASTER_GONE_TIMEOUT = 30.0


def provide_postgres() -> PostgresServer:
    """The first PostgreSQL server that works, in the order the module docstring gives."""
    mode = server_mode()
    if mode == "testcontainers":
        _containers_only("PostgreSQL")
        return _only_container(ContainerPostgres, POSTGRES_IMAGE)
    url = os.environ.get(POSTGRES_URL_ENV)
    if url:
        return ExternalPostgres(url)
    attempts = [f"{POSTGRES_URL_ENV}: not set"]
    reason = "not tried: TEST_SERVERS=private" if mode == "private" else docker_unavailable_reason()
    if reason is None:
        try:
            return ContainerPostgres()
        except Exception as exc:
            attempts.append(f"testcontainers {POSTGRES_IMAGE}: {exc!r}")
    else:
        attempts.append(f"testcontainers: {reason}")
    try:
        return PrivatePostgresCluster()
    except ServerUnavailable as exc:
        attempts.append(f"private cluster: {exc}")
    raise _unavailable("PostgreSQL", attempts)


class PatroniPostgres(PatroniCluster, PostgresServer):
    """A replicated PostgreSQL (``nexus.devstack.patroni``): its URLs name every node
    and connect to whichever is the primary."""

    mode = "private Patroni cluster"


def provide_ha_postgres(nodes: int = 3) -> PatroniPostgres:
    """A replicated PostgreSQL of private processes: Patroni needs to start, kill and
    promote the servers itself, so no server named by URL or container stands in."""
    try:
        return PatroniPostgres(nodes)
    except ServerUnavailable as exc:
        raise _unavailable("replicated PostgreSQL (Patroni with etcd)", [str(exc)]) from exc
