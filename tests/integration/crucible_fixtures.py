"""Helpers for driving real ``crucible-agent`` processes and watching what they publish."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from schemas.common import CommandRejected
from schemas.region import RegionState, RegionStateChanged
from schemas.snapshot import RegionSnapshotStateChanged, RunningSnapshotStateChanged
from schemas.topology import EVENTS_EXCHANGE, crucible_queue
from schemas.transport import Delivery, Transport

AGENT = Path(sys.executable).parent / "crucible-agent"
WAIT_SECONDS = 20.0


@dataclass
class AgentProcess:
    """One agent's identity and data directory; each ``start`` is a new process on them."""

    agent_id: uuid.UUID
    sled_id: uuid.UUID
    data_dir: Path
    amqp_url: str
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def queue(self) -> str:
        return crucible_queue(self.agent_id)

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def start(self, *flags: str) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.starts += 1
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(AGENT),
                    "run",
                    f"--agent-id={self.agent_id}",
                    f"--sled-id={self.sled_id}",
                    f"--data-dir={self.data_dir}",
                    f"--amqp-url={self.amqp_url}",
                    "--log-level=DEBUG",
                    *flags,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={
                    key: value
                    for key, value in os.environ.items()
                    if not key.startswith("CRUCIBLE_")
                },
            )

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def exited(self, timeout: float = WAIT_SECONDS) -> int:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while (code := self.process.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"agent did not exit in {timeout}s\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        return code

    async def kill(self) -> None:
        self.signal(signal.SIGKILL)
        assert await self.exited() == -signal.SIGKILL

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def regions_rows(self) -> list[tuple[object, ...]]:
        """The agent's region table as stored, read beside the running process."""
        with sqlite3.connect(self.data_dir / "agent.sqlite") as db:
            return db.execute("SELECT * FROM regions ORDER BY id").fetchall()

    def unsent_outbox(self) -> int:
        """Messages in the agent's outbox not yet sent (a sent row is deleted)."""
        with sqlite3.connect(self.data_dir / "agent.sqlite") as db:
            return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def files(self) -> dict[str, int]:
        """Every file under the regions directory, with its size."""
        root = self.data_dir / "regions"
        if not root.exists():
            return {}
        return {
            str(path.relative_to(root)): path.stat().st_size
            for path in root.rglob("*")
            if path.is_file()
        }

    def region_dir(self, region_id: uuid.UUID) -> Path:
        return self.data_dir / "regions" / str(region_id)


@pytest.fixture
def crucible_agents(tmp_path: Path, rabbitmq_url: str) -> Iterator[Callable[..., AgentProcess]]:
    """Makes agents with their own ids and data directories; none outlives its test."""
    made: list[AgentProcess] = []

    def make(amqp_url: str = rabbitmq_url) -> AgentProcess:
        agent = AgentProcess(
            agent_id=uuid.uuid4(),
            sled_id=uuid.uuid4(),
            data_dir=tmp_path / f"agent-{len(made)}",
            amqp_url=amqp_url,
        )
        made.append(agent)
        return agent

    yield make
    for agent in made:
        if agent.process is not None and agent.process.poll() is None:
            agent.process.kill()
            agent.process.wait()


@dataclass
class Events:
    """Everything published on ``control.events`` that a test cares about, in arrival order,
    through the test's own queue (other tests' events arrive too: filter by agent)."""

    queue: str
    received: list[Delivery] = field(default_factory=list)

    async def on_delivery(self, delivery: Delivery) -> None:
        self.received.append(delivery)

    def region_changes(
        self, agent_id: uuid.UUID, region_id: uuid.UUID | None = None
    ) -> list[RegionStateChanged]:
        return [
            delivery.message
            for delivery in self.received
            if isinstance(delivery.message, RegionStateChanged)
            and delivery.message.payload.agent_id == agent_id
            and (region_id is None or delivery.message.payload.region.id == region_id)
        ]

    def states(self, agent_id: uuid.UUID, region_id: uuid.UUID) -> list[tuple[RegionState, int]]:
        """Each (state, generation) once, in the order it first arrived."""
        seen: list[tuple[RegionState, int]] = []
        for event in self.region_changes(agent_id, region_id):
            key = (event.payload.region.state, event.payload.region.generation)
            if key not in seen:
                seen.append(key)
        return seen

    def snapshot_changes(
        self, agent_id: uuid.UUID, region_id: uuid.UUID
    ) -> list[RegionSnapshotStateChanged]:
        return [
            delivery.message
            for delivery in self.received
            if isinstance(delivery.message, RegionSnapshotStateChanged)
            and delivery.message.payload.agent_id == agent_id
            and delivery.message.payload.snapshot.region_id == region_id
        ]

    def running_changes(
        self, agent_id: uuid.UUID, region_id: uuid.UUID
    ) -> list[RunningSnapshotStateChanged]:
        return [
            delivery.message
            for delivery in self.received
            if isinstance(delivery.message, RunningSnapshotStateChanged)
            and delivery.message.payload.agent_id == agent_id
            and delivery.message.payload.running_snapshot.id == region_id
        ]

    def running_states(
        self, agent_id: uuid.UUID, region_id: uuid.UUID
    ) -> list[tuple[RegionState, int]]:
        """Each running snapshot (state, generation) once, in the order it first arrived."""
        seen: list[tuple[RegionState, int]] = []
        for event in self.running_changes(agent_id, region_id):
            key = (event.payload.running_snapshot.state, event.payload.running_snapshot.generation)
            if key not in seen:
                seen.append(key)
        return seen

    def rejections(self, command_id: uuid.UUID) -> list[CommandRejected]:
        return [
            delivery.message
            for delivery in self.received
            if isinstance(delivery.message, CommandRejected)
            and delivery.message.payload.command_id == command_id
        ]

    async def until(
        self, condition: Callable[[], bool], what: str, timeout: float = WAIT_SECONDS
    ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.05)

    async def reached(
        self,
        agent_id: uuid.UUID,
        region_id: uuid.UUID,
        state: RegionState,
        timeout: float = WAIT_SECONDS,
    ) -> None:
        await self.until(
            lambda: any(seen == state for seen, _ in self.states(agent_id, region_id)),
            f"region {region_id} {state.value}",
            timeout,
        )


async def watch_events(transport: Transport) -> Events:
    events = Events(queue=f"test.crucible.{uuid.uuid4()}")
    await transport.declare_queue(
        events.queue,
        [
            (EVENTS_EXCHANGE, key)
            for key in (
                "region.*",
                "region_snapshot.*",
                "running_snapshot.*",
                "command.rejected",
                "agent.announced",
            )
        ],
    )
    await transport.consume(events.queue, events.on_delivery)
    return events


@pytest.fixture
async def transport(rabbitmq_url: str) -> AsyncIterator[Transport]:
    async with Transport(rabbitmq_url, name=f"test-crucible-{uuid.uuid4().hex[:8]}") as connected:
        await connected.declare_topology()
        yield connected


@pytest.fixture
async def events(transport: Transport) -> AsyncIterator[Events]:
    watched = await watch_events(transport)
    yield watched
    await transport.channel.queue_delete(watched.queue)
