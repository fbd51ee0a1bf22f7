"""The composition root of a Nexus replica: database, broker, executor, consumers, relay.

``NexusApp`` builds the real adapters from settings and nothing connects before
``start()``. Tests and the benchmark build the same app with their own clock, saga
definitions, saga for ``disk create`` and faults: hooks that no setting reaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from nexus.api import Api
from nexus.db.engine import create_engine, create_sessionmaker
from nexus.events import EventIngest
from nexus.liveness import mark_silent_sleds
from nexus.saga.clock import Clock, DatabaseClock
from nexus.saga.definition import SagaDefinition
from nexus.saga.executor import SagaExecutor
from nexus.saga.faults import Faults
from nexus.saga.outbox import NexusOutboxStore, Outbox
from nexus.saga.position import SagaRow
from nexus.sagas import ALL_SAGAS, disk_create
from nexus.settings import NexusSettings
from schemas.outbox import OutboxRelay
from schemas.progress import SagaProgress, SagaProgressed, SagaStep
from schemas.redact import redact_urls_in
from schemas.topology import NEXUS_API_QUEUE, NEXUS_EVENTS_QUEUE
from schemas.transport import Delivery, Transport

log = logging.getLogger(__name__)

# How often a replica measures its clock against the database's again.
CLOCK_MEASURE_SECONDS = 5.0


class NexusApp:
    def __init__(
        self,
        settings: NexusSettings,
        *,
        clock: Clock | None = None,
        definitions: Sequence[SagaDefinition[Any]] = ALL_SAGAS,
        disk_create_saga: SagaDefinition[Any] = disk_create.DEFINITION,
        faults: Faults | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock or DatabaseClock()
        self._definitions = definitions
        self._disk_create_saga = disk_create_saga
        self._faults = faults
        self._tasks: list[asyncio.Task[None]] = []
        self._progress_tasks: set[asyncio.Task[None]] = set()
        self.engine: AsyncEngine | None = None
        self.sessions: async_sessionmaker[AsyncSession] | None = None
        self.transport: Transport | None = None
        self.executor: SagaExecutor | None = None
        self.relay: OutboxRelay | None = None
        self.ingest: EventIngest | None = None
        self.api: Api | None = None

    @property
    def replica_id(self) -> str:
        return self.settings.replica_id

    async def start(self, *, consume: bool = True, background: bool = True) -> None:
        settings = self.settings
        self.engine = create_engine(settings.database_url)
        self.sessions = create_sessionmaker(self.engine)
        if isinstance(self.clock, DatabaseClock):
            await self.clock.measure(self.engine)
        self.transport = Transport(settings.amqp_url, name=f"nexus/{settings.replica_id}")
        await self.transport.connect()
        await self.transport.declare_topology()

        outbox = Outbox(self.clock.now)
        store = NexusOutboxStore(self.sessions, outbox, clock=self.clock.now)
        self.relay = OutboxRelay(store, self.transport)
        outbox.on_commit(self.relay.notify)
        self.executor = SagaExecutor(
            sessions=self.sessions,
            definitions=self._definitions,
            replica_id=settings.replica_id,
            outbox=outbox,
            transport=self.transport,
            clock=self.clock,
            lease=timedelta(seconds=settings.lease_seconds),
            faults=self._faults,
            on_progress=self._saga_progress,
        )
        self.ingest = EventIngest(
            self.sessions, self.clock.now, max_generation_lead=settings.max_generation_lead
        )
        self._tasks.append(asyncio.create_task(self.relay.run(), name="outbox-relay"))
        if background:
            self._tasks.append(asyncio.create_task(self._sweeper(), name="sweeper"))
        self.api = Api(
            disk_create_saga=self._disk_create_saga,
            sessions=self.sessions,
            executor=self.executor,
            transport=self.transport,
            clock=self.clock.now,
            replica_id=settings.replica_id,
            region_deadline=timedelta(seconds=settings.region_deadline_seconds),
        )
        if consume:
            await self.transport.consume(
                NEXUS_EVENTS_QUEUE, self.on_event, prefetch=settings.event_prefetch
            )
            await self.transport.consume(
                NEXUS_API_QUEUE, self.api.handle, prefetch=16, on_refused=self.api.on_refused
            )
        log.info(
            "nexus replica %s up (database %s)",
            settings.replica_id,
            redact_urls_in(settings.database_url),
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.executor is not None:
            await self.executor.drain()
        if self.transport is not None:
            await self.transport.close()
        if self.engine is not None:
            await self.engine.dispose()

    async def on_event(self, delivery: Delivery) -> None:
        """Record the event (commit), then run the saga it woke; the ack follows."""
        assert self.ingest is not None and self.executor is not None
        ingested = await self.ingest.ingest(delivery.message)
        if ingested.woken is not None:
            log.info(
                "event woke saga %s at %s",
                ingested.woken.saga_id,
                ingested.woken.node,
                extra={
                    "saga_id": str(ingested.woken.saga_id),
                    "message_id": str(delivery.message.id),
                    "correlation_id": str(delivery.message.correlation_id),
                },
            )
            self.executor.spawn(ingested.woken.saga_id)

    async def start_saga(
        self, definition: SagaDefinition[Any], params: Any, saga_id: uuid.UUID | None = None
    ) -> uuid.UUID:
        assert self.executor is not None
        return await self.executor.start(definition, params, saga_id)

    def _saga_progress(
        self, saga: SagaRow, step: str, node: str | None, detail: str | None
    ) -> None:
        """Tell watchers (``nexusctl ... --wait``) how a saga moves; best effort."""
        event = SagaProgressed(
            source=f"nexus/{self.replica_id}",
            correlation_id=saga.id,
            payload=SagaProgress(
                saga_id=saga.id,
                saga_name=saga.name,
                node=node,
                step=SagaStep(step),
                replica=self.replica_id,
                detail=detail[:2000] if detail else None,
            ),
        )
        task = asyncio.create_task(self._publish_progress(event))
        self._progress_tasks.add(task)
        task.add_done_callback(self._progress_tasks.discard)

    async def _publish_progress(self, event: SagaProgressed) -> None:
        assert self.transport is not None
        try:
            await self.transport.publish_notice(event)
        except Exception as error:  # a watcher missing one progress event is harmless
            log.warning("could not publish saga progress: %r", error)

    def _report_health(self) -> None:
        path = self.settings.health_file
        if path is not None and self.transport is not None and self.transport.is_connected:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()

    async def _sweeper(self) -> None:
        """Deadlines, expired leases and stray wake-ups: the safety net, not a poll of agents."""
        assert self.executor is not None
        settings = self.settings
        unclaimed_every = max(1, int(60 / settings.sweep_seconds))
        measure_every = max(1, int(CLOCK_MEASURE_SECONDS / settings.sweep_seconds))
        passes = 0
        while True:
            await asyncio.sleep(settings.sweep_seconds)
            passes += 1
            try:
                if isinstance(self.clock, DatabaseClock) and passes % measure_every == 0:
                    assert self.engine is not None
                    await self.clock.measure(self.engine)
                await self.executor.sweep()
                assert self.sessions is not None
                await mark_silent_sleds(
                    self.sessions,
                    now=self.clock.now(),
                    timeout=timedelta(seconds=settings.sled_timeout_seconds),
                )
                self._report_health()
                if passes % unclaimed_every == 0:
                    moved = await self.executor.sweep_unclaimed(
                        timedelta(seconds=settings.unclaimed_retention_seconds)
                    )
                    if moved:
                        log.warning("moved %d unclaimed events to unclaimed_events", moved)
            except Exception:
                log.exception("sweeper pass failed; trying again next pass")
