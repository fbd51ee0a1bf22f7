"""A Nexus replica's Prometheus metrics (README, "Metrics", lists them all).

Two kinds:

- **Observed in memory**, as they happen, on this replica: node durations, the wake
  overhead, adoptions and reconciles (the engine's port, ``nexus.saga.metrics``), and
  what its transport consumed (``schemas.metrics.MessageMetrics``). Nothing here costs
  a query.
- **Read from the database at scrape time** (:class:`DatabaseFigures`), at most once per
  ``NEXUS_METRICS_REFRESH_SECONDS`` however often Prometheus scrapes: sagas by name and
  state, the outbox's depth and the age of its oldest unsent row, and the leases this
  replica holds. The first two are the database's, so every replica reports the same
  figure: aggregate them with ``max``, not ``sum``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from nexus.db.models import OutboxMessage, Saga
from nexus.db.states import SagaState
from nexus.saga.clock import Clock
from schemas.metrics import LATENCY_BUCKETS, MessageMetrics, new_registry, seconds_between

# A node's duration includes its wait: milliseconds for a database write, up to many
# minutes for a region that takes long to create.
NODE_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
)


class NexusMetrics:
    """The registry of one replica and what the engine and its transport observe into it
    (an ``EngineMetrics``)."""

    def __init__(self, replica_id: str) -> None:
        self.registry: CollectorRegistry = new_registry("nexus", replica_id)
        registry = self.registry
        self.messages = MessageMetrics(registry)
        self.node_duration = Histogram(
            "nexus_saga_node_duration_seconds",
            "From a forward node's start (its first park, for a node that waited) to its "
            "success, by saga and node.",
            ["saga", "node"],
            buckets=NODE_BUCKETS,
            registry=registry,
        )
        self.wake_overhead = Histogram(
            "nexus_wake_overhead_seconds",
            "From an agent's event (its occurred_at, the agent's clock) to the saga node "
            "it woke resuming on this replica, by saga and node.",
            ["saga", "node"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.adoptions = Counter(
            "nexus_saga_adoptions_total",
            "Sagas this replica claimed after another replica's lease on them expired.",
            ["saga"],
            registry=registry,
        )
        self.reconciles = Counter(
            "nexus_reconciles_total",
            "Reconcile queries at a wait's deadline, by saga and what they answered "
            "(resume, rearm, resend, unanswered, fail).",
            ["saga", "outcome"],
            registry=registry,
        )

    # EngineMetrics.

    def node_succeeded(self, saga: str, node: str, seconds: float) -> None:
        self.node_duration.labels(saga, node).observe(seconds)

    def resumed(self, saga: str, node: str, wake_seconds: float) -> None:
        self.wake_overhead.labels(saga, node).observe(wake_seconds)

    def adopted(self, saga: str) -> None:
        self.adoptions.labels(saga).inc()

    def reconciled(self, saga: str, outcome: str) -> None:
        self.reconciles.labels(saga, outcome).inc()


_SAGAS_BY_STATE = select(Saga.name, Saga.state, func.count()).group_by(Saga.name, Saga.state)
_UNSENT = select(func.count(), func.min(OutboxMessage.created_at)).where(
    OutboxMessage.sent_at.is_(None)
)
_LEASED_STATES = (SagaState.RUNNING, SagaState.UNWINDING)


class DatabaseFigures(Collector):
    """Gauges read from the database by :meth:`read` and served from memory at scrape."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        clock: Clock,
        replica_id: str,
        saga_names: Iterable[str],
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._replica_id = replica_id
        self._saga_names = sorted(set(saga_names))
        self.sagas: dict[tuple[str, str], int] = {}
        self.unsent = 0
        self.oldest_unsent_age = 0.0
        self.leases = 0
        self.read_once = False

    async def read(self) -> None:
        """Three queries in one read-only transaction."""
        now = self._clock.now()
        async with self._sessions() as session:
            by_state = (await session.execute(_SAGAS_BY_STATE)).all()
            unsent, oldest = (await session.execute(_UNSENT)).one()
            leases = await session.scalar(
                select(func.count()).where(
                    Saga.state.in_(_LEASED_STATES),
                    Saga.lease_owner == self._replica_id,
                    Saga.lease_expires_at > now,
                )
            )
        self.sagas = {(str(name), _state(state)): int(count) for name, state, count in by_state}
        self.unsent = int(unsent or 0)
        self.oldest_unsent_age = seconds_between(_aware(oldest), now) if oldest else 0.0
        self.leases = int(leases or 0)
        self.read_once = True

    def collect(self) -> Iterator[Metric]:
        if not self.read_once:
            return  # nothing read yet: no figure rather than a false zero
        sagas = GaugeMetricFamily(
            "nexus_sagas",
            "Sagas in the database by name and state (every replica reports the same).",
            labels=["name", "state"],
        )
        counts = {(n, s.value): 0 for n in self._saga_names for s in SagaState}
        counts.update(self.sagas)
        for (name, state), count in sorted(counts.items()):
            sagas.add_metric([name, state], count)
        yield sagas
        yield GaugeMetricFamily(
            "eventplane_outbox_unsent",
            "Messages committed to the outbox and not yet confirmed by the broker.",
            value=self.unsent,
        )
        yield GaugeMetricFamily(
            "eventplane_outbox_oldest_unsent_age_seconds",
            "Age of the oldest unsent outbox message (0 when none waits).",
            value=self.oldest_unsent_age,
        )
        yield GaugeMetricFamily(
            "nexus_leases_held",
            "Running or unwinding sagas whose unexpired lease this replica holds.",
            value=self.leases,
        )


def _state(state: object) -> str:
    return state.value if isinstance(state, SagaState) else str(state)


def _aware(moment: datetime) -> datetime:
    """An aggregate's datetime, in UTC (as the column stores it) if it comes back naive."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
