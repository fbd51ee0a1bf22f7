"""Failure and unwinding: a failed node starts the undos of completed nodes, newest first.

The failed node's own undo is never run (a step that can half-succeed puts its undo on a
no-op node before it). Each undo is a step of its own. An undo that fails leaves the
saga ``stuck``: the definition's ``on_stuck`` marks what it was building faulted, and an
operator sees it. A saga whose record this replica cannot run is marked
``unrecoverable`` and skipped; it never blocks the others.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from nexus.db.states import SagaLogEvent, SagaState
from nexus.saga.definition import ActionFailed
from nexus.saga.errors import raise_unless_the_node_failed
from nexus.saga.moves import (
    Fail,
    Failed,
    Finish,
    Stuck,
    Undo,
    UndoFailed,
    Undone,
    next_move,
    shape_of,
)
from nexus.saga.parts import Parts
from nexus.saga.position import Position, SagaRow

log = logging.getLogger(__name__)


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

    async def undo_step(self, row: SagaRow) -> SagaRow | None:
        """Undo the newest completed node not yet undone; None when the saga is let go."""
        definition, params = self._parts.resolve(row)
        shape = shape_of(definition)
        move = next_move(shape, row.position)
        if isinstance(move, Finish):
            await self.finish(row, move.position)
            return None
        assert isinstance(move, Undo), move
        node = self._parts.node(definition, move.node)
        faults = self._parts.faults
        try:
            async with self._parts.store.step(self._parts.clock.now()) as tx:
                fenced = await tx.fence(row)
                if node.undo is not None:
                    tx.log(row.id, node.name, SagaLogEvent.UNDO_STARTED, tx.now)
                    if faults.fail_undo(definition.name, node.name):
                        raise ActionFailed(f"injected undo failure at {node.name}")
                    ctx = self._parts.ctx(tx, definition, params, fenced, node.name)
                    await node.undo(ctx)
                    if faults.repeat_undos:
                        await node.undo(ctx)
                    tx.log(row.id, node.name, SagaLogEvent.UNDO_FINISHED, self._parts.clock.now())
                after = next_move(shape, fenced.position, Undone(node.name))
                if isinstance(after, Finish):
                    # The last undo ends the saga in the same transaction.
                    ended = tx.write(fenced.at(after.position), release=True)
                else:
                    return tx.write(fenced.at(after.position))
        except Exception as error:
            raise_unless_the_node_failed(error, node.name)
            await self._stuck(row, node.name, describe(error))
            return None
        self._ended(ended)
        return None

    async def _stuck(self, row: SagaRow, node: str, message: str) -> None:
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
            tx.log(
                row.id, node, SagaLogEvent.UNDO_FAILED, self._parts.clock.now(), {"error": message}
            )
            if definition.on_stuck is not None:
                await definition.on_stuck(self._parts.ctx(tx, definition, params, fenced, node))
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
