"""How a service process runs: its settings or a refusal, the service until SIGTERM or
SIGINT, one line for a failure, and the container health check.

``nexus``, ``crucible-agent`` and ``sled-agent`` share it, and so do the benchmark's and
the crash tests' Nexus entry points, so all of them start, stop and fail alike. It ends
a process with ``SystemExit``, whichever command-line library called it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Protocol, TypeVar

from pydantic import ValidationError

from schemas import logs, tracing
from schemas.health import Unhealthy, health_file_age
from schemas.redact import describe, redact_urls_in

log = logging.getLogger(__name__)
SettingsT = TypeVar("SettingsT")


class Startable(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def settings_from(
    service: str, settings: Callable[..., SettingsT], flags: Mapping[str, object]
) -> SettingsT:
    """``settings`` from the environment, with the flags that were given (not None) on top.

    Invalid settings end the process: one line on stderr for each problem, exit status 2.
    """
    try:
        return settings(**{name: value for name, value in flags.items() if value is not None})
    except ValidationError as error:
        for problem in error.errors():
            where = ".".join(str(part) for part in problem["loc"])
            print(f"{service}: {where}: {problem['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def run_service(
    service: str,
    log_level: str,
    main: Callable[[asyncio.Event], Awaitable[None]],
    *,
    traced_as: str | None = None,
    trace_file: Path | None = None,
) -> None:
    """Logs configured, then ``main`` given an event that SIGTERM or SIGINT sets; it
    should return soon after. A failure ends the process: logged, exit status 1.

    Tracing (:mod:`schemas.tracing`) is turned on when the environment or ``trace_file``
    asks for it, with ``traced_as`` (the process's identity) as its service name."""
    logs.configure(service, log_level)
    try:
        if tracing.configure(traced_as or service, trace_file=trace_file, role=service):
            log.info("tracing on as %s", traced_as or service)
        asyncio.run(_until_signalled(main))
    except Exception as error:
        # Redacted: the errors of a server that refuses or does not answer quote its URL.
        log.error(
            "%s failed: %s",
            service,
            describe(error),
            extra={"traceback": redact_urls_in("".join(traceback.format_exception(error)))},
        )
        raise SystemExit(1) from None
    finally:
        tracing.shutdown()


async def _until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await main(stop)


async def serve(app: Startable, stop: asyncio.Event) -> None:
    """Start ``app``, run it until ``stop`` is set, then stop it."""
    await app.start()
    try:
        await stop.wait()
        log.info("stopping on signal")
    finally:
        # A stop that fails leaves no more behind than a crash, which the services
        # recover from; the error of a failed run is the one to report.
        with contextlib.suppress(Exception):
            await app.stop()


def check_health(
    service: str, health_file: Path | None, max_age: float, variable: str, touched_when: str
) -> None:
    """The ``health`` command: whether ``health_file`` was touched within ``max_age`` seconds.

    Healthy is a line on stdout; unhealthy is one line on stderr and exit status 1.
    ``variable`` is the setting that names the file; ``touched_when`` says what a touch
    means (``all tasks well``).
    """
    try:
        age = health_file_age(health_file, max_age, variable)
    except Unhealthy as error:
        print(f"{service}: unhealthy: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"healthy: {touched_when} {age:.1f}s ago")
