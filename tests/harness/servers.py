"""Real RabbitMQ and PostgreSQL servers for the test suite.

Each server comes from the first of these that works:

1. an existing server named by an environment variable (``TEST_RABBITMQ_URL``,
   ``TEST_POSTGRES_URL``);
2. a testcontainers container, when a Docker engine answers;
3. a private server process on free loopback ports in a temporary directory.

Everything here is synchronous so that pytest fixtures built on it are plain
functions; the few asynchronous client calls run on their own event loop in a
worker thread, which works whether or not the calling thread has a loop running.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aio_pika
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

RABBITMQ_URL_ENV = "TEST_RABBITMQ_URL"
POSTGRES_URL_ENV = "TEST_POSTGRES_URL"
RABBITMQ_IMAGE = "rabbitmq:3.13"
POSTGRES_IMAGE = "postgres:15"

_STARTUP_TIMEOUT = 60.0
_T = TypeVar("_T")


class ServerUnavailable(Exception):
    """No way of providing a server worked; the message says what was tried and why."""


class NotSupportedInMode(Exception):
    """The operation needs a server process that this harness owns (a private one)."""


def run_sync(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coroutine`` to completion on a fresh event loop in a worker thread."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


def _unavailable(what: str, attempts: list[str]) -> ServerUnavailable:
    tried = "\n".join(f"  - {attempt}" for attempt in attempts)
    return ServerUnavailable(f"no {what} for the tests; tried, in order:\n{tried}")


# RabbitMQ ---------------------------------------------------------------------------------


async def _amqp_server_version(url: str) -> str:
    connection = await aio_pika.connect(url, timeout=5)
    try:
        transport = connection.transport
        assert transport is not None, "an open aio-pika connection has a transport"
        return str(transport.connection.server_properties.get("version", "unknown"))
    finally:
        await connection.close()


def _wait_for_amqp(url: str, timeout: float, process: subprocess.Popen[bytes] | None = None) -> str:
    """The server's version, once it accepts an AMQP connection.

    With ``process``, a server that exits while starting fails the wait at once instead
    of after the whole timeout.
    """
    parts = urlsplit(url)
    address = (parts.hostname or "localhost", parts.port or 5672)
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise ServerUnavailable(f"the server exited with status {process.returncode}")
        try:
            # A bare TCP probe first: aio-pika logs an error for every refused connection,
            # which would bury the useful lines of a failed start under boot-time noise.
            socket.create_connection(address, timeout=1).close()
            return run_sync(_amqp_server_version(url))
        except Exception as exc:
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"{redact(url)} did not accept AMQP: {exc!r}") from exc
            time.sleep(0.2)


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
            self.version = run_sync(_amqp_server_version(url))
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
            self.version = _wait_for_amqp(self._url, _STARTUP_TIMEOUT)
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


def _rabbitmq_bin_dir() -> Path:
    # Debian's /usr/sbin/rabbitmq-server switches to the rabbitmq user, which could not
    # use our private directory; the scripts it wraps run as whoever calls them.
    candidates = [Path("/usr/lib/rabbitmq/bin")]
    on_path = shutil.which("rabbitmq-server")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    for candidate in candidates:
        if (candidate / "rabbitmq-server").is_file() and (candidate / "rabbitmqctl").is_file():
            return candidate
    raise ServerUnavailable(
        "rabbitmq-server is not installed (looked in /usr/lib/rabbitmq/bin and on PATH); "
        "`bash scripts/bootstrap.sh` installs it"
    )


class PrivateRabbitMQNode(RabbitMQServer):
    """A RabbitMQ node owned by this process, on its own ports and data directory.

    ``stop()`` and ``start()`` keep the port, the node name and the data directory, so
    durable queues and messages survive a restart as they would in production.
    """

    mode = "private node"

    def __init__(self) -> None:
        self._bin = _rabbitmq_bin_dir()
        self._dir = Path(tempfile.mkdtemp(prefix="eventplane-rabbitmq-"))
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        (self._dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        (self._dir / "enabled_plugins").write_text("[].\n")
        self._env = {
            **os.environ,
            # HOME holds the Erlang cookie that rabbitmqctl must share with the node.
            "HOME": str(self._dir),
            "RABBITMQ_NODENAME": f"rtest_{os.getpid()}_{self.port}@localhost",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(self._dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self._dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self._dir / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self._dir / "enabled_plugins"),
            # A private epmd keeps parallel test runs from seeing each other's nodes.
            "ERL_EPMD_PORT": str(free_port()),
        }
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def restartable(self) -> bool:
        return True

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def describe(self) -> str:
        return f"real RabbitMQ {self.version} (private node, port {self.port})"

    def start(self) -> None:
        if self.running:
            return
        output = (self._dir / "server.out").open("ab")
        with output:
            self._process = subprocess.Popen(
                [str(self._bin / "rabbitmq-server")],
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self.version = _wait_for_amqp(self.url, _STARTUP_TIMEOUT, self._process)
        except ServerUnavailable as exc:
            self._kill()
            raise ServerUnavailable(
                f"private RabbitMQ node in {self._dir} did not start: {exc}\n"
                f"{_tail(self._dir / 'server.out')}"
            ) from exc

    def stop(self) -> None:
        if not self.running:
            return
        with suppress(subprocess.SubprocessError):
            subprocess.run(
                [str(self._bin / "rabbitmqctl"), "stop"],
                env=self._env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=_STARTUP_TIMEOUT,
                check=True,
            )
        self._kill(grace=30.0)

    def _kill(self, grace: float = 0.0) -> None:
        """Wait up to ``grace`` seconds for the node to exit, then kill what is left of it."""
        process, self._process = self._process, None
        if process is None:
            return
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
        # The process group also holds helpers (disk monitor, inet_gethost) that would
        # otherwise outlive the node.
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def rabbitmqctl(self, *args: str) -> str:
        result = subprocess.run(
            [str(self._bin / "rabbitmqctl"), *args],
            env=self._env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_STARTUP_TIMEOUT,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} failed ({result.returncode}): "
                f"{result.stdout}{result.stderr}"
            )
        return result.stdout

    def close(self) -> None:
        self.stop()
        # epmd daemonizes out of the node's process group, so it has to be told to go.
        epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
        with suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                [epmd, "-kill"],
                env=self._env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=10,
            )
        shutil.rmtree(self._dir, ignore_errors=True)


def provide_rabbitmq() -> RabbitMQServer:
    """The first RabbitMQ server that works, in the order the module docstring gives."""
    url = os.environ.get(RABBITMQ_URL_ENV)
    if url:
        # A server the user named explicitly is never silently replaced by another one.
        return ExternalRabbitMQ(url)
    attempts = [f"{RABBITMQ_URL_ENV}: not set"]
    reason = docker_unavailable_reason()
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


async def _postgres_server_version(url: URL) -> str:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            banner = str((await connection.execute(text("SELECT version()"))).scalar_one())
    finally:
        await engine.dispose()
    match = re.match(r"PostgreSQL (\S+)", banner)
    return match.group(1) if match else banner


async def _admin_statement(url: URL, statement: str) -> None:
    # CREATE/DROP DATABASE refuse to run inside a transaction block.
    engine = create_async_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(text(statement))
    finally:
        await engine.dispose()


def _wait_for_postgres(url: URL, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return run_sync(_postgres_server_version(url))
        except Exception as exc:
            if time.monotonic() > deadline:
                shown = url.render_as_string(hide_password=True)
                raise ServerUnavailable(f"{shown} did not accept connections: {exc!r}") from exc
            time.sleep(0.5)


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
            self.version = run_sync(_postgres_server_version(self._url))
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
            self.version = _wait_for_postgres(self._url, _STARTUP_TIMEOUT)
        except BaseException:
            self._container.stop()
            raise

    @property
    def admin_url(self) -> URL:
        return self._url

    def close(self) -> None:
        self._container.stop()


def _postgres_bin_dir() -> Path:
    candidates: list[Path] = []
    with suppress(OSError, subprocess.SubprocessError):
        bindir = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        candidates.append(Path(bindir))
    # Newest first: Debian installs each major version side by side.
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
        reverse=True,
    )
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    for candidate in candidates:
        if all((candidate / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return candidate
    raise ServerUnavailable(
        "PostgreSQL server binaries are not installed (looked via pg_config, in "
        "/usr/lib/postgresql/*/bin and on PATH); `bash scripts/bootstrap.sh` installs them"
    )


class PrivatePostgresCluster(PostgresServer):
    """A PostgreSQL cluster owned by this process, on its own port and data directory."""

    mode = "private cluster"

    def __init__(self) -> None:
        self._bin = _postgres_bin_dir()
        self._as_owner: list[str] = []
        self._dir = Path(tempfile.mkdtemp(prefix="eventplane-postgres-"))
        self.port = free_port()
        try:
            if os.geteuid() == 0:
                # initdb refuses to run as root; the cluster belongs to the postgres user.
                try:
                    pwd.getpwnam("postgres")
                except KeyError:
                    raise ServerUnavailable(
                        "running as root and there is no 'postgres' user to own a cluster"
                    ) from None
                shutil.chown(self._dir, user="postgres")
                self._as_owner = ["runuser", "-u", "postgres", "--"]
            self._run(
                "initdb",
                "-D",
                str(self._data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            )
            self.start()
            self.version = _wait_for_postgres(self.admin_url, _STARTUP_TIMEOUT)
        except BaseException:
            self.close()
            raise

    @property
    def _data(self) -> Path:
        return self._dir / "data"

    @property
    def admin_url(self) -> URL:
        return URL.create(
            "postgresql+asyncpg",
            username="postgres",
            host="127.0.0.1",
            port=self.port,
            database="postgres",
        )

    def describe(self) -> str:
        return f"real PostgreSQL {self.version} (private cluster, port {self.port})"

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run(
            [*self._as_owner, str(self._bin / tool), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_STARTUP_TIMEOUT + 30,
        )
        if result.returncode != 0:
            raise ServerUnavailable(
                f"{tool} {' '.join(args)} failed ({result.returncode}): "
                f"{result.stdout}{result.stderr}\n{_tail(self._dir / 'log')}"
            )

    def start(self) -> None:
        options = " ".join(
            [
                f"-p {self.port}",
                f"-k {self._dir}",
                "-c listen_addresses=127.0.0.1",
                "-c max_connections=200",
                # fsync only protects against an operating-system crash, which no test
                # simulates; without it CREATE DATABASE per test is several times faster.
                "-c fsync=off",
            ]
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self._data),
            "-o",
            options,
            "-l",
            str(self._dir / "log"),
            "-w",
            "-t",
            str(int(_STARTUP_TIMEOUT)),
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self._data), "-m", "fast", "-w", "stop")

    def close(self) -> None:
        pid_file = self._data / "postmaster.pid"
        if pid_file.exists():
            try:
                self.stop()
            except ServerUnavailable:
                with suppress(OSError, ValueError):
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(self._dir, ignore_errors=True)


def provide_postgres() -> PostgresServer:
    """The first PostgreSQL server that works, in the order the module docstring gives."""
    url = os.environ.get(POSTGRES_URL_ENV)
    if url:
        return ExternalPostgres(url)
    attempts = [f"{POSTGRES_URL_ENV}: not set"]
    reason = docker_unavailable_reason()
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
