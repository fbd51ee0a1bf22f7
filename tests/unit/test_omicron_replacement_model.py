"""The benchmark's model of Omicron's task-driven region replacement
(``bench.omicron_replacement``): what each task activation decides, Omicron's backoff,
and a run against a fake agent at short periods, checked against the activations it
recorded: each phase begins at the tick Omicron's tasks would begin it, never earlier."""

from __future__ import annotations

import random
import time
import uuid

import pytest

from bench.omicron_replacement import (
    INTERNAL_SERVICE,
    OmicronModel,
    Periods,
    Phase,
    Request,
    driver_activation,
    start_activation,
)
from schemas.region import RegionSpec
from schemas.region import RegionState as Wire

CREATE_SECONDS = 0.6
REPAIR_SECONDS = 0.15
PERIODS = Periods(start_seconds=0.3, driver_seconds=0.1)


def request(repair_seconds: float = REPAIR_SECONDS) -> Request:
    spec = RegionSpec(id=uuid.uuid4(), block_size=512, extent_size=131072, extent_count=1)
    return Request(
        old_region_id=spec.id, spec=spec, new_queue="crucible.x", repair_seconds=repair_seconds
    )


class FakeAgent:
    """Creates each region ``CREATE_SECONDS`` after its first ensure."""

    def __init__(self, answer: Wire | None = None) -> None:
        self.first: dict[uuid.UUID, float] = {}
        self.ensures = 0
        self._answer = answer

    async def ensure(self, queue: str, spec: RegionSpec) -> Wire | None:
        self.ensures += 1
        if self._answer is not None:
            return self._answer
        first = self.first.setdefault(spec.id, time.monotonic())
        return Wire.CREATED if time.monotonic() - first >= CREATE_SECONDS else Wire.REQUESTED


def test_the_start_task_files_requests_and_starts_every_requested_one() -> None:
    lost, requested, running = request(), request(), request()
    requested.phase, running.phase = Phase.REQUESTED, Phase.RUNNING
    filed, to_start = start_activation([lost, requested, running])
    assert filed == [lost]
    assert to_start == [lost, requested]


def test_the_driver_finishes_only_what_its_notification_says_is_repaired() -> None:
    fresh, repairing, repaired, done, allocating = (request() for _ in range(5))
    for r in (fresh, repairing, repaired):
        r.phase = Phase.RUNNING
    repairing.repair_ends_at, repaired.repair_ends_at = 10.0, 5.0
    done.phase, allocating.phase = Phase.REPLACEMENT_DONE, Phase.ALLOCATING
    decision = driver_activation([fresh, repairing, repaired, done, allocating], now=5.0)
    assert decision.done == [repaired]
    assert decision.drive == [fresh, repairing]
    assert decision.finish == [done, repaired]


def test_omicrons_backoff_doubles_from_250_ms_with_jitter_up_to_180_s() -> None:
    rng = random.Random(1)
    for attempt, base in ((0, 0.25), (1, 0.5), (3, 2.0), (20, 180.0)):
        for _ in range(50):
            assert base * 0.5 <= INTERNAL_SERVICE.interval(attempt, rng) <= base * 1.5


async def test_each_phase_waits_for_its_tasks_next_tick() -> None:
    agent = FakeAgent()
    requests = [request(), request(repair_seconds=0.0), request()]
    model = OmicronModel(agent, PERIODS, random.Random(7))
    expunged_at = time.monotonic()
    await model.run(requests, expunged_at, timeout=30)

    starts, drivers = model.activations["start"], model.activations["driver"]
    assert starts[0] >= expunged_at + model.start_offset
    assert drivers[0] >= expunged_at + model.driver_offset
    for r in requests:
        phases = [phase for phase, _ in r.history]
        assert phases[:4] == [Phase.LOST, Phase.REQUESTED, Phase.ALLOCATING, Phase.RUNNING]
        assert phases[-3:] == [Phase.REPLACEMENT_DONE, Phase.COMPLETING, Phase.COMPLETE]
        assert set(phases[4:-3]) == {Phase.DRIVING, Phase.RUNNING}
        # Filed and started at the start task's first tick.
        assert r.entered(Phase.REQUESTED) == r.entered(Phase.ALLOCATING) == starts[0]
        # The new region, created at the agent, seen on a later poll of the backoff.
        assert r.new_region_id is not None
        running_at = r.entered(Phase.RUNNING)
        assert running_at is not None
        assert running_at >= agent.first[r.new_region_id] + CREATE_SECONDS
        assert r.agent_requests >= 3  # 250 ms, 500 ms, ... until 600 ms have passed
        # The repair begins at the driver's first tick after that, and its end is seen at
        # the first tick at or after it, where the finish saga starts too.
        assert r.repair_ends_at is not None
        began = min(at for at in drivers if at >= running_at)
        assert r.repair_ends_at == began + r.repair_seconds
        done_at = r.entered(Phase.REPLACEMENT_DONE)
        assert done_at == min(at for at in drivers if at > began and at >= r.repair_ends_at)
        assert r.entered(Phase.COMPLETING) == done_at
        complete_at = r.entered(Phase.COMPLETE)
        assert complete_at is not None and complete_at >= done_at
    assert agent.ensures == sum(r.agent_requests for r in requests)


async def test_a_start_saga_that_fails_ends_the_run_with_its_error() -> None:
    model = OmicronModel(FakeAgent(answer=Wire.FAILED), PERIODS, random.Random(7))
    with pytest.raises(ExceptionGroup) as raised:
        await model.run([request()], time.monotonic(), timeout=30)
    assert "is failed" in str(raised.value.exceptions[0])
