"""What a saga does next: a pure function of its position and what just happened.

``next_move(shape, position, outcome)`` folds the outcome of the last move into the
position and decides the next move; it touches no database and no broker, so every
transition is tested from a table (``tests/unit/test_saga_moves.py``). The executor
(``nexus.saga.runner``) applies the moves: it runs actions, queries the rendezvous,
writes the position. ``docs/engine.md`` draws the same transitions.

    outcome (what happened)          next move (what to do)
    -----------------------          ----------------------
    None (a step begins)             Run / CheckEvents / Finish(done) / Undo / Stop
    Succeeded(node)                  Run the next node, CheckEvents, or Finish(done)
    WaitsOn(node, wait)              Run a sibling, or CheckEvents once all have started
    EventsIn(nodes)                  Resume the first that waits, or Park
    Failed(node, error)              Fail: unwinding starts
    Undone(node)                     Undo the next, or Finish(undone)
    UndoWaits(node, wait)            CheckEvents (the undo parks unless its event is in)
    UndoFailed(node, error)          Stuck
    DeadlineAnswer(node, answer)     Resume (by reconcile), Rearm, Resend, or Fail
                                     (Stuck, for a wait of an undo)

An undo that waits parks the saga as ``waiting`` with its ``failed_node`` set: woken, it
resumes the undo (``Position.unwinding``), never a forward node.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from nexus.db.states import SagaState
from nexus.saga.definition import Outcome as Answer
from nexus.saga.definition import Reconciled, SagaDefinition
from nexus.saga.position import Position, WaitingNode

# A definition's node names, stage by stage: all ``next_move`` needs to know of it.
Shape = tuple[tuple[str, ...], ...]

# States in which a saga moves forward (running, or parked and woken).
FORWARD = (SagaState.RUNNING, SagaState.WAITING)


def shape_of(definition: SagaDefinition[Any]) -> Shape:
    return tuple(tuple(node.name for node in stage) for stage in definition.stages)


# What happened.


@dataclass(frozen=True)
class Succeeded:
    """The node's action (or resume) returned its output."""

    node: str


@dataclass(frozen=True)
class WaitsOn:
    """The node's action (or resume) returned a wait."""

    node: str
    wait: WaitingNode


@dataclass(frozen=True)
class EventsIn:
    """The waits an event (or a reconcile) has satisfied, oldest first."""

    nodes: tuple[str, ...]


@dataclass(frozen=True)
class Failed:
    node: str
    error: str


@dataclass(frozen=True)
class Undone:
    node: str


@dataclass(frozen=True)
class UndoWaits:
    """The node's undo (or its undo resume) returned a wait."""

    node: str
    wait: WaitingNode


@dataclass(frozen=True)
class UndoFailed:
    node: str
    error: str


@dataclass(frozen=True)
class DeadlineAnswer:
    """The one reconcile query made when a wait's deadline passed, and its answer."""

    node: str
    answer: Reconciled
    now: datetime


Outcome = Succeeded | WaitsOn | EventsIn | Failed | Undone | UndoWaits | UndoFailed | DeadlineAnswer


# What to do. Every move carries the position to write when it is applied.


@dataclass(frozen=True)
class Run:
    """Run the node's action."""

    node: str
    position: Position


@dataclass(frozen=True)
class CheckEvents:
    """Every node of the stage has started and some wait: which events are in?"""

    position: Position


@dataclass(frozen=True)
class Resume:
    """Resume a waiting node with the event on its key (or what reconcile found)."""

    node: str
    position: Position
    by_reconcile: bool = False


@dataclass(frozen=True)
class Park:
    """Nothing to do until an event: let the saga go (no replica holds it)."""

    position: Position


@dataclass(frozen=True)
class Finish:
    """The saga ended: ``done`` (every node ran) or ``undone`` (unwound)."""

    position: Position


@dataclass(frozen=True)
class Fail:
    """The node failed: record why and start unwinding."""

    node: str
    error: str
    position: Position


@dataclass(frozen=True)
class Undo:
    """Undo a completed node (the last one not yet undone)."""

    node: str
    position: Position


@dataclass(frozen=True)
class Stuck:
    """An undo failed: the saga stops for an operator."""

    node: str
    error: str
    position: Position


@dataclass(frozen=True)
class Rearm:
    """Reconcile said the object is still on its way: extend the node's deadline."""

    node: str
    reason: str
    position: Position


@dataclass(frozen=True)
class Resend:
    """The agent does not know the object: run the node's action again (a new command
    id, the same idempotent request) and wait anew."""

    node: str
    reason: str
    position: Position


@dataclass(frozen=True)
class Stop:
    """The saga is in no state to move (it ended, or an operator must look)."""

    position: Position


Move = Run | CheckEvents | Resume | Park | Finish | Fail | Undo | Stuck | Rearm | Resend | Stop


def next_move(shape: Shape, position: Position, outcome: Outcome | None = None) -> Move:
    """Fold ``outcome`` into ``position`` and decide what the saga does next."""
    match outcome:
        case None:
            return _decide(shape, position)
        case Succeeded(node):
            completed = position.without_wait(node).but(completed=(*position.completed, node))
            return _decide(shape, completed)
        case WaitsOn(node, wait):
            return _decide(shape, position.with_wait(node, wait))
        case EventsIn(nodes):
            ready = [node for node in nodes if node in position.waiting]
            if not ready:
                return Park(position.but(state=SagaState.WAITING))
            return Resume(ready[0], position.but(state=_moving(position)))
        case Failed(node, error):
            return _fail(position, node, error)
        case Undone(node):
            undone = position.without_wait(node).but(undone=(*position.undone, node))
            return _decide(shape, undone)
        case UndoWaits(node, wait):
            return CheckEvents(position.with_wait(node, wait))
        case UndoFailed(node, error):
            return _stuck(position, node, error)
        case DeadlineAnswer(node, answer, now):
            return _after_deadline(position, node, answer, now)
    raise AssertionError(f"not an outcome: {outcome!r}")


def _moving(position: Position) -> SagaState:
    """The state of a saga that acts again: forward, or still unwinding."""
    return SagaState.UNWINDING if position.unwinding else SagaState.RUNNING


def _decide(shape: Shape, position: Position) -> Move:
    if position.unwinding:
        if position.waiting:
            return CheckEvents(position)
        remaining = [n for n in reversed(position.completed) if n not in position.undone]
        if remaining:
            return Undo(remaining[0], position)
        return Finish(position.but(state=SagaState.UNDONE))
    if position.state not in FORWARD:
        return Stop(position)
    done = set(position.completed)
    # A stage whose every node completed moves the saga on (in the same write).
    while position.stage < len(shape) and all(n in done for n in shape[position.stage]):
        position = position.but(stage=position.stage + 1)
    if position.stage >= len(shape):
        return Finish(position.but(state=SagaState.DONE))
    stage = shape[position.stage]
    pending = next((n for n in stage if n not in done and n not in position.waiting), None)
    if pending is not None:
        return Run(pending, position)
    return CheckEvents(position)


def _fail(position: Position, node: str, error: str) -> Fail:
    return Fail(
        node,
        error,
        position.but(state=SagaState.UNWINDING, failed_node=node, waiting={}),
    )


def _stuck(position: Position, node: str, error: str) -> Stuck:
    return Stuck(node, error, position.but(state=SagaState.STUCK, waiting={}))


def _after_deadline(position: Position, node: str, answer: Reconciled, now: datetime) -> Move:
    wait = position.waiting[node]
    asked = replace(wait, asked=wait.asked + 1)
    if answer.outcome is Answer.RESUME and answer.key is not None:
        return Resume(node, position.but(state=_moving(position)), by_reconcile=True)
    if answer.outcome is Answer.RESEND:
        again = replace(asked, resends=wait.resends + 1)
        return Resend(node, answer.reason, position.with_wait(node, again))
    # Still on its way: another term, spending a re-arm; no answer at all spends none.
    # An unbounded wait (rearms None) re-arms for as long as the agent says so.
    spends = answer.outcome is Answer.REARM and wait.rearms is not None
    left = wait.rearms
    if answer.outcome is Answer.UNANSWERED or (
        answer.outcome is Answer.REARM and (left is None or left > 0)
    ):
        rearmed = replace(
            asked,
            deadline=now + (answer.after or wait.timeout),
            rearms=None if left is None else left - int(spends),
        )
        return Rearm(node, answer.reason, position.with_wait(node, rearmed))
    reason = f"deadline passed: {answer.reason or 'deadline passed without the event'}"
    if position.unwinding:
        # An undo that cannot finish: the saga stops for an operator (on_stuck).
        return _stuck(position, node, reason)
    return _fail(position, node, reason)
