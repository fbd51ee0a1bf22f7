"""A model of Omicron's task-driven region replacement, for the benchmark's
``replacement`` phase: the same lost regions, the same crucible agents and the same
commands as this project's event-driven replacement; only the waits are Omicron's.

What Omicron does (``nexus/src/app/background/tasks/region_replacement.rs`` and
``region_replacement_driver.rs``, the sagas ``region_replacement_start``, ``_drive``
and ``_finish``; periods from ``smf/nexus/*/config-partial.toml``):

- The **start task** (``region_replacement``, every 30 s) finds the regions on
  expunged disks, files a request for each (``requested``), and in the same activation
  starts a start saga for every requested one. The start saga (``allocating``)
  allocates a region on another sled and ensures it: ``ensure_region_in_dataset``
  (``nexus/src/app/crucible.rs``) POSTs the region and POSTs it again on
  ``retry_policy_internal_service`` (``common/src/backoff.rs``: 250 ms, doubling, capped at
  180 s, ±50 % jitter) until the agent answers ``created``; it then swaps the region
  into the volume and leaves the request ``running``.
- The **driver task** (``region_replacement_driver``, every 10 s): each ``running``
  request with a successful finish notification becomes ``replacement_done``; every
  other one gets a drive saga (``driving``, then ``running`` again) that starts the
  repair if none is going (live repair in a Propolis, reconciliation in a Pantry) or
  looks at the one that is. In the same activation, each ``replacement_done`` request
  gets a finish saga (``completing``) that deletes the old region's volume and
  completes it. The old region is on an expunged disk: ``delete_crucible_region``
  finds its agent gone and asks nothing (as this project's replacement does).

Nothing activates either task early (no saga or notification does, in Omicron): each
phase waits for the next tick. The tasks' phase relative to the expunge is drawn from
the seed, as an expunge lands anywhere in a period.

What the model leaves out: the database work of each saga node (milliseconds against
seconds here) and the saga engine itself; each request's repair is a timer as long as
the event-driven replacement's repair of the same disk (its finish notification is the
timer's end); the new region's place is given (the spare sled, where the event-driven
one puts it too). Its requests are its own, in memory: it does not touch Nexus's
database.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from schemas.region import RegionEnsure, RegionInfo, RegionSpec
from schemas.region import RegionState as Wire
from schemas.transport import Transport

# Omicron's deployed periods (smf/nexus/{single,multi}-sled/config-partial.toml).
START_PERIOD_SECONDS = 30.0
DRIVER_PERIOD_SECONDS = 10.0


@dataclass(frozen=True)
class Backoff:
    """The ``backoff`` crate's ExponentialBackoff as Omicron builds it: the interval
    grows by ``multiplier`` up to ``cap``, then each one is drawn ±``jitter`` around it."""

    initial: float
    multiplier: float
    cap: float
    jitter: float = 0.5

    def interval(self, attempt: int, rng: random.Random) -> float:
        base = min(self.initial * self.multiplier**attempt, self.cap)
        return base * rng.uniform(1 - self.jitter, 1 + self.jitter)


INTERNAL_SERVICE = Backoff(0.25, 2.0, 180.0)


class Phase(StrEnum):
    """Omicron's ``RegionReplacementState``, and ``lost``: the region's disk is expunged
    and no task has seen it yet."""

    LOST = "lost"
    REQUESTED = "requested"
    ALLOCATING = "allocating"
    RUNNING = "running"
    DRIVING = "driving"
    REPLACEMENT_DONE = "replacement_done"
    COMPLETING = "completing"
    COMPLETE = "complete"


@dataclass(frozen=True)
class Periods:
    start_seconds: float = START_PERIOD_SECONDS
    driver_seconds: float = DRIVER_PERIOD_SECONDS


@dataclass
class Request:
    """One lost region and its replacement: where the old one is, where the new one goes."""

    old_region_id: uuid.UUID
    # The old region's geometry: the new one is the same size.
    spec: RegionSpec
    new_queue: str
    # How long its repair takes once a drive saga starts it.
    repair_seconds: float = 0.0
    phase: Phase = Phase.LOST
    new_region_id: uuid.UUID | None = None
    # When the repair's finish notification arrives (monotonic), once a drive started it.
    repair_ends_at: float | None = None
    # (phase, monotonic time entered), oldest first.
    history: list[tuple[Phase, float]] = field(default_factory=list)
    # Ensures sent to the new region's agent for it.
    agent_requests: int = 0

    def enter(self, phase: Phase, now: float) -> None:
        self.phase = phase
        self.history.append((phase, now))

    def entered(self, phase: Phase) -> float | None:
        return next((at for p, at in self.history if p is phase), None)


class Agents(Protocol):
    """The crucible agents' API as the model uses it: the region's state as the agent
    answers an ensure (None: no answer)."""

    async def ensure(self, queue: str, spec: RegionSpec) -> Wire | None: ...


class TransportAgents:
    """The real agents, through the broker: the command Nexus sends them."""

    SOURCE = "nexus/omicron-model"

    def __init__(self, transport: Transport, timeout: float = 10.0) -> None:
        self._transport = transport
        self._timeout = timeout

    async def ensure(self, queue: str, spec: RegionSpec) -> Wire | None:
        command = RegionEnsure(source=self.SOURCE, payload=spec)
        reply = await self._transport.request(command, routing_key=queue, timeout=self._timeout)
        if not isinstance(reply, RegionInfo):
            raise RuntimeError(f"{command.TYPE} to {queue} answered {reply.TYPE}")
        region = reply.payload.region
        return None if region is None else region.state


# What each activation decides, from the requests alone (no I/O).


def start_activation(requests: Sequence[Request]) -> tuple[list[Request], list[Request]]:
    """The start task: (lost regions to file requests for, requests to start sagas for:
    every ``requested`` one, the new ones included)."""
    filed = [r for r in requests if r.phase is Phase.LOST]
    return filed, [r for r in requests if r.phase in (Phase.LOST, Phase.REQUESTED)]


@dataclass(frozen=True)
class DriverDecision:
    # Running, with the repair's finish notification in: replacement done.
    done: list[Request]
    # Running, no notification: a drive saga each.
    drive: list[Request]
    # Replacement done (those above included): a finish saga each.
    finish: list[Request]


def driver_activation(requests: Sequence[Request], now: float) -> DriverDecision:
    running = [r for r in requests if r.phase is Phase.RUNNING]
    done = [r for r in running if r.repair_ends_at is not None and r.repair_ends_at <= now]
    drive = [r for r in running if r not in done]
    finish = [r for r in requests if r.phase is Phase.REPLACEMENT_DONE] + done
    return DriverDecision(done, drive, finish)


class OmicronModel:
    """Runs the two tasks over ``requests`` until every one is complete."""

    def __init__(
        self,
        agents: Agents,
        periods: Periods,
        rng: random.Random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._agents = agents
        self._periods = periods
        self._rng = rng
        self._clock = clock
        self._group: asyncio.TaskGroup | None = None
        self._changed = asyncio.Event()
        # Where in its period each task was when the expunge happened (seconds to the
        # first activation), drawn from the seed.
        self.start_offset = rng.uniform(0, periods.start_seconds)
        self.driver_offset = rng.uniform(0, periods.driver_seconds)
        # When each task was activated (monotonic).
        self.activations: dict[str, list[float]] = {"start": [], "driver": []}

    async def run(self, requests: Sequence[Request], expunged_at: float, timeout: float) -> None:
        for request in requests:
            request.enter(Phase.LOST, expunged_at)

        async def all_complete() -> None:
            while not all(r.phase is Phase.COMPLETE for r in requests):
                self._changed.clear()
                await self._changed.wait()

        # A saga that fails ends the run with its error (the group cancels the rest).
        async with asyncio.timeout(timeout), asyncio.TaskGroup() as group:
            self._group = group
            starts = group.create_task(
                self._every(
                    expunged_at + self.start_offset,
                    self._periods.start_seconds,
                    lambda: self._start(requests),
                )
            )
            drivers = group.create_task(
                self._every(
                    expunged_at + self.driver_offset,
                    self._periods.driver_seconds,
                    lambda: self._drive(requests),
                )
            )
            await all_complete()
            starts.cancel()
            drivers.cancel()

    async def _every(self, first: float, period: float, activate: Callable[[], None]) -> None:
        """A background task's timer: activations at ``first``, ``first + period``, ..."""
        tick = first
        while True:
            await asyncio.sleep(max(0.0, tick - self._clock()))
            activate()
            tick += period

    def _start(self, requests: Sequence[Request]) -> None:
        now = self._clock()
        self.activations["start"].append(now)
        filed, to_start = start_activation(requests)
        for request in filed:
            request.enter(Phase.REQUESTED, now)
        for request in to_start:
            request.enter(Phase.ALLOCATING, now)
            self._saga(self._start_saga(request))

    def _drive(self, requests: Sequence[Request]) -> None:
        now = self._clock()
        self.activations["driver"].append(now)
        decision = driver_activation(requests, now)
        for request in decision.done:
            request.enter(Phase.REPLACEMENT_DONE, now)
        for request in decision.drive:
            # The drive saga: driving while it looks; it starts the repair if none is
            # going (its finish notification comes the request's repair time later); running
            # again when it ends (its node's database work is left out).
            request.enter(Phase.DRIVING, now)
            if request.repair_ends_at is None:
                request.repair_ends_at = now + request.repair_seconds
            request.enter(Phase.RUNNING, now)
        for request in decision.finish:
            request.enter(Phase.COMPLETING, now)
            self._saga(self._finish_saga(request))

    def _saga(self, saga: Coroutine[Any, Any, None]) -> None:
        """Started, not awaited (Omicron's ``saga_start``)."""
        assert self._group is not None
        self._group.create_task(saga)

    async def _start_saga(self, request: Request) -> None:
        """Allocate, then ensure on Omicron's backoff until created; then running."""
        request.new_region_id = request.new_region_id or uuid.uuid4()
        spec = request.spec.model_copy(update={"id": request.new_region_id})
        attempt = 0
        while True:
            request.agent_requests += 1
            try:
                state = await self._agents.ensure(request.new_queue, spec)
            except (TimeoutError, ConnectionError):
                state = None  # transient: asked again after the interval
            if state is Wire.CREATED:
                break
            if state not in (Wire.REQUESTED, None):
                raise RuntimeError(f"region {spec.id} is {state}")
            await asyncio.sleep(INTERNAL_SERVICE.interval(attempt, self._rng))
            attempt += 1
        request.enter(Phase.RUNNING, self._clock())
        self._changed.set()

    async def _finish_saga(self, request: Request) -> None:
        """The old region's agent is gone (its disk expunged): nothing to ask; complete."""
        request.enter(Phase.COMPLETE, self._clock())
        self._changed.set()
