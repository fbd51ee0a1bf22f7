"""What the engine's parts share: the store, the definitions, the clock, the hooks.

Built once per replica by ``SagaExecutor``; the runner, the unwinder and the deadline
handler each take it, so none of them holds state of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from nexus.saga.clock import Clock
from nexus.saga.definition import Ctx, Node, SagaDefinition
from nexus.saga.errors import Unrecoverable
from nexus.saga.faults import Faults
from nexus.saga.notices import Notices
from nexus.saga.position import SagaRow
from nexus.saga.store import SagaStore, StepTx
from schemas.base import Envelope
from schemas.transport import Transport


@dataclass(frozen=True)
class Parts:
    store: SagaStore
    definitions: Mapping[tuple[str, int], SagaDefinition[Any]]
    clock: Clock
    faults: Faults
    notices: Notices
    replica_id: str
    transport: Transport | None

    def resolve(self, row: SagaRow) -> tuple[SagaDefinition[Any], BaseModel]:
        """The saga's definition and its parameters, or :class:`Unrecoverable`."""
        definition = self.definitions.get((row.name, row.definition_version))
        if definition is None:
            raise Unrecoverable(f"no definition {row.name} v{row.definition_version}")
        try:
            return definition, definition.params.model_validate(row.params)
        except ValidationError as error:
            raise Unrecoverable(str(error)) from error

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
