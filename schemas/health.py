"""Container health checks shared by the services: a file touched while all is well.

``run`` touches the file every few seconds while nothing is wrong with the process
(:func:`report_health`): every supervised task completed a pass within its window and
every watched condition holds, such as the broker connection and the consumers
(:meth:`schemas.tasks.Tasks.problems`). The ``health`` command reads the file's age
(:func:`health_file_age`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from schemas.tasks import Throttle

log = logging.getLogger(__name__)

# How often an unchanged state of ill health is logged again.
PROBLEMS_LOG_SECONDS = 30.0


class Unhealthy(RuntimeError):
    """Why a health check fails, in one line."""


async def report_health(
    path: Path, problems: Callable[[], Sequence[str]], every_seconds: float
) -> None:
    """Touch ``path`` every ``every_seconds`` while ``problems()`` is empty.

    Runs until cancelled. While there are problems the file is left to age, so the
    ``health`` command fails once it is older than its ``--max-age``, and they are
    logged: when they appear, then every ``PROBLEMS_LOG_SECONDS`` while they last.
    """
    throttle = Throttle(PROBLEMS_LOG_SECONDS)
    healthy = True
    while True:
        found = problems()
        if not found:
            if not healthy:
                log.info("healthy again: touching %s", path)
            healthy = True
            try:
                await asyncio.to_thread(_touch, path)
            except OSError as error:
                log.warning("cannot touch the health file %s: %r", path, error)
        else:
            # The throttle is asked every time, so it counts from the first line logged.
            if throttle("problems") or healthy:
                log.warning("unhealthy, %s left to age: %s", path, "; ".join(found))
            healthy = False
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
        raise Unhealthy(f"{path} does not exist: not healthy yet") from None
    except OSError as error:
        raise Unhealthy(str(error)) from None
    if age > max_age:
        raise Unhealthy(f"{path} last touched {age:.0f}s ago (more than {max_age:g}s)")
    return age
