"""Failure and unwinding: a failed node starts the undos of completed nodes, newest first.

The failed node's own undo is never run (a step that can half-succeed puts its undo on a
no-op node before it). Each undo is a step of its own. An undo may wait (a delete until
the agent confirms it): it returns a ``Wait``, the saga parks as ``waiting`` with its
``failed_node`` kept, and the event resumes the undo through its node's ``undo_resume``
(its deadline through ``undo_reconcile``). An undo that fails leaves the
saga ``stuck``: the definition's ``on_stuck`` marks what it was building faulted, and an
operator sees it. A saga whose record this replica cannot run is marked
``unrecoverable`` and skipped; it never blocks the others.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from nexus.db.states import SagaLogEvent, SagaState
from nexus.saga.definition import ActionFailed, SagaDefinition, Wait, WakeUp
from nexus.saga.errors import raise_unless_the_node_failed
from nexus.saga.moves import (
    CheckEvents,
    EventsIn,
    Fail,
    Failed,
    Finish,
    Move,
    Outcome,
    Park,
    Resume,
    Stuck,
    Undo,
    UndoFailed,
    Undone,
    UndoWaits,
    next_move,
    shape_of,
)
from nexus.saga.parts import Parts, wake_up
from nexus.saga.position import Position, SagaRow
from nexus.saga.rendezvous import ReadyWait
from nexus.saga.store import StepTx

log = logging.getLogger(__name__)


@dataclass
class _At:
    """The node an unwinding step is working on, for the error that may end it."""

    node: str | None


def describe(error: BaseException) -> str:
    """An action's own message for people; anything else as its repr."""
    return str(error) if isinstance(error, ActionFailed) else repr(error)


class Unwinder:
    def __init__(self, parts: Parts) -> None:
        self._parts = parts

    async def fail_node(self, row: SagaRow, node: str, error: BaseException) -> SagaRow:
        """Record the node's failure (its own step) and turn the saga to unwinding."""
        message = describe(error)
        log.warning(
            "saga %s node %s failed: %s", row.id, node, message, extra={"saga_id": str(row.id)}
        )
        # Whatever the failed step noted rolled back with it.
        self._parts.notices.rolled_back(row.id)
        async with self._parts.store.step(self._parts.clock.now()) as tx:
            fenced = await tx.fence(row)
            move = next_move((), fenced.position, Failed(node, message))
            assert isinstance(move, Fail)
            await tx.release_waits(row.id)
            detail: dict[str, Any] = {"error": message}
            if not isinstance(error, ActionFailed):
                detail["traceback"] = "".join(traceback.format_exception(error))[-4000:]
            tx.log(row.id, node, SagaLogEvent.FAILED, tx.now, detail)
            unwinding = tx.write(fenced.at(move.position, error=f"{node}: {message}"))
        self._parts.notices.tell(row, "failed", node, message)
        return unwinding

    async def undo_step(
        self,
        row: SagaRow,
        first: Undo | Resume | None = None,
        prepare: Callable[[StepTx], Awaitable[WakeUp | None]] | None = None,
    ) -> SagaRow | None:
        """Undo the newest completed node not yet undone, or resume the undo that waits
        (its event is in); None when the saga is let go. ``first`` and ``prepare``: the
        move a deadline decided, and what its step does first (``Deadlines``)."""
        definition, params = self._parts.resolve(row)
        shape = shape_of(definition)
        move = first or next_move(shape, row.position)
        if isinstance(move, Finish):
            await self.finish(row, move.position)
            return None
        at = _At(getattr(move, "node", None))
        try:
            async with self._parts.store.step(self._parts.clock.now()) as tx:
                fenced = await tx.fence(row)
                wake = await prepare(tx) if prepare is not None else None
                after, ended = await self._apply(tx, definition, params, fenced, move, at, wake)
        except Exception as error:
            self._parts.notices.rolled_back(row.id)
            raise_unless_the_node_failed(error, at.node)
            assert at.node is not None
            await self.stuck(row, at.node, describe(error))
            return None
        self._parts.notices.run_after_commit(row.id)
        if ended is not None:
            self._ended(ended)
        return after

    async def _apply(
        self,
        tx: StepTx,
        definition: SagaDefinition[Any],
        params: BaseModel,
        current: SagaRow,
        move: Move,
        at: _At,
        wake: WakeUp | None,
    ) -> tuple[SagaRow | None, SagaRow | None]:
        """Apply unwinding moves in ``tx``: one undo (with what its wait brings), then
        the row to go on from, or the ended row, or (None, None) when it parked."""
        shape = shape_of(definition)
        ready: list[ReadyWait] = []
        undos = 0
        while True:
            outcome: Outcome
            match move:
                case Undo(node) if undos == 0:
                    at.node, undos = node, 1
                    current = current.at(move.position)
                    outcome = await self._undo(tx, definition, params, current, node)
                case Undo():
                    # One undo per step: the next one has a step of its own.
                    return tx.write(current.at(move.position)), None
                case CheckEvents():
                    current = tx.write(current.at(move.position))
                    ready = await tx.ready(current.id)
                    outcome = EventsIn(tuple(wait.node for wait in ready))
                case Resume(node):
                    at.node, undos = node, 1
                    if wake is None:
                        wake = wake_up(next(w for w in ready if w.node == node))
                    current = tx.write(current.at(move.position))
                    outcome = await self._undo_resume(tx, definition, params, current, node, wake)
                    wake = None
                case Park():
                    log.info("saga %s parked in an undo", current.id)
                    tx.write(current.at(move.position), release=True)
                    return None, None
                case Finish():
                    return None, tx.write(current.at(move.position), release=True)
                case _:
                    raise AssertionError(f"unwinding cannot {move!r}")
            move = next_move(shape, current.position, outcome)

    async def _undo(
        self,
        tx: StepTx,
        definition: SagaDefinition[Any],
        params: BaseModel,
        row: SagaRow,
        name: str,
    ) -> Undone | UndoWaits:
        node = self._parts.node(definition, name)
        if node.undo is None:
            return Undone(name)
        faults = self._parts.faults
        tx.log(row.id, name, SagaLogEvent.UNDO_STARTED, tx.now)
        if faults.fail_undo(definition.name, name):
            raise ActionFailed(f"injected undo failure at {name}")
        ctx = self._parts.ctx(tx, definition, params, row, name)
        with self._parts.span(row, name, "undo"):
            result = await node.undo(ctx)
            if faults.repeat_undos:
                result = await node.undo(ctx)
        return await self._settle(tx, row, name, result)

    async def _undo_resume(
        self,
        tx: StepTx,
        definition: SagaDefinition[Any],
        params: BaseModel,
        row: SagaRow,
        name: str,
        wake: WakeUp,
    ) -> Undone | UndoWaits:
        node = self._parts.node(definition, name)
        if node.undo_resume is None:
            raise ActionFailed(f"the undo of {name} waited and has no undo_resume")
        await self._parts.resumed(tx, row, name, wake)
        ctx = self._parts.ctx(tx, definition, params, row, name)
        with self._parts.span(row, name, "undo_resume"):
            result = await node.undo_resume(ctx, wake)
        return await self._settle(tx, row, name, result)

    async def _settle(
        self, tx: StepTx, row: SagaRow, name: str, result: Wait | None
    ) -> Undone | UndoWaits:
        if isinstance(result, Wait):
            return UndoWaits(name, await self._parts.park(tx, row, name, result))
        tx.log(row.id, name, SagaLogEvent.UNDO_FINISHED, self._parts.clock.now())
        return Undone(name)

    async def stuck(self, row: SagaRow, node: str, message: str) -> None:
        """An undo cannot finish: the saga stops for an operator, and ``on_stuck`` marks
        what it was building faulted."""
        log.error(
            "saga %s undo of %s failed; saga is stuck: %s",
            row.id,
            node,
            message,
            extra={"saga_id": str(row.id)},
        )
        definition, params = self._parts.resolve(row)
        async with self._parts.store.step(self._parts.clock.now()) as tx:
            fenced = await tx.fence(row)
            move = next_move((), fenced.position, UndoFailed(node, message))
            assert isinstance(move, Stuck)
            # An undo that waited holds its wait rows: let them go with the saga.
            await tx.release_waits(row.id)
            tx.log(
                row.id, node, SagaLogEvent.UNDO_FAILED, self._parts.clock.now(), {"error": message}
            )
            if definition.on_stuck is not None:
                await definition.on_stuck(
                    self._parts.ctx(tx, definition, params, fenced, node),
                    f"undo of {node} failed: {message}",
                )
            error = f"{row.error}; undo of {node} failed: {message}"
            tx.write(fenced.at(move.position, error=error), release=True)
        self._parts.notices.tell(row, SagaState.STUCK.value, node, message)

    async def finish(self, row: SagaRow, position: Position) -> None:
        """Every undo ran: the saga is ``undone`` and let go."""
        async with self._parts.store.step(self._parts.clock.now()) as tx:
            fenced = await tx.fence(row)
            ended = tx.write(fenced.at(position), release=True)
        self._ended(ended)

    def _ended(self, row: SagaRow) -> None:
        log.info("saga %s %s", row.id, row.state.value, extra={"saga_id": str(row.id)})
        self._parts.notices.tell(row, row.state.value, None, row.error)

    async def mark_unrecoverable(self, row: SagaRow, reason: str) -> None:
        log.error(
            "saga %s is unrecoverable and skipped: %s",
            row.id,
            reason,
            extra={"saga_id": str(row.id)},
        )
        async with self._parts.store.step(self._parts.clock.now()) as tx:
            fenced = await tx.fence(row)
            position = fenced.position.but(state=SagaState.UNRECOVERABLE)
            tx.write(fenced.at(position, error=f"unrecoverable: {reason}"[:4000]), release=True)
