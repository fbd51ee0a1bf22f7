"""Private RabbitMQ and PostgreSQL servers: real server processes from the Debian packages,
owned by this process, on free loopback ports in a temporary directory.

``nexusctl dev run-all`` starts one when nothing answers at the configured URL; the test
harness (``tests/harness/servers.py``) uses the same classes as its last resort.

Everything here is synchronous; the few asynchronous client calls run on their own event
loop in a worker thread, which works whether or not the calling thread has a loop running.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aio_pika
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from schemas.redact import redact_url

STARTUP_TIMEOUT = 60.0
_T = TypeVar("_T")


class ServerUnavailable(Exception):
    """A server could not be provided; the message says why."""


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


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


def process_exists(pid: int) -> bool:
    """The process exists, if only as a zombie not yet reaped."""
    return Path(f"/proc/{pid}").exists()


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def children_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


# RabbitMQ ---------------------------------------------------------------------------------


async def amqp_server_version(url: str) -> str:
    connection = await aio_pika.connect(url, timeout=5)
    try:
        transport = connection.transport
        assert transport is not None, "an open aio-pika connection has a transport"
        return str(transport.connection.server_properties.get("version", "unknown"))
    finally:
        await connection.close()


def amqp_answers(url: str) -> str | None:
    """The server's version if an AMQP server accepts ``url`` right now, else None."""
    parts = urlsplit(url)
    try:
        # A bare TCP probe first: aio-pika logs an error for a refused connection.
        socket.create_connection((parts.hostname or "localhost", parts.port or 5672), 1).close()
        return run_sync(amqp_server_version(url))
    except Exception:
        return None


def wait_for_amqp(url: str, timeout: float, process: subprocess.Popen[bytes] | None = None) -> str:
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
            socket.create_connection(address, timeout=1).close()
            return run_sync(amqp_server_version(url))
        except Exception as exc:
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"{redact_url(url)} did not accept AMQP: {exc!r}") from exc
            time.sleep(0.2)


def rabbitmq_bin_dir() -> Path:
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


class RabbitMQNode:
    """A RabbitMQ node owned by this process, on its own ports and data directory.

    ``stop()`` and ``start()`` keep the port, the node name and the data directory, so
    durable queues and messages survive a restart as they would in production.
    """

    def __init__(self, port: int | None = None, *, extra_config: str = "") -> None:
        """``extra_config``: more rabbitmq.conf lines, e.g. a TLS listener."""
        self._bin = rabbitmq_bin_dir()
        self._dir = Path(tempfile.mkdtemp(prefix="eventplane-rabbitmq-"))
        self.port = port if port is not None else free_port()
        self.version = "unknown"
        self._process: subprocess.Popen[bytes] | None = None
        (self._dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n" + extra_config
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
            # A private epmd keeps parallel runs from seeing each other's nodes.
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
                # Its own session: a Ctrl-C meant for the parent must not reach the node,
                # which the parent stops in order once its clients are gone.
                start_new_session=True,
            )
        try:
            self.version = wait_for_amqp(self.url, STARTUP_TIMEOUT, self._process)
        except ServerUnavailable as exc:
            self._kill()
            raise ServerUnavailable(
                f"private RabbitMQ node in {self._dir} did not start: {exc}\n"
                f"{tail(self._dir / 'server.out')}"
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
                timeout=STARTUP_TIMEOUT,
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
            timeout=STARTUP_TIMEOUT,
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


# PostgreSQL -------------------------------------------------------------------------------


async def postgres_server_version(url: URL) -> str:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            banner = str((await connection.execute(text("SELECT version()"))).scalar_one())
    finally:
        await engine.dispose()
    match = re.match(r"PostgreSQL (\S+)", banner)
    return match.group(1) if match else banner


def wait_for_postgres(url: URL, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return run_sync(postgres_server_version(url))
        except Exception as exc:
            if time.monotonic() > deadline:
                shown = url.render_as_string(hide_password=True)
                raise ServerUnavailable(f"{shown} did not accept connections: {exc!r}") from exc
            time.sleep(0.5)


def postgres_bin_dir() -> Path:
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


class PostgresCluster:
    """A PostgreSQL cluster owned by this process, on its own port and data directory.

    ``durable=False`` (tests, the dev stack) turns fsync off; the benchmark keeps it on.
    """

    def __init__(self, *, durable: bool = False) -> None:
        self._durable = durable
        self._bin = postgres_bin_dir()
        self._as_owner: list[str] = []
        self._dir = Path(tempfile.mkdtemp(prefix="eventplane-postgres-"))
        self.port = free_port()
        self.version = "unknown"
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
            self.version = wait_for_postgres(self.admin_url, STARTUP_TIMEOUT)
        except BaseException:
            self.close()
            raise

    @property
    def _data(self) -> Path:
        return self._dir / "data"

    @property
    def admin_url(self) -> URL:
        """The ``postgresql+asyncpg`` URL of the cluster's maintenance database."""
        return URL.create(
            "postgresql+asyncpg",
            username="postgres",
            host="127.0.0.1",
            port=self.port,
            database="postgres",
        )

    @property
    def url(self) -> str:
        return self.admin_url.render_as_string(hide_password=False)

    def describe(self) -> str:
        return f"real PostgreSQL {self.version} (private cluster, port {self.port})"

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run(
            [*self._as_owner, str(self._bin / tool), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=STARTUP_TIMEOUT + 30,
            # pg_ctl's server inherits the session; a Ctrl-C meant for the parent must not
            # reach it before the parent's clients are gone.
            start_new_session=True,
        )
        if result.returncode != 0:
            raise ServerUnavailable(
                f"{tool} {' '.join(args)} failed ({result.returncode}): "
                f"{result.stdout}{result.stderr}\n{tail(self._dir / 'log')}"
            )

    def start(self) -> None:
        options = " ".join(
            [
                f"-p {self.port}",
                f"-k {self._dir}",
                "-c listen_addresses=127.0.0.1",
                "-c max_connections=200",
                # fsync only protects against an operating-system crash; a throwaway
                # cluster does not outlive one, and without it CREATE DATABASE is
                # several times faster. The benchmark asks for durable commits.
                f"-c fsync={'on' if self._durable else 'off'}",
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
            str(int(STARTUP_TIMEOUT)),
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
