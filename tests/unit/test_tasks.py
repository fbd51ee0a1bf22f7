"""No silent deaths: a supervised loop survives any exception with backoff, and the
process knows when one of its loops is failing, stuck or gone.

``schemas.tasks.Tasks`` is what Nexus and both agents run their relay, sweeper,
announcer and heartbeats under; ``schemas.health.report_health`` touches the health
file only while ``Tasks.problems()`` is empty. The same, per service and against its
real dependency, is in ``tests/integration/test_dependency_outages.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from pathlib import Path

import pytest

from schemas.health import report_health
from schemas.tasks import Tasks, until_up


async def until(condition: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not (condition() if callable(condition) else condition):
            await asyncio.sleep(0.005)


async def test_a_loop_survives_any_exception_with_backoff_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = Tasks(first_delay=0.01, max_delay=0.04)
    failures: list[Exception] = [
        ValueError("a bug"),
        KeyError("another"),
        OSError(5, "Input/output error"),
        ConnectionRefusedError(111, "refused"),
        RuntimeError("anything"),
    ]
    attempts: list[float] = []

    async def one_pass() -> None:
        attempts.append(time.monotonic())
        if len(attempts) <= len(failures):
            raise failures[len(attempts) - 1]
        await asyncio.sleep(0.01)

    caplog.set_level("INFO", logger="schemas.tasks")
    task = tasks.run("relay", one_pass, window=10)
    try:
        await until(lambda: tasks.record("relay").failures == 3)
        (problem,) = tasks.problems()
        assert problem.startswith("relay is failing (3 failed passes in a row): ")
        assert "Input/output error" in problem
        await until(lambda: tasks.record("relay").passes >= 3)
        assert tasks.problems() == []
        assert not task.done()
    finally:
        await tasks.stop()

    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    # 10 ms doubling to 40 ms, ±20 %: backoff between failed passes, none after successes.
    assert all(gap >= 0.008 for gap in gaps[:5])
    assert gaps[3] >= 0.03, "the backoff grew"
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == len(failures), "each failure logged"
    assert errors[0].exc_info is not None and errors[1].exc_info is None, (
        "the traceback once per streak"
    )
    assert any("relay recovered after 5 failed passes" in r.getMessage() for r in caplog.records)


async def test_a_loop_that_is_no_longer_running_is_reported() -> None:
    tasks = Tasks()

    async def one_pass() -> None:
        await asyncio.sleep(0.01)

    task = tasks.run("announcer", one_pass, window=10)
    await until(lambda: tasks.record("announcer").passes >= 1)
    assert tasks.problems() == []
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert tasks.problems() == ["announcer is not running"]


async def test_a_loop_stuck_in_a_pass_is_reported_after_its_window() -> None:
    tasks = Tasks()
    release = asyncio.Event()
    passes = 0

    async def one_pass() -> None:
        nonlocal passes
        passes += 1
        if passes == 2:
            await release.wait()  # a pass that hangs: a lock, a call without a timeout

    tasks.run("sweeper", one_pass, window=0.1)
    try:
        await until(lambda: passes == 2)
        assert tasks.problems() == []
        await asyncio.sleep(0.15)
        (problem,) = tasks.problems()
        assert problem.startswith("sweeper is stuck: no pass completed in the ")
        assert "(window 0.1s)" in problem
        release.set()
        await until(lambda: tasks.problems() == [])
    finally:
        await tasks.stop()


async def test_a_loop_given_until_stops_between_passes() -> None:
    tasks = Tasks(first_delay=10, max_delay=10)
    stop = asyncio.Event()
    passes = 0

    async def one_pass() -> None:
        nonlocal passes
        passes += 1
        if passes == 3:
            stop.set()
            raise OSError("failing as the stop comes: the backoff of 10 s is cut short")

    task = tasks.run("announcer", one_pass, window=10, until=stop)
    async with asyncio.timeout(2):
        await task
    assert passes == 3


async def test_a_watched_condition_is_a_problem_while_it_does_not_hold() -> None:
    tasks = Tasks()
    connected = False
    tasks.watch("broker", lambda: None if connected else "not connected to the broker")
    assert tasks.problems() == ["broker: not connected to the broker"]
    connected = True
    assert tasks.problems() == []


async def test_the_health_file_is_touched_only_while_there_is_no_problem(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "run" / "service.health"
    problems: list[str] = []
    reporter = asyncio.create_task(report_health(path, lambda: problems, 0.01))
    try:
        await until(path.exists)
        problems.append("outbox-relay is failing (1 failed passes in a row): OSError()")
        await asyncio.sleep(0.05)
        an_hour_ago = time.time() - 3600
        os.utime(path, (an_hour_ago, an_hour_ago))
        await asyncio.sleep(0.1)
        assert path.stat().st_mtime == pytest.approx(an_hour_ago), "not touched while failing"
        problems.clear()
        await until(lambda: path.stat().st_mtime > time.time() - 60)
    finally:
        reporter.cancel()
        await asyncio.gather(reporter, return_exceptions=True)
    unhealthy = [r.getMessage() for r in caplog.records if "unhealthy" in r.getMessage()]
    assert len(unhealthy) == 1, "logged when it appears, not at every check"
    assert "outbox-relay is failing" in unhealthy[0]


# until_up: a process starting while a dependency is down waits for it.


async def test_until_up_runs_again_while_the_dependency_is_down_and_returns_its_result() -> None:
    calls: list[int] = []

    async def attempt() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError("database down")
        return "revision 0005"

    assert await until_up("db", attempt, first_delay=0.001, max_delay=0.002) == "revision 0005"
    assert len(calls) == 3


async def test_until_up_raises_an_error_of_the_work_itself_at_once() -> None:
    calls: list[int] = []

    async def attempt() -> str:
        calls.append(1)
        raise ValueError("not a dependency being down")

    with pytest.raises(ValueError):
        await until_up("db", attempt, first_delay=0.001)
    assert len(calls) == 1


async def test_until_up_gives_up_when_asked_to_stop_while_waiting() -> None:
    stop = asyncio.Event()

    async def attempt() -> str:
        stop.set()  # SIGTERM arrives while the database is still down
        raise ConnectionRefusedError("database down")

    assert await until_up("db", attempt, stop=stop, first_delay=10.0) is None
