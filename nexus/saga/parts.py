"""What the engine's parts share: the store, the definitions, the clock, the hooks.

Built once per replica by ``SagaExecutor``; the runner, the unwinder and the deadline
handler each take it, so none of them holds state of its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from nexus.db.states import SagaLogEvent
from nexus.saga.clock import Clock
from nexus.saga.definition import Ctx, Node, SagaDefinition, Wait, WakeUp
from nexus.saga.errors import Unrecoverable
from nexus.saga.faults import Faults
from nexus.saga.metrics import EngineMetrics, NoMetrics
from nexus.saga.notices import Notices
from nexus.saga.position import SagaRow, WaitingNode
from nexus.saga.rendezvous import ReadyWait
from nexus.saga.store import SagaStore, StepTx
from schemas import tracing
from schemas.base import Envelope
from schemas.transport import Transport

# Wake-ups remembered for their resume's span, at most (see Parts.woken).
MAX_WAKES_KEPT = 4096


@dataclass(frozen=True)
class Parts:
    store: SagaStore
    definitions: Mapping[tuple[str, int], SagaDefinition[Any]]
    clock: Clock
    faults: Faults
    notices: Notices
    replica_id: str
    transport: Transport | None
    metrics: EngineMetrics = field(default_factory=NoMetrics)
    # The trace context of the event that woke each (saga, node) here, while tracing.
    wakes: dict[tuple[uuid.UUID, str], dict[str, str]] = field(default_factory=dict)

    def resolve(self, row: SagaRow) -> tuple[SagaDefinition[Any], BaseModel]:
        """The saga's definition and its parameters, or :class:`Unrecoverable`."""
        definition = self.definitions.get((row.name, row.definition_version))
        if definition is None:
            raise Unrecoverable(f"no definition {row.name} v{row.definition_version}")
        params = row.params
        if tracing.SAGA_TRACE_PARAM in params:
            params = {k: v for k, v in params.items() if k != tracing.SAGA_TRACE_PARAM}
        try:
            return definition, definition.params.model_validate(params)
        except ValidationError as error:
            raise Unrecoverable(str(error)) from error

    def span(self, row: SagaRow, node: str, what: str) -> AbstractContextManager[None]:
        """The span of a node's ``what`` (action, resume, undo, reconcile): in the saga's
        trace, a child of the handling of the event that woke the node on this replica
        (:meth:`woken`), else of the current span, when that is of the same trace."""
        if not tracing.enabled():
            return tracing.OFF
        return tracing.span(
            f"{row.name}.{node} {what}",
            parent=tracing.headers_of(row.params.get(tracing.SAGA_TRACE_PARAM)),
            via=self.wakes.pop((row.id, node), None),
            attributes={
                "saga.id": str(row.id),
                "saga.name": row.name,
                "saga.node": node,
                "saga.step": what,
                "nexus.replica": self.replica_id,
            },
        )

    def woken(self, saga_id: uuid.UUID, node: str) -> None:
        """An event handled now woke ``node``: its resume's span is that handling's child
        (one run resumes every node that is ready, whichever event started it)."""
        if not tracing.enabled():
            return
        if len(self.wakes) >= MAX_WAKES_KEPT:
            # Wakes that another replica resumed are never popped here: the oldest go.
            del self.wakes[next(iter(self.wakes))]
        self.wakes[(saga_id, node)] = tracing.current_headers()

    def node(self, definition: SagaDefinition[Any], name: str) -> Node[Any]:
        """A node the saga's log names; one its definition lacks makes it unrecoverable."""
        try:
            return definition.node(name)
        except KeyError as error:
            raise Unrecoverable(str(error)) from error

    def ctx(
        self,
        tx: StepTx | AsyncSession,
        definition: SagaDefinition[Any],
        params: BaseModel,
        row: SagaRow,
        node: str,
        *,
        attempt: int = 0,
    ) -> Ctx[Any]:
        """What a node's action, resume, undo or reconcile query sees.

        Given a step's transaction, what the node sends leaves when it commits; given a
        bare session (a reconcile query), the node may read but not send.
        """

        async def send(message: Envelope, exchange: str, routing_key: str, mandatory: bool) -> None:
            if not isinstance(tx, StepTx):
                raise RuntimeError("a saga sends commands only from an action or an undo")
            tx.send(message, exchange, routing_key, mandatory)

        waiting = row.position.waiting.get(node)
        return Ctx(
            saga_id=row.id,
            saga_name=definition.name,
            node=node,
            params=params,
            outputs=row.outputs,
            session=tx.session if isinstance(tx, StepTx) else tx,
            now=self.clock.now(),
            replica_id=self.replica_id,
            send=send,
            transport=self.transport,
            attempt=attempt,
            resends=waiting.resends if waiting is not None else 0,
        )

    async def park(self, tx: StepTx, row: SagaRow, node: str, wait: Wait) -> WaitingNode:
        """Park ``node`` (an action's, a resume's or an undo's wait) in ``tx``; the wait
        as the position keeps it."""
        now = self.clock.now()
        previous = row.position.waiting.get(node)
        waiting = WaitingNode(
            keys=wait.keys,
            since=previous.since if previous is not None else now,
            deadline=now + wait.deadline,
            rearms=wait.rearms,
            min_generation=wait.min_generation,
            timeout=wait.deadline,
            asked=previous.asked if previous is not None else 0,
            resends=(previous.resends if previous is not None else 0) + int(wait.resent),
        )
        await tx.park(row.id, node, wait.keys, waiting.deadline, wait.min_generation)
        if previous is not None:
            # Parked again (a resume that waits anew, a command sent again): keys of the
            # earlier wait that are still parked take the new deadline too.
            await tx.rearm(row.id, node, waiting.deadline)
        self.notices.note(row.id, "waiting", node, ", ".join(wait.keys))
        tx.log(
            row.id,
            node,
            SagaLogEvent.WAITING,
            now,
            {"keys": list(wait.keys), "deadline": waiting.deadline.isoformat()},
        )
        return waiting

    async def resumed(self, tx: StepTx, row: SagaRow, node: str, wake: WakeUp) -> None:
        """Record that ``node`` resumes with ``wake``: its wait rows, the log, watchers."""
        self.notices.note(
            row.id,
            "resumed",
            node,
            "by reconcile" if wake.by_reconcile else f"by event on {wake.key}",
        )
        await tx.resolve(row.id, node)
        now = self.clock.now()
        if not wake.by_reconcile and wake.occurred_at is not None:
            wake_seconds = max(0.0, (now - wake.occurred_at).total_seconds())
            metrics, saga = self.metrics, row.name
            self.notices.after_commit(row.id, lambda: metrics.resumed(saga, node, wake_seconds))
        tx.log(
            row.id,
            node,
            SagaLogEvent.RESUMED,
            now,
            {
                "key": wake.key,
                "message_id": str(wake.message_id) if wake.message_id else None,
                "by_reconcile": wake.by_reconcile,
                "event_occurred_at": wake.occurred_at.isoformat() if wake.occurred_at else None,
            },
        )


def wake_up(wait: ReadyWait) -> WakeUp:
    """What a node resumes with when its wait row is ready."""
    return WakeUp(
        key=wait.key,
        payload=wait.payload,
        generation=wait.generation,
        message_id=wait.message_id,
        occurred_at=wait.occurred_at,
    )
