"""``next_move``: every transition of docs/engine.md, from a table, without a database.

The saga below has three stages: ``a``, then ``b`` and ``c`` side by side, then ``d``.
Each row is one transition: where the saga stands, what happened, and the move that
must follow (with the position it carries).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

import pytest

from nexus.db.states import SagaState
from nexus.saga.definition import Reconciled
from nexus.saga.moves import (
    CheckEvents,
    DeadlineAnswer,
    EventsIn,
    Fail,
    Failed,
    Finish,
    Move,
    Outcome,
    Park,
    Rearm,
    Resend,
    Resume,
    Run,
    Stop,
    Stuck,
    Succeeded,
    Undo,
    UndoFailed,
    Undone,
    UndoWaits,
    WaitsOn,
    next_move,
)
from nexus.saga.position import Position, WaitingNode

SHAPE = (("a",), ("b", "c"), ("d",))
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
TERM = timedelta(seconds=60)


def wait(*, rearms: int | None = 1, asked: int = 0) -> WaitingNode:
    return WaitingNode(
        keys=("region:1:created",),
        since=NOW - TERM,
        deadline=NOW - timedelta(seconds=1),
        rearms=rearms,
        min_generation=0,
        timeout=TERM,
        asked=asked,
    )


def at(
    state: SagaState = SagaState.RUNNING,
    stage: int = 0,
    completed: str = "",
    waiting: str = "",
    undone: str = "",
    **changes: Any,
) -> Position:
    """A position from short strings: ``completed="ab"`` means nodes a and b."""
    return Position(
        state=state,
        stage=stage,
        completed=tuple(completed),
        waiting={node: wait() for node in waiting},
        undone=tuple(undone),
        **changes,
    )


RUNNING, WAITING, UNWINDING = SagaState.RUNNING, SagaState.WAITING, SagaState.UNWINDING


@dataclass(frozen=True)
class Row:
    position: Position
    outcome: Outcome | None
    move: Move


TRANSITIONS: dict[str, Row] = {
    # A step begins: decide from the position alone.
    "a new saga runs its first node": Row(at(), None, Run("a", at())),
    "a completed stage moves the saga to the next": Row(
        at(completed="a"), None, Run("b", at(stage=1, completed="a"))
    ),
    "a woken saga checks which events are in": Row(
        at(WAITING, 1, "a", waiting="bc"), None, CheckEvents(at(WAITING, 1, "a", waiting="bc"))
    ),
    "every node done: the saga is done": Row(
        at(stage=2, completed="abcd"), None, Finish(at(SagaState.DONE, 3, "abcd"))
    ),
    "unwinding undoes the newest completed node": Row(
        at(UNWINDING, 1, "ab"), None, Undo("b", at(UNWINDING, 1, "ab"))
    ),
    "unwinding skips what is already undone": Row(
        at(UNWINDING, 1, "ab", undone="b"), None, Undo("a", at(UNWINDING, 1, "ab", undone="b"))
    ),
    "nothing left to undo: the saga is undone": Row(
        at(UNWINDING, 1, "ab", undone="ba"),
        None,
        Finish(at(SagaState.UNDONE, 1, "ab", undone="ba")),
    ),
    "a done saga does not move": Row(
        at(SagaState.DONE, 3, "abcd"), None, Stop(at(SagaState.DONE, 3, "abcd"))
    ),
    "an undone saga does not move": Row(at(SagaState.UNDONE), None, Stop(at(SagaState.UNDONE))),
    "a stuck saga waits for an operator": Row(at(SagaState.STUCK), None, Stop(at(SagaState.STUCK))),
    "an unrecoverable saga is skipped": Row(
        at(SagaState.UNRECOVERABLE), None, Stop(at(SagaState.UNRECOVERABLE))
    ),
    # A node's action or resume returned an output.
    "an output moves on to the next stage": Row(
        at(), Succeeded("a"), Run("b", at(stage=1, completed="a"))
    ),
    "an output starts the node's sibling": Row(
        at(stage=1, completed="a"), Succeeded("b"), Run("c", at(stage=1, completed="ab"))
    ),
    "an output beside a waiting sibling checks the events": Row(
        at(stage=1, completed="a", waiting="c"),
        Succeeded("b"),
        CheckEvents(at(stage=1, completed="ab", waiting="c")),
    ),
    "a resumed node's output ends its wait": Row(
        at(stage=1, completed="ac", waiting="b"),
        Succeeded("b"),
        Run("d", at(stage=2, completed="acb")),
    ),
    "the last output finishes the saga": Row(
        at(stage=2, completed="abc"), Succeeded("d"), Finish(at(SagaState.DONE, 3, "abcd"))
    ),
    # A node's action or resume returned a wait.
    "a wait starts the node's sibling": Row(
        at(stage=1, completed="a"),
        WaitsOn("b", wait()),
        Run("c", at(stage=1, completed="a", waiting="b")),
    ),
    "once every node of the stage started, check the events": Row(
        at(stage=1, completed="a", waiting="b"),
        WaitsOn("c", wait()),
        CheckEvents(at(stage=1, completed="a", waiting="bc")),
    ),
    "a node of its own stage checks the events at once": Row(
        at(), WaitsOn("a", wait()), CheckEvents(at(waiting="a"))
    ),
    # The rendezvous answered which waits an event satisfied.
    "no event is in: park": Row(
        at(stage=1, completed="a", waiting="bc"),
        EventsIn(()),
        Park(at(WAITING, 1, "a", waiting="bc")),
    ),
    "an event is in: resume its node": Row(
        at(WAITING, 1, "a", waiting="bc"),
        EventsIn(("c",)),
        Resume("c", at(RUNNING, 1, "a", waiting="bc")),
    ),
    "the oldest event resumes first": Row(
        at(WAITING, 1, "a", waiting="bc"),
        EventsIn(("c", "b")),
        Resume("c", at(RUNNING, 1, "a", waiting="bc")),
    ),
    "an event for a node that no longer waits is passed over": Row(
        at(stage=1, completed="ab", waiting="c"),
        EventsIn(("b", "c")),
        Resume("c", at(RUNNING, 1, "ab", waiting="c")),
    ),
    "only such events: park": Row(
        at(stage=1, completed="ab", waiting="c"),
        EventsIn(("b",)),
        Park(at(WAITING, 1, "ab", waiting="c")),
    ),
    # A node failed: unwinding starts, every wait is given up.
    "a failed node starts the unwinding": Row(
        at(stage=1, completed="a", waiting="c"),
        Failed("b", "boom"),
        Fail("b", "boom", at(UNWINDING, 1, "a", failed_node="b")),
    ),
    # An undo ran.
    "an undo moves on to the next older node": Row(
        at(UNWINDING, 1, "ab"), Undone("b"), Undo("a", at(UNWINDING, 1, "ab", undone="b"))
    ),
    "the last undo ends the saga undone": Row(
        at(UNWINDING, 1, "ab", undone="b"),
        Undone("a"),
        Finish(at(SagaState.UNDONE, 1, "ab", undone="ba")),
    ),
    "an undo that fails leaves the saga stuck": Row(
        at(UNWINDING, 1, "ab"),
        UndoFailed("b", "disk gone"),
        Stuck("b", "disk gone", at(SagaState.STUCK, 1, "ab")),
    ),
}

# A wait's deadline passed and its reconcile query answered.
AT_DEADLINE = at(WAITING, 1, "a", waiting="bc")
REARMED = WaitingNode(
    keys=("region:1:created",),
    since=NOW - TERM,
    deadline=NOW + TERM,
    rearms=0,
    min_generation=0,
    timeout=TERM,
    asked=1,
)
TRANSITIONS |= {
    "reconcile found the event's news: resume by reconcile": Row(
        AT_DEADLINE,
        DeadlineAnswer("b", Reconciled.resume("region:1:created", {}, 2), NOW),
        Resume("b", AT_DEADLINE.but(state=RUNNING), by_reconcile=True),
    ),
    "still on its way: re-arm for the wait's own term": Row(
        AT_DEADLINE,
        DeadlineAnswer("b", Reconciled.rearm("still creating"), NOW),
        Rearm("b", "still creating", AT_DEADLINE.with_wait("b", REARMED)),
    ),
    "still on its way: re-arm for the term reconcile asks": Row(
        AT_DEADLINE,
        DeadlineAnswer("b", Reconciled.rearm("slow", after=timedelta(seconds=5)), NOW),
        Rearm(
            "b",
            "slow",
            AT_DEADLINE.with_wait(
                "b", WaitingNode(**{**REARMED.__dict__, "deadline": NOW + timedelta(seconds=5)})
            ),
        ),
    ),
    "the agent never heard of it: send the command again": Row(
        AT_DEADLINE,
        DeadlineAnswer("b", Reconciled.resend("unknown region"), NOW),
        Resend(
            "b",
            "unknown region",
            AT_DEADLINE.with_wait(
                "b", WaitingNode(**{**wait().__dict__, "asked": 1, "resends": 1})
            ),
        ),
    ),
    "no answer: another term, spending no re-arm": Row(
        AT_DEADLINE.with_wait("b", wait(rearms=0)),
        DeadlineAnswer("b", Reconciled.unanswered("agent unreachable"), NOW),
        Rearm(
            "b",
            "agent unreachable",
            AT_DEADLINE.with_wait("b", WaitingNode(**{**REARMED.__dict__, "rearms": 0})),
        ),
    ),
    "no re-arms left: the node fails": Row(
        AT_DEADLINE.with_wait("b", wait(rearms=0)),
        DeadlineAnswer("b", Reconciled.rearm("still creating"), NOW),
        Fail(
            "b",
            "deadline passed: still creating",
            at(UNWINDING, 1, "a", failed_node="b"),
        ),
    ),
    "reconcile says it failed: the node fails": Row(
        AT_DEADLINE,
        DeadlineAnswer("b", Reconciled.fail("region failed"), NOW),
        Fail("b", "deadline passed: region failed", at(UNWINDING, 1, "a", failed_node="b")),
    ),
    "a resume without a key is no answer: the node fails": Row(
        AT_DEADLINE,
        DeadlineAnswer("b", Reconciled(Reconciled.resume("k", {}, 1).outcome), NOW),
        Fail(
            "b",
            "deadline passed: deadline passed without the event",
            at(UNWINDING, 1, "a", failed_node="b"),
        ),
    ),
}


# A wait of an undo: the saga parks as waiting with its failed node kept (here ``c``
# failed and ``b``'s undo waits for the agent to confirm a delete).
UNDO_WAITS = at(UNWINDING, 1, "ab", failed_node="c").with_wait("b", wait())
UNDO_PARKED = UNDO_WAITS.but(state=WAITING)
TRANSITIONS |= {
    "an undo that waits checks the events": Row(
        at(UNWINDING, 1, "ab", failed_node="c"),
        UndoWaits("b", wait()),
        CheckEvents(UNDO_WAITS),
    ),
    "an undo's event is not in: park, still unwinding": Row(
        UNDO_WAITS,
        EventsIn(()),
        Park(UNDO_PARKED),
    ),
    "a woken undo checks the events": Row(UNDO_PARKED, None, CheckEvents(UNDO_PARKED)),
    "an undo's event is in: resume the undo": Row(
        UNDO_PARKED, EventsIn(("b",)), Resume("b", UNDO_WAITS)
    ),
    "an undo that waited and finished moves on to the next older node": Row(
        UNDO_WAITS,
        Undone("b"),
        Undo("a", at(UNWINDING, 1, "ab", undone="b", failed_node="c")),
    ),
    "an undo's deadline, reconcile found the news: resume the undo": Row(
        UNDO_PARKED,
        DeadlineAnswer("b", Reconciled.resume("region:1:destroyed", {}, 3), NOW),
        Resume("b", UNDO_WAITS, by_reconcile=True),
    ),
    "an undo's deadline, no re-arms left: the saga is stuck": Row(
        UNDO_PARKED.with_wait("b", wait(rearms=0)),
        DeadlineAnswer("b", Reconciled.rearm("still deleting"), NOW),
        Stuck(
            "b",
            "deadline passed: still deleting",
            at(SagaState.STUCK, 1, "ab", failed_node="c"),
        ),
    ),
    "an unbounded wait re-arms for as long as the agent is still working": Row(
        AT_DEADLINE.with_wait("b", wait(rearms=None, asked=7)),
        DeadlineAnswer("b", Reconciled.rearm("still creating"), NOW),
        Rearm(
            "b",
            "still creating",
            AT_DEADLINE.with_wait(
                "b", WaitingNode(**{**REARMED.__dict__, "rearms": None, "asked": 8})
            ),
        ),
    ),
}


@pytest.mark.parametrize("name", list(TRANSITIONS))
def test_next_move(name: str) -> None:
    row = TRANSITIONS[name]
    assert next_move(SHAPE, row.position, row.outcome) == row.move


def test_every_move_and_outcome_appears_in_the_table() -> None:
    moves = {type(row.move) for row in TRANSITIONS.values()}
    outcomes = {type(row.outcome) for row in TRANSITIONS.values()}
    assert moves == set(get_args(Move))
    assert outcomes - {type(None)} == set(get_args(Outcome))


def test_every_saga_state_appears_in_the_table() -> None:
    states = {row.position.state for row in TRANSITIONS.values()}
    states |= {row.move.position.state for row in TRANSITIONS.values()}
    assert states == set(SagaState)


def test_a_position_survives_its_json() -> None:
    position = at(WAITING, 1, "a", waiting="bc", undone="", failed_node=None)
    assert Position.of(position.state, position.dump()) == position
