"""Container health checks shared by the agents: a file touched while the broker is up.

``run`` touches the file every few seconds while its broker connection is up
(:func:`report_health`); the ``health`` command reads its age
(:func:`health_file_age`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from schemas.transport import Transport

log = logging.getLogger(__name__)


class Unhealthy(RuntimeError):
    """Why a health check fails, in one line."""


async def report_health(path: Path, transport: Transport, every_seconds: float) -> None:
    """Touch ``path`` every ``every_seconds`` while the broker connection is up.

    Runs until cancelled. A connect_robust connection that lost the broker is not
    closed but no longer ``connected``, so that is what is checked.
    """
    while True:
        if transport.is_connected and transport.connection.connected.is_set():
            try:
                await asyncio.to_thread(_touch, path)
            except OSError as error:
                log.warning("cannot touch the health file %s: %r", path, error)
        await asyncio.sleep(every_seconds)


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def health_file_age(path: Path | None, max_age: float, variable: str) -> float:
    """Seconds since ``path`` was touched, or :class:`Unhealthy` saying what is wrong."""
    if path is None:
        raise Unhealthy(f"{variable} is not set")
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        raise Unhealthy(f"{path} does not exist: not connected yet") from None
    except OSError as error:
        raise Unhealthy(str(error)) from None
    if age > max_age:
        raise Unhealthy(f"{path} last touched {age:.0f}s ago (more than {max_age:g}s)")
    return age
