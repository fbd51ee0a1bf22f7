"""Deadlines: when a wait's deadline passes without its event, ask once, then decide.

The node's reconcile query asks the agent for the object's current state (one request,
outside any transaction: an agent may be slow). ``next_move`` turns the answer into a
move: ``Resume`` with what the lost event would have said, ``Rearm`` the deadline
(still on its way; a wait re-arms as often as its ``rearms`` allow, or for as long as
the agent says so), ``Resend`` its command, or ``Fail`` the node. A wait of an undo asks
its node's ``undo_reconcile``, and ends ``Stuck`` where a forward one would fail.
This is the safety net under notifications, not a polling loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel

from nexus.db.states import SagaLogEvent
from nexus.saga.definition import ActionFailed, Reconcile, Reconciled, SagaDefinition, WakeUp
from nexus.saga.errors import raise_unless_the_node_failed
from nexus.saga.moves import (
    DeadlineAnswer,
    Fail,
    Move,
    Rearm,
    Resend,
    Resume,
    Run,
    Stuck,
    Undo,
    next_move,
)
from nexus.saga.parts import Parts
from nexus.saga.position import SagaRow, WaitingNode
from nexus.saga.runner import SagaRunner
from nexus.saga.store import StepTx

log = logging.getLogger(__name__)


class Deadlines:
    def __init__(self, parts: Parts, runner: SagaRunner) -> None:
        self._parts = parts
        self._runner = runner

    async def reconcile(self, row: SagaRow) -> SagaRow | None:
        """Reconcile every expired wait of a claimed saga; the row to run on from (also
        when a node failed: it unwinds), or None when it parked again or ended (what
        else expired is the next sweep's)."""
        definition, params = self._parts.resolve(row)
        now = self._parts.clock.now()
        for node_name, wait in list(row.position.waiting.items()):
            if wait.deadline >= now:
                continue
            node = self._parts.node(definition, node_name)
            unwinding = row.position.unwinding
            query = node.undo_reconcile if unwinding else node.reconcile
            answer = await self._ask(definition, params, row, node_name, query, wait)
            self._parts.metrics.reconciled(row.name, answer.outcome.value)
            log.info(
                "saga %s node %s deadline: reconcile says %s %s",
                row.id,
                node_name,
                answer.outcome.value,
                answer.reason,
                extra={"saga_id": str(row.id)},
            )
            move = next_move((), row.position, DeadlineAnswer(node_name, answer, now))
            if unwinding and not isinstance(move, Rearm):
                return await self._in_undo(row, move, answer)
            match move:
                case Resume():
                    resumed = await self._resume(definition, params, row, move, answer)
                    if resumed is None:
                        return None
                    row = resumed
                case Rearm(node=name, reason=reason):
                    row = await self._rearm(row, move, name, reason)
                case Resend():
                    resent = await self._resend(definition, params, row, move)
                    if resent is None:
                        return None
                    row = resent
                case Fail(node=name, error=error):
                    return await self._runner.unwind.fail_node(row, name, ActionFailed(error))
        return row

    async def _in_undo(self, row: SagaRow, move: Move, answer: Reconciled) -> SagaRow | None:
        """A deadline of an undo's wait: resume the undo with what reconcile found, run
        the undo again (it re-sends its commands), or leave the saga stuck."""
        match move:
            case Resume(node=name):
                key = answer.key
                assert key is not None

                async def found(tx: StepTx) -> WakeUp:
                    await tx.force_ready(key, answer.payload, answer.generation)
                    return _found(key, answer, tx)

                return await self._runner.unwind.undo_step(row, move, found)
            case Resend(node=name, reason=reason, position=position):

                async def logged(tx: StepTx) -> None:
                    data = {"rearmed": reason, "resent": True}
                    tx.log(row.id, name, SagaLogEvent.WAITING, tx.now, data)

                return await self._runner.unwind.undo_step(row, Undo(name, position), logged)
            case Stuck(node=name, error=error):
                await self._runner.unwind.stuck(row, name, error)
                return None
        raise AssertionError(f"an undo's deadline cannot {move!r}")

    async def _resume(
        self,
        definition: SagaDefinition[Any],
        params: BaseModel,
        row: SagaRow,
        move: Resume,
        answer: Reconciled,
    ) -> SagaRow | None:
        """Record what the lost event would have said, and resume the node with it."""
        key = answer.key
        assert key is not None

        async def found(tx: StepTx) -> WakeUp:
            await tx.force_ready(key, answer.payload, answer.generation)
            return _found(key, answer, tx)

        return await self._in_step(definition, params, row, move.node, move, found)

    async def _resend(
        self, definition: SagaDefinition[Any], params: BaseModel, row: SagaRow, move: Resend
    ) -> SagaRow | None:
        """Run the node's action again in a step of its own: it sends its command anew."""

        async def logged(tx: StepTx) -> None:
            data = {"rearmed": move.reason, "resent": True}
            tx.log(row.id, move.node, SagaLogEvent.WAITING, tx.now, data)

        again = Run(move.node, move.position)
        return await self._in_step(definition, params, row, move.node, again, logged)

    async def _in_step(
        self,
        definition: SagaDefinition[Any],
        params: BaseModel,
        row: SagaRow,
        node: str,
        first: Run | Resume,
        prepare: Callable[[StepTx], Awaitable[WakeUp | None]],
    ) -> SagaRow | None:
        """One step that runs ``node`` alone (its ``first`` move, after ``prepare``);
        the node's own failure fails it, a lost race is the next sweep's."""
        try:
            async with self._parts.store.step(self._parts.clock.now()) as tx:
                fenced = await tx.fence(row)
                wake = await prepare(tx)
                after = await self._runner.advance(
                    tx, definition, params, fenced, first, limit=1, wake=wake
                )
        except Exception as error:
            self._parts.notices.rolled_back(row.id)
            raise_unless_the_node_failed(error, node)
            return await self._runner.unwind.fail_node(row, node, error)
        self._parts.notices.committed(fenced)
        return after

    async def _rearm(self, row: SagaRow, move: Rearm, node: str, reason: str) -> SagaRow:
        wait = move.position.waiting[node]
        async with self._parts.store.step(self._parts.clock.now()) as tx:
            fenced = await tx.fence(row)
            await tx.rearm(row.id, node, wait.deadline)
            tx.log(
                row.id,
                node,
                SagaLogEvent.WAITING,
                tx.now,
                {"keys": list(wait.keys), "deadline": wait.deadline.isoformat(), "rearmed": reason},
            )
            return tx.write(fenced.at(move.position))

    async def _ask(
        self,
        definition: SagaDefinition[Any],
        params: BaseModel,
        row: SagaRow,
        node: str,
        query: Reconcile[Any] | None,
        wait: WaitingNode,
    ) -> Reconciled:
        if query is None:
            return Reconciled.fail("the node has no reconcile query")
        # Bounded by the lease: a slow agent must not outlast it, or another replica
        # claims the saga away from its reconciler again and again.
        bound = self._parts.store.lease.total_seconds() / 2
        async with self._parts.store.reading() as session:
            ctx = self._parts.ctx(session, definition, params, row, node, attempt=wait.asked)
            try:
                async with asyncio.timeout(bound):
                    with self._parts.span(row, node, "reconcile"):
                        return await query(ctx, list(wait.keys))
            except Exception as error:  # an unreachable agent: give the wait another term
                return Reconciled.unanswered(f"reconcile query failed: {error!r}")


def _found(key: str, answer: Reconciled, tx: StepTx) -> WakeUp:
    """What the lost event would have said, as reconcile found it."""
    return WakeUp(
        key=key,
        payload=answer.payload,
        generation=answer.generation,
        message_id=None,
        by_reconcile=True,
        occurred_at=tx.now,
    )
