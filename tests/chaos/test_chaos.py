"""Chaos: the real rack keeps its books while its processes are SIGKILLed at random,
RabbitMQ restarts, PostgreSQL is stopped and killed, a replica is frozen past its lease
or runs with its clock 30 s off, and a crucible agent's disk fills up.

On a PostgreSQL cluster of its own, 2 Nexus replicas (2 s leases, 0.2 s sweeps, so
adoption is quick; 5 s region deadlines, so a database outage outlasts one), 4 crucible
agents (each on a small tmpfs, each on a sled of its own) and 2 sled agents, each a real
process with its own broker user: disk creates (some snapshotted, most snapshots deleted
again, some disks deleted) and instance lifecycles (create with a disk attached, stop,
start, reboot, the attached disk snapshotted and the snapshot deleted, delete, then the
disk deleted) run while a driver (``tests/chaos/driver.py``) does its faults, one of
which is a sled lost for good and expunged (its agent SIGKILLed and never started again)
while disks are ready and operations in flight. Then the faults stop, every saga must
end, and the books must balance:

- every disk and instance is in a terminal state, and ``doctor`` finds Nexus's records
  and the agents' in agreement (no orphan region, no missing one, no instance astray);
- no saga is ``stuck`` without a recorded error, none unwound on Nexus's own exception,
  and none unwound for want of space unless an agent's disk was full meanwhile;
- no request was answered with Nexus's own error (a database that is down makes a
  request wait; it is not the operator's problem);
- every region replacement the expunge filed is ``complete``; every ready disk has 3
  ``created`` regions on 3 distinct live sleds, none on the lost sled's dataset;
- no snapshot is left ``creating`` or ``deleting`` (and ``doctor``, whose findings
  include the snapshots' parts at their agents, exits 0);
- a disk create after the faults succeeds (the rack recovered);
- the dead-letter queue holds nothing (every producer here is a valid one);
- no process exited by itself;
- operations lost: 0.

Loopback only, bounded in count (``--chaos-operations``, 36 disk creates by default;
300 for the long run) and time; seeded (``--chaos-seed``), the seed printed first.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text

from nexus.db.engine import create_engine
from nexus.db.migrate import upgrade_async
from nexus.db.models import Dataset, Disk, Region
from nexus.db.states import DatasetState, DiskState
from schemas import api
from schemas.transport import Transport
from tests.chaos.driver import FaultDriver, FaultPlan, describe, parse_forced
from tests.chaos.machine import MountFailed
from tests.chaos.rack import Rack, RackSettings, build_rack, unprovision
from tests.chaos.workload import ENDED, SOURCE, Api, Ledger, Unanswered, Workload
from tests.harness.servers import PrivatePostgresCluster, RabbitMQServer
from tests.processes import BIN, libfaketime

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

TERMINAL_DISK = frozenset({"detached", "attached", "faulted"})
TERMINAL_INSTANCE = frozenset({"running", "stopped", "failed"})
# A snapshot's states in which no saga works on it.
SETTLED_SNAPSHOT = frozenset({"ready", "faulted", "destroyed"})
REPLACEMENT_DONE = "complete"
# Regions that are a disk's (not being written off or gone).
DEAD_REGION = frozenset({"destroyed", "tombstoned"})
# Four crucible agents, each on its own sled: one more than a disk's regions, so that
# every region of the sled the run expunges has a sled its disk does not use.
CRUCIBLE_AGENTS = 4
SETTLE_SECONDS = 150.0
# "node: DBAPIError('...')": a saga's error that is an exception's repr, not a node's refusal.
INTERNAL_ERROR = re.compile(r"^(\w+: )?[A-Za-z_.]*(Error|Exception)\(")
# A region (or its agent) out of space: how a disk create that landed on the full agent
# may rightly end, undone. Matched loosely: the agent's words are its own.
OUT_OF_SPACE = re.compile(
    r"out of space|no space|disk is full|ENOSPC|database or disk is full", re.I
)
# A region (or a snapshot's part) on the sled the run expunged: how a disk create or a
# snapshot create in flight at the expunge may rightly end, undone.
EXPUNGED = re.compile(r"expunged|lost with its dataset")
# After a disk was emptied, how long work that was on its way may still find it full.
FULL_AFTERMATH_SECONDS = 10.0
# One instance lifecycle per this many disk creates, each with this many power actions.
DISKS_PER_INSTANCE = 8
ACTIONS_PER_INSTANCE = 4
DISK_CONCURRENCY = 4


@dataclass
class Verdict:
    """What the books say after the faults stopped; ``lost`` must be empty."""

    lost: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    saga_states: Counter[str] = field(default_factory=Counter)
    disk_states: Counter[str] = field(default_factory=Counter)
    instance_states: Counter[str] = field(default_factory=Counter)
    snapshot_states: Counter[str] = field(default_factory=Counter)
    # The replacements of the expunged sled's regions, by state; seconds from the
    # expunge until the last was complete; attempts (sagas) they took.
    replacement_states: Counter[str] = field(default_factory=Counter)
    replacement_repairs: Counter[str] = field(default_factory=Counter)
    replacement_attempts: list[int] = field(default_factory=list)
    replaced_within_seconds: float | None = None
    # Snapshots with a part on the lost sled, deleted after the faults.
    snapshots_written_off: int = 0
    dead_letters: list[str] = field(default_factory=list)
    # Sagas that did not finish as asked, and why: legitimate outcomes under faults,
    # listed so that a run shows what the faults did.
    unwound: list[str] = field(default_factory=list)
    unwound_by_cause: Counter[str] = field(default_factory=Counter)
    internal_unwinds: list[str] = field(default_factory=list)
    internal_answers: list[str] = field(default_factory=list)

    def lose(self, what: str, why: str) -> None:
        self.lost.setdefault(what, why)


@pytest.fixture
async def rack(
    restartable_rabbitmq: RabbitMQServer,
    restartable_postgres: PrivatePostgresCluster,
    tmp_path: Path,
    chaos_seed: int,
) -> AsyncIterator[Rack]:
    # Checked before anything starts: a replica is started under libfaketime mid-run.
    try:
        libfaketime()
    except RuntimeError as exc:
        pytest.fail(f"the chaos test skews a replica's clock: {exc}", pytrace=False)
    # A cluster of the module's own, which the driver stops and kills (never the
    # session's server, which other tests share).
    database_url = restartable_postgres.create_database()
    await upgrade_async(database_url)
    built = build_rack(
        restartable_rabbitmq,
        restartable_postgres,
        database_url,
        tmp_path / "rack",
        chaos_seed,
        RackSettings(crucible_agents=CRUCIBLE_AGENTS),
    )
    try:
        try:
            built.mount_disks()
        except MountFailed as exc:
            pytest.fail(str(exc), pytrace=False)
        built.start_all()
        await built.wait_until_ready()
        yield built
    finally:
        await built.stop_all()
        built.unmount_disks()
        if restartable_postgres.log_path.exists():
            shutil.copyfile(restartable_postgres.log_path, built.logs_dir / "postgres.log")
        if not restartable_postgres.running:
            restartable_postgres.start()
        # The servers are started again even when the test failed while they were down.
        restartable_rabbitmq.start()
        unprovision(built)


async def test_the_books_balance_under_faults(
    rack: Rack,
    chaos_seed: int,
    chaos_operations: int,
    chaos_faults: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    plan = FaultPlan(forced=parse_forced(chaos_faults))
    run = await run_chaos(rack, plan, chaos_seed, chaos_operations, capsys)
    assert_books_balance(rack, run)


@dataclass
class ChaosRun:
    report: dict[str, object]
    verdict: Verdict
    ledger: Ledger
    driver: FaultDriver


async def run_chaos(
    rack: Rack,
    plan: FaultPlan,
    chaos_seed: int,
    chaos_operations: int,
    capsys: pytest.CaptureFixture[str],
) -> ChaosRun:
    """The workload beside the driver's faults, then the books audited and reported (in
    the rack's state directory and on the terminal)."""
    with capsys.disabled():
        print(
            f"\nchaos seed {chaos_seed} ({chaos_operations} disk creates; forced faults: "
            f"{describe(plan.forced)}); state in {rack.stack.health_files[0].parent}"
        )
    rng = random.Random(chaos_seed)
    ledger = Ledger()
    instances = max(2, chaos_operations // DISKS_PER_INSTANCE)
    started = time.monotonic()
    async with Transport(rack.cli_url, name="chaos-operator") as transport:
        client = Api(transport, ledger)
        workload_rng, driver_rng = random.Random(rng.random()), random.Random(rng.random())
        driver = FaultDriver(
            rack,
            ledger,
            driver_rng,
            plan,
            progress=lambda: workload.disks_submitted / chaos_operations,
            expunge_sled=client.expunge_sled,
        )
        workload = Workload(
            client,
            ledger,
            workload_rng,
            gate=driver.gate,
            # Disks from snapshots before the expunge too: a lost clone is replaced by a
            # clone (seed 1504 found it was not, RELIABILITY.md).
            may_clone=lambda: True,
        )
        stop_faults = asyncio.Event()
        faults = asyncio.create_task(driver.run(stop_faults))
        try:
            await asyncio.gather(
                workload.disk_creates(chaos_operations, DISK_CONCURRENCY),
                workload.instance_lifecycles(instances, ACTIONS_PER_INSTANCE),
            )
        finally:
            stop_faults.set()
            await faults
        await driver.finish()
        chaos_seconds = time.monotonic() - started
        # Once every fault has ended, the rack takes new work again.
        probe = await workload.create_disk("after-the-faults")
        # Snapshots with a part on the lost sled are deleted: their teardown writes that
        # part off rather than wait for its agent.
        lost_datasets = await datasets_of(rack, driver)
        written_off = [
            snapshot.name
            for snapshot in await client.snapshots()
            if snapshot.state == "ready"
            and any(part.dataset_id in lost_datasets for part in snapshot.parts)
        ]
        await asyncio.gather(*(workload.delete_snapshot(name) for name in written_off))
        verdict = await settle_and_check(rack, client, ledger, driver)
        verdict.snapshots_written_off = len(written_off)
    # A process that died while the books were checked counts too.
    rack.note_exits()
    duration = time.monotonic() - started
    if probe.final != "done":
        verdict.problems.append(f"a disk create after the faults ended {probe.final}")

    report = figures(ledger, verdict, chaos_seed, chaos_operations, chaos_seconds, duration)
    report |= {
        "faults_forced": sorted(fault.value for fault in plan.forced),
        "region_deadline_seconds": rack.settings.region_deadline_seconds,
        "lease_seconds": rack.settings.lease_seconds,
        "nexus_replicas": rack.settings.nexus_replicas,
        "crucible_agents": rack.settings.crucible_agents,
        "expunged": driver.expunged_agent,
        "postgres_outages_seconds": [round(outage, 1) for outage in driver.postgres_outages],
        "disk_full_seconds": [round(end - begin, 1) for _, begin, end in ledger.full_windows],
    }
    if driver.failovers:
        report |= {
            "failovers": [
                f"{what} {(replaced - lost).total_seconds():.1f}s"
                for lost, replaced, what in driver.failovers
            ],
            "wake_ms": await wakes_around_failovers(rack, driver.failovers),
        }
    state_dir = rack.stack.health_files[0].parent
    (state_dir / "chaos-report.json").write_text(
        json.dumps(report | {"fault_log": ledger.fault_log}, indent=2)
    )
    rendered = render(report, ledger, verdict, rack)
    (state_dir / "chaos-report.txt").write_text(rendered)
    with capsys.disabled():
        print(rendered)
    return ChaosRun(report, verdict, ledger, driver)


def assert_books_balance(rack: Rack, run: ChaosRun) -> None:
    driver, verdict, ledger = run.driver, run.verdict, run.ledger
    assert not driver.forced_missing, f"forced faults that did not happen: {driver.forced_missing}"
    assert not rack.unexpected_exits, rack.unexpected_exits
    assert not verdict.lost, f"operations lost: {verdict.lost}"
    assert not verdict.dead_letters, verdict.dead_letters
    assert not verdict.problems, verdict.problems
    # Found by this test and fixed: deadlocks between placements and deletes unwound
    # sagas, and a re-sent request could be answered differently from its first copy.
    assert not verdict.internal_unwinds, (
        f"sagas unwound by Nexus's own errors: {verdict.internal_unwinds}"
    )
    assert not ledger.retry_mismatches, (
        f"re-sent requests answered differently: {ledger.retry_mismatches}"
    )
    assert not verdict.internal_answers, (
        f"requests answered with Nexus's own error: {verdict.internal_answers}"
    )


# A wake whose event came this long after a failover ended still counts as "during": the
# replicas' retries back off for up to 5 s (schemas.tasks) before they find the new server.
FAILOVER_AFTERMATH = timedelta(seconds=5)


async def wakes_around_failovers(
    rack: Rack, failovers: list[tuple[datetime, datetime, str]]
) -> dict[str, dict[str, float] | None]:
    """Wake overhead (the agent's event → the saga resumed) of every resumed wait, split
    by whether the wake overlapped a failover (or its aftermath) or not."""
    engine = create_engine(rack.database_url)
    try:
        async with engine.connect() as connection:
            rows = (
                await connection.execute(
                    text(
                        "SELECT event_occurred_at, resumed_at FROM wait_rendezvous "
                        "WHERE resumed_at IS NOT NULL AND event_occurred_at IS NOT NULL"
                    )
                )
            ).all()
    finally:
        await engine.dispose()
    during: list[float] = []
    outside: list[float] = []
    for occurred, resumed in rows:
        wake = (resumed - occurred).total_seconds() * 1000
        # During: the wake overlapped a failover (or its aftermath), whenever it began.
        near = any(
            occurred <= replaced + FAILOVER_AFTERMATH and resumed >= lost
            for lost, replaced, _ in failovers
        )
        (during if near else outside).append(wake)
    return {"during_failovers": _percentiles(during), "outside_failovers": _percentiles(outside)}


def _percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 1)

    return {"n": len(ordered), "p50": at(0.5), "p99": at(0.99), "max": round(ordered[-1], 1)}


async def settle_and_check(rack: Rack, client: Api, ledger: Ledger, driver: FaultDriver) -> Verdict:
    """Wait (bounded) for every saga to end, every replacement of the expunged sled's
    regions to be complete (a request whose saga unwound waits for its retry with no
    saga running), and the agents to answer; then audit."""
    verdict = Verdict()
    deadline = time.monotonic() + SETTLE_SECONDS
    lost_datasets = await datasets_of(rack, driver)

    async def unsettled() -> tuple[tuple[api.SagaView, ...], list[api.ReplacementView]]:
        sagas = await client.sagas()
        ours = [r for r in await client.replacements() if r.old_dataset_id in lost_datasets]
        return sagas, ours

    sagas, replacements = await unsettled()
    while (
        any(s.state not in ENDED for s in sagas)
        or any(r.state != REPLACEMENT_DONE for r in replacements)
    ) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        sagas, replacements = await unsettled()
    check_replacements(driver, lost_datasets, replacements, verdict)
    verdict.saga_states = Counter(s.state for s in sagas)
    for saga in sagas:
        if saga.state not in ENDED:
            view = await client.saga(saga.id)
            waits = ", ".join(w.wait_key for w in view.waiting_for) if view else ""
            verdict.lose(f"saga {saga.id}", f"{saga.name} still {saga.state} {waits}")
        elif saga.state == "stuck" and not saga.error:
            verdict.lose(f"saga {saga.id}", f"{saga.name} stuck without a recorded error")
        if saga.state in ("undone", "stuck"):
            verdict.unwound.append(f"{saga.name} {saga.id} {saga.state}: {saga.error}")
            cause = unwind_cause(saga)
            verdict.unwound_by_cause[cause] += 1
            if cause == "internal":
                # A node's own refusal reads as a sentence (ActionFailed); an exception's
                # repr means the operation failed for a reason of Nexus's, not the user's.
                verdict.internal_unwinds.append(f"{saga.name} {saga.id}: {saga.error}")
            elif cause == "out of space":
                check_out_of_space(ledger, saga, verdict)
            elif cause == "region lost with the expunged sled":
                check_lost_with_the_sled(ledger, driver, saga, verdict)
        if saga.state == "unrecoverable":
            verdict.problems.append(f"saga {saga.id} {saga.name} {saga.state}: {saga.error}")

    known = {s.id: s.state for s in sagas}
    for operation in ledger.operations:
        if operation.saga_id in known and operation.final not in ENDED:
            # The workload stopped watching it before it ended; it has ended since.
            operation.final = known[operation.saga_id]
        name = f"{operation.kind} {operation.resource}"
        if operation.answer == "unanswered":
            verdict.lose(name, f"request {operation.request_id} never answered")
        elif operation.answer in ("rejected:internal", "rejected:unavailable"):
            verdict.lose(name, f"request {operation.request_id} answered {operation.answer}")
        elif operation.saga_id is not None and operation.saga_id not in known:
            verdict.lose(name, f"saga {operation.saga_id} accepted but not in Nexus's records")

    disks = await client.disks()
    verdict.disk_states = Counter(d.state.value for d in disks)
    for disk in disks:
        if disk.state not in TERMINAL_DISK:
            verdict.lose(f"disk {disk.name}", f"left {disk.state}")
    instances = await client.instances()
    verdict.instance_states = Counter(i.state for i in instances)
    for instance in instances:
        if instance.state not in TERMINAL_INSTANCE:
            verdict.lose(f"instance {instance.name}", f"left {instance.state}")
    snapshots = await client.snapshots()
    verdict.snapshot_states = Counter(s.state for s in snapshots)
    for snapshot in snapshots:
        if snapshot.state not in SETTLED_SNAPSHOT:
            verdict.lose(f"snapshot {snapshot.name}", f"left {snapshot.state}")
    check_outcomes(ledger, disks, instances, snapshots, verdict)
    if driver.expunged_agent is not None:
        await check_regions(rack, lost_datasets, verdict)

    report = await doctor_when_all_answer(client, deadline)
    if report.unreachable_agents:
        verdict.problems.append(f"doctor: unreachable {report.unreachable_agents}")
    for finding in report.findings:
        verdict.lose(f"{finding.kind} {finding.object_id}", finding.detail)
    # And as an operator would ask: the CLI, as its own broker user.
    doctor = await asyncio.create_subprocess_exec(
        str(BIN / "nexusctl"),
        "doctor",
        "--amqp-url",
        rack.cli_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output = (await doctor.communicate())[0].decode(errors="replace")
    if doctor.returncode != 0:
        verdict.problems.append(f"nexusctl doctor exited {doctor.returncode}: {output[-2000:]}")

    verdict.dead_letters = [letter.describe() for letter in await rack.dead_letters()]
    verdict.internal_answers = [
        what for code, what in ledger.error_answers if code is api.ErrorCode.INTERNAL
    ]
    return verdict


def tally(entries: list[str]) -> list[str]:
    """Equal entries once, with how many there were."""
    return [
        entry if count == 1 else f"{count} x {entry}" for entry, count in Counter(entries).items()
    ]


def unwind_cause(saga: api.SagaView) -> str:
    """Why a saga unwound, in the words of the report."""
    error = saga.error
    if not error:
        return "no error recorded"
    if INTERNAL_ERROR.match(error):
        return "internal"
    if OUT_OF_SPACE.search(error):
        return "out of space"
    if EXPUNGED.search(error):
        return "region lost with the expunged sled"
    if "deadline passed" in error:
        return "deadline"
    if "insufficient capacity" in error:
        return "insufficient capacity"
    if "refused" in error:
        return "refused by an agent"
    if saga.name.startswith("instance_"):
        # Its sled agent restarted under it (instances come back failed), or the
        # instance was not in a state the action applies to.
        return "instance not in a state for it"
    return "other"


def check_out_of_space(ledger: Ledger, saga: api.SagaView, verdict: Verdict) -> None:
    """An operation may end undone for want of space only if it ran while an agent's
    disk was full (or just after, while work on its way still found it so)."""
    operation = next((op for op in ledger.operations if op.saga_id == saga.id), None)
    if operation is None:
        return
    if not any(
        operation.submitted_at <= emptied + FULL_AFTERMATH_SECONDS
        for _, _, emptied in ledger.full_windows
    ):
        verdict.problems.append(
            f"{operation.kind} {operation.resource} unwound out of space, though it was "
            f"submitted after every full disk was emptied: {saga.error}"
        )


def check_lost_with_the_sled(
    ledger: Ledger, driver: FaultDriver, saga: api.SagaView, verdict: Verdict
) -> None:
    """A disk create may end undone because a region was lost with the expunged sled
    only if it was submitted before the expunge was answered: placement skips an
    expunged dataset. (A snapshot create may be refused until the disk's replacement
    is complete.)"""
    operation = next((op for op in ledger.operations if op.saga_id == saga.id), None)
    if operation is None or not operation.kind.startswith("disk_create"):
        return
    if driver.expunged_answered_at is None or operation.submitted_at > driver.expunged_answered_at:
        verdict.problems.append(
            f"{operation.kind} {operation.resource} unwound for a region of the expunged "
            f"sled, though it was submitted after the expunge: {saga.error}"
        )


def check_outcomes(
    ledger: Ledger,
    disks: tuple[api.DiskView, ...],
    instances: tuple[api.InstanceView, ...],
    snapshots: tuple[api.SnapshotView, ...],
    verdict: Verdict,
) -> None:
    """Each operation's end state is the resource's: a created resource exists unless
    the workload deleted it, an undone one does not."""
    live = {
        "disk": {d.name for d in disks},
        "instance": {i.name for i in instances},
        "snapshot": {s.name for s in snapshots},
    }
    deleted = {
        (op.kind.split("_")[0], op.resource)
        for op in ledger.operations
        if op.kind in ("disk_delete", "instance_delete", "snapshot_delete") and op.final == "done"
    }
    for op in ledger.operations:
        if op.kind not in (
            "disk_create",
            "disk_create_from_snapshot",
            "instance_create",
            "snapshot_create",
        ):
            continue
        kind = op.kind.split("_")[0]
        is_live = op.resource in live[kind]
        name = f"{op.kind} {op.resource}"
        if op.final == "done" and not is_live and (kind, op.resource) not in deleted:
            verdict.lose(name, "saga done, but the resource is gone")
        if op.final == "undone" and is_live:
            verdict.lose(name, "saga undone, but the resource is live")


async def datasets_of(rack: Rack, driver: FaultDriver) -> set[uuid.UUID]:
    """The datasets of the sled the run expunged (none if it expunged none)."""
    if driver.expunged_agent is None:
        return set()
    sled_id = rack.sled_of(driver.expunged_agent)
    engine = create_engine(rack.database_url)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(select(Dataset.id).where(Dataset.sled_id == sled_id))
            return set(rows.scalars())
    finally:
        await engine.dispose()


def check_replacements(
    driver: FaultDriver,
    lost_datasets: set[uuid.UUID],
    replacements: list[api.ReplacementView],
    verdict: Verdict,
) -> None:
    """The expunge happened, filed a replacement (the lost sled held regions of ready
    disks) and every one of them ended ``complete``, each on a live dataset."""
    if driver.expunged_agent is None:
        return
    if not lost_datasets:
        verdict.problems.append(f"the expunged {driver.expunged_agent} had no dataset in Nexus")
    if not replacements:
        verdict.problems.append(
            f"the expunge of {driver.expunged_agent}'s sled filed no region replacement"
        )
    verdict.replacement_states = Counter(r.state for r in replacements)
    verdict.replacement_repairs = Counter(r.repair_mode or "none" for r in replacements)
    verdict.replacement_attempts = sorted(r.attempts for r in replacements)
    for request in replacements:
        if request.state != REPLACEMENT_DONE:
            verdict.lose(
                f"region replacement {request.id}",
                f"left {request.state} (waiting for {request.waiting_for}; attempts "
                f"{request.attempts}; last failure {request.last_failure})",
            )
        elif request.new_dataset_id in lost_datasets or request.new_dataset_id is None:
            verdict.problems.append(
                f"region replacement {request.id} complete onto {request.new_dataset_id}"
            )
    done = [r.since for r in replacements if r.state == REPLACEMENT_DONE]
    if done and len(done) == len(replacements):
        filed = min(r.request_time for r in replacements)
        verdict.replaced_within_seconds = round((max(done) - filed).total_seconds(), 1)


async def check_regions(rack: Rack, lost_datasets: set[uuid.UUID], verdict: Verdict) -> None:
    """Every ready disk: 3 ``created`` writable regions on 3 distinct live sleds, and a
    disk made from a snapshot 3 ``created`` clones on 3 distinct live sleds besides, none
    on the lost sled's datasets (the volume's targets are its regions' addresses)."""
    engine = create_engine(rack.database_url)
    try:
        async with engine.connect() as connection:
            disks = (
                await connection.execute(
                    select(Disk.id, Disk.name, Disk.create_snapshot_id).where(
                        Disk.state.in_((DiskState.DETACHED, DiskState.ATTACHED))
                    )
                )
            ).all()
            regions = (
                await connection.execute(
                    select(Region.disk_id, Region.dataset_id, Region.state, Region.read_only)
                )
            ).all()
            datasets = (
                await connection.execute(select(Dataset.id, Dataset.sled_id, Dataset.state))
            ).all()
    finally:
        await engine.dispose()
    sled_of = {d.id: d.sled_id for d in datasets}
    expunged = {d.id for d in datasets if d.state == DatasetState.EXPUNGED}
    if not lost_datasets <= expunged:
        verdict.problems.append(f"the lost datasets {lost_datasets - expunged} not expunged")
    for disk_id, name, from_snapshot in disks:
        for clones in (False, True):
            what = "clones" if clones else "regions"
            expected = 3 if not clones or from_snapshot is not None else 0
            own = [
                r
                for r in regions
                if r.disk_id == disk_id and r.read_only == clones and r.state not in DEAD_REGION
            ]
            where = sorted(str(r.dataset_id)[:8] for r in own)
            if [r.state for r in own] != ["created"] * expected:
                verdict.lose(f"disk {name}", f"ready with {what} {[r.state for r in own]}")
            elif len({sled_of[r.dataset_id] for r in own}) != expected:
                verdict.lose(f"disk {name}", f"{what} on fewer than {expected} sleds: {where}")
            elif any(r.dataset_id in expunged for r in own):
                verdict.lose(f"disk {name}", f"{what} on an expunged dataset: {where}")


async def doctor_when_all_answer(client: Api, deadline: float) -> api.DoctorReport:
    """Agents restarted last may still be connecting: ask again until all answer."""
    while True:
        try:
            report = await client.doctor()
        except Unanswered:
            if time.monotonic() > deadline:
                raise
            continue
        if not report.unreachable_agents or time.monotonic() > deadline:
            return report
        await asyncio.sleep(1.0)


def figures(
    ledger: Ledger,
    verdict: Verdict,
    seed: int,
    disk_creates: int,
    chaos_seconds: float,
    duration: float,
) -> dict[str, object]:
    answers = Counter(op.answer for op in ledger.operations)
    return {
        "seed": seed,
        "disk_creates_requested": disk_creates,
        "operations_submitted": ledger.submitted,
        "operations_by_kind": dict(Counter(op.kind for op in ledger.operations)),
        "answers": dict(answers),
        "saga_outcomes": dict(Counter(op.final for op in ledger.operations if op.final)),
        "faults_injected": sum(ledger.faults.values()),
        "faults_by_kind": dict(ledger.faults),
        "operations_lost": len(verdict.lost),
        "sagas_unwound": len(verdict.unwound),
        "sagas_unwound_by_internal_errors": len(verdict.internal_unwinds),
        "saga_states": dict(verdict.saga_states),
        "disk_states": dict(verdict.disk_states),
        "instance_states": dict(verdict.instance_states),
        "snapshot_states": dict(verdict.snapshot_states),
        "replacements": dict(verdict.replacement_states),
        "replacement_repairs": dict(verdict.replacement_repairs),
        "replacement_attempts": verdict.replacement_attempts,
        "replaced_within_seconds": verdict.replaced_within_seconds,
        "snapshot_deletes_with_a_lost_part": verdict.snapshots_written_off,
        "operation_seconds_by_kind": operation_seconds(ledger),
        "sagas_unwound_by_cause": dict(verdict.unwound_by_cause),
        "answers_to_try_again": dict(Counter(code.value for code, _ in ledger.error_answers)),
        "dead_letters": len(verdict.dead_letters),
        "retry_mismatches": len(ledger.retry_mismatches),
        "chaos_seconds": round(chaos_seconds, 1),
        "duration_seconds": round(duration, 1),
        "source": SOURCE,
    }


def operation_seconds(ledger: Ledger) -> dict[str, dict[str, float]]:
    """How long each kind of operation took, submitted to its end as the workload saw
    it (p50 and max)."""
    spans: dict[str, list[float]] = {}
    for op in ledger.operations:
        if op.ended_at is not None:
            spans.setdefault(op.kind, []).append(op.ended_at - op.submitted_at)
    result = {}
    for kind, values in sorted(spans.items()):
        ordered = sorted(values)
        result[kind] = {
            "p50": round(ordered[len(ordered) // 2], 1),
            "max": round(ordered[-1], 1),
        }
    return result


def _without_id(letter: str) -> str:
    return re.sub(r"^(\S+) [0-9a-f-]{36} ", r"\1 ", letter)


def render(report: dict[str, object], ledger: Ledger, verdict: Verdict, rack: Rack) -> str:
    lines = ["", "chaos run figures:"]
    lines += [f"  {key}: {value}" for key, value in report.items()]
    lines += ["faults:", *(f"  {entry}" for entry in ledger.fault_log)]
    sections = (
        ("lost", [f"{what}: {why}" for what, why in verdict.lost.items()]),
        ("problems", verdict.problems),
        ("sagas unwound", verdict.unwound),
        ("sagas unwound by Nexus's own errors", verdict.internal_unwinds),
        ("requests answered with Nexus's own error", tally(verdict.internal_answers)),
        ("dead letters", tally([_without_id(letter) for letter in verdict.dead_letters])),
        ("re-sent requests answered differently", ledger.retry_mismatches),
        ("unexpected exits", rack.unexpected_exits),
    )
    for title, entries in sections:
        if entries:
            lines += [f"{title}:", *(f"  {entry}" for entry in entries)]
    return "\n".join(lines)
