"""A sled agent's Prometheus metrics (README, "Metrics").

The commands it consumed, their relay time and outcomes, come from its transport
(``schemas.metrics.MessageMetrics``). Its VMMs by state and its queue of timed
transitions come from the hypervisor's view in memory, at scrape time; its outbox
depth from its store, read at most once per ``REFRESH_SECONDS``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from schemas.instance import VmmState
from schemas.metrics import MessageMetrics, new_registry
from sled_agent.service import SledAgent
from sled_agent.store import SledStore

# How often a scrape reads the store at most.
REFRESH_SECONDS = 2.0


class SledMetrics(Collector):
    """The sled's registry, its transport's metrics, and its VMM and outbox gauges."""

    def __init__(self, sled_id: str) -> None:
        self.registry: CollectorRegistry = new_registry("sled-agent", sled_id)
        self.messages = MessageMetrics(self.registry)
        self._agent: SledAgent | None = None
        self._store: SledStore | None = None
        self.unsent: int | None = None
        self.registry.register(self)

    def watch(self, agent: SledAgent, store: SledStore) -> None:
        self._agent = agent
        self._store = store

    async def read(self) -> None:
        if self._store is not None:
            self.unsent = await self._store.unsent_count()

    def collect(self) -> Iterator[Metric]:
        if self._agent is None or self.unsent is None:
            return
        vms = list(self._agent.hypervisor)
        by_state = Counter(vm.state for vm in vms)
        vmms = GaugeMetricFamily(
            "sled_vmms", "VMMs this sled holds a record of, by state.", labels=["state"]
        )
        for state in VmmState:
            vmms.add_metric([state.value], by_state.get(state, 0))
        yield vmms
        yield GaugeMetricFamily(
            "sled_worker_queue_depth",
            "VMMs in a timed transition (starting, stopping, rebooting) not yet finished.",
            value=sum(1 for vm in vms if vm.transitional),
        )
        yield GaugeMetricFamily(
            "eventplane_outbox_unsent",
            "Messages committed to the outbox and not yet confirmed by the broker.",
            value=self.unsent,
        )
