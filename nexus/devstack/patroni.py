"""A replicated PostgreSQL owned by this process: Patroni nodes and one etcd, from the
Debian packages (``patroni``, ``etcd-server``), on free loopback ports in a temporary
directory.

Patroni keeps one node the primary by holding a leader key in etcd, and with
``synchronous_mode`` names one standby the synchronous one: a commit is acknowledged
only once that standby has the WAL, and only that standby may be promoted. So a
primary that dies loses no acknowledged write: the standby that had every one of them
takes over once the leader key expires.

Nexus finds the primary itself: :attr:`PatroniCluster.url` lists every node and asks
for ``target_session_attrs=read-write``, so asyncpg connects to whichever node accepts
writes now, whatever happened before.

The timings are short, for tests and the dev stack (Patroni's defaults are ttl 30,
loop_wait 10, retry_timeout 10):

- ``ttl`` 10 s: how long the leader key lives without a renewal. A primary whose
  Patroni died is replaced once it expires, so it bounds the failover (the measured
  time is in RELIABILITY.md).
- ``loop_wait`` 1 s: how often each Patroni looks at the cluster and renews the key; a
  standby notices the expired key within it.
- ``retry_timeout`` 4 s: how long etcd or PostgreSQL may not answer before Patroni gives
  up an operation; a leader that cannot renew for that long demotes itself. Patroni
  requires ``loop_wait + 2 * retry_timeout <= ttl``.

Nothing is kept: ``close()`` kills every process and deletes the directory.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

from nexus.devstack.servers import (
    STARTUP_TIMEOUT,
    ServerUnavailable,
    children_of,
    free_port,
    postgres_bin_dir,
    process_alive,
    process_exists,
    tail,
)

TTL_SECONDS = 10
LOOP_WAIT_SECONDS = 1
RETRY_TIMEOUT_SECONDS = 4
# Orphaned backends notice their postmaster's death within moments; a new postmaster
# cannot start on the data directory while they live.
GONE_TIMEOUT = 30.0


def _installed(program: str) -> str:
    found = shutil.which(program)
    if found is None:
        raise ServerUnavailable(
            f"{program} is not installed (Debian packages patroni, etcd-server, etcd-client); "
            "`bash scripts/bootstrap.sh` installs it"
        )
    return found


def _get_json(url: str, timeout: float = 1.0) -> Any:
    """The JSON body at ``url``, whatever the status (Patroni answers 503 with a body)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        return json.loads(error.read())


class EtcdServer:
    """One etcd member, a cluster of its own: the store Patroni keeps its leader key in."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self.port = free_port()
        self._peer_port = free_port()
        self._log = directory / "etcd.log"
        peer = f"http://127.0.0.1:{self._peer_port}"
        client = f"http://127.0.0.1:{self.port}"
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    _installed("etcd"),
                    "--name=etcd0",
                    f"--data-dir={directory / 'etcd'}",
                    f"--listen-client-urls={client}",
                    f"--advertise-client-urls={client}",
                    f"--listen-peer-urls={peer}",
                    f"--initial-advertise-peer-urls={peer}",
                    f"--initial-cluster=etcd0={peer}",
                    "--initial-cluster-state=new",
                    f"--initial-cluster-token=eventplane-{uuid.uuid4().hex[:8]}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            _until(self._healthy, STARTUP_TIMEOUT, "etcd answers /health", self._process)
        except BaseException:
            self.close()
            raise

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _healthy(self) -> bool:
        try:
            return bool(_get_json(f"http://{self.endpoint}/health").get("health") == "true")
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        _kill_group(self._process)


@dataclass
class PatroniNode:
    """One PostgreSQL server and the Patroni that manages it."""

    name: str
    directory: Path
    pg_port: int
    api_port: int
    as_owner: list[str]
    process: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def config_path(self) -> Path:
        return self.directory / "patroni.yml"

    @property
    def log_path(self) -> Path:
        return self.directory / "patroni.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.running:
            return
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*self.as_owner, _installed("patroni"), str(self.config_path)],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # A Ctrl-C meant for the parent must not reach it; the parent stops it.
                start_new_session=True,
            )

    def status(self) -> dict[str, Any] | None:
        """Patroni's own view of the node (``GET /patroni``), None if it does not answer."""
        try:
            status = _get_json(f"http://127.0.0.1:{self.api_port}/patroni")
        except (OSError, ValueError):
            return None
        return status if isinstance(status, dict) else None

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def crash(self) -> str:
        """SIGKILL Patroni and its PostgreSQL at once, as the loss of the machine would:
        nothing is shut down, and nobody renews the leader key. What was killed."""
        killed = []
        if self.process is not None:
            killed.append(f"patroni {self.process.pid}")
            _kill_group(self.process)
            self.process = None
        # The postmaster runs in a session of its own (Patroni starts it so, so that it
        # would outlive Patroni), with its backends.
        pid = self.postmaster_pid()
        if pid is not None and process_alive(pid):
            children = children_of(pid)
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.append(f"postmaster {pid} ({len(children)} children)")
            _until(
                lambda: (
                    not process_exists(pid) and not any(process_alive(child) for child in children)
                ),
                GONE_TIMEOUT,
                f"the killed postmaster {pid} and its backends are gone",
            )
        return ", ".join(killed) or "nothing (not running)"


class PatroniCluster:
    """``nodes`` PostgreSQL servers under Patroni, one primary and synchronous standbys,
    with one etcd. Started when constructed; :meth:`close` kills everything.

    ``durable=False`` (tests, the dev stack) turns fsync off, as
    :class:`nexus.devstack.servers.PostgresCluster` does: the processes may die, the
    machine does not, and a write is durable by being on two servers.
    """

    def __init__(self, nodes: int = 3, *, durable: bool = False) -> None:
        if nodes < 2:
            raise ValueError("a replicated database needs at least 2 nodes")
        self._bin = postgres_bin_dir()
        _installed("patroni")
        self._dir = Path(tempfile.mkdtemp(prefix="eventplane-patroni-"))
        self.scope = f"eventplane-{uuid.uuid4().hex[:8]}"
        self.version = "unknown"
        self._as_owner: list[str] = []
        self.nodes: list[PatroniNode] = []
        self._etcd: EtcdServer | None = None
        try:
            self._etcd = EtcdServer(self._dir)
            if os.geteuid() == 0:
                # initdb refuses to run as root; the clusters belong to the postgres user.
                try:
                    pwd.getpwnam("postgres")
                except KeyError:
                    raise ServerUnavailable(
                        "running as root and there is no 'postgres' user to own a cluster"
                    ) from None
                self._as_owner = ["runuser", "-u", "postgres", "--"]
                shutil.chown(self._dir, user="postgres")
            for number in range(nodes):
                node = PatroniNode(
                    name=f"pg{number}",
                    directory=self._dir / f"pg{number}",
                    pg_port=free_port(),
                    api_port=free_port(),
                    as_owner=self._as_owner,
                )
                node.directory.mkdir(mode=0o700)
                node.config_path.write_text(self._config(node, durable))
                if self._as_owner:
                    shutil.chown(node.directory, user="postgres")
                    shutil.chown(node.config_path, user="postgres")
                self.nodes.append(node)
            # The first node bootstraps (initdb) and becomes the primary; the others
            # then clone it with pg_basebackup.
            self.nodes[0].start()
            _until(
                lambda: self.primary() is not None,
                STARTUP_TIMEOUT,
                "the first node bootstraps and is the primary",
                self.nodes[0].process,
            )
            for node in self.nodes[1:]:
                node.start()
            self.wait_until_replicated(STARTUP_TIMEOUT)
            status = self.nodes[0].status() or {}
            self.version = _version(int(status.get("server_version", 0)))
        except BaseException as error:
            logs = "\n".join(f"--- {n.name}\n{tail(n.log_path, 15)}" for n in self.nodes)
            self.close()
            if isinstance(error, ServerUnavailable | TimeoutError):
                raise ServerUnavailable(
                    f"the Patroni cluster did not start: {error}\n{logs}"
                ) from error
            raise

    def _config(self, node: PatroniNode, durable: bool) -> str:
        assert self._etcd is not None
        config = {
            "scope": self.scope,
            "namespace": "/eventplane/",
            "name": node.name,
            "log": {"level": "INFO"},
            "restapi": {
                "listen": f"127.0.0.1:{node.api_port}",
                "connect_address": f"127.0.0.1:{node.api_port}",
            },
            # etcd's v3 API (etcd 3.4 serves v2 only when asked to).
            "etcd3": {"hosts": [self._etcd.endpoint]},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL_SECONDS,
                    "loop_wait": LOOP_WAIT_SECONDS,
                    "retry_timeout": RETRY_TIMEOUT_SECONDS,
                    # A commit waits for one standby; only that standby may be promoted.
                    "synchronous_mode": True,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "parameters": {
                            "max_connections": 200,
                            "wal_level": "replica",
                            "hot_standby": "on",
                            "max_wal_senders": 10,
                            "max_replication_slots": 10,
                            "wal_keep_size": "128MB",
                            "fsync": "on" if durable else "off",
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "no-sync"],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{node.pg_port}",
                "connect_address": f"127.0.0.1:{node.pg_port}",
                "data_dir": str(node.data_dir),
                "bin_dir": str(self._bin),
                "pgpass": str(node.directory / "pgpass"),
                # Loopback only, and trusted, as the single private cluster is.
                "pg_hba": [
                    "local all all trust",
                    "local replication all trust",
                    "host all all 127.0.0.1/32 trust",
                    "host replication all 127.0.0.1/32 trust",
                ],
                "authentication": {
                    "superuser": {"username": "postgres"},
                    "replication": {"username": "replicator"},
                    "rewind": {"username": "postgres"},
                },
                "parameters": {"unix_socket_directories": str(node.directory)},
            },
        }
        # JSON is YAML: no YAML library needed to write Patroni's configuration.
        return json.dumps(config, indent=2)

    # Addresses ------------------------------------------------------------------------

    def url_for(self, database: str) -> URL:
        """A ``postgresql+asyncpg`` URL naming every node, that connects to the primary."""
        return URL.create(
            "postgresql+asyncpg",
            username="postgres",
            database=database,
            query={
                "host": tuple(f"127.0.0.1:{node.pg_port}" for node in self.nodes),
                "target_session_attrs": "read-write",
            },
        )

    @property
    def admin_url(self) -> URL:
        return self.url_for("postgres")

    @property
    def url(self) -> str:
        return self.admin_url.render_as_string(hide_password=False)

    def describe(self) -> str:
        ports = ", ".join(str(node.pg_port) for node in self.nodes)
        return (
            f"real PostgreSQL {self.version} under Patroni ({len(self.nodes)} nodes, "
            f"synchronous mode, ports {ports}; etcd on {self._etcd.port if self._etcd else '?'})"
        )

    # Roles ----------------------------------------------------------------------------

    def members(self) -> list[dict[str, Any]]:
        """The cluster as Patroni sees it (``GET /cluster`` of the first node that
        answers): each member's name, role (``leader``, ``sync_standby``, ``replica``),
        state and lag."""
        for node in self.nodes:
            if not node.running:
                continue
            with suppress(OSError, ValueError):
                members = _get_json(f"http://127.0.0.1:{node.api_port}/cluster").get("members")
                if isinstance(members, list):
                    return members
        return []

    def primary(self) -> PatroniNode | None:
        """The node that is the leader and runs as a primary, by its own Patroni."""
        for node in self.nodes:
            if not node.running:
                continue
            status = node.status()
            if (
                status
                and status.get("role") in ("master", "primary")
                and (status.get("state") == "running")
            ):
                return node
        return None

    def wait_for_primary(self, timeout: float, *, other_than: str | None = None) -> PatroniNode:
        found: list[PatroniNode] = []

        def elected() -> bool:
            node = self.primary()
            if node is None or node.name == other_than:
                return False
            found.append(node)
            return True

        _until(elected, timeout, "a node is the primary")
        return found[-1]

    def wait_until_replicated(self, timeout: float) -> None:
        """Every running node is up, one primary, and a synchronous standby streams."""

        def replicated() -> bool:
            members = self.members()
            running = {node.name for node in self.nodes if node.running}
            up = {
                str(m["name"])
                for m in members
                if m.get("state") in ("running", "streaming")
                and (m.get("role") in ("leader", "sync_standby") or m.get("lag") is not None)
            }
            roles = [m.get("role") for m in members if str(m.get("name")) in running]
            return running <= up and "leader" in roles and "sync_standby" in roles

        _until(replicated, timeout, "a primary and a streaming synchronous standby")

    def close(self) -> None:
        # Killed, not stopped: nothing is kept, and a primary's orderly shutdown waits
        # for its standbys (tens of seconds).
        for node in self.nodes:
            with suppress(Exception):
                node.crash()
        if self._etcd is not None:
            self._etcd.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def _version(number: int) -> str:
    """PostgreSQL's ``server_version_num`` (150018) as ``15.18``."""
    return f"{number // 10000}.{number % 10000}" if number else "unknown"


def _until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise ServerUnavailable(f"exited with status {process.returncode} before: {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:g}s: {what}")
        time.sleep(0.1)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
