"""One test triad for every saga, after Omicron's ``nexus/src/app/sagas/test_helpers.rs``.

A ``Scenario`` says, for one saga definition, how to build a world for it to act on and
what the saga leaves behind. The helpers run it, each in a world of its own:

    succeeds                          it ends ``done``, in the scenario's end state
    failure_can_unwind                a failure injected at a node unwinds to a clean slate
    actions_succeed_idempotently      every action run twice: each returns what its first
                                      run decided (else the engine fails the node), still
                                      ``done``, same end state
    failure_can_unwind_idempotently   a failure at a node, every undo run twice: clean slate

The agents are played by ``Agents``: every command a saga writes to the outbox is carried
out as the real agent would and its events are delivered, until no command is left.

A clean slate is the world as it was before the saga: the rows of every resource table
(sleds, datasets, disks, regions, instances; ``updated_at`` aside) and what the agents
hold. A saga whose design leaves something visible on failure (a deletion cannot be
undone) says instead, in its scenario's ``unwound``, what clean means for it.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel
from sqlalchemy import func, select

from nexus.db.models import Base, Saga, WaitRendezvous
from nexus.db.states import SagaLogEvent, SagaState, WaitState
from nexus.saga.clock import ManualClock
from nexus.saga.definition import SagaDefinition
from nexus.saga.faults import Faults
from nexus.sagas import ALL_SAGAS
from tests.saga_support import Agents, Database, Replica

P = TypeVar("P", bound=BaseModel)

# The tables of what sagas build; the engine's own (sagas, log, outbox, rendezvous)
# are checked through the saga's state instead.
RESOURCE_TABLES = (
    "sleds",
    "datasets",
    "disks",
    "regions",
    "instances",
    "vmms",
    "snapshots",
    "region_snapshots",
)
# Written by every change; says when, not what.
_VOLATILE_COLUMNS = frozenset({"updated_at"})

# By id (a region snapshot, which has none, by its primary key).
Rows = Mapping[Any, Mapping[str, Any]]


@dataclass(frozen=True)
class Snapshot:
    """The world at one moment: resource rows by table and id, and what the agents hold."""

    rows: Mapping[str, Rows]
    held: Mapping[str, Mapping[Any, str]]

    def row(self, table: str, row_id: uuid.UUID) -> Mapping[str, Any]:
        return self.rows[table][row_id]

    def without(self, table: str, row_id: uuid.UUID, *columns: str) -> Snapshot:
        """The same snapshot with ``columns`` of one row left out, to compare the rest."""
        row = {k: v for k, v in self.rows[table][row_id].items() if k not in columns}
        return Snapshot({**self.rows, table: {**self.rows[table], row_id: row}}, self.held)


@dataclass
class World:
    """A database and the agents around it, on one clock; its replicas run every saga,
    and the one under test as its scenario defines it."""

    database: Database
    agents: Agents
    definitions: Sequence[SagaDefinition[Any]]
    clock: ManualClock = field(default_factory=ManualClock)

    @classmethod
    def for_saga(cls, database: Database, definition: SagaDefinition[Any]) -> World:
        # The last definition of a (name, version) is the one a replica runs.
        return cls(database, Agents.new(database), (*ALL_SAGAS, definition))

    def replica(self, faults: Faults | None = None) -> Replica:
        return Replica(
            self.database, "triad", clock=self.clock, definitions=self.definitions, faults=faults
        )

    async def run(
        self, definition: SagaDefinition[P], params: P, *, replica: Replica | None = None
    ) -> uuid.UUID:
        """Start a saga and answer its commands until it sends no more."""
        replica = replica or self.replica()
        saga_id = await replica.executor.start(definition, params)
        await self.agents.answer(replica)
        return saga_id

    async def run_to_done(self, definition: SagaDefinition[P], params: P) -> uuid.UUID:
        saga_id = await self.run(definition, params)
        await assert_saga(self.database, saga_id, SagaState.DONE)
        return saga_id

    async def snapshot(self) -> Snapshot:
        rows: dict[str, Rows] = {}
        async with self.database.sessions() as session:
            for name in RESOURCE_TABLES:
                table = Base.metadata.tables[name]
                result = await session.execute(select(table))
                key = [column.name for column in table.primary_key.columns]
                rows[name] = {
                    (row.id if key == ["id"] else tuple(row._mapping[k] for k in key)): {
                        k: v for k, v in row._mapping.items() if k not in _VOLATILE_COLUMNS
                    }
                    for row in result
                }
        return Snapshot(rows, self.agents.held())


Prepare = Callable[[World], Awaitable[P]]
# (world, params, snapshot before the saga): asserts what the saga left.
Done = Callable[[World, P, Snapshot], Awaitable[None]]
# (world, params, snapshot before the saga, the node that failed): asserts a clean slate.
Unwound = Callable[[World, P, Snapshot, str], Awaitable[None]]


async def as_before(world: World, params: Any, before: Snapshot, failed_node: str) -> None:
    """The clean slate of a saga that undoes everything: the world as it was."""
    assert_same(before, await world.snapshot())


@dataclass(frozen=True)
class Scenario(Generic[P]):
    """How to run one saga: build its world and params; what success and failure leave."""

    definition: SagaDefinition[P]
    prepare: Prepare[P]
    done: Done[P]
    unwound: Unwound[P] = as_before

    @property
    def name(self) -> str:
        return self.definition.name


async def succeeds(database: Database, scenario: Scenario[Any]) -> None:
    world = World.for_saga(database, scenario.definition)
    params = await scenario.prepare(world)
    before = await world.snapshot()
    saga_id = await world.run(scenario.definition, params)
    await assert_saga(database, saga_id, SagaState.DONE)
    await scenario.done(world, params, before)


async def actions_succeed_idempotently(database: Database, scenario: Scenario[Any]) -> None:
    world = World.for_saga(database, scenario.definition)
    params = await scenario.prepare(world)
    before = await world.snapshot()
    twice = world.replica(Faults(repeat_actions=True))
    saga_id = await world.run(scenario.definition, params, replica=twice)
    await assert_saga(database, saga_id, SagaState.DONE)
    await scenario.done(world, params, before)


async def failure_can_unwind(
    database: Database, scenario: Scenario[Any], failing_node: str, *, undos_twice: bool = False
) -> None:
    world = World.for_saga(database, scenario.definition)
    params = await scenario.prepare(world)
    before = await world.snapshot()
    faults = Faults(
        fail_node=lambda saga, node: saga == scenario.name and node == failing_node,
        repeat_undos=undos_twice,
    )
    saga_id = await world.run(scenario.definition, params, replica=world.replica(faults))

    saga = await assert_saga(database, saga_id, SagaState.UNDONE)
    assert saga.error is not None and failing_node in saga.error, saga.error
    log = await database.log(saga_id)
    assert [e.node_name for e in log if e.event == SagaLogEvent.FAILED] == [failing_node]
    undone = {e.node_name for e in log if e.event == SagaLogEvent.UNDO_FINISHED}
    assert failing_node not in undone, "the failed node's own undo is not run"
    async with database.sessions() as session:
        held = await session.scalar(
            select(func.count())
            .select_from(WaitRendezvous)
            .where(
                WaitRendezvous.saga_id == saga_id,
                WaitRendezvous.state.in_([WaitState.PARKED, WaitState.READY]),
            )
        )
    assert held == 0, "an unwound saga holds no wait"
    await scenario.unwound(world, params, before, failing_node)


async def failure_can_unwind_idempotently(
    database: Database, scenario: Scenario[Any], failing_node: str
) -> None:
    await failure_can_unwind(database, scenario, failing_node, undos_twice=True)


async def assert_saga(database: Database, saga_id: uuid.UUID, state: SagaState) -> Saga:
    saga = await database.saga(saga_id)
    if saga.state != state:
        history = [(e.node_name, e.event.value) for e in await database.log(saga_id)]
        raise AssertionError(
            f"saga {saga.name} is {saga.state.value}, not {state.value}: {saga.error}; "
            f"log: {history}"
        )
    return saga


def assert_same(before: Snapshot, after: Snapshot) -> None:
    changes = differences(before, after)
    assert not changes, "the world changed:\n  " + "\n  ".join(changes)


def differences(before: Snapshot, after: Snapshot) -> list[str]:
    """What changed, one line per row or column, for a failure a reader can act on."""
    changes: list[str] = []
    for table in RESOURCE_TABLES:
        old, new = before.rows[table], after.rows[table]
        changes += [f"{table} {row_id}: gone" for row_id in old.keys() - new.keys()]
        changes += [f"{table} {row_id}: new {new[row_id]}" for row_id in new.keys() - old.keys()]
        for row_id in old.keys() & new.keys():
            changes += [
                f"{table} {row_id}: {column} {old[row_id].get(column)!r} -> {value!r}"
                for column, value in new[row_id].items()
                if old[row_id].get(column) != value
            ]
    for kind in before.held.keys() | after.held.keys():
        old_held, new_held = before.held.get(kind, {}), after.held.get(kind, {})
        changes += [
            f"agents' {kind} {held_id}: {old_held.get(held_id)} -> {new_held.get(held_id)}"
            for held_id in old_held.keys() | new_held.keys()
            if old_held.get(held_id) != new_held.get(held_id)
        ]
    return sorted(changes)
