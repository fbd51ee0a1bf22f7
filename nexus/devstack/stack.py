"""The processes of a single-machine rack, and waiting until they can take requests.

Three crucible agents on three distinct sleds (a disk's three regions must be on
distinct sleds), two of which also run a sled agent for instances; two Nexus replicas
sharing one database. Each serves Prometheus metrics on a free loopback port and writes
its URL to ``<state dir>/metrics/<process>.url`` (:func:`metrics_urls`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from nexus.devstack.access import Access
from nexus.devstack.supervisor import ChildSpec, Supervisor
from schemas.identity import NEXUS_USER, crucible_user, sled_user
from schemas.messages import Message
from schemas.sled import AgentAnnounced, SledHeartbeat, SledRegistered
from schemas.transport import Delivery

BIN = Path(sys.executable).parent
# Short intervals: the stack is ready once every agent has been heard from while both
# replicas were consuming (see Readiness), so these bound how long starting takes.
ANNOUNCE_SECONDS = 1.0
HEARTBEAT_SECONDS = 1.0


# Where run-all leaves nexusctl's broker URL, password included, for its owner only.
CLI_URL_FILE = "nexusctl.url"
# Where each process writes the URL of its /metrics.
METRICS_DIR = "metrics"


def metrics_file(state_dir: Path, process: str) -> Path:
    return state_dir / METRICS_DIR / f"{process}.url"


def metrics_urls(state_dir: Path, processes: list[str]) -> dict[str, str]:
    """Each process's /metrics URL, from the file it wrote (processes yet to write one
    are left out)."""
    urls = {}
    for process in processes:
        path = metrics_file(state_dir, process)
        if path.exists():
            urls[process] = path.read_text().strip()
    return urls


def _metrics_env(prefix: str, state_dir: Path, process: str) -> dict[str, str]:
    """A free loopback port for the process's metrics, and where it writes the URL."""
    return {
        f"{prefix}METRICS_PORT": "0",
        f"{prefix}METRICS_HOST": "127.0.0.1",
        f"{prefix}METRICS_ADDRESS_FILE": str(metrics_file(state_dir, process)),
    }


def save_cli_url(state_dir: Path, url: str) -> Path:
    """Write ``url`` to a file in ``state_dir`` that only its owner can read (0600, from
    its creation on: never readable by others, not even for a moment)."""
    path = state_dir / CLI_URL_FILE
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.fchmod(descriptor, 0o600)  # whatever the umask
    with os.fdopen(descriptor, "w") as file:
        file.write(url + "\n")
    return path


class StartupFailed(Exception):
    """A process died or never became ready while the stack started."""


@dataclass(frozen=True)
class StackConfig:
    state_dir: Path
    amqp_url: str
    database_url: str
    nexus_replicas: int = 2
    crucible_agents: int = 3
    sled_agents: int = 2
    # Regions take a while to create, as on real hardware; the demo shows sagas parked
    # meanwhile and woken by the agents' notifications.
    create_delay: str = "uniform:0.2,1.5"
    capacity_bytes: int = 1 << 40


@dataclass(frozen=True)
class StackPlan:
    nexus: list[ChildSpec]
    agents: list[ChildSpec]
    replica_ids: list[str]
    health_files: list[Path]
    crucible_ids: list[uuid.UUID]
    sled_ids: list[uuid.UUID]
    storage_sleds: list[uuid.UUID]
    # Written by each process once it serves /metrics.
    metrics_files: list[Path] = dataclasses.field(default_factory=list)


def plan(config: StackConfig) -> StackPlan:
    """Every process's command line and settings; new ids each time."""
    sleds = [uuid.uuid4() for _ in range(max(config.crucible_agents, config.sled_agents))]
    logs = config.state_dir / "logs"
    replica_ids = [f"nexus-{n}" for n in range(1, config.nexus_replicas + 1)]
    health_files = [config.state_dir / f"{replica}.health" for replica in replica_ids]
    nexus = [
        ChildSpec(
            name=replica,
            argv=(str(BIN / "nexus"), "run"),
            env={
                "NEXUS_REPLICA_ID": replica,
                "NEXUS_DATABASE_URL": config.database_url,
                "NEXUS_AMQP_URL": config.amqp_url,
                "NEXUS_HEALTH_FILE": str(health),
                **_metrics_env("NEXUS_", config.state_dir, replica),
            },
            log_path=logs / f"{replica}.log",
        )
        for replica, health in zip(replica_ids, health_files, strict=True)
    ]
    crucible_ids = [uuid.uuid4() for _ in range(config.crucible_agents)]
    agents = [
        ChildSpec(
            name=f"crucible-{n}",
            argv=(str(BIN / "crucible-agent"), "run"),
            env={
                "CRUCIBLE_AGENT_ID": str(agent_id),
                "CRUCIBLE_SLED_ID": str(sleds[n - 1]),
                "CRUCIBLE_DATA_DIR": str(config.state_dir / f"crucible-{n}"),
                "CRUCIBLE_CAPACITY_BYTES": str(config.capacity_bytes),
                "CRUCIBLE_AMQP_URL": config.amqp_url,
                "CRUCIBLE_CREATE_DELAY": config.create_delay,
                "CRUCIBLE_ANNOUNCE_SECONDS": str(ANNOUNCE_SECONDS),
                **_metrics_env("CRUCIBLE_", config.state_dir, f"crucible-{n}"),
            },
            log_path=logs / f"crucible-{n}.log",
        )
        for n, agent_id in enumerate(crucible_ids, start=1)
    ]
    sled_ids = sleds[: config.sled_agents]
    agents += [
        ChildSpec(
            name=f"sled-{n}",
            argv=(str(BIN / "sled-agent"), "run"),
            env={
                "SLED_SLED_ID": str(sled_id),
                "SLED_DATA_DIR": str(config.state_dir / f"sled-{n}"),
                "SLED_AMQP_URL": config.amqp_url,
                "SLED_HOSTNAME": f"sled-{n}",
                "SLED_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
                **_metrics_env("SLED_", config.state_dir, f"sled-{n}"),
            },
            log_path=logs / f"sled-{n}.log",
        )
        for n, sled_id in enumerate(sled_ids, start=1)
    ]
    return StackPlan(
        nexus=nexus,
        agents=agents,
        replica_ids=replica_ids,
        health_files=health_files,
        crucible_ids=crucible_ids,
        sled_ids=sled_ids,
        storage_sleds=sleds[: config.crucible_agents],
        metrics_files=[metrics_file(config.state_dir, spec.name) for spec in [*nexus, *agents]],
    )


def with_users(layout: StackPlan, access: Access, base_url: str) -> StackPlan:
    """The same processes, each connecting as its own least-privilege broker user."""

    def user_of(spec: ChildSpec) -> tuple[str, str]:
        if "NEXUS_AMQP_URL" in spec.env:
            return "NEXUS_AMQP_URL", NEXUS_USER
        if "CRUCIBLE_AMQP_URL" in spec.env:
            return "CRUCIBLE_AMQP_URL", crucible_user(uuid.UUID(spec.env["CRUCIBLE_AGENT_ID"]))
        return "SLED_AMQP_URL", sled_user(uuid.UUID(spec.env["SLED_SLED_ID"]))

    def as_user(spec: ChildSpec) -> ChildSpec:
        variable, user = user_of(spec)
        env = {**spec.env, variable: access.url(base_url, user)}
        return dataclasses.replace(spec, env=env)

    return dataclasses.replace(
        layout,
        nexus=[as_user(spec) for spec in layout.nexus],
        agents=[as_user(spec) for spec in layout.agents],
    )


class Readiness:
    """Hears every agent once both replicas consume: then Nexus knows them all.

    An agent's first announcement may sit in ``nexus.events`` until a replica starts;
    one heard *after* every replica is up was applied as it arrived, a few
    milliseconds later, so it (or an earlier one) is in Nexus's records.
    """

    def __init__(self, crucible_ids: list[uuid.UUID], sled_ids: list[uuid.UUID]) -> None:
        self._waiting: set[uuid.UUID] = set(crucible_ids) | set(sled_ids)
        self.armed = False

    async def handle(self, delivery: Delivery) -> None:
        if self.armed:
            heard = _agent_of(delivery.message)
            if heard is not None:
                self._waiting.discard(heard)

    def arm(self) -> None:
        self.armed = True

    @property
    def complete(self) -> bool:
        return self.armed and not self._waiting


def _agent_of(message: Message) -> uuid.UUID | None:
    if isinstance(message, AgentAnnounced):
        return message.payload.agent_id
    if isinstance(message, SledHeartbeat):
        return message.payload.sled_id
    if isinstance(message, SledRegistered):
        return message.payload.sled_id
    return None


READINESS_KEYS = ("agent.announced", "sled.heartbeat", "sled.registered")


async def wait_until_ready(
    supervisor: Supervisor, plan: StackPlan, readiness: Readiness, timeout: float
) -> None:
    """Both replicas healthy, then every agent heard and every process serving its
    metrics; StartupFailed if a process dies.

    A replica touches its health file after a sweeper pass with the broker connected;
    files and other processes' exits offer nothing to await, so while the stack starts
    (and only then) this looks at them every 100 ms.
    """
    deadline = time.monotonic() + timeout
    while not (readiness.complete and all(path.exists() for path in plan.metrics_files)):
        dead = supervisor.dead()
        if dead:
            names = ", ".join(
                f"{child.spec.name} (exit {child.process.returncode}, log {child.spec.log_path})"
                for child in dead
            )
            raise StartupFailed(f"died while starting: {names}")
        if not readiness.armed and all(path.exists() for path in plan.health_files):
            readiness.arm()
        if time.monotonic() > deadline:
            what = (
                "Nexus health files"
                if not readiness.armed
                else "agents to announce themselves"
                if not readiness.complete
                else "every process's metrics address file"
            )
            raise StartupFailed(f"not ready after {timeout:g}s: still waiting for {what}")
        await asyncio.sleep(0.1)
