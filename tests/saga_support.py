"""Running sagas in-process against a real database, with agents played by the test.

``Replica`` is one Nexus replica's executor and event intake without a broker: what it
would publish stays in the outbox table, where ``FakeCrucible`` and ``FakeSled`` read the
commands and answer with the events their agents would publish. ``Agents`` plays both
agents through: it carries out every command as the real agents would and keeps what
they hold.

Nexus believes an event only from the agent that owns its object (``nexus/events.py``),
so the fakes speak as the agent each command went to (its outbox row's queue), and the
engine's tests, whose waits are about no saga's object, place a VMM on a sled of its
own first (:func:`placed_vmm`) and speak for that sled (:func:`vmm_event`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from crucible_agent import snapshots as snapshot_rules
from crucible_agent.regions import NotFound, Refused
from nexus.db.engine import create_engine, create_sessionmaker
from nexus.db.migrate import upgrade_async
from nexus.db.models import Dataset, OutboxMessage, Saga, SagaLogEntry, Sled
from nexus.db.models import Instance as InstanceRow
from nexus.db.models import Vmm as VmmRow
from nexus.db.states import SledState
from nexus.db.states import VmmState as VmmRowState
from nexus.events import EventIngest, Ingested
from nexus.saga.clock import ManualClock
from nexus.saga.definition import (
    Ctx,
    Node,
    Reconciled,
    SagaDefinition,
    Wait,
    WakeUp,
    sequence,
)
from nexus.saga.executor import SagaExecutor
from nexus.saga.faults import Faults
from nexus.saga.metrics import EngineMetrics
from nexus.saga.outbox import Outbox
from nexus.sagas import ALL_SAGAS
from nexus.vmms import INSTANCE_STATE_OF_VMM
from schemas.base import Envelope
from schemas.common import CommandRejected, Rejection
from schemas.identity import crucible_source, queue_agent, sled_source
from schemas.instance import (
    DiskFlushed,
    Repair,
    RepairChange,
    RepairChanged,
    RepairSpec,
    RepairState,
    Vmm,
    VmmChange,
    VmmDiskFlushed,
    VmmDiskSnapshot,
    VmmEnsure,
    VmmReboot,
    VmmSpec,
    VmmState,
    VmmStateChanged,
    VmmStop,
    VolumeRepair,
)
from schemas.messages import decode
from schemas.region import (
    Region,
    RegionChange,
    RegionDelete,
    RegionEnsure,
    RegionState,
    RegionStateChanged,
)
from schemas.snapshot import (
    RegionSnapshotChange,
    RegionSnapshotCreate,
    RegionSnapshotDelete,
    RegionSnapshotStateChanged,
    RunningSnapshot,
    RunningSnapshotChange,
    RunningSnapshotRun,
    RunningSnapshotStateChanged,
    RunningSnapshotStop,
    Snapshot,
    SnapshotRef,
)
from schemas.topology import crucible_queue, sled_queue
from schemas.transport import Transport


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: AsyncEngine = create_engine(url)
        self.sessions: async_sessionmaker[AsyncSession] = create_sessionmaker(self.engine)

    @classmethod
    async def migrated(cls, url: str) -> Database:
        await upgrade_async(url)
        return cls(url)

    async def close(self) -> None:
        await self.engine.dispose()

    async def saga(self, saga_id: uuid.UUID) -> Saga:
        async with self.sessions() as session:
            saga = await session.get(Saga, saga_id)
            assert saga is not None
            return saga

    async def log(self, saga_id: uuid.UUID) -> list[SagaLogEntry]:
        async with self.sessions() as session:
            rows = await session.execute(
                select(SagaLogEntry)
                .where(SagaLogEntry.saga_id == saga_id)
                .order_by(SagaLogEntry.id)
            )
            return list(rows.scalars())

    async def outbox(self) -> list[Envelope]:
        return [message for _, message in await self.sent()]

    async def sent(self) -> list[tuple[str, Envelope]]:
        """The outbox in order, each message with its routing key (a command's queue)."""
        async with self.sessions() as session:
            rows = await session.execute(select(OutboxMessage).order_by(OutboxMessage.id))
            return [(row.routing_key, decode(row.body)) for row in rows.scalars()]

    async def add_datasets(self, count: int, free_bytes: int = 1 << 40) -> list[Dataset]:
        datasets = [
            Dataset(
                id=(dataset_id := uuid.uuid4()),
                sled_id=uuid.uuid4(),
                queue_name=crucible_queue(dataset_id),
                capacity_bytes=free_bytes,
                free_bytes=free_bytes,
                last_seen_at=ManualClock().now(),
            )
            for _ in range(count)
        ]
        async with self.sessions.begin() as session:
            session.add_all(datasets)
        return datasets


class Replica:
    """One Nexus replica's saga executor and event intake, on a shared database."""

    def __init__(
        self,
        database: Database,
        replica_id: str,
        *,
        clock: ManualClock,
        definitions: Sequence[SagaDefinition[Any]] = ALL_SAGAS,
        faults: Faults | None = None,
        lease: timedelta = timedelta(seconds=15),
        transport: Transport | None = None,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.database = database
        self.replica_id = replica_id
        self.clock = clock
        self.outbox = Outbox(clock.now)
        # What watchers were told, in order: (saga, step, node).
        self.told: list[tuple[uuid.UUID, str, str | None]] = []
        self.executor = SagaExecutor(
            sessions=database.sessions,
            definitions=definitions,
            replica_id=replica_id,
            outbox=self.outbox,
            clock=clock,
            lease=lease,
            faults=faults,
            transport=transport,
            on_progress=lambda row, step, node, detail: self.told.append((row.id, step, node)),
            metrics=metrics,
        )
        self.intake = EventIngest(database.sessions, clock.now)

    async def deliver(self, event: Envelope, *, run: bool = True) -> Ingested:
        """Consume one event as the broker would hand it over; run the saga it woke."""
        ingested = await self.intake.ingest(event)  # type: ignore[arg-type]
        if run and ingested.woken is not None:
            await self.executor.run(ingested.woken.saga_id)
        return ingested


def agent_of(queue: str) -> uuid.UUID:
    """The id of the agent commanded on ``queue`` (``crucible.<id>``, ``sled.<id>``)."""
    source = queue_agent(queue)
    assert source is not None, f"{queue} is no agent's queue"
    return uuid.UUID(source.partition("/")[2])


@dataclass
class FakeCrucible:
    """Answers region commands found in the outbox with the agent's events, speaking
    as the agent each region's commands went to."""

    database: Database
    generations: dict[uuid.UUID, int]
    # Region id to the agent whose queue its commands went to.
    owners: dict[uuid.UUID, uuid.UUID] = field(default_factory=dict)

    @classmethod
    def new(cls, database: Database) -> FakeCrucible:
        return cls(database=database, generations={})

    async def ensures(self) -> list[RegionEnsure]:
        return [m for m in await self._commands() if isinstance(m, RegionEnsure)]

    async def deletes(self) -> list[RegionDelete]:
        return [m for m in await self._commands() if isinstance(m, RegionDelete)]

    async def _commands(self) -> list[Envelope]:
        found: list[Envelope] = []
        for queue, message in await self.database.sent():
            if isinstance(message, RegionEnsure | RegionDelete):
                self.owners[message.payload.id] = agent_of(queue)
                found.append(message)
        return found

    def event(
        self, command: RegionEnsure, state: RegionState, *, agent_id: uuid.UUID | None = None
    ) -> RegionStateChanged:
        """The event of the agent the region's commands went to (a test that forges one
        names another ``agent_id``)."""
        spec = command.payload
        agent_id = agent_id or self.owners[spec.id]
        generation = self.generations.get(spec.id, 1) + 1
        self.generations[spec.id] = generation
        region = Region(
            **spec.model_dump(),
            port_number=19000 if state is RegionState.CREATED else 0,
            state=state,
            generation=generation,
            failure="injected" if state is RegionState.FAILED else None,
        )
        return RegionStateChanged(
            source=crucible_source(agent_id),
            correlation_id=command.correlation_id,
            causation_id=command.id,
            payload=RegionChange(agent_id=agent_id, region=region),
        )

    def deleted(
        self, command: RegionEnsure, state: RegionState = RegionState.DESTROYED
    ) -> RegionStateChanged:
        """The agent's event about a delete of the region ``command`` ensured:
        ``destroyed``, or ``failed`` when its destroy failed."""
        event = self.event(command, state)
        if state is not RegionState.FAILED:
            return event
        region = event.payload.region.model_copy(update={"failure": "injected destroy failure"})
        return event.model_copy(
            update={"payload": event.payload.model_copy(update={"region": region})}
        )

    async def created_events(
        self, commands: Iterable[RegionEnsure] | None = None
    ) -> list[RegionStateChanged]:
        chosen = list(commands) if commands is not None else await self.ensures()
        return [self.event(command, RegionState.CREATED) for command in chosen]


# A minimal saga for the engine's own tests: prepare, wait on a key, finish.


class WaitParams(BaseModel):
    key: str
    min_generation: int = 0
    deadline_seconds: float = 60.0
    rearms: int = 1


class Woke(BaseModel):
    key: str
    generation: int
    by_reconcile: bool


class Reconciler:
    """The reconcile query's answers, scripted by a test, and how often it was asked."""

    def __init__(self, *, answers_after: float = 0.0) -> None:
        self.answers: list[Reconciled] = []
        self.asked = 0
        # A slow agent: seconds before each answer.
        self.answers_after = answers_after

    async def __call__(self, ctx: Ctx[WaitParams], keys: Sequence[str]) -> Reconciled:
        self.asked += 1
        await asyncio.sleep(self.answers_after)
        return self.answers.pop(0) if self.answers else Reconciled.rearm("still pending")


def wait_saga(reconciler: Reconciler | None = None, version: int = 1) -> SagaDefinition[WaitParams]:
    async def prepare(ctx: Ctx[WaitParams]) -> None:
        return None

    async def wait(ctx: Ctx[WaitParams]) -> Wait:
        return Wait(
            keys=(ctx.params.key,),
            deadline=timedelta(seconds=ctx.params.deadline_seconds),
            min_generation=ctx.params.min_generation,
            rearms=ctx.params.rearms,
        )

    async def woke(ctx: Ctx[WaitParams], wake: WakeUp) -> Woke:
        return Woke(key=wake.key, generation=wake.generation, by_reconcile=wake.by_reconcile)

    async def finish(ctx: Ctx[WaitParams]) -> None:
        ctx.output("wait", Woke)

    return SagaDefinition(
        name="test_wait",
        version=version,
        params=WaitParams,
        stages=sequence(
            Node("prepare", prepare),
            Node("wait", wait, resume=woke, reconcile=reconciler),
            Node("finish", finish),
        ),
    )


_PLAYED_SLEDS = uuid.UUID("0b8f4a52-63c1-4c55-9d43-2d7f0e2f6a01")


def sled_of(vmm_id: uuid.UUID) -> uuid.UUID:
    """The sled :func:`placed_vmm` puts a VMM on, and :func:`vmm_event` speaks for by
    default."""
    return uuid.uuid5(_PLAYED_SLEDS, str(vmm_id))


async def placed_vmm(
    database: Database,
    vmm_id: uuid.UUID | None = None,
    *,
    state: VmmRowState = VmmRowState.CREATING,
    generation: int = 0,
) -> uuid.UUID:
    """A VMM Nexus placed on :func:`sled_of` it, the active VMM of an instance of its own
    (the three rows), so that events about it from that sled are believed; for tests
    whose waits are about no saga's object. Returns the VMM's id."""
    vmm_id = vmm_id or uuid.uuid4()
    instance_id = uuid.uuid4()
    sled_id = sled_of(vmm_id)
    now = ManualClock().now()
    async with database.sessions.begin() as session:
        session.add(
            Sled(
                id=sled_id,
                hostname=f"sled-{sled_id.hex[:6]}",
                queue_name=sled_queue(sled_id),
                cpus=16,
                memory_bytes=64 << 30,
                state=SledState.ACTIVE,
                last_heartbeat_at=now,
                generation=1,
            )
        )
        session.add(
            InstanceRow(
                id=instance_id,
                project="p",
                name=f"vm-{instance_id.hex[:8]}",
                ncpus=1,
                memory_bytes=1 << 30,
                active_vmm_id=vmm_id,
                state=INSTANCE_STATE_OF_VMM[state],
                generation=1,
                created_at=now,
                updated_at=now,
            )
        )
        await session.flush()
        session.add(
            VmmRow(
                id=vmm_id,
                instance_id=instance_id,
                sled_id=sled_id,
                ncpus=1,
                memory_bytes=1 << 30,
                state=state,
                generation=generation,
                created_at=now,
                updated_at=now,
            )
        )
    return vmm_id


def vmm_event(
    vmm_id: uuid.UUID,
    state: VmmState,
    generation: int,
    *,
    sled_id: uuid.UUID | None = None,
    instance_id: uuid.UUID | None = None,
) -> VmmStateChanged:
    """A VMM event, whose wait key is ``vmm:<id>:<state>``, from ``sled_id`` (by default
    :func:`sled_of` the VMM)."""
    sled_id = sled_id or sled_of(vmm_id)
    return VmmStateChanged(
        source=sled_source(sled_id),
        payload=VmmChange(
            vmm=Vmm(
                id=vmm_id,
                instance_id=instance_id or uuid.uuid4(),
                sled_id=sled_id,
                name="vm",
                ncpus=1,
                memory_bytes=1 << 30,
                state=state,
                generation=generation,
            )
        ),
    )


async def add_sleds(database: Database, count: int, cpus: int = 16) -> list[Sled]:
    sleds = [
        Sled(
            id=(sled_id := uuid.uuid4()),
            hostname=f"sled-{index}",
            queue_name=sled_queue(sled_id),
            cpus=cpus,
            memory_bytes=64 << 30,
            state=SledState.ACTIVE,
            last_heartbeat_at=ManualClock().now(),
            generation=1,
        )
        for index in range(count)
    ]
    async with database.sessions.begin() as session:
        session.add_all(sleds)
    return sleds


@dataclass
class FakeSled:
    """Answers VMM commands found in the outbox with the sled's events, speaking as the
    sled each VMM's commands went to."""

    database: Database
    generations: dict[uuid.UUID, int]
    # VMM id to the sled its commands went to (known once ``commands`` saw them).
    owners: dict[uuid.UUID, uuid.UUID] = field(default_factory=dict)

    @classmethod
    def new(cls, database: Database) -> FakeSled:
        return cls(database=database, generations={})

    async def commands(self, kind: type[Envelope]) -> list[Any]:
        found: list[Any] = []
        for queue, message in await self.database.sent():
            if type(message) in _SLED_COMMANDS:
                self.owners[message.payload.id] = agent_of(queue)  # type: ignore[attr-defined]
            if isinstance(message, kind):
                found.append(message)
        return found

    def event(self, spec: VmmSpec, state: VmmState) -> VmmStateChanged:
        """The event of the sled the VMM's commands went to."""
        generation = self.generations.get(spec.id, 0) + 1
        self.generations[spec.id] = generation
        return vmm_event(
            spec.id, state, generation, sled_id=self.owners[spec.id], instance_id=spec.instance_id
        )


# The states a sled agent moves a VMM through for each command, by the state it is in
# (None: the sled does not have it); a pair not listed is refused, as the real agent
# refuses it. An empty tuple: nothing to do (a repeated command, or a VMM that has
# ended), so no event.
_SLED_MOVES: dict[tuple[type[Envelope], VmmState | None], tuple[VmmState, ...]] = {
    (VmmEnsure, None): (VmmState.STARTING, VmmState.RUNNING),
    **{(VmmEnsure, state): () for state in VmmState},
    (VmmStop, VmmState.RUNNING): (VmmState.STOPPING, VmmState.DESTROYED),
    (VmmStop, VmmState.FAILED): (),
    (VmmStop, VmmState.DESTROYED): (),
    (VmmReboot, VmmState.RUNNING): (VmmState.REBOOTING, VmmState.RUNNING),
}
_SLED_COMMANDS = frozenset(kind for kind, _ in _SLED_MOVES)
_SNAPSHOT_COMMANDS = (
    RegionSnapshotCreate,
    RegionSnapshotDelete,
    RunningSnapshotRun,
    RunningSnapshotStop,
)


@dataclass
class Agents:
    """The crucible and sled agents, played from the outbox as the real ones behave.

    Each command is taken once, in the order Nexus wrote it: it changes what the agent
    holds and is answered with the events the real agent would publish; a command the
    real agent would refuse (a region or instance it does not have) is rejected.
    """

    database: Database
    crucible: FakeCrucible
    sled: FakeSled
    regions: dict[uuid.UUID, tuple[RegionEnsure, RegionState]] = field(default_factory=dict)
    vmms: dict[uuid.UUID, tuple[VmmSpec, VmmState]] = field(default_factory=dict)
    # Live repairs the sleds ran, by id: the command and its last state.
    repairs: dict[uuid.UUID, tuple[VolumeRepair, RepairState]] = field(default_factory=dict)
    taken: set[uuid.UUID] = field(default_factory=set)
    # A region's snapshots and running snapshots by (region, name), as the agent keeps
    # them (``crucible_agent/snapshots.py`` decides each command, as in the real agent).
    snapshots: dict[tuple[uuid.UUID, str], Snapshot] = field(default_factory=dict)
    running: dict[tuple[uuid.UUID, str], RunningSnapshot] = field(default_factory=dict)

    @classmethod
    def new(cls, database: Database) -> Agents:
        return cls(database, FakeCrucible.new(database), FakeSled.new(database))

    async def answer(self, replica: Replica) -> None:
        """Carry out every command not taken yet, delivering the events to ``replica``
        (which runs the sagas they wake), until the sagas send no more."""
        while pending := [
            (queue, message)
            for queue, message in await self.database.sent()
            if message.IS_COMMAND and message.id not in self.taken
        ]:
            for queue, command in pending:
                self.taken.add(command.id)
                for event in self._carry_out(queue, command):
                    await replica.deliver(event)

    def held(self) -> dict[str, dict[Any, str]]:
        """What the agents hold: regions that are not destroyed, VMMs that have not ended,
        snapshots that exist and running snapshots that are not destroyed."""
        return {
            "snapshots": {
                key: snapshot.state.value
                for key, snapshot in self.snapshots.items()
                if snapshot_rules.exists(snapshot)
            },
            "running_snapshots": {
                key: running.state.value
                for key, running in self.running.items()
                if snapshot_rules.live(running)
            },
            "regions": {
                region_id: state.value
                for region_id, (_, state) in self.regions.items()
                if state is not RegionState.DESTROYED
            },
            "vmms": {
                vmm_id: state.value
                for vmm_id, (_, state) in self.vmms.items()
                if state not in (VmmState.DESTROYED, VmmState.FAILED)
            },
        }

    def _carry_out(self, queue: str, command: Envelope) -> list[Envelope]:
        """What the agent of ``queue`` does with ``command``, and the events it sends."""
        match command:
            case RegionEnsure(payload=spec):
                self.crucible.owners[spec.id] = agent_of(queue)
                if spec.id in self.regions:
                    return []
                self.regions[spec.id] = (command, RegionState.CREATED)
                return [self.crucible.event(command, RegionState.CREATED)]
            case RegionDelete(payload=ref):
                if ref.id not in self.regions:
                    return [self._rejected(queue, command, "not_found")]
                if any(region == ref.id for region, _ in self.held()["snapshots"]):
                    return [self._rejected(queue, command, "has_snapshots")]
                ensure, state = self.regions[ref.id]
                if state in (RegionState.TOMBSTONED, RegionState.DESTROYED):
                    return []
                self.regions[ref.id] = (ensure, RegionState.DESTROYED)
                return [
                    self.crucible.event(ensure, RegionState.TOMBSTONED),
                    self.crucible.event(ensure, RegionState.DESTROYED),
                ]
            case _ if type(command) in _SLED_COMMANDS:
                return self._move_vmm(queue, command)
            case VmmDiskSnapshot(payload=request):
                return self._flush(queue, command, request.id, request.disk_id, request.snapshot_id)
            case _ if isinstance(command, _SNAPSHOT_COMMANDS):
                return self._snapshot_command(queue, command)
            case VolumeRepair(payload=spec):
                return self._repair(queue, command, spec)
            case _:
                raise AssertionError(f"no agent takes a {command.TYPE}")

    def _move_vmm(self, queue: str, command: Envelope) -> list[Envelope]:
        vmm_id: uuid.UUID = command.payload.id  # type: ignore[attr-defined]
        self.sled.owners[vmm_id] = agent_of(queue)
        spec, state = self.vmms.get(vmm_id, (None, None))
        if isinstance(command, VmmEnsure) and spec is None:
            spec = command.payload
        moves = _SLED_MOVES.get((type(command), state))
        if moves is None:
            code = "not_found" if state is None else "invalid_transition"
            return [self._rejected(queue, command, code)]
        assert spec is not None
        events: list[Envelope] = []
        for next_state in moves:
            self.vmms[vmm_id] = (spec, next_state)
            events.append(self.sled.event(spec, next_state))
        return events

    def _flush(
        self,
        queue: str,
        command: Envelope,
        vmm_id: uuid.UUID,
        disk_id: uuid.UUID,
        snapshot_id: uuid.UUID,
    ) -> list[Envelope]:
        """As the sled agent's ``disk_flush``: only a disk of a running VMM."""
        spec, state = self.vmms.get(vmm_id, (None, None))
        if spec is None:
            return [self._rejected(queue, command, "not_found")]
        if state is not VmmState.RUNNING:
            return [self._rejected(queue, command, "not_running")]
        if disk_id not in spec.disk_ids:
            return [self._rejected(queue, command, "disk_not_attached")]
        sled_id = agent_of(queue)
        return [
            VmmDiskFlushed(
                source=sled_source(sled_id),
                correlation_id=command.correlation_id,
                causation_id=command.id,
                payload=DiskFlushed(
                    sled_id=sled_id, vmm_id=vmm_id, disk_id=disk_id, snapshot_id=snapshot_id
                ),
            )
        ]

    def _region(self, region_id: uuid.UUID) -> Region | None:
        if region_id not in self.regions:
            return None
        ensure, state = self.regions[region_id]
        return Region(
            **ensure.payload.model_dump(),
            port_number=19000,
            state=state,
            generation=self.crucible.generations.get(region_id, 1),
        )

    def _snapshot_command(self, queue: str, command: Envelope) -> list[Envelope]:
        """The crucible agent's rules (``crucible_agent.snapshots``) on what it holds; a
        run is started and a stop finished at once, each with its two events."""
        ref: SnapshotRef = command.payload  # type: ignore[attr-defined]
        key = (ref.region_id, ref.name)
        region = self._region(ref.region_id)
        existing = self.snapshots.get(key)
        running = self.running.get(key)
        outcome: Any
        match command:
            case RegionSnapshotCreate():
                outcome = snapshot_rules.create(region, existing, ref, now=ManualClock().now())
            case RegionSnapshotDelete():
                outcome = snapshot_rules.delete(region, existing, running)
            case RunningSnapshotRun():
                ports = {
                    r.port_number for r in self.running.values() if snapshot_rules.holds_port(r)
                }
                free = next(port for port in range(19100, 20000) if port not in ports)
                outcome = snapshot_rules.run(region, existing, running, ref, free_port=free)
            case _:
                outcome = snapshot_rules.stop(region, running)
        agent_id = agent_of(queue)
        match outcome:
            case snapshot_rules.SnapshotChanged(snapshot=snapshot):
                self.snapshots[key] = snapshot
                return [self._snapshot_event(agent_id, command, snapshot)]
            case snapshot_rules.RunningChanged(running=moved):
                events: list[Envelope] = [self._running_event(agent_id, command, moved)]
                if moved.state is RegionState.REQUESTED:
                    finished: Any = snapshot_rules.start_finished(moved, None)
                else:
                    finished = snapshot_rules.stop_finished(moved)
                if isinstance(finished, snapshot_rules.RunningChanged):
                    moved = finished.running
                    events.append(self._running_event(agent_id, command, moved))
                self.running[key] = moved
                return events
            case snapshot_rules.Unchanged():
                return []
            case NotFound():
                return [self._rejected(queue, command, "not_found")]
            case Refused(code=code):
                return [self._rejected(queue, command, code)]
        raise AssertionError(f"unexpected outcome {outcome!r}")

    @staticmethod
    def _snapshot_event(
        agent_id: uuid.UUID, command: Envelope, snapshot: Snapshot
    ) -> RegionSnapshotStateChanged:
        return RegionSnapshotStateChanged(
            source=crucible_source(agent_id),
            correlation_id=command.correlation_id,
            causation_id=command.id,
            payload=RegionSnapshotChange(agent_id=agent_id, snapshot=snapshot),
        )

    @staticmethod
    def _running_event(
        agent_id: uuid.UUID, command: Envelope, running: RunningSnapshot
    ) -> RunningSnapshotStateChanged:
        return RunningSnapshotStateChanged(
            source=crucible_source(agent_id),
            correlation_id=command.correlation_id,
            causation_id=command.id,
            payload=RunningSnapshotChange(agent_id=agent_id, running_snapshot=running),
        )

    def _repair(self, queue: str, command: VolumeRepair, spec: RepairSpec) -> list[Envelope]:
        """A live repair, as the real sled runs it (sled_agent/repairs.py): started, half
        way, finished; a repeated command changes nothing."""
        if spec.id in self.repairs:
            return []
        vmm_spec, state = self.vmms.get(spec.vmm_id, (None, None))
        if vmm_spec is None or state is not VmmState.RUNNING:
            code = "not_found" if vmm_spec is None else "invalid_transition"
            return [self._rejected(queue, command, code)]
        sled_id = agent_of(queue)
        events: list[Envelope] = []
        for generation, (repair_state, progress) in enumerate(
            [(RepairState.STARTED, 0), (RepairState.PROGRESS, 50), (RepairState.FINISHED, 100)],
            start=1,
        ):
            repair = Repair(
                id=spec.id,
                sled_id=sled_id,
                vmm_id=spec.vmm_id,
                disk_id=spec.disk_id,
                old_region_id=spec.old_region_id,
                new_region_id=spec.new_region_id,
                state=repair_state,
                progress=progress,
                generation=generation,
            )
            events.append(
                RepairChanged(
                    source=sled_source(sled_id),
                    correlation_id=command.correlation_id,
                    causation_id=command.id,
                    payload=RepairChange(repair=repair),
                )
            )
            self.repairs[spec.id] = (command, repair_state)
        return events

    @staticmethod
    def _rejected(queue: str, command: Envelope, code: str) -> CommandRejected:
        source = queue_agent(queue)
        assert source is not None, f"{queue} is no agent's queue"
        return CommandRejected(
            source=source,
            correlation_id=command.correlation_id,
            causation_id=command.id,
            payload=Rejection(
                command_id=command.id,
                command_type=command.TYPE,
                code=code,
                message=f"{code}: {command.TYPE}",
            ),
        )
