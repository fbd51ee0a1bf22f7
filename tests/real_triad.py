"""The saga test triad on real processes: the checks of ``tests/saga_triad.py``, with a
real Nexus replica (``tests.crashing_nexus``, its fault hooks set by command-line flags),
real crucible agents and a real sled agent over a real RabbitMQ, sagas started and the
rack judged by the real ``nexusctl``.

For one saga (a ``RealScenario``), each case restarts only the Nexus process, with the
flags the case needs, and runs the saga once on inputs of its own (its own disk or
snapshot names):

    succeeds           no fault: ``done``, in the scenario's end state, doctor exit 0
    actions_twice      ``--repeat-actions``: every action run twice, still ``done``, the
                       same end state as a plain run, doctor exit 0
    fails_at NODE      ``--fail-node SAGA:NODE``, for every node of the saga's definition:
                       ``undone``, only NODE failed, no wait held, and the world as
                       before (the scenario may define its clean slate otherwise, from
                       the saga's design), doctor exit 0
    undos_twice        ``--fail-node SAGA:<last node> --repeat-undos``: every undo run
                       twice, still a clean slate, doctor exit 0

The world compared before and after is Nexus's resource rows (read from its SQLite
database; ``updated_at`` aside) and what the agents themselves say they hold: each
crucible agent's regions that are not destroyed, snapshots that exist and running
snapshots that are not destroyed, and the sled agent's state of each VMM Nexus knows.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nexus.saga.definition import SagaDefinition
from schemas.instance import VmmGet, VmmInfo, VmmRef
from schemas.region import RegionList, RegionListed, RegionRef
from schemas.region import RegionState as WireRegionState
from schemas.snapshot import RegionSnapshotList, RegionSnapshotsInfo
from schemas.snapshot import SnapshotState as WireSnapshotState
from schemas.topology import crucible_queue, sled_queue
from schemas.transport import Transport
from tests.processes import BIN, ApiClient, Crucible, Service, Sled, crucible, nexus

NEXUSCTL = str(BIN / "nexusctl")
PROJECT = "triad"
SOURCE = "cli/triad"

# Nexus's tables of what sagas build (those this database has); the engine's own are
# judged through the saga's view instead. A dataset's free space is Nexus's own account
# (placement reserves it, an undo gives it back), so datasets are compared too.
RESOURCE_TABLES = (
    "sleds",
    "datasets",
    "disks",
    "regions",
    "instances",
    "vmms",
    "snapshots",
    "region_snapshots",
    "region_replacement",
)
# Written by every change, heartbeat or announcement; say when, not what.
VOLATILE_COLUMNS = frozenset({"updated_at", "last_seen_at", "last_heartbeat_at"})

# kind ("disks", "held:regions", ...) -> key -> what it is.
World = Mapping[str, Mapping[Any, Any]]


def new_agent(amqp_url: str, workdir: Path, capacity_bytes: int = 1 << 40) -> Crucible:
    """A crucible agent of the rack (not started): a create takes a moment, a clone's
    copy longer, as at a real agent. A from-snapshot saga failed at a later one of its
    six parallel nodes then unwinds while the clones sent before it copy: their agents
    refuse the delete (``being cloned``) and the undo waits and deletes them again (seen
    in the agents' logs of ``fails_at:clone_1``)."""
    return crucible(
        amqp_url,
        workdir,
        create_delay="fixed:0.05",
        clone_delay="fixed:0.5",
        capacity_bytes=str(capacity_bytes),
    )


# A replica stops consuming, finishes the step at hand and exits: seconds at most.
STOP_SECONDS = 20.0


async def py_spy_dump(service: Service) -> str:
    """Where each thread of a process that does not exit is (py-spy, from the venv)."""
    assert service.process is not None
    try:
        process = await asyncio.create_subprocess_exec(
            str(BIN / "py-spy"),
            "dump",
            "--locals",
            "--pid",
            str(service.process.pid),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 30)
    except (OSError, TimeoutError) as error:
        return f"(py-spy failed: {error!r})"
    return out.decode(errors="replace")


def tail(service: Service) -> str:
    return service.log_text()[-5000:]


@dataclass(frozen=True)
class Result:
    code: int
    document: Any
    output: str


@dataclass
class Rack:
    """The processes of one test module, started once; only Nexus is restarted."""

    amqp_url: str
    database: Path
    workdir: Path
    transport: Transport
    agents: list[Crucible]
    sled: Sled
    nexus: Service | None = None
    faults: tuple[str, ...] = ()
    restarts: int = 0
    # The agents that were expunged with their sled: Nexus asks them nothing, nor do we.
    lost: set[uuid.UUID] = field(default_factory=set)

    @property
    def database_url(self) -> str:
        return f"sqlite+aiosqlite:///{self.database}"

    @property
    def client(self) -> ApiClient:
        return ApiClient(self.transport)

    async def nexus_with(self, faults: Sequence[str] = ()) -> None:
        """A Nexus replica running with exactly these fault flags: the running one if it
        has them, else a new process (the old one stopped by SIGTERM, and it must exit
        cleanly: the triad's faults are not crashes)."""
        if self.nexus is not None and self.nexus.running and tuple(faults) == self.faults:
            return
        await self.stop_nexus()
        self.restarts += 1
        self.faults = tuple(faults)
        self.nexus = nexus(
            f"triad-{self.restarts}",
            database_url=self.database_url,
            amqp_url=self.amqp_url,
            workdir=self.workdir,
            faults=faults,
        )
        self.nexus.start()

    async def stop_nexus(self) -> None:
        """SIGTERM the replica; it must exit 0 within ``STOP_SECONDS``. Whatever happens,
        the next case starts a new one (a failure here fails this case only)."""
        service, self.nexus = self.nexus, None
        if service is None:
            return
        if not service.running:
            code = await service.wait_exit()
            raise AssertionError(f"{service.name} had exited {code}:\n{tail(service)}")
        service.send(signal.SIGTERM)
        try:
            code = await service.wait_exit(timeout=STOP_SECONDS)
        except TimeoutError:
            stacks = await py_spy_dump(service)
            (self.workdir / f"{service.name.replace(' ', '-')}.stacks").write_text(stacks)
            service.send(signal.SIGKILL)
            await service.wait_exit()
            raise AssertionError(
                f"{service.name} did not exit within {STOP_SECONDS}s of SIGTERM; its "
                f"threads then:\n{stacks}\nits log:\n{tail(service)}"
            ) from None
        assert code == 0, f"{service.name} exited {code}:\n{tail(service)}"

    async def add_agent(self, capacity_bytes: int, timeout: float = 30.0) -> Crucible:
        """One more crucible agent (on a sled of its own), once Nexus has recorded its
        dataset (it announces itself as it starts)."""
        agent = new_agent(self.amqp_url, self.workdir, capacity_bytes)
        agent.service.start()
        self.agents.append(agent)
        deadline = time.monotonic() + timeout
        while not self.query("SELECT 1 FROM datasets WHERE id = ?", agent.agent_id.hex):
            assert agent.service.running, agent.service.log_text()
            assert time.monotonic() < deadline, f"Nexus did not record {agent.agent_id}"
            await asyncio.sleep(0.1)
        return agent

    async def stop_lost(self) -> None:
        """Stop the agents of expunged sleds: Nexus asks them nothing any more."""
        for agent in self.agents:
            if agent.agent_id in self.lost:
                await agent.service.stop()

    def query(self, sql: str, *parameters: Any) -> list[tuple[Any, ...]]:
        """Nexus's SQLite database, as the replica shares it (uuids as 32 hex digits)."""
        with closing(sqlite3.connect(self.database, timeout=30)) as connection:
            return connection.execute(sql, parameters).fetchall()

    async def ctl(self, *args: str, timeout: float = 120.0) -> Result:
        """``nexusctl ARGS --output json`` as a real process."""
        process = await asyncio.create_subprocess_exec(
            NEXUSCTL,
            *args,
            "--amqp-url",
            self.amqp_url,
            "--output",
            "json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError(f"nexusctl {' '.join(args)} ran over {timeout}s") from None
        text = stdout.decode()
        document = json.loads(text) if text.strip() else None
        assert process.returncode is not None
        return Result(process.returncode, document, text + stderr.decode())

    async def ok(self, *args: str) -> Any:
        result = await self.ctl(*args)
        assert result.code == 0, f"nexusctl {' '.join(args)}: {result.output}"
        return result.document

    async def doctor(self) -> Result:
        return await self.ctl("doctor", "--timeout", "5")

    async def healthy(self) -> None:
        report = await self.doctor()
        assert report.code == 0, f"doctor exit {report.code}: {report.output}"

    async def world(self) -> World:
        """Nexus's resource rows and what the agents hold, at one moment (the rack is
        quiet: no saga runs)."""
        rows = self.rows()
        vmms = [(uuid.UUID(row["id"]), uuid.UUID(row["sled_id"])) for row in rows["vmms"].values()]
        return {**rows, **(await self.held(vmms))}

    def rows(self) -> dict[str, dict[Any, dict[str, Any]]]:
        found: dict[str, dict[Any, dict[str, Any]]] = {}
        with closing(sqlite3.connect(self.database, timeout=30)) as connection:
            connection.row_factory = sqlite3.Row
            tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master")}
            for table in RESOURCE_TABLES:
                if table not in tables:
                    continue
                info = connection.execute(f"PRAGMA table_info({table})").fetchall()
                key = [
                    column["name"] for column in sorted(info, key=lambda c: c["pk"]) if column["pk"]
                ]
                found[table] = {}
                for row in connection.execute(f"SELECT * FROM {table}"):
                    columns = zip(row.keys(), row, strict=True)
                    values = {k: v for k, v in columns if k not in VOLATILE_COLUMNS}
                    row_key = values[key[0]] if len(key) == 1 else tuple(values[k] for k in key)
                    found[table][row_key] = values
        return found

    async def held(self, vmms: Iterable[tuple[uuid.UUID, uuid.UUID]]) -> World:
        """What the agents say they hold: each answers for itself, on its own queue."""
        regions: dict[Any, Any] = {}
        snapshots: dict[Any, Any] = {}
        running: dict[Any, Any] = {}
        live_agents = [a for a in self.agents if a.agent_id not in self.lost]
        listings = await asyncio.gather(
            *(
                self.transport.request(
                    RegionList(source=SOURCE),
                    routing_key=crucible_queue(agent.agent_id),
                    timeout=10,
                )
                for agent in live_agents
            )
        )
        asked = []
        for agent, listing in zip(live_agents, listings, strict=True):
            assert isinstance(listing, RegionListed), listing
            for region in listing.payload.regions:
                if region.state is not WireRegionState.DESTROYED:
                    regions[region.id] = (agent.agent_id, region.state.value, region.read_only)
                    asked.append((agent.agent_id, region.id))
        infos = await asyncio.gather(
            *(
                self.transport.request(
                    RegionSnapshotList(source=SOURCE, payload=RegionRef(id=region_id)),
                    routing_key=crucible_queue(agent_id),
                    timeout=10,
                )
                for agent_id, region_id in asked
            )
        )
        for info in infos:
            assert isinstance(info, RegionSnapshotsInfo), info
            for snapshot in info.payload.snapshots:
                if snapshot.state is WireSnapshotState.CREATED:
                    snapshots[(snapshot.region_id, snapshot.name)] = snapshot.state.value
            for run in info.payload.running_snapshots:
                if run.state is not WireRegionState.DESTROYED:
                    running[(run.id, run.name)] = (run.state.value, run.port_number)
        vmm_states: dict[Any, Any] = {}
        for vmm_id, sled_id in vmms:
            reply = await self.transport.request(
                VmmGet(source=SOURCE, payload=VmmRef(id=vmm_id)),
                routing_key=sled_queue(sled_id),
                timeout=10,
            )
            assert isinstance(reply, VmmInfo), reply
            found = reply.payload.vmm
            vmm_states[vmm_id] = None if found is None else found.state.value
        return {
            "held:regions": regions,
            "held:snapshots": snapshots,
            "held:running_snapshots": running,
            "held:vmms": vmm_states,
        }


def changed(before: World, after: World) -> dict[str, set[Any]]:
    """The keys of each kind that appeared, went or changed."""
    found: dict[str, set[Any]] = {}
    for kind in before.keys() | after.keys():
        old, new = before.get(kind, {}), after.get(kind, {})
        keys = {key for key in old.keys() | new.keys() if old.get(key) != new.get(key)}
        if keys:
            found[kind] = keys
    return found


def describe(before: World, after: World) -> str:
    lines = []
    for kind, keys in sorted(changed(before, after).items()):
        for key in keys:
            lines.append(
                f"{kind} {key}: {before.get(kind, {}).get(key)} -> {after.get(kind, {}).get(key)}"
            )
    return "\n  ".join(sorted(lines))


def assert_as_before(before: World, after: World) -> None:
    assert not changed(before, after), "the world changed:\n  " + describe(before, after)


def assert_changed_only(before: World, after: World, expected: Mapping[str, set[Any]]) -> None:
    """Exactly ``expected`` changed (kinds with no keys left out)."""
    wanted = {kind: keys for kind, keys in expected.items() if keys}
    assert changed(before, after) == wanted, (
        f"expected changes in {sorted(wanted)}; the world changed:\n  " + describe(before, after)
    )


# A scenario: how to make inputs for one saga's cases, start the saga through nexusctl,
# and what it leaves.

# (rack, case ids) -> each case's input; run once per saga, on a Nexus without faults.
Prepare = Callable[[Rack, Sequence[str]], Awaitable[Mapping[str, Any]]]
# (input) -> the nexusctl arguments that start the saga.
Start = Callable[[Any], Sequence[str]]
# (rack, input, world before, world after): asserts the end state of a ``done`` saga.
Done = Callable[[Rack, Any, World, World], Awaitable[None]]
# (rack, input, world before, world after, failed node): asserts the clean slate.
Unwound = Callable[[Rack, Any, World, World, str], Awaitable[None]]


async def as_before(rack: Rack, item: Any, before: World, after: World, node: str) -> None:
    assert_as_before(before, after)
    await rack.healthy()


def saga_of_operation(document: Any) -> uuid.UUID:
    """The saga a ``nexusctl`` create or delete started (its JSON output)."""
    return uuid.UUID(document["saga_id"])


@dataclass(frozen=True)
class RealScenario:
    definition: SagaDefinition[Any]
    prepare: Prepare
    start: Start
    done: Done
    unwound: Unwound = as_before
    # Run for each case on the case's Nexus, before the world is taken: what the saga
    # acts on, when it cannot be made beforehand; returns the case's input.
    setup_case: Callable[[Rack, Any], Awaitable[Any]] | None = None
    # The saga the start command started, from its JSON output.
    saga_of: Callable[[Any], uuid.UUID] = saga_of_operation
    # Flags for every Nexus that fails this saga on purpose.
    failing_flags: tuple[str, ...] = ()
    # After the module's last case of this saga.
    after_all: Callable[[Rack], Awaitable[None]] | None = None
    # Tells two scenarios of one saga apart (``region_replacement[attached]``).
    variant: str = ""
    # The nodes a failure is injected at: all (None), or, for a variant that differs
    # from its saga's main scenario only in some nodes, those (to keep the module short).
    failing_nodes: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def label(self) -> str:
        return f"{self.name}[{self.variant}]" if self.variant else self.name

    def cases(self) -> list[str]:
        """The plain run, every action twice, a failure at every node of the saga's
        definition (a node added to the saga is covered), the undos twice."""
        nodes = self.definition.node_names if self.failing_nodes is None else self.failing_nodes
        assert set(nodes) <= set(self.definition.node_names), nodes
        return ["succeeds", "actions_twice", *(f"fails_at:{n}" for n in nodes), "undos_twice"]

    def faults(self, case: str) -> list[str]:
        if case == "succeeds":
            return []
        if case == "actions_twice":
            return ["--repeat-actions"]
        if case == "undos_twice":
            failing = ["--fail-node", f"{self.name}:{self.last_node}", "--repeat-undos"]
        else:
            failing = ["--fail-node", f"{self.name}:{case.removeprefix('fails_at:')}"]
        return failing + list(self.failing_flags)

    @property
    def last_node(self) -> str:
        return self.definition.node_names[-1]


@dataclass
class Prepared:
    """Each saga's inputs, made once per module (on first use)."""

    inputs: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


async def run_case(rack: Rack, prepared: Prepared, scenario: RealScenario, case: str) -> None:
    started = time.monotonic()
    if scenario.label not in prepared.inputs:
        await rack.nexus_with(())
        prepared.inputs[scenario.label] = await scenario.prepare(rack, scenario.cases())
        await rack.healthy()
    item = prepared.inputs[scenario.label][case]
    await rack.nexus_with(scenario.faults(case))
    if scenario.setup_case is not None:
        item = await scenario.setup_case(rack, item)
    before = await rack.world()
    result = await rack.ctl(*scenario.start(item), "--wait")
    assert result.document is not None, result.output
    saga = await rack.client.saga(scenario.saga_of(result.document))
    history = [(e.node, e.event) for e in saga.log]
    after = await rack.world()
    if case in ("succeeds", "actions_twice"):
        assert (result.code, saga.state) == (0, "done"), f"{saga.error}; log: {history}"
        await scenario.done(rack, item, before, after)
        await rack.healthy()
    else:
        node = scenario.last_node if case == "undos_twice" else case.removeprefix("fails_at:")
        assert result.code != 0, result.output
        assert saga.state == "undone", f"{saga.state}: {saga.error}; log: {history}"
        assert node in (saga.error or ""), saga.error
        assert [n for n, event in history if event == "failed"] == [node], history
        assert (node, "undo_finished") not in history, "the failed node's own undo is not run"
        assert saga.waiting_for == (), "an unwound saga holds no wait"
        await scenario.unwound(rack, item, before, after, node)
    if case == scenario.cases()[-1] and scenario.after_all is not None:
        await scenario.after_all(rack)
    prepared.seconds[scenario.label] = prepared.seconds.get(scenario.label, 0.0) + (
        time.monotonic() - started
    )
