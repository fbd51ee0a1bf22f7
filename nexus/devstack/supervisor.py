"""Run a set of child processes, report the ones that die, and stop them all cleanly.

Children get their own session, so a Ctrl-C at the terminal reaches only the
supervisor, which then stops them in order: SIGTERM to each, SIGKILL to the process
group of any still running after the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

# Settings of the services; a child gets only the ones its spec gives it, never ones
# that happen to be exported in the developer's shell.
SERVICE_ENV_PREFIXES = ("NEXUS_", "CRUCIBLE_", "SLED_")


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    log_path: Path


@dataclass
class Child:
    spec: ChildSpec
    process: asyncio.subprocess.Process
    watcher: asyncio.Task[None] | None = None


OnExit = Callable[[ChildSpec, int], None]


class Supervisor:
    def __init__(self, on_unexpected_exit: OnExit, *, grace_seconds: float = 10.0) -> None:
        self._on_unexpected_exit = on_unexpected_exit
        self._grace = grace_seconds
        self._children: list[Child] = []
        self._stopping = False

    @property
    def children(self) -> list[Child]:
        return list(self._children)

    async def start(self, spec: ChildSpec) -> Child:
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(SERVICE_ENV_PREFIXES)
        } | dict(spec.env)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with spec.log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,
            )
        child = Child(spec, process)
        child.watcher = asyncio.create_task(self._watch(child), name=f"watch {spec.name}")
        self._children.append(child)
        return child

    async def _watch(self, child: Child) -> None:
        code = await child.process.wait()
        if not self._stopping:
            self._on_unexpected_exit(child.spec, code)

    def dead(self) -> list[Child]:
        return [child for child in self._children if child.process.returncode is not None]

    async def stop(self) -> dict[str, int]:
        """SIGTERM every child, SIGKILL what is left after the grace period; exit codes."""
        self._stopping = True
        running = [child for child in self._children if child.process.returncode is None]
        for child in running:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        waits = [asyncio.create_task(child.process.wait()) for child in running]
        if waits:
            await asyncio.wait(waits, timeout=self._grace)
        for child in running:
            if child.process.returncode is None:
                # The whole group: a child's own helpers must not outlive it either.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGKILL)
                await child.process.wait()
        for child in self._children:
            if child.watcher is not None:
                await child.watcher
        return {
            child.spec.name: child.process.returncode
            for child in self._children
            if child.process.returncode is not None
        }
