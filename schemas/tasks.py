"""The long-running tasks of a process: none dies silently, and the process knows which
are alive.

Nexus and both agents run their background loops (outbox relay, sweeper, announcer,
heartbeats) through one :class:`Tasks`. A loop is written as one *pass* (``one_pass``:
flush the outbox and wait for the next wake-up; sleep, then sweep), which
:meth:`Tasks.run` runs again and again. A pass that raises, whatever the exception, is
logged and run again after a backoff (0.1 s doubling to 5 s, with jitter), so an
outage delays a loop but never ends it. Each completed pass is recorded, and
:meth:`Tasks.problems` names every task that is not running, is failing, or has not
completed a pass within its window, and every watched condition (the broker connection,
the consumers, work retried in place) that does not hold. The health file is touched
only while there is none (:func:`schemas.health.report_health`).

:class:`TransientRetries` is the other half: one piece of work (a consumed message, a
region's files) run again in place while it fails on a transient error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

from schemas.transient import is_transient

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_DELAY_SECONDS = 0.1
MAX_DELAY_SECONDS = 5.0


class Backoff:
    """Delays that start at ``first`` and double up to ``cap``, each within ±``jitter``
    of its nominal value, so that retries of many callers do not fall in step."""

    def __init__(
        self,
        first: float = FIRST_DELAY_SECONDS,
        cap: float = MAX_DELAY_SECONDS,
        *,
        jitter: float = 0.2,
    ) -> None:
        self._first = first
        self._cap = cap
        self._jitter = jitter
        self._nominal = first

    def next(self) -> float:
        """The delay before the next attempt; each call doubles the following one."""
        nominal = self._nominal
        self._nominal = min(nominal * 2, self._cap)
        return nominal * random.uniform(1 - self._jitter, 1 + self._jitter)

    def reset(self) -> None:
        """After a success: the next failure starts again at ``first``."""
        self._nominal = self._first


class Throttle:
    """True at most once every ``every`` seconds per key: for log lines that would repeat
    as fast as something is retried."""

    def __init__(self, every: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._every = every
        self._clock = clock
        self._last: dict[Hashable, float] = {}

    def __call__(self, key: Hashable) -> bool:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._every:
            return False
        self._last[key] = now
        return True


@dataclass
class TaskRecord:
    """What :class:`Tasks` knows about one task: when it last completed a pass, and how
    its passes have been failing since."""

    name: str
    window: float
    started_at: float
    task: asyncio.Task[None] | None = None
    last_pass_at: float | None = None
    failures: int = 0
    last_error: str | None = None
    passes: int = 0

    @property
    def task_done(self) -> bool:
        return self.task is not None and self.task.done()


async def until_up(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    *,
    stop: asyncio.Event | None = None,
    first_delay: float = FIRST_DELAY_SECONDS,
    max_delay: float = MAX_DELAY_SECONDS,
) -> T | None:
    """``attempt()``'s result once it succeeds, run again with backoff while it fails on
    a dependency that is down (:class:`TransientRetries`): a process starting while its
    database or broker restarts waits for it instead of exiting. Any other error is
    raised. None if ``stop`` is set first (the process was asked to stop meanwhile)."""
    retries = TransientRetries(first_delay=first_delay, max_delay=max_delay, stopping=stop)
    results: list[T] = []

    async def once() -> None:
        results.append(await attempt())

    done = await retries.run("start-up", f"waiting for {what}", once)
    return results[0] if done else None


class Tasks:
    """The supervised long-running tasks of one process, and what its health depends on."""

    def __init__(
        self,
        *,
        first_delay: float = FIRST_DELAY_SECONDS,
        max_delay: float = MAX_DELAY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._clock = clock
        self._records: dict[str, TaskRecord] = {}
        self._probes: dict[str, Callable[[], str | None]] = {}

    def run(
        self,
        name: str,
        one_pass: Callable[[], Awaitable[None]],
        *,
        window: float,
        until: asyncio.Event | None = None,
    ) -> asyncio.Task[None]:
        """Run ``one_pass`` again and again, in a task named ``name``, until cancelled or
        (checked between passes) until ``until`` is set: a stop at a safe point.

        A pass that raises is logged (with its traceback the first time in a row) and
        run again after a backoff. ``window``: the longest a healthy pass takes,
        waiting included; a task that has not completed a pass for longer is reported
        by :meth:`problems`, and so is one that has ended.
        """
        if name in self._records and not self._records[name].task_done:
            raise RuntimeError(f"a task named {name!r} is already running")
        record = TaskRecord(name=name, window=window, started_at=self._clock())
        record.task = asyncio.create_task(self._forever(record, one_pass, until), name=name)
        self._records[name] = record
        return record.task

    def watch(self, name: str, probe: Callable[[], str | None]) -> None:
        """Also unhealthy whenever ``probe()`` says what is wrong (None: nothing is)."""
        self._probes[name] = probe

    def record(self, name: str) -> TaskRecord:
        return self._records[name]

    def problems(self) -> list[str]:
        """One line per task that is not running, whose last pass failed, or that has not
        completed a pass within its window (stuck), and one per watched condition that
        does not hold; empty when all is well.

        A failing pass counts at once: the health file's own age (the ``health``
        command's ``--max-age``) is the grace that a short blip stays within.
        """
        now = self._clock()
        found: list[str] = []
        for record in self._records.values():
            since = record.last_pass_at if record.last_pass_at is not None else record.started_at
            if record.task_done:
                found.append(f"{record.name} is not running")
            elif record.failures:
                found.append(
                    f"{record.name} is failing ({record.failures} failed passes in a row): "
                    f"{record.last_error}"
                )
            elif now - since > record.window:
                what = "its last pass" if record.last_pass_at is not None else "it started"
                found.append(
                    f"{record.name} is stuck: no pass completed in the {now - since:.0f}s "
                    f"since {what} (window {record.window:g}s)"
                )
        for name, probe in self._probes.items():
            problem = probe()
            if problem is not None:
                found.append(f"{name}: {problem}")
        return found

    async def stop(self) -> None:
        """Cancel every task and wait until they have ended."""
        tasks = [record.task for record in self._records.values() if record.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _forever(
        self,
        record: TaskRecord,
        one_pass: Callable[[], Awaitable[None]],
        until: asyncio.Event | None,
    ) -> None:
        backoff = Backoff(self._first_delay, self._max_delay)
        stopped = until or asyncio.Event()
        while not stopped.is_set():
            try:
                await one_pass()
            except Exception as error:
                record.failures += 1
                record.last_error = repr(error)[:500]
                delay = backoff.next()
                log.error(
                    "%s failed (%d in a row); trying again in %.1fs: %r",
                    record.name,
                    record.failures,
                    delay,
                    error,
                    # The traceback once per streak: the same one every few seconds
                    # through an outage would bury everything else.
                    exc_info=error if record.failures == 1 else None,
                    extra={"task": record.name},
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stopped.wait()
                continue
            if record.failures:
                log.info(
                    "%s recovered after %d failed passes",
                    record.name,
                    record.failures,
                    extra={"task": record.name},
                )
            record.failures = 0
            record.last_error = None
            record.passes += 1
            record.last_pass_at = self._clock()
            backoff.reset()
            # A pass that had nothing to wait for must not starve the rest of the process.
            await asyncio.sleep(0)


@dataclass(eq=False)
class _Retrying:
    group: str
    what: str
    since: float
    task: asyncio.Task[Any] | None
    attempts: int = 0
    last_error: str = ""


class TransientRetries:
    """Work run again in place while it fails on a transient error
    (:func:`schemas.transient.is_transient`): with backoff, logged at a bounded rate,
    and known while it goes on, for the health check.

    The transport runs a consumer's handler through one (the message stays unacked
    meanwhile, so the failure never counts toward dead-lettering); the crucible agent
    its region work.
    """

    def __init__(
        self,
        *,
        first_delay: float = FIRST_DELAY_SECONDS,
        max_delay: float = MAX_DELAY_SECONDS,
        log_every: float = 10.0,
        stopping: asyncio.Event | None = None,
    ) -> None:
        """``stopping``: an event of the caller's that ends the retrying when set (by
        default one of its own, set by :meth:`stop`)."""
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._throttle = Throttle(log_every)
        self._retrying: set[_Retrying] = set()
        self.stopping = stopping or asyncio.Event()

    def __len__(self) -> int:
        return len(self._retrying)

    async def run(
        self,
        group: str,
        what: str,
        attempt: Callable[[], Awaitable[None]],
        *,
        go_on: Callable[[], bool] = lambda: True,
    ) -> bool:
        """Run ``attempt`` until it returns (True), again after each transient failure.

        A failure that is not transient is raised at once. False when, after a transient
        failure, :attr:`stopping` was set or ``go_on()`` turned false before the next
        attempt: the work was not done. ``group`` (a queue, "region work") and ``what``
        (the message, the region) are what the log lines name.
        """
        retrying: _Retrying | None = None
        backoff = Backoff(self._first_delay, self._max_delay)
        try:
            while True:
                try:
                    await attempt()
                except Exception as error:
                    if not is_transient(error):
                        raise
                    if retrying is None:
                        retrying = _Retrying(group, what, time.monotonic(), asyncio.current_task())
                        self._retrying.add(retrying)
                    retrying.attempts += 1
                    retrying.last_error = repr(error)[:300]
                    delay = backoff.next()
                    self._log_failure(retrying, delay)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self.stopping.wait()
                    if self.stopping.is_set() or not go_on():
                        return False
                    continue
                if retrying is not None:
                    self._log_success(retrying)
                return True
        finally:
            if retrying is not None:
                self._retrying.discard(retrying)

    async def stop(self, timeout: float) -> None:
        """Set :attr:`stopping` and wait up to ``timeout`` for the work waiting to be run
        again to give up (each ``run`` returns False)."""
        self.stopping.set()
        waiting = {retrying.task for retrying in self._retrying if retrying.task is not None}
        waiting.discard(asyncio.current_task())
        if waiting:
            await asyncio.wait(waiting, timeout=timeout)

    def problem(self, *, stuck_after: float) -> str | None:
        """None, or what has been failing on a transient error for over ``stuck_after``
        seconds (how much, and the oldest)."""
        now = time.monotonic()
        stuck = [retrying for retrying in self._retrying if now - retrying.since > stuck_after]
        if not stuck:
            return None
        oldest = min(stuck, key=lambda retrying: retrying.since)
        return (
            f"{len(stuck)} retried on a transient failure for more than {stuck_after:g}s; "
            f"the oldest, {oldest.what} ({oldest.group}), for {now - oldest.since:.0f}s "
            f"({oldest.attempts} attempts, last: {oldest.last_error})"
        )

    def _log_failure(self, retrying: _Retrying, delay: float) -> None:
        # Everything of a group fails alike while a dependency is down: one line per group
        # every ``log_every`` seconds says what is waiting, and on what.
        waiting = sum(1 for other in self._retrying if other.group == retrying.group)
        log.log(
            logging.WARNING if self._throttle(retrying.group) else logging.DEBUG,
            "%s: %s failed on a transient error, run again in place (attempt %d, next in "
            "%.1fs; %d waiting): %s",
            retrying.group,
            retrying.what,
            retrying.attempts,
            delay,
            waiting,
            retrying.last_error,
            extra={"queue": retrying.group},
        )

    def _log_success(self, retrying: _Retrying) -> None:
        last = not any(
            other is not retrying and other.group == retrying.group for other in self._retrying
        )
        if last or self._throttle((retrying.group, "done")):
            log.info(
                "%s: %s done after %d failed attempts over %.1fs%s",
                retrying.group,
                retrying.what,
                retrying.attempts,
                time.monotonic() - retrying.since,
                "" if last else " (more still waiting)",
                extra={"queue": retrying.group},
            )
