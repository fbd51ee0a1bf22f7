"""The faults of the chaos test, at seeded random times.

Every 0.5 to 2.5 s the driver does one fault. Most are SIGKILLs of a service, started again
0.3 to 3 s later. Beside them, the run has these (``--chaos-faults`` chooses which; all by
default), each forced once at a seeded fraction of the disk creates submitted (the
workload submits no more until it has begun, and a SIGKILL comes between two of them),
and drawn now and then besides:

- ``rabbitmq-restart``: the node stopped and started again 2 s later, same port and
  data (forced only; once).
- ``postgres-stop``: ``pg_ctl stop -m immediate``, started again after a while.
- ``postgres-kill``: the postmaster SIGKILLed, started again (crash recovery). At least
  one of the forced PostgreSQL outages lasts longer than the rack's region deadline.
- ``sigstop``: a Nexus replica frozen (SIGSTOP) for longer than its lease, then
  continued (SIGCONT).
- ``clock-skew``: a Nexus replica SIGKILLed and started again with its clock 30 s ahead
  or behind (libfaketime), which it keeps for the rest of the run.
- ``disk-full``: a crucible agent's data directory (a small tmpfs) filled with a filler
  file, emptied again 4 to 10 s later while the driver carries on.
- ``sled-expunge``: a sled lost for good (forced only; once, at a seeded point in
  ``expunge_window``, when some disks are ready and others in flight): a crucible agent
  on a sled without a sled agent SIGKILLed and never started again, then the sled
  expunged through the API as an operator would (``nexusctl sled expunge``), which files
  a replacement of each of its regions. The rack has a fourth crucible agent, so that
  every lost region has a sled its disk does not use. No fault is done to the lost
  agent after (the rack leaves it out); the others' carry on.

The node-loss run (``tests/chaos/test_node_loss.py``) has its own, on a rack whose
servers are replicated, and no SIGKILLs of services between them:

- ``db-primary-kill``: the primary PostgreSQL's machine lost (its Patroni and postmaster
  SIGKILLed at once); Patroni promotes the synchronous standby; the lost node is started
  again later and rejoins as a standby.
- ``broker-node-kill``: the RabbitMQ node that leads ``nexus.events`` SIGKILLed; the
  queue elects a leader among the others, every client fails over to a node of its
  list; the node is started again later and rejoins.
- ``broker-node-stop``: a node stopped cleanly (``rabbitmqctl stop``), started again
  later: one step of a rolling restart.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from schemas import api
from tests.chaos.rack import Rack
from tests.chaos.workload import Ledger

# How the driver expunges a sled, as an operator would: the API's answer.
ExpungeSled = Callable[[uuid.UUID], Awaitable[api.SledExpunged]]


class Fault(StrEnum):
    RABBITMQ_RESTART = "rabbitmq-restart"
    POSTGRES_STOP = "postgres-stop"
    POSTGRES_KILL = "postgres-kill"
    FREEZE = "sigstop"
    CLOCK_SKEW = "clock-skew"
    DISK_FULL = "disk-full"
    # Node loss: a rack whose database is replicated (tests/chaos/test_node_loss.py).
    DB_PRIMARY_KILL = "db-primary-kill"
    # ... and whose broker is a 3-node cluster.
    BROKER_NODE_KILL = "broker-node-kill"
    BROKER_NODE_STOP = "broker-node-stop"
    SLED_EXPUNGE = "sled-expunge"


POSTGRES_FAULTS = frozenset({Fault.POSTGRES_STOP, Fault.POSTGRES_KILL})
# The faults of the classic chaos run (a single PostgreSQL and RabbitMQ node): "all".
CLASSIC_FAULTS = frozenset(
    {
        Fault.RABBITMQ_RESTART,
        Fault.POSTGRES_STOP,
        Fault.POSTGRES_KILL,
        Fault.FREEZE,
        Fault.CLOCK_SKEW,
        Fault.DISK_FULL,
        Fault.SLED_EXPUNGE,
    }
)


def parse_forced(text: str) -> frozenset[Fault]:
    """``all``, ``none``, or a comma-separated list of fault names."""
    text = text.strip()
    if text == "all":
        return CLASSIC_FAULTS
    if text in ("none", ""):
        return frozenset()
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in {fault.value for fault in Fault}]
    if unknown:
        known = ", ".join(fault.value for fault in Fault)
        raise ValueError(f"unknown chaos faults {unknown}; known: {known}, all, none")
    return frozenset(Fault(name) for name in names)


@dataclass(frozen=True)
class FaultPlan:
    gap_seconds: tuple[float, float] = (0.5, 2.5)
    down_seconds: tuple[float, float] = (0.3, 3.0)
    # Sometimes two processes at once, which may be both replicas: a total outage of
    # Nexus, during which requests and events wait in their queues.
    double_fault_chance: float = 0.15
    rabbitmq_down_seconds: float = 2.0
    # Which kind of process dies: Nexus most often, as its recovery (lease expiry,
    # adoption, fencing) is the most intricate.
    weights: Mapping[str, float] = field(
        default_factory=lambda: {"nexus": 0.4, "crucible": 0.35, "sled": 0.25}
    )
    # Done at least once each, when a seeded fraction (in ``forced_window``) of the disk
    # creates has been submitted, or after the workload if it ended first.
    forced: frozenset[Fault] = CLASSIC_FAULTS
    # Between forced faults, SIGKILLs of services (and draws of ``chances``); off for a
    # run about one kind of fault.
    process_kills: bool = True
    # How long a lost database or broker node stays down after the others took over.
    db_node_down_seconds: tuple[float, float] = (5.0, 15.0)
    broker_node_down_seconds: tuple[float, float] = (3.0, 10.0)
    forced_window: tuple[float, float] = (0.1, 0.8)
    # The expunge's point: late enough that disks are ready (and snapshotted), early
    # enough that operations are in flight around it and after it.
    expunge_window: tuple[float, float] = (0.3, 0.6)
    # At a tick with nothing forced due, the chance of each fault other than a SIGKILL
    # (of those in ``forced``; the RabbitMQ restart happens once).
    chances: Mapping[Fault, float] = field(
        default_factory=lambda: {
            Fault.POSTGRES_STOP: 0.01,
            Fault.POSTGRES_KILL: 0.01,
            Fault.FREEZE: 0.02,
            Fault.CLOCK_SKEW: 0.015,
            Fault.DISK_FULL: 0.015,
        }
    )
    # A PostgreSQL outage lasts from ``postgres_down_min`` to this much longer than the
    # region deadline; a forced one that must outlast the deadline, by a draw from it.
    postgres_down_min: float = 1.0
    beyond_deadline_seconds: tuple[float, float] = (1.0, 3.0)
    # A frozen replica stays stopped this much longer than its lease.
    freeze_beyond_lease_seconds: tuple[float, float] = (1.0, 6.0)
    skew_seconds: int = 30
    full_seconds: tuple[float, float] = (4.0, 10.0)


class FaultDriver:
    """Does the faults of a :class:`FaultPlan` to the rack, and logs each in the ledger."""

    def __init__(
        self,
        rack: Rack,
        ledger: Ledger,
        rng: random.Random,
        plan: FaultPlan,
        progress: Callable[[], float],
        expunge_sled: ExpungeSled | None = None,
    ) -> None:
        """``expunge_sled``: how the driver, as an operator, expunges a sled (the
        ``sled-expunge`` fault needs it)."""
        self._rack = rack
        self._expunge_sled = expunge_sled
        self._ledger = ledger
        self._rng = rng
        self._plan = plan
        self._progress = progress
        # Drawn for every classic fault, forced or not, so that one seed gives one
        # schedule (and the faults of other runs leave the classic schedule as it was).
        self._forced_at = {
            fault: rng.uniform(
                *(plan.expunge_window if fault is Fault.SLED_EXPUNGE else plan.forced_window)
            )
            for fault in Fault
            if fault in CLASSIC_FAULTS or fault in plan.forced
        }
        self._pending = set(plan.forced)
        self._begun = asyncio.Condition()
        self._running = True
        self._emptying: list[asyncio.Task[None]] = []
        self.postgres_outages: list[float] = []
        # Each failover of a replicated server: (lost at, replaced at), wall clock (to
        # compare with the database's times), and what failed over.
        self.failovers: list[tuple[datetime, datetime, str]] = []
        # The sled expunge's answer, the lost agent, and when (monotonic) it was answered.
        self.expunged: api.SledExpunged | None = None
        self.expunged_agent: str | None = None
        self.expunged_answered_at: float | None = None

    @property
    def forced_missing(self) -> list[Fault]:
        return sorted(self._pending)

    async def gate(self) -> None:
        """Awaited by the workload before each disk create: once the progress reached a
        forced fault's point, nothing more is submitted until the fault has begun, so
        that it meets operations in flight however fast the workload runs."""
        async with self._begun:
            await self._begun.wait_for(lambda: not self._running or not self._due())

    async def run(self, stop: asyncio.Event) -> None:
        try:
            forced_last = False
            while not stop.is_set():
                gap = self._rng.uniform(*self._plan.gap_seconds)
                try:
                    await asyncio.wait_for(stop.wait(), gap)
                    return
                except TimeoutError:
                    pass
                self._restart_the_unexpectedly_dead()
                # A forced fault, then at least one SIGKILL (or other draw) before the next.
                due = self._due()
                forced_last = bool(due) and not forced_last
                await self._do(min(due, key=self._forced_at.__getitem__) if forced_last else None)
        finally:
            # The workload waits for nothing more from a driver that stopped.
            async with self._begun:
                self._running = False
                self._begun.notify_all()

    def _due(self) -> list[Fault]:
        return [fault for fault in self._pending if self._forced_at[fault] <= self._progress()]

    async def finish(self) -> None:
        """The forced faults happen even if the workload ended early; then every filled
        disk is emptied and every dead process started again."""
        for fault in sorted(self._pending, key=self._forced_at.__getitem__):
            await self._do(fault)
        await asyncio.gather(*self._emptying)
        self._restart_the_unexpectedly_dead()

    def _draw(self) -> Fault | None:
        """One of the plan's other faults by its chance, else None: a SIGKILL."""
        draw = self._rng.random()
        for fault, chance in self._plan.chances.items():
            if draw < chance:
                return fault if fault in self._plan.forced else None
            draw -= chance
        return None

    async def _do(self, fault: Fault | None) -> None:
        forced = fault in self._pending
        if fault is None:
            fault = self._draw()
        elif forced:
            async with self._begun:
                self._pending.discard(fault)
                self._begun.notify_all()
        match fault:
            case None if not self._plan.process_kills:
                return
            case None:
                await self._kill_and_restart()
            case Fault.DB_PRIMARY_KILL:
                await self._db_primary_kill()
            case Fault.BROKER_NODE_KILL | Fault.BROKER_NODE_STOP:
                await self._broker_node_loss(clean=fault is Fault.BROKER_NODE_STOP)
            case Fault.RABBITMQ_RESTART:
                self._ledger.fault("rabbitmq restart", self._rack.server.describe())
                await self._rack.restart_rabbitmq(self._plan.rabbitmq_down_seconds)
            case Fault.POSTGRES_STOP | Fault.POSTGRES_KILL:
                await self._postgres_outage(fault, self._postgres_down(forced))
            case Fault.FREEZE:
                await self._freeze()
            case Fault.CLOCK_SKEW:
                await self._skew()
            case Fault.DISK_FULL:
                await self._fill()
            case Fault.SLED_EXPUNGE:
                await self._expunge()

    async def _kill_and_restart(self) -> None:
        count = 2 if self._rng.random() < self._plan.double_fault_chance else 1
        victims: list[str] = []
        while len(victims) < count:
            kind = self._rng.choices(list(self._plan.weights), list(self._plan.weights.values()))[0]
            victim = self._rng.choice(
                [name for name in self._rack.of_kind(kind) if name not in victims]
            )
            victims.append(victim)
            self._ledger.fault(f"sigkill {kind}", victim)
            await self._rack.kill(victim)
        await asyncio.sleep(self._rng.uniform(*self._plan.down_seconds))
        for victim in victims:
            self._rack.restart(victim)

    def _postgres_down(self, forced: bool) -> float:
        deadline = self._rack.settings.region_deadline_seconds
        longest = deadline + self._plan.beyond_deadline_seconds[1]
        outlasted = any(outage > deadline for outage in self.postgres_outages)
        # The last forced PostgreSQL outage outlasts the deadline if none did before.
        last_forced = forced and not (self._pending & POSTGRES_FAULTS)
        if last_forced and not outlasted:
            return deadline + self._rng.uniform(*self._plan.beyond_deadline_seconds)
        return self._rng.uniform(self._plan.postgres_down_min, longest)

    async def _postgres_outage(self, fault: Fault, down: float) -> None:
        began = time.monotonic()
        deadline = self._rack.settings.region_deadline_seconds
        if fault is Fault.POSTGRES_STOP:
            kind, how = "postgres stop", "pg_ctl stop -m immediate"
            outage = await self._rack.stop_postgres(down)
        else:
            kind = "postgres sigkill"
            outage, killed = await self._rack.kill_postgres(down)
            how = f"SIGKILL of {killed}"
        self.postgres_outages.append(outage)
        longer = "longer" if outage > deadline else "shorter"
        self._ledger.fault(
            kind,
            f"{how}; down {outage:.1f}s, {longer} than the region deadline ({deadline:g}s)",
            at=began,
        )

    async def _db_primary_kill(self) -> None:
        lost_at = datetime.now(UTC)
        began = time.monotonic()
        down = self._rng.uniform(*self._plan.db_node_down_seconds)
        lost, promoted, failover = await self._rack.kill_db_primary(down)
        self.failovers.append((lost_at, lost_at + timedelta(seconds=failover), "database"))
        self._ledger.fault(
            "database primary lost",
            f"{lost} SIGKILLed (Patroni and postmaster); {promoted} took writes after "
            f"{failover:.1f}s; the lost node started again after {down:.1f}s",
            at=began,
        )

    async def _broker_node_loss(self, *, clean: bool) -> None:
        lost_at = datetime.now(UTC)
        began = time.monotonic()
        down = self._rng.uniform(*self._plan.broker_node_down_seconds)
        lost, leader, failover = await self._rack.lose_broker_node(
            down, clean=clean, pick=self._rng.random()
        )
        self.failovers.append((lost_at, lost_at + timedelta(seconds=failover), "broker"))
        self._ledger.fault(
            "broker node stopped" if clean else "broker node killed",
            f"{lost} {'stopped cleanly' if clean else 'SIGKILLed'}; nexus.events led by "
            f"{leader} after {failover:.1f}s; started again after {down:.1f}s",
            at=began,
        )

    async def _freeze(self) -> None:
        victim = self._rng.choice(self._rack.nexus_names)
        lease = self._rack.settings.lease_seconds
        seconds = lease + self._rng.uniform(*self._plan.freeze_beyond_lease_seconds)
        self._ledger.fault(
            "sigstop nexus", f"{victim} for {seconds:.1f}s (lease {lease:g}s), then SIGCONT"
        )
        await self._rack.freeze(victim, seconds)

    async def _skew(self) -> None:
        victim = self._rng.choice(self._rack.nexus_names)
        skew = f"{self._rng.choice('+-')}{self._plan.skew_seconds}s"
        self._ledger.fault("clock skew nexus", f"{victim} SIGKILLed, started with FAKETIME={skew}")
        await self._rack.restart_skewed(victim, skew)

    async def _expunge(self) -> None:
        """Lose a storage sled for good, then expunge it as an operator would."""
        assert self._expunge_sled is not None, "the sled-expunge fault needs the API"
        assert self.expunged is None, "one sled expunge per run"
        victim = self._rng.choice(sorted(self._rack.storage_only()))
        sled_id = self._rack.sled_of(victim)
        began = time.monotonic()
        await self._rack.lose([victim])
        self.expunged_agent = victim
        self.expunged = await self._expunge_sled(sled_id)
        self.expunged_answered_at = time.monotonic()
        self._ledger.fault(
            "sled expunge",
            f"{victim} (sled {sled_id}) SIGKILLed for good, sled expunged: "
            f"{self.expunged.datasets_expunged} dataset(s), "
            f"{self.expunged.replacements_requested} region replacement(s) filed",
            at=began,
        )

    async def _fill(self) -> None:
        candidates = [
            name
            for name, disk in self._rack.disks.items()
            if not disk.full and name not in self._rack.lost
        ]
        if not candidates:
            await self._kill_and_restart()
            return
        victim = self._rng.choice(sorted(candidates))
        seconds = self._rng.uniform(*self._plan.full_seconds)
        began = time.monotonic()
        filled = await self._rack.fill_disk(victim)
        size = self._rack.disks[victim].size_bytes
        self._ledger.fault(
            "disk full crucible",
            f"{victim}: {filled / 2**20:.1f} MiB filler on its {size / 2**20:g} MiB tmpfs, "
            f"emptied after {seconds:.1f}s",
            at=began,
        )
        self._emptying.append(asyncio.create_task(self._empty_later(victim, seconds, began)))

    async def _empty_later(self, name: str, seconds: float, began: float) -> None:
        try:
            await asyncio.sleep(seconds)
        finally:
            await self._rack.empty_disk(name)
            self._ledger.full_windows.append((name, began, time.monotonic()))

    def _restart_the_unexpectedly_dead(self) -> None:
        self._rack.note_exits()
        self._rack.start_all()


def describe(faults: Iterable[Fault]) -> str:
    return ", ".join(sorted(fault.value for fault in faults)) or "none"
