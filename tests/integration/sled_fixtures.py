"""Real ``sled-agent`` processes and a private event queue to watch what they publish."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from schemas.base import Envelope
from schemas.instance import Vmm, VmmState, VmmStateChanged
from schemas.messages import Message
from schemas.sled import SledHeartbeat, SledRegistered
from schemas.topology import EVENTS_EXCHANGE, sled_queue
from schemas.transport import Delivery, Transport

SLED_AGENT = Path(sys.executable).parent / "sled-agent"
SOURCE = "test/sled-agent"
_M = TypeVar("_M", bound=Envelope)


class Watcher:
    """Everything published on ``instance.*``, ``sled.*`` and ``command.rejected``.

    Other tests' events arrive too; every question here is about given ids.
    """

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.received: list[Message] = []
        self._arrived = asyncio.Condition()

    async def on_delivery(self, delivery: Delivery) -> None:
        async with self._arrived:
            self.received.append(delivery.message)
            self._arrived.notify_all()

    async def send(self, command: Envelope, sled_id: uuid.UUID) -> None:
        await self.transport.send_command(command, sled_queue(sled_id))

    async def wait_for(
        self, kind: type[_M], matches: Callable[[_M], bool], *, timeout: float = 10.0
    ) -> _M:
        def found() -> _M | None:
            for message in self.received:
                if isinstance(message, kind) and matches(message):
                    return message
            return None

        try:
            async with asyncio.timeout(timeout), self._arrived:
                await self._arrived.wait_for(lambda: found() is not None)
        except TimeoutError:
            raise AssertionError(f"no matching {kind.__name__} within {timeout}s") from None
        message = found()
        assert message is not None
        return message

    def vmm_events(self, vmm_id: uuid.UUID) -> list[Vmm]:
        """The VMM's state changes in arrival order, each message once."""
        seen: set[uuid.UUID] = set()
        changes = []
        for message in self.received:
            if (
                isinstance(message, VmmStateChanged)
                and message.id not in seen
                and message.payload.vmm.id == vmm_id
            ):
                seen.add(message.id)
                changes.append(message.payload.vmm)
        return changes

    async def wait_for_vmm(
        self,
        vmm_id: uuid.UUID,
        state: VmmState,
        generation: int | None = None,
        *,
        timeout: float = 10.0,
    ) -> Vmm:
        def matches(message: VmmStateChanged) -> bool:
            vmm = message.payload.vmm
            return (
                vmm.id == vmm_id
                and vmm.state is state
                and (generation is None or vmm.generation == generation)
            )

        event = await self.wait_for(VmmStateChanged, matches, timeout=timeout)
        return event.payload.vmm

    async def wait_registered(
        self, sled_id: uuid.UUID, *, after: int = 0, timeout: float = 15.0
    ) -> SledRegistered:
        """The ``after``-th registration of the sled (0: the first)."""

        def registrations() -> list[SledRegistered]:
            return [
                m
                for m in self.received
                if isinstance(m, SledRegistered) and m.payload.sled_id == sled_id
            ]

        await self.wait_for(
            SledRegistered,
            lambda m: m.payload.sled_id == sled_id and len(registrations()) > after,
            timeout=timeout,
        )
        return registrations()[after]

    def heartbeats(self, sled_id: uuid.UUID) -> list[SledHeartbeat]:
        return [
            m
            for m in self.received
            if isinstance(m, SledHeartbeat) and m.payload.sled_id == sled_id
        ]


@asynccontextmanager
async def watching(url: str) -> AsyncIterator[Watcher]:
    async with Transport(url, name=f"test-watcher-{uuid.uuid4().hex[:8]}") as transport:
        await transport.declare_topology()
        queue = f"test.sled-events.{uuid.uuid4()}"
        declared = await transport.declare_queue(
            queue,
            [
                (EVENTS_EXCHANGE, "instance.*"),
                (EVENTS_EXCHANGE, "sled.*"),
                (EVENTS_EXCHANGE, "command.rejected"),
            ],
        )
        watcher = Watcher(transport)
        await transport.consume(queue, watcher.on_delivery)
        try:
            yield watcher
        finally:
            await declared.delete(if_unused=False, if_empty=False)


@dataclass
class SledProcess:
    """One ``sled-agent run`` process; restart it with the same sled id and data dir."""

    amqp_url: str
    data_dir: Path
    flags: dict[str, str]
    sled_id: uuid.UUID = field(default_factory=uuid.uuid4)
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "agent.log"

    def start(self, **flags: str) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        arguments = {
            "sled-id": str(self.sled_id),
            "data-dir": str(self.data_dir),
            "amqp-url": self.amqp_url,
            **self.flags,
            **flags,
        }
        command = [str(SLED_AGENT), "run"]
        for name, value in arguments.items():
            command += [f"--{name}", value]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={
                    key: value for key, value in os.environ.items() if not key.startswith("SLED_")
                },
            )

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait(self, timeout: float = 10.0) -> int:
        assert self.process is not None
        process = self.process
        return await asyncio.wait_for(asyncio.to_thread(process.wait), timeout)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ensure_stopped(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


SledFactory = Callable[..., SledProcess]


@pytest.fixture
def sled_agents(tmp_path: Path) -> Iterator[SledFactory]:
    """Make sled agents (not started); every one is killed after the test, logs shown."""
    made: list[SledProcess] = []

    def make(amqp_url: str, **flags: str) -> SledProcess:
        sled = SledProcess(amqp_url, tmp_path / f"sled-{len(made)}", flags)
        made.append(sled)
        return sled

    yield make
    for sled in made:
        sled.ensure_stopped()
        # Shown by pytest only when the test failed.
        print(f"--- sled {sled.sled_id} log ---\n{sled.logs()[-20000:]}")
