"""A crucible agent's Prometheus metrics (README, "Metrics").

The commands it consumed, their relay time and outcomes, come from its transport
(``schemas.metrics.MessageMetrics``). Its regions by state, its worker queue and its
outbox are read from its SQLite store at scrape time, at most once per
``REFRESH_SECONDS``: one short read-only transaction on the store's single connection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from crucible_agent.regions import WORK_ORDER
from crucible_agent.store import AgentStore
from schemas.metrics import MessageMetrics, new_registry
from schemas.region import RegionState

# How often a scrape reads the store at most.
REFRESH_SECONDS = 2.0


class CrucibleMetrics(Collector):
    """The agent's registry, its transport's metrics, and the gauges read from its store."""

    def __init__(self, agent_id: str) -> None:
        self.registry: CollectorRegistry = new_registry("crucible-agent", agent_id)
        self.messages = MessageMetrics(self.registry)
        self._store: AgentStore | None = None
        self._busy: Callable[[], int] = lambda: 0
        self.regions: dict[str, int] | None = None
        self.unsent = 0
        self.registry.register(self)

    def watch(self, store: AgentStore, busy: Callable[[], int]) -> None:
        """Read ``store`` at scrape time; ``busy``: regions the workers hold right now."""
        self._store = store
        self._busy = busy

    async def read(self) -> None:
        if self._store is None:
            return
        self.regions, self.unsent = await self._store.figures()

    def collect(self) -> Iterator[Metric]:
        if self._store is not None:
            counts = self._store.group.counts
            yield CounterMetricFamily(
                "crucible_group_commits",
                "SQLite transactions committed or rolled back for grouped writes "
                "(crucible_agent/group_commit.py).",
                value=counts.groups,
            )
            yield CounterMetricFamily(
                "crucible_group_commit_writes",
                "Writes (a command's record, a worker's outcome, ...) run in those groups.",
                value=counts.members,
            )
            yield CounterMetricFamily(
                "crucible_group_commit_splits",
                "Writes run again alone because their group failed.",
                value=counts.splits,
            )
        if self.regions is None:
            return
        regions = GaugeMetricFamily(
            "crucible_regions",
            "Regions this agent holds a record of, by state.",
            labels=["state"],
        )
        for state in RegionState:
            regions.add_metric([state.value], self.regions.get(state.value, 0))
        yield regions
        yield GaugeMetricFamily(
            "crucible_worker_queue_depth",
            "Regions waiting for a worker or being worked on (requested or tombstoned).",
            value=sum(self.regions.get(state.value, 0) for state in WORK_ORDER),
        )
        yield GaugeMetricFamily(
            "crucible_workers_busy",
            "Regions the workers are creating or destroying right now.",
            value=self._busy(),
        )
        yield GaugeMetricFamily(
            "eventplane_outbox_unsent",
            "Messages committed to the outbox and not yet confirmed by the broker.",
            value=self.unsent,
        )
