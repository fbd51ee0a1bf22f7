"""Running one saga: steps that apply ``next_move`` until the saga parks or ends.

A step is one transaction (``SagaStore.step``): it claims or fences the saga row, then
applies moves. ``Run`` and ``Resume`` call the node's code; what they return is an
outcome, and ``next_move`` decides what follows. Nodes that follow each other without
waiting share the step (up to ``MAX_NODES_PER_STEP``); each keeps its own log entries,
output and outbox rows, and a crash rolls them back together, so every node still either
happened entirely or not at all. The step ends when the saga parks, ends, or the limit
is reached. A failing node fails alone: the nodes run before it in the same step commit
first, then it runs again in a step of its own and its failure is recorded
(``nexus.saga.unwind``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from nexus.db.states import SagaLogEvent, SagaState
from nexus.saga.definition import ActionFailed, Node, SagaDefinition, Wait, WakeUp
from nexus.saga.errors import Contended, Unrecoverable, raise_unless_the_node_failed
from nexus.saga.moves import (
    FORWARD,
    CheckEvents,
    EventsIn,
    Finish,
    Move,
    Outcome,
    Park,
    Resume,
    Run,
    Succeeded,
    WaitsOn,
    next_move,
    shape_of,
)
from nexus.saga.parts import Parts, wake_up
from nexus.saga.position import SagaRow
from nexus.saga.rendezvous import ReadyWait
from nexus.saga.store import StepTx
from nexus.saga.unwind import Unwinder

log = logging.getLogger(__name__)

# Nodes that follow each other without waiting run in one transaction, up to this many.
MAX_NODES_PER_STEP = 16
CONTENTION_RETRIES = 5


class _Split(Exception):
    """A node failed after ``ran`` others in the same step: commit those first."""

    def __init__(self, ran: int) -> None:
        super().__init__(ran)
        self.ran = ran


@dataclass(frozen=True)
class _Stepped:
    seen: SagaRow | None  # the row as the step fenced or claimed it (for watchers)
    after: SagaRow | None  # where to go on from; None: parked, ended or not ours
    unrecoverable: str | None = None


@dataclass
class _Tally:
    """How far a step got: the nodes whose code ran, and the one running now."""

    ran: int = 0
    node: str | None = None


class _PayloadOutput(BaseModel):
    """A wake-up's payload kept as a node's output when the node has no resume."""

    model_config = {"extra": "allow"}


class SagaRunner:
    def __init__(self, parts: Parts) -> None:
        self._parts = parts
        self.notices = parts.notices
        self.unwind = Unwinder(parts)

    async def run(self, row: SagaRow | None, saga_id: uuid.UUID) -> bool:
        """Run the saga from ``row`` (this replica owns it), or claim ``saga_id`` first,
        in the same transaction as the first nodes it runs; False when the claim found
        the saga not ours to run."""
        notices = self._parts.notices
        current = row
        claiming = row is None
        contended = 0
        limit = MAX_NODES_PER_STEP
        while claiming or current is not None:
            before = current
            try:
                stepped = await self._step(before, saga_id, limit)
            except Contended:
                # The step rolled back whole, the saga row is as it was: run it again,
                # after a pause that separates the two contenders.
                notices.rolled_back(saga_id)
                contended += 1
                if contended > CONTENTION_RETRIES:
                    raise
                await asyncio.sleep(random.uniform(0.005, 0.05) * contended)
                continue
            except _Split as split:
                # A node failed after others in the same step: commit those alone, then
                # the failing node runs (and fails) in its own step.
                notices.rolled_back(saga_id)
                limit = split.ran
                continue
            except Unrecoverable as error:
                notices.rolled_back(saga_id)
                if before is not None:
                    await self.unwind.mark_unrecoverable(before, str(error))
                return True
            if stepped.seen is not None:
                notices.committed(stepped.seen)
            elif claiming:
                return False
            if stepped.unrecoverable is not None and stepped.after is not None:
                await self.unwind.mark_unrecoverable(stepped.after, stepped.unrecoverable)
                return True
            claiming = False
            contended = 0
            limit = MAX_NODES_PER_STEP
            current = stepped.after
        return True

    async def _step(self, row: SagaRow | None, saga_id: uuid.UUID, limit: int) -> _Stepped:
        """One transaction: fence (or claim) the saga, then run up to ``limit`` nodes."""
        if row is not None and row.position.unwinding:
            return _Stepped(None, await self.unwind.undo_step(row))
        tally = _Tally()
        try:
            async with self._parts.store.step(self._parts.clock.now()) as tx:
                if row is None:
                    claimed = await tx.claim(saga_id)
                    if claimed is None:
                        return _Stepped(None, None)
                    current = claimed
                else:
                    current = await tx.fence(row)
                seen = current
                if current.position.unwinding:
                    return _Stepped(seen, current)  # claimed while unwinding: next step
                if current.state not in FORWARD:
                    return _Stepped(seen, None)
                try:
                    definition, params = self._parts.resolve(current)
                except Unrecoverable as error:
                    return _Stepped(seen, current, unrecoverable=str(error))
                move = next_move(shape_of(definition), current.position)
                after = await self.advance(tx, definition, params, current, move, limit, tally)
                return _Stepped(seen, after)
        except Exception as error:  # an action's failure, whatever its type, fails its node
            raise_unless_the_node_failed(error, tally.node)
            assert tally.node is not None
            if tally.ran > 0 or row is None:
                raise _Split(tally.ran) from error
            return _Stepped(row, await self.unwind.fail_node(row, tally.node, error))

    async def advance(
        self,
        tx: StepTx,
        definition: SagaDefinition[Any],
        params: BaseModel,
        current: SagaRow,
        move: Move,
        limit: int,
        tally: _Tally | None = None,
        wake: WakeUp | None = None,
    ) -> SagaRow | None:
        """Apply moves in ``tx`` until the saga parks or ends (None) or ``limit`` nodes
        ran (the row to go on from). ``wake``: what the first ``Resume`` resumes with."""
        tally = tally or _Tally()
        shape = shape_of(definition)
        ready: list[ReadyWait] = []
        while True:
            if isinstance(move, Run | Resume) and tally.ran >= limit:
                return tx.write(current.at(move.position))
            outcome: Outcome
            match move:
                case Run(node):
                    tally.node = node
                    current, outcome = await self._act(
                        tx, definition, params, current.at(move.position), definition.node(node)
                    )
                    tally.ran += 1
                case Resume(node):
                    tally.node = node
                    if wake is None:
                        wake = wake_up(next(w for w in ready if w.node == node))
                    current = tx.write(current.at(move.position))
                    current, outcome = await self._resume(
                        tx, definition, params, current, definition.node(node), wake
                    )
                    wake = None
                    tally.ran += 1
                case CheckEvents():
                    current = tx.write(current.at(move.position))
                    ready = await tx.ready(current.id)
                    outcome = EventsIn(tuple(wait.node for wait in ready))
                case Park():
                    log.info("saga %s parked", current.id, extra={"saga_id": str(current.id)})
                    tx.write(current.at(move.position), release=True)
                    return None
                case Finish():
                    self._parts.notices.note(current.id, SagaState.DONE.value, None)
                    log.info("saga %s done", current.id, extra={"saga_id": str(current.id)})
                    tx.write(current.at(move.position, error=None), release=True)
                    return None
                case _:
                    raise AssertionError(f"a forward step cannot {move!r}")
            move = next_move(shape, current.position, outcome)

    async def _act(
        self,
        tx: StepTx,
        definition: SagaDefinition[Any],
        params: BaseModel,
        row: SagaRow,
        node: Node[Any],
    ) -> tuple[SagaRow, Outcome]:
        """Run a node's action inside the step's transaction and record its result."""
        faults = self._parts.faults
        started = self._parts.clock.now()
        ctx = self._parts.ctx(tx, definition, params, row, node.name)
        if faults.before_action is not None:
            faults.before_action(definition.name, node.name)
        if faults.fail_node(definition.name, node.name):
            raise ActionFailed(f"injected failure at {node.name}")
        with self._parts.span(row, node.name, "action"):
            result = await node.action(ctx)
            if faults.repeat_actions:
                first, result = result, await node.action(ctx)
                if _decided(first) != _decided(result):
                    # A re-run (after a crash) must return what the first run decided.
                    raise ActionFailed(
                        f"{node.name} decided differently when run again: "
                        f"{_decided(first)!r} then {_decided(result)!r}"
                    )
        tx.log(row.id, node.name, SagaLogEvent.STARTED, started)
        return await self._settle(tx, row, node, result, started)

    async def _resume(
        self,
        tx: StepTx,
        definition: SagaDefinition[Any],
        params: BaseModel,
        row: SagaRow,
        node: Node[Any],
        wake: WakeUp,
    ) -> tuple[SagaRow, Outcome]:
        await self._parts.resumed(tx, row, node.name, wake)
        result: BaseModel | Wait | None
        with self._parts.span(row, node.name, "resume"):
            if node.resume is None:
                result = _PayloadOutput.model_validate(dict(wake.payload))
            else:
                ctx = self._parts.ctx(tx, definition, params, row, node.name)
                result = await node.resume(ctx, wake)
        return await self._settle(tx, row, node, result)

    async def _settle(
        self,
        tx: StepTx,
        row: SagaRow,
        node: Node[Any],
        result: BaseModel | Wait | None,
        started: datetime | None = None,
    ) -> tuple[SagaRow, Outcome]:
        """Record what an action or resume returned: an output, or a wait to park on.

        ``started``: when the action began (None for a resume: the wait's ``since``)."""
        now = self._parts.clock.now()
        notices = self._parts.notices
        if isinstance(result, Wait):
            return row, await self._wait(tx, row, node, result)
        output = result.model_dump(mode="json") if result is not None else {}
        self._observe_duration(row, node.name, started, now)
        notices.note(row.id, "succeeded", node.name)
        tx.log(row.id, node.name, SagaLogEvent.SUCCEEDED, now)
        return row.at(row.position, outputs={**row.outputs, node.name: output}), Succeeded(
            node.name
        )

    def _observe_duration(
        self, row: SagaRow, node: str, started: datetime | None, now: datetime
    ) -> None:
        """The node's duration, from its start (its first park, for a node that waited)
        to now, for metrics once the step commits."""
        waited = row.position.waiting.get(node)
        begun = waited.since if waited is not None else started
        if begun is None:
            return
        seconds = max(0.0, (now - begun).total_seconds())
        metrics, saga = self._parts.metrics, row.name
        self._parts.notices.after_commit(
            row.id, lambda: metrics.node_succeeded(saga, node, seconds)
        )

    async def _wait(self, tx: StepTx, row: SagaRow, node: Node[Any], wait: Wait) -> WaitsOn:
        return WaitsOn(node.name, await self._parts.park(tx, row, node.name, wait))


def _decided(result: BaseModel | Wait | None) -> object:
    """What an action decided, comparable across two runs."""
    return result.model_dump(mode="json") if isinstance(result, BaseModel) else result
