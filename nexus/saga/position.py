"""Where a saga stands: a typed value, kept as JSON in ``sagas.progress``; and the saga
row as a step reads it (``SagaRow``: who the saga is, its position, its outputs).

The saga's state column and this position together say everything the engine needs to
decide its next move (``nexus.saga.moves``). Node outputs live beside it in
``sagas.node_outputs``; a node is done exactly when it is in ``completed``.

The JSON keys are the ones the engine has always written, so a saga recorded by an
older replica is read the same way.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from nexus.db.states import SagaState


@dataclass(frozen=True)
class WaitingNode:
    """A node parked on wait keys until an event arrives or its deadline passes."""

    keys: tuple[str, ...]
    # When the node first parked (a re-armed or re-parked wait keeps it).
    since: datetime
    deadline: datetime
    # How many more times reconcile may extend the deadline before the node fails
    # (None: no bound, for as long as the agent says it is still working).
    rearms: int | None
    # Only an event with a newer generation wakes the node.
    min_generation: int
    # The wait's own term: a re-arm without a term of its own extends by this much.
    timeout: timedelta
    # How many times this wait's deadline was reconciled already.
    asked: int = 0
    # How many times reconcile had the node's command sent again.
    resends: int = 0

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> WaitingNode:
        return cls(
            keys=tuple(data["keys"]),
            since=datetime.fromisoformat(data["since"]),
            deadline=datetime.fromisoformat(data["deadline"]),
            rearms=None if data.get("rearms", 0) is None else int(data.get("rearms", 0)),
            min_generation=int(data.get("min_generation", 0)),
            timeout=timedelta(seconds=float(data["timeout_seconds"])),
            asked=int(data.get("asked", 0)),
            resends=int(data.get("resends", 0)),
        )

    def dump(self) -> dict[str, Any]:
        return {
            "keys": list(self.keys),
            "since": self.since.isoformat(),
            "deadline": self.deadline.isoformat(),
            "rearms": self.rearms,
            "min_generation": self.min_generation,
            "timeout_seconds": self.timeout.total_seconds(),
            "asked": self.asked,
            "resends": self.resends,
        }


@dataclass(frozen=True)
class Position:
    """A saga's state and where it is in its definition."""

    state: SagaState = SagaState.RUNNING
    # The stage (a group of nodes run side by side) being run.
    stage: int = 0
    # Nodes parked on a wait, by name.
    waiting: Mapping[str, WaitingNode] = field(default_factory=dict)
    # Nodes in the order they completed; unwinding undoes them in reverse.
    completed: tuple[str, ...] = ()
    # Nodes already undone while unwinding.
    undone: tuple[str, ...] = ()
    # The node whose failure started the unwinding (its own undo is never run).
    failed_node: str | None = None

    @classmethod
    def of(cls, state: str, data: Mapping[str, Any]) -> Position:
        return cls(
            state=SagaState(state),
            stage=int(data.get("stage", 0)),
            waiting={
                name: WaitingNode.of(wait) for name, wait in dict(data.get("waiting", {})).items()
            },
            completed=tuple(data.get("completed", ())),
            undone=tuple(data.get("undone", ())),
            failed_node=data.get("failed_node"),
        )

    def dump(self) -> dict[str, Any]:
        """The JSON of ``sagas.progress`` (the state has a column of its own)."""
        return {
            "stage": self.stage,
            "waiting": {name: wait.dump() for name, wait in self.waiting.items()},
            "completed": list(self.completed),
            "undone": list(self.undone),
            "failed_node": self.failed_node,
        }

    @property
    def unwinding(self) -> bool:
        """Undoing, or parked in an undo that waits (a saga that failed and is not ended)."""
        return self.state is SagaState.UNWINDING or (
            self.state is SagaState.WAITING and self.failed_node is not None
        )

    def but(self, **changes: Any) -> Position:
        return replace(self, **changes)

    def with_wait(self, node: str, wait: WaitingNode) -> Position:
        return replace(self, waiting={**self.waiting, node: wait})

    def without_wait(self, node: str) -> Position:
        return replace(self, waiting={n: w for n, w in self.waiting.items() if n != node})


@dataclass(frozen=True)
class SagaRow:
    """A saga as a step read it: who it is, where it stands, what its nodes produced."""

    id: uuid.UUID
    name: str
    definition_version: int
    params: Mapping[str, Any]
    position: Position
    outputs: Mapping[str, Any]
    version: int
    error: str | None

    @property
    def state(self) -> SagaState:
        return self.position.state

    def at(self, position: Position, **changes: Any) -> SagaRow:
        """The row moved to ``position`` (and ``outputs`` or ``error`` changed)."""
        return replace(self, position=position, **changes)
