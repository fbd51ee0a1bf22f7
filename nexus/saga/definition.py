"""How a saga is declared: parameters, stages of nodes, each action beside its undo.

A saga module reads top to bottom as the story of the operation (docs/style.md, "Sagas"):

    class Params(BaseModel): ...

    async def ids(ctx: Ctx[Params]) -> Ids: ...
    async def regions_ensure(ctx: Ctx[Params]) -> Wait: ...
    async def regions_ensure_undo(ctx: Ctx[Params]) -> None: ...

    DEFINITION = SagaDefinition(
        name="disk_create", version=1, params=Params,
        stages=(
            (Node("ids", ids),),
            (Node("region_0", ensure_0, undo=...), Node("region_1", ...)),  # parallel
        ),
    )

Node outputs are pydantic models, stored with the saga; a later node reads one with
``ctx.output("ids", Ids)``. That is the only way data passes between nodes, so a node
re-run after a crash sees exactly what the first run saw.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel

from schemas.base import Envelope, command_id
from schemas.topology import COMMANDS_EXCHANGE, EVENTS_EXCHANGE

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from schemas.transport import Transport

P = TypeVar("P", bound=BaseModel)
M = TypeVar("M", bound=BaseModel)


class ActionFailed(Exception):
    """Raised by an action (or resume) to fail its node with a message for people."""


@dataclass(frozen=True)
class Wait:
    """Park the node until an event arrives on any of ``keys`` (or the deadline passes).

    ``min_generation``: only an event with a newer generation wakes the node, so a key
    that is reused (``instance:<id>:running``) is not satisfied by an old event.
    ``rearms``: how many times reconcile may extend the deadline before the node fails
    when the agent says "still working"; None: for as long as it says so.
    ``resent``: this wait follows a command the node sent again (a failed destroy);
    the engine counts it with the reconcile's re-sends in ``Ctx.resends``.
    """

    keys: tuple[str, ...]
    deadline: timedelta
    min_generation: int = 0
    rearms: int | None = 1
    resent: bool = False

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a wait needs at least one key")
        if self.deadline <= timedelta(0):
            raise ValueError("a wait needs a positive deadline: every wait has one")


@dataclass(frozen=True)
class WakeUp:
    """What a parked node is resumed with: the event that arrived on one of its keys."""

    key: str
    payload: Mapping[str, Any]
    generation: int
    message_id: uuid.UUID | None
    by_reconcile: bool = False
    # When the event happened at its source; for reconcile, when the query found it.
    occurred_at: datetime | None = None


class Outcome(StrEnum):
    RESUME = "resume"
    REARM = "rearm"
    # The agent does not know the object: run the node's action again (its command is
    # idempotent; it leaves under a new id) and wait anew.
    RESEND = "resend"
    # No answer (the agent is unreachable, the query timed out): wait another term,
    # spending none of the wait's re-arms.
    UNANSWERED = "unanswered"
    FAIL = "fail"


@dataclass(frozen=True)
class Reconciled:
    """What the one reconcile query at a deadline found."""

    outcome: Outcome
    key: str | None = None
    payload: Mapping[str, Any] = field(default_factory=dict)
    generation: int = 0
    reason: str = ""
    # For a re-arm: the next deadline from now (default: the wait's own term again).
    after: timedelta | None = None

    @classmethod
    def resume(cls, key: str, payload: Mapping[str, Any], generation: int) -> Reconciled:
        return cls(Outcome.RESUME, key=key, payload=payload, generation=generation)

    @classmethod
    def rearm(cls, reason: str, after: timedelta | None = None) -> Reconciled:
        return cls(Outcome.REARM, reason=reason, after=after)

    @classmethod
    def resend(cls, reason: str) -> Reconciled:
        return cls(Outcome.RESEND, reason=reason)

    @classmethod
    def unanswered(cls, reason: str) -> Reconciled:
        return cls(Outcome.UNANSWERED, reason=reason)

    @classmethod
    def fail(cls, reason: str) -> Reconciled:
        return cls(Outcome.FAIL, reason=reason)


class Ctx(Generic[P]):
    """What an action sees: its saga's parameters and outputs, and its transaction.

    Database work goes through ``session`` and commits with the node's log entry;
    messages go through ``send``/``publish`` into the outbox in the same transaction,
    so nothing leaves unless the node's transaction committed.
    """

    def __init__(
        self,
        *,
        saga_id: uuid.UUID,
        saga_name: str,
        node: str,
        params: P,
        outputs: Mapping[str, Any],
        session: AsyncSession,
        now: datetime,
        replica_id: str,
        send: Callable[[Envelope, str, str, bool], Awaitable[None]],
        transport: Transport | None,
        attempt: int = 0,
        resends: int = 0,
    ) -> None:
        self.saga_id = saga_id
        self.saga_name = saga_name
        self.node = node
        self.params = params
        self._outputs = outputs
        self.session = session
        self.now = now
        self.replica_id = replica_id
        self._send = send
        self.transport = transport
        # In a reconcile query: how many times this wait's deadline was reconciled before.
        self.attempt = attempt
        # How many times reconcile had this node's command sent again (its ids change).
        self.resends = resends

    @property
    def source(self) -> str:
        return f"nexus/{self.replica_id}"

    def output(self, node: str, model: type[M]) -> M:
        if node not in self._outputs:
            raise KeyError(f"node {node!r} has no output (yet) in saga {self.saga_id}")
        return model.model_validate(self._outputs[node])

    def has_output(self, node: str) -> bool:
        return node in self._outputs

    def command_id(self, suffix: str = "") -> uuid.UUID:
        """The same id every time this node runs for this saga: re-sent is recognisable.

        A command that reconcile has sent again (the agent had not heard of it) leaves
        under a new id, so the outbox does not take it for the one already sent.
        """
        return self._command_id(suffix, self.resends)

    def resend_id(self, suffix: str = "") -> uuid.UUID:
        """The id of a command this node sends again now (a failed destroy): the next
        one ``command_id`` will give, once the wait that follows (``Wait(resent=True)``)
        is counted."""
        return self._command_id(suffix, self.resends + 1)

    def command_ids_so_far(self, suffix: str = "") -> tuple[uuid.UUID, ...]:
        """Every id ``command_id`` has given so far, the first one first: an answer to
        a command sent before a re-send (a refusal) still names the id it was sent with."""
        return tuple(self._command_id(suffix, attempt) for attempt in range(self.resends + 1))

    def _command_id(self, suffix: str, attempt: int) -> uuid.UUID:
        return command_id(self.saga_id, f"{self.node}{':' + suffix if suffix else ''}", attempt)

    async def send(self, message: Envelope, queue: str) -> None:
        """Queue a command for an agent; it leaves when the node's transaction commits."""
        await self._send(message, COMMANDS_EXCHANGE, queue, True)

    async def publish(self, event: Envelope, routing_key: str) -> None:
        await self._send(event, EVENTS_EXCHANGE, routing_key, False)

    def envelope(self, **fields: Any) -> dict[str, Any]:
        """Envelope fields for a message this node sends: source and correlation."""
        return {"source": self.source, "correlation_id": self.saga_id, **fields}


Action = Callable[[Ctx[P]], Awaitable[BaseModel | Wait | None]]
Resume = Callable[[Ctx[P], WakeUp], Awaitable[BaseModel | Wait | None]]
# An undo may wait too (a delete until the agent confirms it): it returns a Wait.
Undo = Callable[[Ctx[P]], Awaitable[Wait | None]]
UndoResume = Callable[[Ctx[P], WakeUp], Awaitable[Wait | None]]
# Told why: which undo could not finish, and its error.
OnStuck = Callable[[Ctx[P], str], Awaitable[None]]
Reconcile = Callable[[Ctx[P], Sequence[str]], Awaitable[Reconciled]]


async def no_op(ctx: Ctx[Any]) -> None:
    """An action that does nothing: the anchor of an undo for a step that can half-succeed."""


@dataclass(frozen=True)
class Node(Generic[P]):
    name: str
    action: Action[P]
    undo: Undo[P] | None = None
    # Called with the event when a wait returned by ``action`` is satisfied;
    # without it, the event's payload becomes the node's output.
    resume: Resume[P] | None = None
    # The one query made when a wait's deadline passes without its event.
    reconcile: Reconcile[P] | None = None
    # The same two for a wait the undo returned: the event that woke it (it may wait
    # again), and the query at its deadline. Without them the undo's wait cannot end.
    undo_resume: UndoResume[P] | None = None
    undo_reconcile: Reconcile[P] | None = None


Stage = tuple[Node[Any], ...]


@dataclass(frozen=True)
class SagaDefinition(Generic[P]):
    """A saga: its parameters and its stages; nodes of one stage run side by side."""

    name: str
    version: int
    params: type[P]
    stages: tuple[Stage, ...]
    # Runs when an undo failed and the saga is left stuck: mark what it was building
    # faulted, so an operator sees it rather than a resource stuck in "creating".
    on_stuck: OnStuck[P] | None = None

    def __post_init__(self) -> None:
        names = [node.name for stage in self.stages for node in stage]
        duplicates = {name for name in names if names.count(name) > 1}
        if duplicates:
            raise ValueError(f"saga {self.name}: node names repeat: {sorted(duplicates)}")
        if not names:
            raise ValueError(f"saga {self.name} has no nodes")

    def node(self, name: str) -> Node[Any]:
        for stage in self.stages:
            for node in stage:
                if node.name == name:
                    return node
        raise KeyError(f"saga {self.name} v{self.version} has no node {name!r}")

    @property
    def node_names(self) -> list[str]:
        return [node.name for stage in self.stages for node in stage]


def sequence(*nodes: Node[Any]) -> tuple[Stage, ...]:
    """Stages of one node each, run in order."""
    return tuple((node,) for node in nodes)


def parallel(*nodes: Node[Any]) -> tuple[Stage, ...]:
    """One stage whose nodes run side by side; the next stage waits for all of them."""
    return (tuple(nodes),)
