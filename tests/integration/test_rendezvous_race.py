"""The early-event race, on PostgreSQL with two replicas (separate connection pools).

Each trial starts a saga on one replica while its event is delivered on the other (and
sometimes a duplicate on the first), with random timing, so the event lands before,
during or after the saga parks. No sweeper runs: a lost wake-up would leave the saga
waiting. Every saga must resume exactly once and finish.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from nexus.db.states import SagaLogEvent, SagaState
from nexus.saga.clock import ManualClock
from schemas.instance import VmmState
from tests.saga_support import (
    Database,
    Replica,
    WaitParams,
    placed_vmm,
    vmm_event,
    wait_saga,
)

pytestmark = [pytest.mark.integration, pytest.mark.race]

CONCURRENT_TRIALS = 16


@pytest.fixture
async def replicas(fresh_postgres_url: str) -> AsyncIterator[tuple[Replica, Replica]]:
    first = await Database.migrated(fresh_postgres_url)
    second = Database(fresh_postgres_url)
    definition = wait_saga()
    clock = ManualClock()
    try:
        yield (
            Replica(first, "replica-a", clock=clock, definitions=[definition]),
            Replica(second, "replica-b", clock=clock, definitions=[definition]),
        )
    finally:
        await first.close()
        await second.close()


async def trial(a: Replica, b: Replica, rng: random.Random) -> tuple[uuid.UUID, str]:
    starter, consumer = (a, b) if rng.random() < 0.5 else (b, a)
    instance_id = await placed_vmm(a.database)
    event = vmm_event(instance_id, VmmState.RUNNING, 2)
    saga_id = uuid.uuid4()
    # Parking takes a few milliseconds here; delays around it put the event before,
    # inside and after the parking transaction.
    start_delay, event_delay = rng.uniform(0, 0.02), rng.uniform(0, 0.03)
    duplicate = rng.random() < 0.3

    async def start() -> None:
        await asyncio.sleep(start_delay)
        await starter.executor.start(
            wait_saga(), WaitParams(key=f"vmm:{instance_id}:running"), saga_id
        )

    async def deliver(replica: Replica, delay: float) -> None:
        await asyncio.sleep(delay)
        await replica.deliver(event)

    work = [start(), deliver(consumer, event_delay)]
    if duplicate:
        work.append(deliver(starter, rng.uniform(0, 0.03)))
    await asyncio.gather(*work)
    placement = "before" if event_delay < start_delay else "after"
    return saga_id, placement


async def test_every_saga_resumes_exactly_once_whatever_the_timing(
    replicas: tuple[Replica, Replica], race_trials: int
) -> None:
    a, b = replicas
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"race seed {seed}, {race_trials} trials")
    outcomes: list[tuple[uuid.UUID, str]] = []
    for offset in range(0, race_trials, CONCURRENT_TRIALS):
        batch = min(CONCURRENT_TRIALS, race_trials - offset)
        outcomes += await asyncio.gather(*(trial(a, b, rng) for _ in range(batch)))

    database = a.database
    problems = []
    resumed_by: Counter[str] = Counter()
    for saga_id, placement in outcomes:
        saga = await database.saga(saga_id)
        log = await database.log(saga_id)
        resumes = [entry for entry in log if entry.event == SagaLogEvent.RESUMED]
        resumed_by.update(entry.replica_id for entry in resumes)
        if saga.state != SagaState.DONE or len(resumes) != 1:
            problems.append((saga_id, placement, saga.state, len(resumes)))
    assert not problems, f"seed {seed}: {problems[:5]} ({len(problems)} of {len(outcomes)})"
    placements = Counter(placement for _, placement in outcomes)
    assert placements["before"] and placements["after"], placements
    assert len(resumed_by) == 2, f"both replicas resumed sagas: {resumed_by}"
