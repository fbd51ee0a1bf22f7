"""``--wait``: follow one saga by the events Nexus publishes, until it finishes.

The subscription is bound before the request is sent, so no event the request causes
is missed; events that arrive before the reply names the saga are kept and sorted out
afterwards. Nothing polls: the only request after the one that started the saga is a
single ``saga show`` for the final record.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from schemas.progress import DiskUpdated, InstanceUpdated, SagaProgressed, SagaStep

if TYPE_CHECKING:
    from schemas.messages import Message
    from schemas.transport import Delivery

FINISHED_STEPS = frozenset({SagaStep.DONE, SagaStep.UNDONE, SagaStep.STUCK})


@dataclass(frozen=True)
class ProgressLine:
    """One event as a watcher shows it."""

    elapsed: float
    # The operation's label when several are followed at once.
    label: str
    what: str
    step: str
    replica: str
    detail: str | None


@dataclass(frozen=True)
class Target:
    """An operation to follow: its saga, the resource it acts on, a label for its lines."""

    saga_id: uuid.UUID
    resource_id: uuid.UUID
    label: str = ""


def finishes(event: SagaProgressed) -> bool:
    """Whether the saga reached an end state (a node's own failure is not one)."""
    step = event.payload.step
    return step in FINISHED_STEPS or (step is SagaStep.FAILED and event.payload.node is None)


class ProgressWatch:
    """Collects progress events from the moment it is subscribed."""

    def __init__(self) -> None:
        self._events: asyncio.Queue[Message] = asyncio.Queue()
        self._started = time.monotonic()

    async def handle(self, delivery: Delivery) -> None:
        await self._events.put(delivery.message)

    async def follow(
        self,
        targets: Sequence[Target],
        show: Callable[[ProgressLine], None],
        timeout: float,
    ) -> dict[uuid.UUID, str]:
        """Show the targets' events until every saga ends or ``timeout`` passes.

        Returns each finished saga's final step; a saga missing from it did not finish.
        """
        by_saga = {target.saga_id: target for target in targets}
        by_resource = {target.resource_id: target for target in targets}
        finished: dict[uuid.UUID, str] = {}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while len(finished) < len(by_saga):
                    message = await self._events.get()
                    line = self._line(message, by_saga, by_resource)
                    if line is not None:
                        show(line)
                    if (
                        isinstance(message, SagaProgressed)
                        and message.payload.saga_id in by_saga
                        and finishes(message)
                    ):
                        finished[message.payload.saga_id] = message.payload.step.value
        return finished

    def _line(
        self,
        message: Message,
        by_saga: Mapping[uuid.UUID, Target],
        by_resource: Mapping[uuid.UUID, Target],
    ) -> ProgressLine | None:
        elapsed = time.monotonic() - self._started
        if isinstance(message, SagaProgressed) and message.payload.saga_id in by_saga:
            p = message.payload
            label = by_saga[p.saga_id].label
            return ProgressLine(
                elapsed, label, p.node or p.saga_name, p.step.value, p.replica, p.detail
            )
        if isinstance(message, DiskUpdated) and message.payload.disk_id in by_resource:
            d = message.payload
            label = by_resource[d.disk_id].label
            return ProgressLine(elapsed, label, "disk", d.state.value, _replica(message), d.detail)
        if isinstance(message, InstanceUpdated) and message.payload.instance_id in by_resource:
            i = message.payload
            label = by_resource[i.instance_id].label
            return ProgressLine(elapsed, label, "instance", i.state, _replica(message), i.detail)
        return None


def _replica(message: Message) -> str:
    # Nexus's sources are "nexus/<replica>".
    return message.source.partition("/")[2]
