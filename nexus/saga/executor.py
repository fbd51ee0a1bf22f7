"""The saga executor: runs nodes, parks on waits, resumes, unwinds — all from the database.

Nothing about a saga lives in memory between steps. Each step is one transaction that
starts by *fencing* on the saga row (``WHERE lease_owner = me AND version = seen``,
bumping the version and extending the lease), so a replica that lost its lease cannot
write, and two replicas never act on the same state. A node's action runs inside that
transaction with its log entries, its output and the commands it sends (outbox), so a
node either happened entirely or not at all; after a crash it simply runs again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, cast

from pydantic import BaseModel, ValidationError
from sqlalchemy import Table, bindparam, func, insert, or_, select, tuple_, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from nexus.db.models import Saga, SagaLogEntry
from nexus.db.states import SagaLogEvent, SagaState
from nexus.saga import rendezvous
from nexus.saga.clock import Clock, SystemClock
from nexus.saga.definition import (
    ActionFailed,
    Ctx,
    Node,
    Outcome,
    Reconciled,
    SagaDefinition,
    Wait,
    WakeUp,
)
from nexus.saga.faults import Faults
from nexus.saga.outbox import Outbox
from schemas.transport import Transport

log = logging.getLogger(__name__)

sagas = cast(Table, Saga.__table__)
saga_log = cast(Table, SagaLogEntry.__table__)

# States a replica may claim a saga in.
_CLAIMABLE = (SagaState.RUNNING.value, SagaState.WAITING.value, SagaState.UNWINDING.value)
SWEEP_CONCURRENCY = 32
_INFRASTRUCTURE_ERRORS = (OperationalError, InterfaceError, ConnectionError, TimeoutError)


# PostgreSQL's deadlock_detected and serialization_failure: the transaction lost a race
# with another one and may simply run again.
_CONTENTION_SQLSTATES = frozenset({"40P01", "40001"})
CONTENTION_RETRIES = 5
# Nodes that follow each other without waiting run in one transaction, up to this many.
MAX_NODES_PER_STEP = 16


class Contended(Exception):
    """A step's transaction lost a race with another (deadlock, serialization): retry it."""


def _contention(error: BaseException) -> bool:
    if not isinstance(error, DBAPIError):
        return False
    original = error.orig
    code = getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)
    return code in _CONTENTION_SQLSTATES


class _Split(Exception):
    """A node failed after ``ran`` others in the same transaction: commit those first."""

    def __init__(self, ran: int) -> None:
        super().__init__(ran)
        self.ran = ran


class LeaseLost(Exception):
    """Another replica owns the saga now; this one must stop writing."""


class Unrecoverable(Exception):
    """The saga's record cannot be run by this definition (bad params, unknown node)."""


@dataclass(frozen=True)
class SagaRow:
    id: uuid.UUID
    name: str
    definition_version: int
    params: Mapping[str, Any]
    state: str
    outputs: Mapping[str, Any]
    progress: Mapping[str, Any]
    version: int
    error: str | None


@dataclass(frozen=True)
class _Stepped:
    seen: SagaRow | None  # the row as the step fenced or claimed it (for watchers)
    after: SagaRow | None  # where to go on from; None: parked, finished or not ours
    unrecoverable: str | None = None


@dataclass
class Progress:
    """The executor's position, kept in ``sagas.progress``."""

    stage: int = 0
    # node -> {"keys": [...], "since": iso, "deadline": iso, "rearms": n, "min_generation": g}
    waiting: dict[str, dict[str, Any]] = field(default_factory=dict)
    # nodes in the order they completed; unwinding undoes them in reverse
    completed: list[str] = field(default_factory=list)
    undone: list[str] = field(default_factory=list)
    failed_node: str | None = None

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> Progress:
        return cls(
            stage=int(data.get("stage", 0)),
            waiting=dict(data.get("waiting", {})),
            completed=list(data.get("completed", [])),
            undone=list(data.get("undone", [])),
            failed_node=data.get("failed_node"),
        )

    def dump(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "waiting": self.waiting,
            "completed": self.completed,
            "undone": self.undone,
            "failed_node": self.failed_node,
        }


class SagaExecutor:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        definitions: Iterable[SagaDefinition[Any]],
        replica_id: str,
        outbox: Outbox,
        transport: Transport | None = None,
        clock: Clock | None = None,
        lease: timedelta = timedelta(seconds=15),
        faults: Faults | None = None,
        on_progress: Callable[[SagaRow, str, str | None, str | None], None] | None = None,
    ) -> None:
        self._sessions = sessions
        self._definitions = {(d.name, d.version): d for d in definitions}
        self.replica_id = replica_id
        self._outbox = outbox
        self._transport = transport
        self._clock = clock or SystemClock()
        self._lease = lease
        self._faults = faults or Faults()
        self._running: set[uuid.UUID] = set()
        self._claim_statement: Any = None
        # Woken while this replica was running them: claimed again when that run ends.
        self._again: set[uuid.UUID] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_progress = on_progress
        # Progress of steps whose transaction has not committed yet, per saga.
        self._notes: dict[uuid.UUID, list[tuple[str, str | None, str | None]]] = {}

    # Starting and waking.

    async def start(
        self,
        definition: SagaDefinition[Any],
        params: BaseModel,
        saga_id: uuid.UUID | None = None,
        *,
        run: bool = True,
    ) -> uuid.UUID:
        """Record a new saga and (by default) run it on this replica at once."""
        saga_id = saga_id or uuid.uuid4()
        async with self._transaction() as session:
            created = await self.create(session, definition, params, saga_id)
        if run:
            await self.run(saga_id, created)
        return saga_id

    async def create(
        self,
        session: AsyncSession,
        definition: SagaDefinition[Any],
        params: BaseModel,
        saga_id: uuid.UUID,
    ) -> SagaRow:
        """Insert a saga inside a caller's transaction (e.g. with the disk row it creates).

        This replica holds its lease from the start: once the transaction commits, the
        returned row can be run here without claiming it again.
        """
        now = self._clock.now()
        values: dict[str, Any] = {
            "id": saga_id,
            "name": definition.name,
            "definition_version": definition.version,
            "params": params.model_dump(mode="json"),
            "state": SagaState.RUNNING.value,
            "node_outputs": {},
            "progress": Progress().dump(),
            "lease_owner": self.replica_id,
            "lease_expires_at": now + self._lease,
            "version": 1,
            "created_at": now,
            "updated_at": now,
        }
        await session.execute(insert(sagas).values(**values))
        return SagaRow(
            id=saga_id,
            name=definition.name,
            definition_version=definition.version,
            params=values["params"],
            state=SagaState.RUNNING.value,
            outputs={},
            progress=values["progress"],
            version=1,
            error=None,
        )

    def spawn(self, saga_id: uuid.UUID, created: SagaRow | None = None) -> None:
        """Run a saga in the background (an event consumer must not wait for it).

        ``created``: the row :meth:`create` returned, committed since: run it as owned.
        """
        task = asyncio.create_task(self.run(saga_id, created), name=f"saga-{saga_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def run(self, saga_id: uuid.UUID, created: SagaRow | None = None) -> None:
        """Claim the saga and run it until it parks, finishes or gets stuck."""
        if saga_id in self._running:
            # This replica is running it: once that run parks, it claims it again (a
            # wake-up that arrived meanwhile must not wait for the sweeper).
            self._again.add(saga_id)
            return
        self._running.add(saga_id)
        self._again.discard(saga_id)
        try:
            await self._run_claimed(created, saga_id)
        except Contended:
            log.warning(
                "saga %s kept losing races in the database; its lease will expire "
                "and it is tried again",
                saga_id,
                extra={"saga_id": str(saga_id)},
            )
        except LeaseLost:
            log.warning(
                "lost the lease on saga %s; another replica has it",
                saga_id,
                extra={"saga_id": str(saga_id)},
            )
        except _INFRASTRUCTURE_ERRORS as error:
            # The lease expires and another replica (or this one) adopts the saga.
            log.error(
                "saga %s paused by a database error: %r",
                saga_id,
                error,
                extra={"saga_id": str(saga_id)},
            )
        finally:
            self._running.discard(saga_id)
            self._run_again(saga_id)

    def _run_again(self, saga_id: uuid.UUID) -> None:
        if saga_id in self._again:
            self._again.discard(saga_id)
            self.spawn(saga_id)

    async def _run_claimed(self, row: SagaRow | None, saga_id: uuid.UUID | None = None) -> None:
        """Run the saga from ``row`` (this replica owns it), or claim ``saga_id`` first,
        in the same transaction as the first nodes it runs."""
        current = row
        claiming = row is None
        target = row.id if row is not None else saga_id
        assert target is not None
        contended = 0
        limit = MAX_NODES_PER_STEP
        while claiming or current is not None:
            before = current
            try:
                stepped = await self._step(before, target, limit)
            except Contended:
                # The step rolled back whole, the saga row is as it was: run it again,
                # after a pause that separates the two contenders.
                self._notes.pop(target, None)
                contended += 1
                if contended > CONTENTION_RETRIES:
                    raise
                await asyncio.sleep(random.uniform(0.005, 0.05) * contended)
                continue
            except _Split as split:
                # A node failed after others in the same transaction: commit those
                # alone, then the failing node runs (and fails) in its own step.
                self._notes.pop(target, None)
                limit = split.ran
                continue
            except Unrecoverable as error:
                self._notes.pop(target, None)
                if before is not None:
                    await self._mark_unrecoverable(before, str(error))
                return
            if stepped.seen is not None:
                self._tell(stepped.seen)
            if stepped.unrecoverable is not None and stepped.after is not None:
                await self._mark_unrecoverable(stepped.after, stepped.unrecoverable)
                return
            claiming = False
            contended = 0
            limit = MAX_NODES_PER_STEP
            current = stepped.after

    def _definition(self, row: SagaRow) -> SagaDefinition[Any]:
        definition = self._definitions.get((row.name, row.definition_version))
        if definition is None:
            raise Unrecoverable(f"no definition {row.name} v{row.definition_version}")
        return definition

    # Claiming and fencing.

    def _runnable_definitions(self) -> Any:
        return tuple_(sagas.c.name, sagas.c.definition_version).in_(list(self._definitions))

    async def _claim(self, saga_id: uuid.UUID) -> SagaRow | None:
        async with self._transaction() as session:
            return await self._claim_in(session, saga_id)

    async def _claim_in(self, session: AsyncSession, saga_id: uuid.UUID) -> SagaRow | None:
        now = self._clock.now()
        if self._claim_statement is None:
            self._claim_statement = (
                update(sagas)
                .where(
                    sagas.c.id == bindparam("b_id"),
                    sagas.c.state.in_(_CLAIMABLE),
                    or_(
                        sagas.c.lease_owner.is_(None),
                        sagas.c.lease_owner == bindparam("b_owner"),
                        sagas.c.lease_expires_at < bindparam("b_now"),
                    ),
                    self._runnable_definitions(),
                )
                .values(
                    lease_owner=bindparam("b_owner"),
                    lease_expires_at=bindparam("b_expires"),
                    version=sagas.c.version + 1,
                    updated_at=bindparam("b_now"),
                )
                .returning(*_ROW_COLUMNS)
            )
        result = await session.execute(
            self._claim_statement,
            {
                "b_id": saga_id,
                "b_owner": self.replica_id,
                "b_now": now,
                "b_expires": now + self._lease,
            },
        )
        found = result.first()
        return _row(found) if found is not None else None

    async def _fence(self, session: AsyncSession, row: SagaRow) -> SagaRow:
        """Lock the saga row for this transaction if we still own it; bump its version."""
        now = self._clock.now()
        result = await session.execute(
            _FENCE,
            {
                "b_id": row.id,
                "b_owner": self.replica_id,
                "b_version": row.version,
                "b_now": now,
                "b_expires": now + self._lease,
            },
        )
        fenced = result.first()
        if fenced is None:
            raise LeaseLost(str(row.id))
        return _row(fenced)

    async def _write(self, session: AsyncSession, row: SagaRow, **values: Any) -> SagaRow:
        """Update the saga row already fenced in this transaction.

        The row is locked by the fence, so the write is kept and made once, with the
        step's log entries, just before the transaction commits (:meth:`_transaction`).
        ``lease_owner`` / ``lease_expires_at`` may only be cleared (the saga is let go).
        """
        unknown = values.keys() - _ROW_FIELDS.keys() - {"lease_owner", "lease_expires_at"}
        assert not unknown, f"not a column a step writes: {unknown}"
        release = values.get("lease_owner", row) is None
        changes = {_ROW_FIELDS[key]: value for key, value in values.items() if key in _ROW_FIELDS}
        written = replace(row, **changes)
        pending: _PendingWrite | None = session.info.get(_PENDING_WRITE)
        session.info[_PENDING_WRITE] = _PendingWrite(
            written, release or (pending is not None and pending.release)
        )
        return written

    async def _log(
        self,
        session: AsyncSession,
        saga_id: uuid.UUID,
        node: str,
        event: SagaLogEvent,
        at: datetime,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        session.info.setdefault(_PENDING_LOG, []).append(
            {
                "saga_id": saga_id,
                "node_name": node,
                "event": event.value,
                "replica_id": self.replica_id,
                "at": at,
                "data": dict(data) if data else None,
            }
        )

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncSession]:
        """A step's transaction: the saga row's write and the log entries go last."""
        async with self._sessions.begin() as session:
            session.info[_IN_STEP] = True
            yield session
            await self._outbox.add_rows(session, session.info.pop(_PENDING_OUTBOX, []))
            pending: _PendingWrite | None = session.info.pop(_PENDING_WRITE, None)
            if pending is not None:
                row = pending.row
                await session.execute(
                    _WRITE_RELEASING if pending.release else _WRITE,
                    {
                        "b_id": row.id,
                        "b_version": row.version,
                        "b_state": row.state,
                        "b_progress": dict(row.progress),
                        "b_outputs": dict(row.outputs),
                        "b_error": row.error,
                    },
                )
            entries: list[dict[str, Any]] | None = session.info.pop(_PENDING_LOG, None)
            if entries:
                await session.execute(_LOG_INSERT, entries)

    # One step.

    async def _step(self, row: SagaRow | None, saga_id: uuid.UUID, limit: int) -> _Stepped:
        """One transaction: fence (or claim) the saga, then run up to ``limit`` nodes.

        Nodes that follow each other without waiting share the transaction: each keeps
        its own log entries, output and outbox rows, and a crash rolls them back
        together, so every node still either happened entirely or not at all. The
        transaction ends when the saga parks, finishes, or the limit is reached.
        """
        if row is not None:
            if row.state == SagaState.DONE.value:
                return _Stepped(None, None)
            if row.state == SagaState.UNWINDING.value:
                definition, params = self._resolve(row)
                return _Stepped(None, await self._undo_step(definition, params, row))
        ran = 0
        node_name: str | None = None
        try:
            async with self._transaction() as session:
                if row is None:
                    claimed = await self._claim_in(session, saga_id)
                    if claimed is None:
                        return _Stepped(None, None)
                    current = claimed
                else:
                    current = await self._fence(session, row)
                seen = current
                if current.state not in (SagaState.RUNNING.value, SagaState.WAITING.value):
                    return _Stepped(seen, current)  # claimed while unwinding: next step
                try:
                    definition, params = self._resolve(current)
                except Unrecoverable as error:
                    return _Stepped(seen, current, unrecoverable=str(error))
                while ran < limit:
                    progress = Progress.of(current.progress)
                    if progress.stage >= len(definition.stages):
                        self._note(current.id, SagaState.DONE.value, None)
                        await self._write(
                            session,
                            current,
                            state=SagaState.DONE.value,
                            lease_owner=None,
                            lease_expires_at=None,
                            error=None,
                        )
                        return _Stepped(seen, None)
                    stage = definition.stages[progress.stage]
                    if all(node.name in current.outputs for node in stage):
                        progress.stage += 1
                        current = await self._write(session, current, progress=progress.dump())
                        continue
                    pending = next(
                        (
                            node
                            for node in stage
                            if node.name not in current.outputs
                            and node.name not in progress.waiting
                        ),
                        None,
                    )
                    if pending is not None:
                        node_name = pending.name
                        after = await self._act(session, definition, params, current, pending)
                    else:
                        ready = await self._ready(session, current.id, progress)
                        if not ready:
                            await self._write(
                                session,
                                current,
                                state=SagaState.WAITING.value,
                                lease_owner=None,
                                lease_expires_at=None,
                            )
                            log.info(
                                "saga %s parked", current.id, extra={"saga_id": str(current.id)}
                            )
                            return _Stepped(seen, None)
                        wait = ready[0]
                        node_name = wait.node
                        wake = WakeUp(
                            key=wait.key,
                            payload=wait.payload,
                            generation=wait.generation,
                            message_id=wait.message_id,
                            occurred_at=wait.occurred_at,
                        )
                        node = definition.node(wait.node)
                        after = await self._resume(session, definition, params, current, node, wake)
                    ran += 1
                    if after is None:
                        return _Stepped(seen, None)  # parked
                    current = after
                    if current.state != SagaState.RUNNING.value:
                        break  # done
                return _Stepped(seen, current)
        except (LeaseLost, *_INFRASTRUCTURE_ERRORS):
            raise
        except Exception as error:  # an action's failure, whatever its type, fails its node
            if _contention(error):
                raise Contended(str(node_name)) from error
            if isinstance(error, DBAPIError) and error.connection_invalidated:
                raise
            if node_name is None:
                raise
            if ran > 0 or row is None:
                raise _Split(ran) from error
            if isinstance(error, Unrecoverable):
                raise
            return _Stepped(row, await self._fail_node(row, node_name, error))

    def _resolve(self, row: SagaRow) -> tuple[SagaDefinition[Any], BaseModel]:
        definition = self._definition(row)
        try:
            return definition, definition.params.model_validate(row.params)
        except ValidationError as error:
            raise Unrecoverable(str(error)) from error

    async def _act(
        self,
        session: AsyncSession,
        definition: SagaDefinition[Any],
        params: BaseModel,
        fenced: SagaRow,
        node: Node[Any],
    ) -> SagaRow | None:
        """Run a node's action inside the step's transaction and record its result."""
        started = self._clock.now()
        ctx = self._ctx(session, definition, params, fenced, node.name)
        if self._faults.before_action is not None:
            self._faults.before_action(definition.name, node.name)
        if self._faults.fail_node(definition.name, node.name):
            raise ActionFailed(f"injected failure at {node.name}")
        result = await node.action(ctx)
        if self._faults.repeat_actions:
            result = await node.action(ctx)
        await self._log(session, fenced.id, node.name, SagaLogEvent.STARTED, started)
        return await self._settle(session, definition, params, fenced, node, result)

    async def _settle(
        self,
        session: AsyncSession,
        definition: SagaDefinition[Any],
        params: BaseModel,
        fenced: SagaRow,
        node: Node[Any],
        result: BaseModel | Wait | None,
    ) -> SagaRow | None:
        """Record what an action or resume returned: an output, or a wait.

        None: the saga parked (it is no longer this replica's).
        """
        now = self._clock.now()
        progress = Progress.of(fenced.progress)
        if isinstance(result, Wait):
            deadline = now + result.deadline
            previous = progress.waiting.get(node.name, {})
            progress.waiting[node.name] = {
                "keys": list(result.keys),
                "since": previous.get("since", now.isoformat()),
                "deadline": deadline.isoformat(),
                "rearms": result.rearms,
                "min_generation": result.min_generation,
                "timeout_seconds": result.deadline.total_seconds(),
            }
            await rendezvous.park(
                session,
                saga_id=fenced.id,
                node=node.name,
                keys=result.keys,
                deadline=deadline,
                min_generation=result.min_generation,
                now=now,
            )
            self._note(fenced.id, "waiting", node.name, ", ".join(result.keys))
            await self._log(
                session,
                fenced.id,
                node.name,
                SagaLogEvent.WAITING,
                now,
                {"keys": list(result.keys), "deadline": deadline.isoformat()},
            )
            stage = definition.stages[progress.stage]
            started = all(
                other.name in fenced.outputs or other.name in progress.waiting for other in stage
            )
            if started and not await self._ready(session, fenced.id, progress):
                # Every node of the stage waits and no event is in: park in this same
                # transaction (the saga row is locked, so no wake-up can slip between).
                await self._write(
                    session,
                    fenced,
                    progress=progress.dump(),
                    state=SagaState.WAITING.value,
                    lease_owner=None,
                    lease_expires_at=None,
                )
                return None
            return await self._write(session, fenced, progress=progress.dump())
        output = result.model_dump(mode="json") if result is not None else {}
        outputs = {**fenced.outputs, node.name: output}
        progress.waiting.pop(node.name, None)
        progress.completed.append(node.name)
        self._note(fenced.id, "succeeded", node.name)
        await self._log(session, fenced.id, node.name, SagaLogEvent.SUCCEEDED, now)
        # The stage's last node moves the saga on in the same write (one commit fewer),
        # and the saga's last node finishes it.
        finished: dict[str, Any] = {}
        if all(other.name in outputs for other in definition.stages[progress.stage]):
            progress.stage += 1
            if progress.stage >= len(definition.stages):
                finished = {
                    "state": SagaState.DONE.value,
                    "lease_owner": None,
                    "lease_expires_at": None,
                    "error": None,
                }
                self._note(fenced.id, SagaState.DONE.value, None)
                log.info("saga %s done", fenced.id, extra={"saga_id": str(fenced.id)})
        return await self._write(
            session, fenced, progress=progress.dump(), node_outputs=outputs, **finished
        )

    async def _ready(
        self, session: AsyncSession, saga_id: uuid.UUID, progress: Progress
    ) -> list[rendezvous.ReadyWait]:
        """The saga's waits an event has satisfied, among those it still waits on."""
        return [
            wait
            for wait in await rendezvous.ready_waits(session, saga_id)
            if wait.node in progress.waiting
        ]

    async def _resume(
        self,
        session: AsyncSession,
        definition: SagaDefinition[Any],
        params: BaseModel,
        fenced: SagaRow,
        node: Node[Any],
        wake: WakeUp,
    ) -> SagaRow | None:
        now = self._clock.now()
        self._note(
            fenced.id,
            "resumed",
            node.name,
            "by reconcile" if wake.by_reconcile else f"by event on {wake.key}",
        )
        await rendezvous.resolve(session, saga_id=fenced.id, node=node.name, now=now)
        await self._log(
            session,
            fenced.id,
            node.name,
            SagaLogEvent.RESUMED,
            now,
            {
                "key": wake.key,
                "message_id": str(wake.message_id) if wake.message_id else None,
                "by_reconcile": wake.by_reconcile,
                "event_occurred_at": wake.occurred_at.isoformat() if wake.occurred_at else None,
            },
        )
        if fenced.state == SagaState.WAITING.value:
            fenced = await self._write(session, fenced, state=SagaState.RUNNING.value)
        if node.resume is None:
            return await self._settle(
                session,
                definition,
                params,
                fenced,
                node,
                _PayloadOutput.model_validate(dict(wake.payload)),
            )
        ctx = self._ctx(session, definition, params, fenced, node.name)
        result = await node.resume(ctx, wake)
        return await self._settle(session, definition, params, fenced, node, result)

    # Deadlines: one reconcile query, then resume, re-arm or fail.

    async def handle_deadline(self, saga_id: uuid.UUID) -> None:
        if saga_id in self._running:
            return
        self._running.add(saga_id)
        try:
            row = await self._claim(saga_id)
            if row is None:
                return
            definition = self._definition(row)
            params = definition.params.model_validate(row.params)
            row = await self._reconcile_expired(definition, params, row)
            if row is not None:
                await self._run_claimed(row)
        except (LeaseLost, Contended):
            log.warning(
                "lost the lease on saga %s during reconcile (or a race in the "
                "database); the next sweep tries again",
                saga_id,
            )
        except (Unrecoverable, ValidationError) as error:
            log.error("saga %s cannot be reconciled: %s", saga_id, error)
        finally:
            self._running.discard(saga_id)
            self._run_again(saga_id)

    async def _reconcile_expired(
        self, definition: SagaDefinition[Any], params: BaseModel, row: SagaRow
    ) -> SagaRow | None:
        now = self._clock.now()
        progress = Progress.of(row.progress)
        for node_name, wait in list(progress.waiting.items()):
            if datetime.fromisoformat(wait["deadline"]) >= now:
                continue
            node = definition.node(node_name)
            keys = list(wait["keys"])
            outcome = await self._ask(
                definition, params, row, node, keys, attempt=int(wait.get("asked", 0))
            )
            log.info(
                "saga %s node %s deadline: reconcile says %s %s",
                row.id,
                node_name,
                outcome.outcome.value,
                outcome.reason,
                extra={"saga_id": str(row.id)},
            )
            if outcome.outcome is Outcome.RESUME and outcome.key is not None:
                try:
                    async with self._transaction() as session:
                        fenced = await self._fence(session, row)
                        await rendezvous.force_ready(
                            session,
                            key=outcome.key,
                            payload=outcome.payload,
                            generation=outcome.generation,
                            now=now,
                        )
                        wake = WakeUp(
                            key=outcome.key,
                            payload=outcome.payload,
                            generation=outcome.generation,
                            message_id=None,
                            by_reconcile=True,
                            occurred_at=now,
                        )
                        resumed = await self._resume(
                            session, definition, params, fenced, node, wake
                        )
                except (LeaseLost, *_INFRASTRUCTURE_ERRORS):
                    raise
                except Exception as error:
                    if _contention(error):
                        # The next sweep finds the deadline still passed and asks again.
                        raise Contended(node_name) from error
                    return await self._fail_node(row, node_name, error)
                if resumed is None:
                    # It parked again (a resume may wait anew); what else expired is
                    # the next sweep's.
                    return None
                row = resumed
            elif outcome.outcome is Outcome.REARM and int(wait.get("rearms", 0)) > 0:
                async with self._transaction() as session:
                    fenced = await self._fence(session, row)
                    term = outcome.after or timedelta(seconds=float(wait["timeout_seconds"]))
                    deadline = now + term
                    wait = {
                        **wait,
                        "deadline": deadline.isoformat(),
                        "rearms": int(wait["rearms"]) - 1,
                        "asked": int(wait.get("asked", 0)) + 1,
                    }
                    progress = Progress.of(fenced.progress)
                    progress.waiting[node_name] = wait
                    await rendezvous.rearm(
                        session, saga_id=row.id, node=node_name, deadline=deadline
                    )
                    await self._log(
                        session,
                        row.id,
                        node_name,
                        SagaLogEvent.WAITING,
                        now,
                        {"keys": keys, "deadline": deadline.isoformat(), "rearmed": outcome.reason},
                    )
                    row = await self._write(session, fenced, progress=progress.dump())
            else:
                reason = outcome.reason or "deadline passed without the event"
                return await self._fail_node(
                    row, node_name, ActionFailed(f"deadline passed: {reason}")
                )
        return row

    async def _ask(
        self,
        definition: SagaDefinition[Any],
        params: BaseModel,
        row: SagaRow,
        node: Node[Any],
        keys: list[str],
        *,
        attempt: int,
    ) -> Reconciled:
        if node.reconcile is None:
            return Reconciled.fail("the node has no reconcile query")
        async with self._sessions() as session:
            ctx = self._ctx(session, definition, params, row, node.name)
            ctx.attempt = attempt
            try:
                return await node.reconcile(ctx, keys)
            except Exception as error:  # an unreachable agent: give the wait another term
                return Reconciled.rearm(f"reconcile query failed: {error!r}")

    # Failure and unwinding.

    async def _fail_node(self, row: SagaRow, node: str, error: BaseException) -> SagaRow:
        message = str(error) if isinstance(error, ActionFailed) else repr(error)
        log.warning(
            "saga %s node %s failed: %s", row.id, node, message, extra={"saga_id": str(row.id)}
        )
        # Whatever the failed step noted rolled back with it.
        self._notes.pop(row.id, None)
        self._note(row.id, "failed", node, message)
        now = self._clock.now()
        async with self._transaction() as session:
            fenced = await self._fence(session, row)
            progress = Progress.of(fenced.progress)
            progress.failed_node = node
            progress.waiting.clear()
            await rendezvous.release(session, row.id)
            detail: dict[str, Any] = {"error": message}
            if not isinstance(error, ActionFailed):
                detail["traceback"] = "".join(traceback.format_exception(error))[-4000:]
            await self._log(session, row.id, node, SagaLogEvent.FAILED, now, detail)
            return await self._write(
                session,
                fenced,
                state=SagaState.UNWINDING.value,
                progress=progress.dump(),
                error=f"{node}: {message}",
            )

    async def _undo_step(
        self, definition: SagaDefinition[Any], params: BaseModel, row: SagaRow
    ) -> SagaRow | None:
        progress = Progress.of(row.progress)
        remaining = [n for n in reversed(progress.completed) if n not in progress.undone]
        if not remaining:
            await self._finish(row, SagaState.UNDONE, error=row.error)
            return None
        node = definition.node(remaining[0])
        started = self._clock.now()
        try:
            async with self._transaction() as session:
                fenced = await self._fence(session, row)
                if node.undo is not None:
                    await self._log(session, row.id, node.name, SagaLogEvent.UNDO_STARTED, started)
                    if self._faults.fail_undo(definition.name, node.name):
                        raise ActionFailed(f"injected undo failure at {node.name}")
                    ctx = self._ctx(session, definition, params, fenced, node.name)
                    await node.undo(ctx)
                    if self._faults.repeat_undos:
                        await node.undo(ctx)
                    await self._log(
                        session, row.id, node.name, SagaLogEvent.UNDO_FINISHED, self._clock.now()
                    )
                progress = Progress.of(fenced.progress)
                progress.undone.append(node.name)
                return await self._write(session, fenced, progress=progress.dump())
        except (LeaseLost, Unrecoverable, *_INFRASTRUCTURE_ERRORS):
            raise
        except Exception as error:
            if _contention(error):
                raise Contended(node.name) from error
            message = str(error) if isinstance(error, ActionFailed) else repr(error)
            log.error(
                "saga %s undo of %s failed; saga is stuck: %s",
                row.id,
                node.name,
                message,
                extra={"saga_id": str(row.id)},
            )
            async with self._transaction() as session:
                fenced = await self._fence(session, row)
                await self._log(
                    session,
                    row.id,
                    node.name,
                    SagaLogEvent.UNDO_FAILED,
                    self._clock.now(),
                    {"error": message},
                )
                if definition.on_stuck is not None:
                    await definition.on_stuck(
                        self._ctx(session, definition, params, fenced, node.name)
                    )
                await self._write(
                    session,
                    fenced,
                    state=SagaState.STUCK.value,
                    lease_owner=None,
                    lease_expires_at=None,
                    error=f"{row.error}; undo of {node.name} failed: {message}",
                )
            self._progress(row, SagaState.STUCK.value, node.name, message)
            return None

    async def _finish(self, row: SagaRow, state: SagaState, error: str | None) -> None:
        async with self._transaction() as session:
            fenced = await self._fence(session, row)
            await self._write(
                session,
                fenced,
                state=state.value,
                lease_owner=None,
                lease_expires_at=None,
                error=error,
            )
        log.info("saga %s %s", row.id, state.value, extra={"saga_id": str(row.id)})
        self._progress(row, state.value, None, error)

    async def _mark_unrecoverable(self, row: SagaRow, reason: str) -> None:
        log.error(
            "saga %s is unrecoverable and skipped: %s",
            row.id,
            reason,
            extra={"saga_id": str(row.id)},
        )
        async with self._transaction() as session:
            fenced = await self._fence(session, row)
            await self._write(
                session,
                fenced,
                state=SagaState.UNRECOVERABLE.value,
                lease_owner=None,
                lease_expires_at=None,
                error=f"unrecoverable: {reason}"[:4000],
            )

    def _progress(self, row: SagaRow, step: str, node: str | None, detail: str | None) -> None:
        """Tell watchers (after a commit; it is not state, and is best effort)."""
        if self._on_progress is not None:
            self._on_progress(row, step, node, detail)

    def _note(
        self, saga_id: uuid.UUID, step: str, node: str | None, detail: str | None = None
    ) -> None:
        """Progress to tell once the current step's transaction has committed."""
        self._notes.setdefault(saga_id, []).append((step, node, detail))

    def _tell(self, row: SagaRow) -> None:
        for step, node, detail in self._notes.pop(row.id, []):
            self._progress(row, step, node, detail)

    # Background duties of every replica: deadlines, adoption, stray wake-ups.

    async def sweep(self, limit: int = 100) -> int:
        """One pass; returns how many sagas it acted on."""
        now = self._clock.now()
        async with self._sessions() as session:
            expired = await rendezvous.expired(session, now, limit)
            woken = await rendezvous.woken_but_waiting(session, limit)
            orphaned = (
                (
                    await session.execute(
                        select(sagas.c.id)
                        .where(
                            sagas.c.state.in_([SagaState.RUNNING.value, SagaState.UNWINDING.value]),
                            or_(sagas.c.lease_owner.is_(None), sagas.c.lease_expires_at < now),
                            self._runnable_definitions(),
                        )
                        .limit(limit)
                    )
                )
                .scalars()
                .all()
            )
        # Side by side: a reconcile query waits on an agent, and one slow agent must not
        # hold up every other saga's deadline.
        gate = asyncio.Semaphore(SWEEP_CONCURRENCY)

        async def gated(work: Awaitable[None]) -> None:
            async with gate:
                await work

        await asyncio.gather(
            *(gated(self.handle_deadline(saga_id)) for saga_id in expired),
            *(gated(self.run(saga_id)) for saga_id in {*woken, *orphaned}),
        )
        return len(expired) + len({*woken, *orphaned})

    async def sweep_unclaimed(self, retention: timedelta) -> int:
        now = self._clock.now()
        async with self._transaction() as session:
            return await rendezvous.sweep_unclaimed(session, older_than=now - retention, now=now)

    async def unrunnable(self) -> list[tuple[str, int, int]]:
        """Sagas this replica leaves alone because it lacks their definition version."""
        async with self._sessions() as session:
            rows = await session.execute(
                select(sagas.c.name, sagas.c.definition_version, func.count())
                .where(sagas.c.state.in_(_CLAIMABLE), ~self._runnable_definitions())
                .group_by(sagas.c.name, sagas.c.definition_version)
            )
            return [(r[0], r[1], r[2]) for r in rows]

    # Helpers.

    def _ctx(
        self,
        session: AsyncSession,
        definition: SagaDefinition[Any],
        params: BaseModel,
        row: SagaRow,
        node: str,
    ) -> Ctx[Any]:
        async def send(message: Any, exchange: str, routing_key: str, mandatory: bool) -> None:
            # Written with the step's other rows, in one statement, before its commit.
            row = self._outbox.row(
                message, exchange=exchange, routing_key=routing_key, mandatory=mandatory
            )
            if _IN_STEP not in session.info:
                raise RuntimeError("a saga sends commands only from an action or an undo")
            session.info.setdefault(_PENDING_OUTBOX, []).append(row)

        return Ctx(
            saga_id=row.id,
            saga_name=definition.name,
            node=node,
            params=params,
            outputs=row.outputs,
            session=session,
            now=self._clock.now(),
            replica_id=self.replica_id,
            send=send,
            transport=self._transport,
        )


class _PayloadOutput(BaseModel):
    """A wake-up's payload kept as a node's output when the node has no resume."""

    model_config = {"extra": "allow"}


# Saga columns a step writes -> SagaRow fields (lease and timestamps are not in SagaRow).
_ROW_FIELDS = {
    "state": "state",
    "progress": "progress",
    "node_outputs": "outputs",
    "error": "error",
}
_PENDING_WRITE = "nexus.saga.pending_write"
_PENDING_LOG = "nexus.saga.pending_log"
_PENDING_OUTBOX = "nexus.saga.pending_outbox"
_IN_STEP = "nexus.saga.in_step"

_ROW_COLUMNS = (
    sagas.c.id,
    sagas.c.name,
    sagas.c.definition_version,
    sagas.c.params,
    sagas.c.state,
    sagas.c.node_outputs,
    sagas.c.progress,
    sagas.c.version,
    sagas.c.error,
)


# Every step starts with this: built once (building costs more CPU than running it).
_FENCE = (
    update(sagas)
    .where(
        sagas.c.id == bindparam("b_id"),
        sagas.c.lease_owner == bindparam("b_owner"),
        sagas.c.version == bindparam("b_version"),
    )
    .values(
        version=sagas.c.version + 1,
        lease_expires_at=bindparam("b_expires"),
        updated_at=bindparam("b_now"),
    )
    .returning(*_ROW_COLUMNS)
)


def _write_statement(release: bool) -> Any:
    values: dict[str, Any] = {
        "state": bindparam("b_state", type_=sagas.c.state.type),
        "progress": bindparam("b_progress", type_=sagas.c.progress.type),
        "node_outputs": bindparam("b_outputs", type_=sagas.c.node_outputs.type),
        "error": bindparam("b_error", type_=sagas.c.error.type),
    }
    if release:
        values |= {"lease_owner": None, "lease_expires_at": None}
    return (
        update(sagas)
        .where(sagas.c.id == bindparam("b_id"), sagas.c.version == bindparam("b_version"))
        .values(**values)
    )


_WRITE = _write_statement(release=False)
_WRITE_RELEASING = _write_statement(release=True)
_LOG_INSERT = insert(saga_log)


@dataclass(frozen=True)
class _PendingWrite:
    row: SagaRow
    release: bool


def _row(found: Any) -> SagaRow:
    return SagaRow(
        id=found.id,
        name=found.name,
        definition_version=found.definition_version,
        params=found.params,
        state=found.state,
        outputs=found.node_outputs or {},
        progress=found.progress or {},
        version=found.version,
        error=found.error,
    )
