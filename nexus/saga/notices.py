"""Notices to watchers (``nexusctl ... --wait``): how a saga moves, told after commit.

A notice is not state: it is best effort, and told only once the step it describes has
committed (a step that rolls back tells nothing). Steps note what they do as they go;
the runner tells the notes when the step commits, or drops them when it rolls back.
Callbacks registered with :meth:`Notices.after_commit` (the engine's metrics) follow
the same rule.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nexus.saga.position import SagaRow

# (the saga, the step: "waiting", "resumed", "succeeded", "failed", a final state,
#  the node or None, a detail for people or None)
Listener = Callable[["SagaRow", str, str | None, str | None], None]


class Notices:
    def __init__(self, listener: Listener | None) -> None:
        self._listener = listener
        self._pending: dict[uuid.UUID, list[tuple[str, str | None, str | None]]] = {}
        self._after_commit: dict[uuid.UUID, list[Callable[[], None]]] = {}

    def note(
        self, saga_id: uuid.UUID, step: str, node: str | None, detail: str | None = None
    ) -> None:
        """To tell once the current step of ``saga_id`` has committed."""
        self._pending.setdefault(saga_id, []).append((step, node, detail))

    def after_commit(self, saga_id: uuid.UUID, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the current step of ``saga_id`` has committed (never if
        it rolls back)."""
        self._after_commit.setdefault(saga_id, []).append(callback)

    def committed(self, row: SagaRow) -> None:
        self.run_after_commit(row.id)
        for step, node, detail in self._pending.pop(row.id, []):
            self.tell(row, step, node, detail)

    def run_after_commit(self, saga_id: uuid.UUID) -> None:
        """The step of ``saga_id`` committed: run its callbacks (an undo step, whose
        notes watchers are not told)."""
        for callback in self._after_commit.pop(saga_id, []):
            callback()

    def rolled_back(self, saga_id: uuid.UUID) -> None:
        self._pending.pop(saga_id, None)
        self._after_commit.pop(saga_id, None)

    def tell(self, row: SagaRow, step: str, node: str | None, detail: str | None) -> None:
        """Tell now (the caller's transaction has committed)."""
        if self._listener is not None:
            self._listener(row, step, node, detail)
