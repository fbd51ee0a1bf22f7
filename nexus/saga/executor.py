"""The saga executor of one Nexus replica: starts, wakes and sweeps its sagas.

Nothing about a saga lives in memory between steps: the executor only keeps which
sagas this replica is running right now, so one saga never runs twice here at once.
How one saga runs is ``nexus.saga.runner`` (steps that apply ``nexus.saga.moves``);
unwinding is ``nexus.saga.unwind``; deadlines ``nexus.saga.deadlines``; every SQL
statement ``nexus.saga.store``. ``docs/engine.md`` is the map.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Iterable
from datetime import timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from nexus.saga.clock import Clock, SystemClock
from nexus.saga.deadlines import Deadlines
from nexus.saga.definition import SagaDefinition
from nexus.saga.errors import Contended, LeaseLost, Unrecoverable, lost_connection
from nexus.saga.faults import Faults
from nexus.saga.metrics import EngineMetrics, NoMetrics
from nexus.saga.notices import Listener, Notices
from nexus.saga.outbox import Outbox
from nexus.saga.parts import Parts
from nexus.saga.position import SagaRow
from nexus.saga.runner import SagaRunner
from nexus.saga.store import SagaStore
from schemas.transport import Transport

log = logging.getLogger(__name__)

# A reconcile query waits on an agent: this many deadlines are handled side by side, so
# one slow agent does not hold up every other saga's.
SWEEP_CONCURRENCY = 32


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
        on_progress: Listener | None = None,
        metrics: EngineMetrics | None = None,
    ) -> None:
        by_version = {(d.name, d.version): d for d in definitions}
        self.replica_id = replica_id
        self._clock = clock or SystemClock()
        self.store = SagaStore(
            sessions, replica_id=replica_id, lease=lease, outbox=outbox, runnable=list(by_version)
        )
        self._parts = parts = Parts(
            store=self.store,
            definitions=by_version,
            clock=self._clock,
            faults=faults or Faults(),
            notices=Notices(on_progress),
            replica_id=replica_id,
            transport=transport,
            metrics=metrics or NoMetrics(),
        )
        self._metrics = parts.metrics
        self.runner = SagaRunner(parts)
        self._deadlines = Deadlines(parts, self.runner)
        # Sagas this replica is running now.
        self._running: set[uuid.UUID] = set()
        # Woken while this replica was running them: claimed again when that run ends.
        self._again: set[uuid.UUID] = set()
        self._tasks: set[asyncio.Task[None]] = set()

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
        async with self.store.reading() as session, session.begin():
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
        return await self.store.create(
            session,
            saga_id=saga_id,
            name=definition.name,
            version=definition.version,
            params=params.model_dump(mode="json"),
            now=self._clock.now(),
        )

    def spawn(
        self, saga_id: uuid.UUID, created: SagaRow | None = None, *, woken: str | None = None
    ) -> None:
        """Run a saga in the background (an event consumer must not wait for it).

        ``created``: the row :meth:`create` returned, committed since: run it as owned.
        ``woken``: the node an event handled now woke (its resume continues the trace).
        """
        if woken is not None:
            self._parts.woken(saga_id, woken)
        task = asyncio.create_task(self.run(saga_id, created), name=f"saga-{saga_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def run(
        self, saga_id: uuid.UUID, created: SagaRow | None = None, *, adopting: str | None = None
    ) -> None:
        """Claim the saga and run it until it parks, ends or gets stuck.

        ``adopting``: the saga's name, when the sweeper found its lease, held by another
        replica, expired; a claim that succeeds is an adoption (counted in the metrics)."""
        if not self._enter(saga_id):
            return
        try:
            claimed = await self.runner.run(created, saga_id)
            if adopting is not None and claimed:
                self._metrics.adopted(adopting)
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
        except Exception as error:
            if not lost_connection(error):
                raise
            # The lease expires and another replica (or this one) adopts the saga.
            log.error(
                "saga %s paused by a database error: %r",
                saga_id,
                error,
                extra={"saga_id": str(saga_id)},
            )
        finally:
            self._leave(saga_id)

    async def handle_deadline(self, saga_id: uuid.UUID) -> None:
        """Claim a saga with an expired wait, reconcile it, and run on from there."""
        if saga_id in self._running:
            return
        self._running.add(saga_id)
        try:
            async with self.store.step(self._clock.now()) as tx:
                row = await tx.claim(saga_id)
            if row is None:
                return
            try:
                after = await self._deadlines.reconcile(row)
            except Unrecoverable as error:
                await self.runner.unwind.mark_unrecoverable(row, str(error))
                return
            if after is not None:
                await self.runner.run(after, saga_id)
        except (LeaseLost, Contended):
            log.warning(
                "lost the lease on saga %s during reconcile (or a race in the "
                "database); the next sweep tries again",
                saga_id,
            )
        finally:
            self._leave(saga_id)

    def _enter(self, saga_id: uuid.UUID) -> bool:
        if saga_id in self._running:
            # Once the run at hand parks, it claims the saga again (a wake-up that
            # arrived meanwhile must not wait for the sweeper).
            self._again.add(saga_id)
            return False
        self._running.add(saga_id)
        self._again.discard(saga_id)
        return True

    def _leave(self, saga_id: uuid.UUID) -> None:
        # What a step noted and did not commit (a lost lease, a database error) is void.
        self.runner.notices.rolled_back(saga_id)
        self._running.discard(saga_id)
        if saga_id in self._again:
            self._again.discard(saga_id)
            self.spawn(saga_id)

    # Background duties of every replica: deadlines, adoption, stray wake-ups.

    async def sweep(self, limit: int = 100) -> int:
        """One pass; returns how many sagas it acted on."""
        due = await self.store.due(self._clock.now(), limit)
        gate = asyncio.Semaphore(SWEEP_CONCURRENCY)

        async def gated(work: Awaitable[None]) -> None:
            async with gate:
                try:
                    await work
                except Exception:
                    # One saga's trouble must not cost the others their pass.
                    log.exception("sweep: a saga failed to move; the next pass tries again")

        await asyncio.gather(
            *(gated(self.handle_deadline(saga_id)) for saga_id in due.expired),
            *(
                gated(self.run(saga_id, adopting=due.adoptable.get(saga_id)))
                for saga_id in due.runnable
            ),
        )
        return len(due.expired) + len(due.runnable)

    async def sweep_unclaimed(self, retention: timedelta) -> int:
        """Move events no saga claimed within ``retention`` where an operator sees them."""
        now = self._clock.now()
        return await self.store.sweep_unclaimed(older_than=now - retention, now=now)

    async def unrunnable(self) -> list[tuple[str, int, int]]:
        """Sagas this replica leaves alone because it lacks their definition version."""
        return await self.store.unrunnable()
