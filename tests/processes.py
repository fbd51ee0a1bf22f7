"""Real service processes for tests: started from the installed console scripts,
stopped with real signals, their output kept in a log file beside their data."""

from __future__ import annotations

import asyncio
import glob
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from schemas import api
from schemas.base import Envelope
from schemas.messages import Message
from schemas.topology import NEXUS_API_QUEUE
from schemas.transport import Transport

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Service:
    """One service's command line and environment; each ``start`` is a new process."""

    name: str
    argv: list[str]
    env: Mapping[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    exits: list[int] = field(default_factory=list)

    def start(self, extra_env: Mapping[str, str] | None = None) -> None:
        assert not self.running, f"{self.name} is already running"
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("NEXUS_", "CRUCIBLE_", "SLED_"))
        }
        environment |= dict(self.env) | dict(extra_env or {})
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while (code := self.process.poll()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not exit within {timeout}s")
            await asyncio.sleep(0.05)
        self.exits.append(code)
        return code

    async def stop(self, signum: signal.Signals = signal.SIGTERM) -> int | None:
        if not self.running:
            return None
        self.send(signum)
        try:
            return await self.wait_exit()
        except TimeoutError:
            self.send(signal.SIGKILL)
            return await self.wait_exit()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def nexus(
    replica_id: str,
    *,
    database_url: str,
    amqp_url: str,
    workdir: Path,
    crash_in_node: str | None = None,
    freeze_in_node: str | None = None,
    clock_skew: str | None = None,
    faults: Sequence[str] = (),
    **settings: str,
) -> Service:
    """A Nexus replica; with ``crash_in_node``, one that SIGKILLs itself in that node;
    with ``freeze_in_node``, one that SIGSTOPs itself there (the first time), until
    SIGCONT; with ``faults`` (``tests.crashing_nexus``'s triad options, such as
    ``["--fail-node", "snapshot_create:disk_flush"]``), one whose sagas fail or repeat
    as they say; with ``clock_skew`` (``+30s``, ``-30s``), one whose clock is off by
    that much."""
    argv = [str(BIN / "nexus"), "run"]
    env = {
        "NEXUS_REPLICA_ID": replica_id,
        "NEXUS_DATABASE_URL": database_url,
        "NEXUS_AMQP_URL": amqp_url,
        "NEXUS_LOG_LEVEL": "INFO",
    }
    env |= {f"NEXUS_{key.upper()}": value for key, value in settings.items()}
    for flag, node in (("--crash-in-node", crash_in_node), ("--freeze-in-node", freeze_in_node)):
        if node is not None:
            argv = [sys.executable, "-m", "tests.crashing_nexus", flag, node]
            # The tests of this checkout, whichever one the venv was installed from.
            env["PYTHONPATH"] = str(REPO)
    if faults:
        assert crash_in_node is None and freeze_in_node is None, "faults do not combine"
        argv = [sys.executable, "-m", "tests.crashing_nexus", *faults]
        env["PYTHONPATH"] = str(REPO)
    if clock_skew is not None:
        # Preloaded into the replica itself (the faketime wrapper would stand between the
        # test and the process, and hide how it died).
        env |= {"LD_PRELOAD": libfaketime(), "FAKETIME": clock_skew}
    return Service(
        name=f"nexus {replica_id}",
        argv=argv,
        env=env,
        log_path=workdir / f"nexus-{replica_id}.log",
    )


def libfaketime() -> str:
    """Debian's libfaketime (package faketime), which scripts/bootstrap.sh installs."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        raise RuntimeError(
            "libfaketime is not installed (Debian package faketime): run scripts/bootstrap.sh"
        )
    return found[0]


@dataclass
class Crucible:
    agent_id: uuid.UUID
    sled_id: uuid.UUID
    service: Service


def crucible(
    amqp_url: str, workdir: Path, *, agent_id: uuid.UUID | None = None, **settings: str
) -> Crucible:
    """A crucible agent; ``agent_id`` for one whose broker user was provisioned by id."""
    agent_id, sled_id = agent_id or uuid.uuid4(), uuid.uuid4()
    data_dir = workdir / f"crucible-{agent_id}"
    env = {
        "CRUCIBLE_AGENT_ID": str(agent_id),
        "CRUCIBLE_SLED_ID": str(sled_id),
        "CRUCIBLE_DATA_DIR": str(data_dir),
        "CRUCIBLE_CAPACITY_BYTES": str(1 << 40),
        "CRUCIBLE_AMQP_URL": amqp_url,
        "CRUCIBLE_ANNOUNCE_SECONDS": "2",
    }
    env |= {f"CRUCIBLE_{key.upper()}": value for key, value in settings.items()}
    service = Service(
        name=f"crucible {agent_id}",
        argv=[str(BIN / "crucible-agent"), "run"],
        env=env,
        log_path=workdir / f"crucible-{agent_id}.log",
    )
    return Crucible(agent_id=agent_id, sled_id=sled_id, service=service)


@dataclass
class Sled:
    sled_id: uuid.UUID
    service: Service


def sled(
    amqp_url: str, workdir: Path, *, sled_id: uuid.UUID | None = None, **settings: str
) -> Sled:
    """A sled agent; ``sled_id`` for one whose broker user was provisioned by id."""
    sled_id = sled_id or uuid.uuid4()
    env = {
        "SLED_SLED_ID": str(sled_id),
        "SLED_DATA_DIR": str(workdir / f"sled-{sled_id}"),
        "SLED_AMQP_URL": amqp_url,
        "SLED_HOSTNAME": f"sled-{str(sled_id)[:8]}",
    }
    env |= {f"SLED_{key.upper()}": value for key, value in settings.items()}
    service = Service(
        name=f"sled {sled_id}",
        argv=[str(BIN / "sled-agent"), "run"],
        env=env,
        log_path=workdir / f"sled-{sled_id}.log",
    )
    return Sled(sled_id=sled_id, service=service)


class ApiClient:
    """What ``nexusctl`` does, without its printing: requests on ``nexus.api``."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    # Tests send their first request right after starting a replica; the request waits in
    # nexus.api until the replica consumes, which on a loaded machine (CI's Docker builds
    # beside the suite) took longer than 10 s: a timeout there measured start-up, not Nexus.
    async def request(self, message: Envelope, timeout: float = 30.0) -> Message:
        reply = await self._transport.request(message, routing_key=NEXUS_API_QUEUE, timeout=timeout)
        if isinstance(reply, api.ApiError):
            raise RuntimeError(f"{reply.payload.code}: {reply.payload.message}")
        return reply

    async def create_disk(self, name: str, size_bytes: int = 1 << 30) -> api.Accepted:
        reply = await self.request(
            api.DiskCreate(
                source="cli/test",
                payload=api.DiskCreateRequest(project="test", name=name, size_bytes=size_bytes),
            )
        )
        assert isinstance(reply, api.AcceptedReply), reply
        return reply.payload

    async def saga(self, saga_id: uuid.UUID) -> api.SagaView:
        reply = await self.request(
            api.SagaGet(source="cli/test", payload=api.SagaRef(saga_id=saga_id))
        )
        assert isinstance(reply, api.SagaReply), reply
        return reply.payload

    async def saga_in(
        self, saga_id: uuid.UUID, states: set[str], timeout: float = 30.0
    ) -> api.SagaView:
        """The saga once it reaches one of ``states`` (the test watches; nothing else polls)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                view = await self.saga(saga_id)
                if view.state in states:
                    return view
            except RuntimeError as error:
                if "not_found" not in str(error):
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"saga {saga_id} not in {states} after {timeout}s")
            await asyncio.sleep(0.1)
