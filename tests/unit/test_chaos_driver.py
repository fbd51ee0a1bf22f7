"""The chaos test's fault driver against a rack that only records what was done to it:
every fault of the plan happens at least once, a PostgreSQL outage outlasts the region
deadline, only the plan's faults are drawn, and one seed gives one schedule."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import uuid
from dataclasses import dataclass, field
from typing import cast

import pytest

from schemas import api
from tests.chaos.driver import CLASSIC_FAULTS, Fault, FaultDriver, FaultPlan, parse_forced
from tests.chaos.rack import Rack, RackSettings
from tests.chaos.workload import Ledger


def quick(
    forced: frozenset[Fault] = CLASSIC_FAULTS, chances: dict[Fault, float] | None = None
) -> FaultPlan:
    """The plan with no waiting between faults or within them."""
    plan = FaultPlan(
        gap_seconds=(0.0, 0.001),
        down_seconds=(0.0, 0.0),
        full_seconds=(0.0, 0.001),
        forced=forced,
    )
    return plan if chances is None else dataclasses.replace(plan, chances=chances)


@dataclass
class FakeDisk:
    size_bytes: int = 32 << 20
    full: bool = False


class FakeServer:
    def describe(self) -> str:
        return "a RabbitMQ node"


@dataclass
class FakeRack:
    settings: RackSettings = field(default_factory=RackSettings)
    server: FakeServer = field(default_factory=FakeServer)
    disks: dict[str, FakeDisk] = field(
        default_factory=lambda: {f"crucible-{n}": FakeDisk() for n in (1, 2, 3)}
    )
    done: list[tuple[str, object]] = field(default_factory=list)
    lost: set[str] = field(default_factory=set)

    @property
    def nexus_names(self) -> list[str]:
        return ["nexus-1", "nexus-2"]

    def of_kind(self, kind: str) -> list[str]:
        if kind == "nexus":
            return self.nexus_names
        if kind == "crucible":
            return [name for name in self.disks if name not in self.lost]
        return ["sled-1", "sled-2"]

    def storage_only(self) -> list[str]:
        return [name for name in self.of_kind("crucible") if name != "crucible-1"]

    def sled_of(self, name: str) -> uuid.UUID:
        return uuid.uuid5(uuid.NAMESPACE_OID, name)

    async def lose(self, names: list[str]) -> None:
        self.lost.update(names)

    async def kill(self, name: str) -> None:
        self.done.append(("kill", name))

    def restart(self, name: str) -> None:
        pass

    async def restart_rabbitmq(self, down_seconds: float) -> None:
        self.done.append(("rabbitmq", down_seconds))

    async def stop_postgres(self, down_seconds: float) -> float:
        self.done.append(("postgres stop", down_seconds))
        return down_seconds

    async def kill_postgres(self, down_seconds: float) -> tuple[float, str]:
        self.done.append(("postgres kill", down_seconds))
        return down_seconds, "postmaster 1 and 0 children"

    async def freeze(self, name: str, seconds: float) -> None:
        self.done.append(("freeze", seconds))

    async def restart_skewed(self, name: str, skew: str) -> None:
        self.done.append(("skew", skew))

    async def fill_disk(self, name: str) -> int:
        self.disks[name].full = True
        self.done.append(("fill", name))
        return self.disks[name].size_bytes

    async def empty_disk(self, name: str) -> None:
        self.disks[name].full = False

    def note_exits(self) -> None:
        pass

    def start_all(self) -> None:
        pass


def driver(rack: FakeRack, plan: FaultPlan, seed: int = 7, progress: float = 1.0) -> FaultDriver:
    async def expunge_sled(sled_id: uuid.UUID) -> api.SledExpunged:
        lost = next(name for name in rack.lost if rack.sled_of(name) == sled_id)
        rack.done.append(("expunge", lost))
        return api.SledExpunged(
            sled=api.SledView(id=sled_id),
            changed=True,
            datasets_expunged=1,
            vmms_failed=0,
            replacements_requested=2,
        )

    return FaultDriver(
        cast(Rack, rack),
        Ledger(),
        random.Random(seed),
        plan,
        progress=lambda: progress,
        expunge_sled=expunge_sled,
    )


async def run_ticks(faults: FaultDriver, seconds: float) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(faults.run(stop))
    await asyncio.sleep(seconds)
    stop.set()
    await task
    await faults.finish()


def kinds(rack: FakeRack) -> set[str]:
    return {kind for kind, _ in rack.done}


async def test_every_fault_happens_and_a_database_outage_outlasts_the_deadline() -> None:
    rack = FakeRack()
    faults = driver(rack, quick())
    await run_ticks(faults, 0.2)
    assert faults.forced_missing == []
    assert {
        "rabbitmq",
        "postgres stop",
        "postgres kill",
        "freeze",
        "skew",
        "fill",
        "expunge",
    } <= kinds(rack)
    deadline = rack.settings.region_deadline_seconds
    assert any(outage > deadline for outage in faults.postgres_outages)
    lease = rack.settings.lease_seconds
    assert all(float(str(seconds)) > lease for kind, seconds in rack.done if kind == "freeze")
    assert {skew for kind, skew in rack.done if kind == "skew"} <= {"+30s", "-30s"}
    assert not any(disk.full for disk in rack.disks.values()), "every full disk was emptied"


async def test_finish_does_the_faults_the_workload_did_not_reach() -> None:
    rack = FakeRack()
    faults = driver(rack, quick(), progress=0.0)
    await faults.finish()
    assert faults.forced_missing == []
    assert {
        "rabbitmq",
        "postgres stop",
        "postgres kill",
        "freeze",
        "skew",
        "fill",
        "expunge",
    } == kinds(rack)


async def test_only_the_plans_faults_are_drawn() -> None:
    rack = FakeRack()
    always = dict.fromkeys(Fault, 0.19)
    plan = quick(frozenset({Fault.FREEZE}), always)
    await run_ticks(driver(rack, plan), 0.2)
    assert kinds(rack) == {"freeze", "kill"}
    assert sum(kind == "freeze" for kind, _ in rack.done) > 1


async def test_one_seed_gives_one_schedule() -> None:
    async def schedule(seed: int) -> list[tuple[str, object]]:
        rack = FakeRack()
        faults = driver(rack, quick(), seed=seed, progress=0.0)
        await faults.finish()
        return rack.done

    assert await schedule(3) == await schedule(3)
    assert await schedule(3) != await schedule(4)


def test_the_faults_option() -> None:
    assert parse_forced("all") == CLASSIC_FAULTS
    assert parse_forced("none") == frozenset()
    assert parse_forced("postgres-kill, disk-full") == {Fault.POSTGRES_KILL, Fault.DISK_FULL}
    with pytest.raises(ValueError, match="unknown chaos faults"):
        parse_forced("postgres-kill,gremlins")


async def test_a_forced_fault_comes_between_sigkills() -> None:
    rack = FakeRack()
    await run_ticks(driver(rack, quick(chances={})), 0.2)
    forced = [kind != "kill" for kind, _ in rack.done]
    assert sum(forced) == len(CLASSIC_FAULTS)
    assert not any(a and b for a, b in itertools.pairwise(forced)), rack.done


async def test_the_workload_waits_at_a_due_fault_until_it_has_begun() -> None:
    rack = FakeRack()
    progress = [0.0]
    plan = dataclasses.replace(quick(frozenset({Fault.FREEZE}), {}), forced_window=(0.5, 0.5))
    faults = FaultDriver(
        cast(Rack, rack), Ledger(), random.Random(1), plan, progress=lambda: progress[0]
    )
    await asyncio.wait_for(faults.gate(), 1.0)  # nothing due yet
    progress[0] = 0.5
    waiting = asyncio.create_task(faults.gate())
    await asyncio.sleep(0.05)
    assert not waiting.done(), "the fault is due and has not begun"
    stop = asyncio.Event()
    running = asyncio.create_task(faults.run(stop))
    await asyncio.wait_for(waiting, 1.0)
    assert rack.done[0][0] == "freeze"
    stop.set()
    await running


async def test_a_driver_that_stopped_holds_nobody() -> None:
    rack = FakeRack()
    faults = driver(rack, quick(), progress=1.0)
    stop = asyncio.Event()
    stop.set()
    await faults.run(stop)
    await asyncio.wait_for(faults.gate(), 1.0)


async def test_one_storage_sled_is_expunged_and_its_agent_left_alone_after() -> None:
    """The expunge loses a crucible agent of a sled without a sled agent, once; no
    SIGKILL or full disk comes to it after."""
    rack = FakeRack()
    always = {Fault.DISK_FULL: 0.5}
    faults = driver(rack, quick(chances=always), progress=1.0)
    await run_ticks(faults, 0.3)
    expunges = [what for kind, what in rack.done if kind == "expunge"]
    assert len(expunges) == 1 and expunges[0] in rack.storage_only() + list(rack.lost)
    (lost,) = rack.lost
    assert expunges == [lost] and lost != "crucible-1"
    after = rack.done[rack.done.index(("expunge", lost)) + 1 :]
    assert after, "faults went on after the expunge"
    assert lost not in {what for _, what in after}
    assert faults.expunged is not None and faults.expunged_agent == lost
