"""The composition root of a Nexus replica: database, broker, executor, consumers, relay.

``NexusApp`` builds the real adapters from settings and nothing connects before
``start()``. Tests and the benchmark build the same app with their own clock, saga
definitions, saga for ``disk create`` and faults: hooks that no setting reaches.

The outbox relay and the sweeper run under one :class:`schemas.tasks.Tasks`: a pass that
fails (the database or the broker is down) is logged and run again after a backoff,
never ending its loop. The health file (``NEXUS_HEALTH_FILE``) is touched only while
both complete their passes, the broker connection is up and no consumed message has
been waiting on a transient failure for long (:meth:`NexusApp.problems`).

With ``NEXUS_METRICS_PORT`` set it serves Prometheus metrics (``nexus.metrics``) from a
registry of its own, so that several apps in one process keep their figures apart.
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
from nexus.liveness import expunge_lost_sleds, mark_silent_sleds
from nexus.metrics import DatabaseFigures, NexusMetrics
from nexus.replacements import Replacements
from nexus.saga.clock import Clock, DatabaseClock
from nexus.saga.definition import SagaDefinition
from nexus.saga.executor import SagaExecutor
from nexus.saga.faults import Faults
from nexus.saga.outbox import NexusOutboxStore, Outbox
from nexus.saga.position import SagaRow
from nexus.sagas import ALL_SAGAS, disk_create
from nexus.settings import NexusSettings
from schemas.health import report_health
from schemas.metrics import MetricsServer, Refresh, serve_metrics
from schemas.outbox import OutboxRelay
from schemas.progress import SagaProgress, SagaProgressed, SagaStep
from schemas.redact import redact_urls_in
from schemas.tasks import Tasks, until_up
from schemas.topology import NEXUS_API_QUEUE, NEXUS_EVENTS_QUEUE
from schemas.transport import Delivery, Transport

log = logging.getLogger(__name__)

# How often the health file is touched while nothing is wrong.
HEALTH_SECONDS = 1.0
# A sweeper pass is a sleep of NEXUS_SWEEP_SECONDS and the sweep; longer than this on
# top of the sleep, and it is stuck.
SWEEP_GRACE_SECONDS = 10.0
# A consumed message still failing on a transient error after this long: the replica
# cannot do its work (its database has been down that long).
CONSUMER_STUCK_SECONDS = 30.0
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
        self.tasks = Tasks()
        self._health_task: asyncio.Task[None] | None = None
        self._sweeps = 0
        self._progress_tasks: set[asyncio.Task[None]] = set()
        self.engine: AsyncEngine | None = None
        self.sessions: async_sessionmaker[AsyncSession] | None = None
        self.transport: Transport | None = None
        self.executor: SagaExecutor | None = None
        self.relay: OutboxRelay | None = None
        self.ingest: EventIngest | None = None
        self.api: Api | None = None
        self.replacements: Replacements | None = None
        # Its own registry: several apps in one process (tests) keep their figures apart.
        self.metrics = NexusMetrics(settings.replica_id)
        self.metrics_server: MetricsServer | None = None
        self._figures: DatabaseFigures | None = None

    @property
    def replica_id(self) -> str:
        return self.settings.replica_id

    async def start(self, *, consume: bool = True, background: bool = True) -> None:
        settings = self.settings
        self.engine = create_engine(settings.database_url, timeouts=settings.postgres_timeouts())
        self.sessions = create_sessionmaker(self.engine)
        if isinstance(self.clock, DatabaseClock):
            clock, engine = self.clock, self.engine
            await until_up("the database's clock", lambda: clock.measure(engine))
        self.transport = Transport(
            settings.amqp_url,
            name=f"nexus/{settings.replica_id}",
            heartbeat=settings.amqp_heartbeat,
            metrics=self.metrics.messages,
        )
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
            metrics=self.metrics,
        )
        self.ingest = EventIngest(
            self.sessions, self.clock.now, max_generation_lead=settings.max_generation_lead
        )
        self.tasks.run("outbox-relay", self.relay.run_pass, window=self.relay.pass_window)
        if background:
            self.tasks.run(
                "sweeper",
                self._sweep_pass,
                window=settings.sweep_seconds + SWEEP_GRACE_SECONDS,
            )
        transport = self.transport
        self.tasks.watch(
            "broker", lambda: transport.health_problem(stuck_after=CONSUMER_STUCK_SECONDS)
        )
        self.replacements = Replacements(
            self.executor,
            region_deadline=timedelta(seconds=settings.region_deadline_seconds),
            delete_deadline=timedelta(seconds=settings.delete_deadline_seconds),
        )
        self.api = Api(
            replacements=self.replacements,
            disk_create_saga=self._disk_create_saga,
            sessions=self.sessions,
            executor=self.executor,
            transport=self.transport,
            clock=self.clock.now,
            replica_id=settings.replica_id,
            region_deadline=timedelta(seconds=settings.region_deadline_seconds),
            region_max_rearms=settings.region_max_rearms,
            delete_deadline=timedelta(seconds=settings.delete_deadline_seconds),
        )
        if consume:
            await self.transport.consume(
                NEXUS_EVENTS_QUEUE, self.on_event, prefetch=settings.event_prefetch
            )
            await self.transport.consume(
                NEXUS_API_QUEUE, self.api.handle, prefetch=16, on_refused=self.api.on_refused
            )
        if settings.health_file is not None:
            self._health_task = asyncio.create_task(
                report_health(settings.health_file, self.problems, HEALTH_SECONDS),
                name="health",
            )
        await self._serve_metrics()
        log.info(
            "nexus replica %s up (database %s)",
            settings.replica_id,
            redact_urls_in(settings.database_url),
        )

    async def _serve_metrics(self) -> None:
        """/metrics when NEXUS_METRICS_PORT is set; the database's figures are read at
        scrape time, at most every NEXUS_METRICS_REFRESH_SECONDS."""
        settings = self.settings
        if settings.metrics_port is None:
            return
        assert self.sessions is not None
        self._figures = figures = DatabaseFigures(
            self.sessions, self.clock, self.replica_id, (d.name for d in self._definitions)
        )
        self.metrics.registry.register(figures)
        self.metrics_server = await serve_metrics(
            self.metrics.registry,
            host=settings.metrics_host,
            port=settings.metrics_port,
            address_file=settings.metrics_address_file,
            refresh=Refresh(figures.read, settings.metrics_refresh_seconds),
        )

    async def stop(self) -> None:
        if self.metrics_server is not None:
            await self.metrics_server.stop()
            self.metrics_server = None
        if self._figures is not None:
            self.metrics.registry.unregister(self._figures)
            self._figures = None
        if self._health_task is not None:
            # A stopping replica is no longer healthy: the file ages from here on.
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        await self.tasks.stop()
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
            self.executor.spawn(ingested.woken.saga_id, woken=ingested.woken.node)

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

    def problems(self) -> list[str]:
        """What is wrong with this replica now, one line each; empty when it is healthy."""
        return self.tasks.problems()

    async def _sweep_pass(self) -> None:
        """Deadlines, expired leases and stray wake-ups: the safety net, not a poll of agents.

        One pass of the sweeper task; a failure is the task supervisor's to log and retry.
        """
        assert self.executor is not None and self.sessions is not None
        settings = self.settings
        await asyncio.sleep(settings.sweep_seconds)
        self._sweeps += 1
        if (
            isinstance(self.clock, DatabaseClock)
            and self._sweeps % max(1, int(CLOCK_MEASURE_SECONDS / settings.sweep_seconds)) == 0
        ):
            assert self.engine is not None
            await self.clock.measure(self.engine)
        await self.executor.sweep()
        await mark_silent_sleds(
            self.sessions,
            now=self.clock.now(),
            timeout=timedelta(seconds=settings.sled_timeout_seconds),
        )
        for woke in await expunge_lost_sleds(
            self.sessions,
            now=self.clock.now(),
            after=timedelta(seconds=settings.sled_expunge_seconds),
            hearing=timedelta(seconds=settings.sled_timeout_seconds),
            replacements=self.replacements,
        ):
            self.executor.spawn(woke.saga_id)
        assert self.replacements is not None
        # The one timer of region replacement: a request whose saga unwound, again.
        await self.replacements.retry(self.sessions, self.clock.now())
        if self._sweeps % max(1, int(60 / settings.sweep_seconds)) == 0:
            moved = await self.executor.sweep_unclaimed(
                timedelta(seconds=settings.unclaimed_retention_seconds)
            )
            if moved:
                log.warning("moved %d unclaimed events to unclaimed_events", moved)
