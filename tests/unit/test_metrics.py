"""Prometheus metrics: what the engine observes (after commit only), what is read from the
database at scrape time, what the transport counts, and the /metrics server itself.

The live stack's /metrics on every process is tests/e2e/test_metrics.py.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from nexus.db.states import SagaState
from nexus.metrics import DatabaseFigures, NexusMetrics
from nexus.saga.clock import ManualClock
from nexus.saga.notices import Notices
from nexus.sagas import ALL_SAGAS, disk_create
from schemas.base import utcnow
from schemas.metrics import MessageMetrics, MetricsServer, Refresh, new_registry
from schemas.region import RegionGet, RegionRef, RegionStateChanged
from tests.examples import BUILDERS
from tests.saga_support import (
    Database,
    FakeCrucible,
    Reconciler,
    Replica,
    WaitParams,
    placed_vmm,
    wait_saga,
)

WAKE = timedelta(milliseconds=250)


def total(registry: CollectorRegistry, sample: str, **labels: str) -> float:
    """The sum of every sample named ``sample`` whose labels include ``labels``."""
    return sum(
        found.value
        for family in registry.collect()
        for found in family.samples
        if found.name == sample and all(found.labels.get(k) == v for k, v in labels.items())
    )


def params() -> disk_create.Params:
    return disk_create.Params(
        disk_id=uuid.uuid4(), project="demo", name="data", size_bytes=1 << 30, block_size=512
    )


async def test_a_disk_create_is_measured_node_by_node_and_wake_by_wake(
    database: Database,
) -> None:
    await database.add_datasets(3)
    clock = ManualClock()
    metrics = NexusMetrics("a")
    replica = Replica(database, "a", clock=clock, metrics=metrics)
    crucible = FakeCrucible.new(database)
    saga_id = await replica.executor.start(disk_create.DEFINITION, params())
    clock.advance(timedelta(seconds=2))
    for event in await crucible.created_events():
        # Each agent's event occurred WAKE before the replica (its clock) resumes the saga.
        await replica.deliver(_occurred(event, clock.now() - WAKE))

    assert (await database.saga(saga_id)).state == SagaState.DONE
    registry = metrics.registry
    assert total(registry, "nexus_wake_overhead_seconds_count", saga="disk_create") == 3
    assert total(registry, "nexus_wake_overhead_seconds_sum") == pytest.approx(0.75)
    # Every node that ran is timed once; a region's node from its start, its wait included.
    nodes = {
        found.labels["node"]: found.value
        for family in registry.collect()
        for found in family.samples
        if found.name == "nexus_saga_node_duration_seconds_sum"
    }
    assert set(nodes) == {node.name for stage in disk_create.DEFINITION.stages for node in stage}
    waited = [node for node, seconds in nodes.items() if seconds >= 2]
    assert len(waited) == 3, nodes
    assert total(registry, "nexus_saga_node_duration_seconds_count") == len(nodes)


async def test_the_database_figures_are_read_when_asked(database: Database) -> None:
    await database.add_datasets(3)
    clock = ManualClock()
    replica = Replica(database, "a", clock=clock)
    crucible = FakeCrucible.new(database)
    done = await replica.executor.start(disk_create.DEFINITION, params())
    for event in await crucible.created_events():
        await replica.deliver(event)
    await replica.executor.start(disk_create.DEFINITION, params().model_copy(update={"name": "b"}))
    clock.advance(timedelta(seconds=7))
    figures = DatabaseFigures(database.sessions, clock, "a", (d.name for d in ALL_SAGAS))
    registry = CollectorRegistry()
    registry.register(figures)
    assert list(registry.collect()) == [], "nothing is shown before the first read"

    await figures.read()

    assert (await database.saga(done)).state == SagaState.DONE
    assert registry.get_sample_value("nexus_sagas", {"name": "disk_create", "state": "done"}) == 1
    assert (
        registry.get_sample_value("nexus_sagas", {"name": "disk_create", "state": "waiting"}) == 1
    )
    assert registry.get_sample_value("nexus_sagas", {"name": "disk_delete", "state": "done"}) == 0
    # No relay runs here: everything the sagas sent is unsent, the oldest 7 s old.
    assert registry.get_sample_value("eventplane_outbox_unsent") == len(await database.sent())
    assert registry.get_sample_value("eventplane_outbox_oldest_unsent_age_seconds") == 7
    assert registry.get_sample_value("nexus_leases_held") == 0


async def test_an_adoption_is_counted_by_the_replica_that_claims_it(database: Database) -> None:
    await database.add_datasets(3)
    clock = ManualClock()
    a = Replica(database, "a", clock=clock, metrics=NexusMetrics("a"))
    b_metrics = NexusMetrics("b")
    b = Replica(database, "b", clock=clock, metrics=b_metrics)
    # a records the saga under its lease and dies before running it.
    saga_id = await a.executor.start(disk_create.DEFINITION, params(), run=False)
    figures = DatabaseFigures(database.sessions, clock, "a", ["disk_create"])
    await figures.read()
    assert figures.leases == 1

    clock.advance(timedelta(seconds=16))
    await b.executor.sweep()
    await b.executor.sweep()

    assert (await database.saga(saga_id)).state == SagaState.WAITING
    assert total(b_metrics.registry, "nexus_saga_adoptions_total", saga="disk_create") == 1


async def test_reconciles_are_counted_by_what_they_answered(database: Database) -> None:
    clock = ManualClock()
    metrics = NexusMetrics("a")
    definition = wait_saga(Reconciler())
    a = Replica(database, "a", clock=clock, definitions=[definition], metrics=metrics)
    instance_id = await placed_vmm(database)
    key = f"vmm:{instance_id}:running"
    await a.executor.start(definition, WaitParams(key=key, deadline_seconds=10, rearms=1))

    for _ in range(2):
        clock.advance(timedelta(seconds=11))
        await a.executor.sweep()

    assert total(metrics.registry, "nexus_reconciles_total", saga="test_wait", outcome="rearm") == 2


def test_what_a_step_noted_for_metrics_counts_only_if_it_committed() -> None:
    notices = Notices(None)
    saga_id = uuid.uuid4()
    counted: list[str] = []
    notices.after_commit(saga_id, lambda: counted.append("rolled back"))
    notices.rolled_back(saga_id)
    notices.after_commit(saga_id, lambda: counted.append("committed"))
    notices.run_after_commit(saga_id)
    notices.run_after_commit(saga_id)
    assert counted == ["committed"]


def test_a_command_s_relay_time_is_measured_at_its_first_delivery_only() -> None:
    registry = CollectorRegistry()
    metrics = MessageMetrics(registry)
    command = RegionGet(
        source="nexus/a",
        occurred_at=utcnow() - timedelta(seconds=1),
        payload=RegionRef(id=uuid.uuid4()),
    )
    metrics.received(command, redelivered=False)
    metrics.received(command, redelivered=True)
    metrics.received(BUILDERS["region.state_changed.v1"](), redelivered=False)
    metrics.dead_lettered("not_owner")

    relayed = {"type": "region.get.v1"}
    assert registry.get_sample_value("eventplane_command_relay_seconds_count", relayed) == 1
    seconds = registry.get_sample_value("eventplane_command_relay_seconds_sum", relayed)
    assert seconds is not None and 1 <= seconds < 5
    assert total(registry, "eventplane_command_relay_seconds_count") == 1, "events are not timed"
    assert registry.get_sample_value("eventplane_redeliveries_total", relayed) == 1
    assert registry.get_sample_value("eventplane_dead_letters_total", {"reason": "not_owner"}) == 1


async def test_refresh_reads_at_most_once_per_interval() -> None:
    reads = 0

    async def read() -> None:
        nonlocal reads
        reads += 1
        if reads == 1:
            raise ConnectionError("the database is down")

    often = Refresh(read, 0)
    await often()  # a failed read is logged; the scrape goes on with the last figures
    await often()
    assert reads == 2
    seldom = Refresh(read, 3600)
    await asyncio.gather(seldom(), seldom(), seldom())
    assert reads == 3

    async def hangs() -> None:
        await asyncio.Event().wait()

    # A database that does not answer costs a scrape the timeout, not the scrape.
    await Refresh(hangs, 0, timeout=0.01)()


async def test_the_server_serves_the_registry_in_the_text_format(tmp_path: Path) -> None:
    registry = new_registry("nexus", "a")
    MessageMetrics(registry).dead_lettered("malformed")
    refreshed = 0

    async def refresh() -> None:
        nonlocal refreshed
        refreshed += 1

    server = MetricsServer(registry, refresh)
    address_file = tmp_path / "metrics" / "nexus-a.url"
    url = await server.start("127.0.0.1", 0, address_file)
    try:
        assert address_file.read_text() == url + "\n"
        assert server.address is not None and server.address[1] > 0
        text = await asyncio.to_thread(_get, url)
        families = {family.name: family for family in text_string_to_metric_families(text)}
        dead = families["eventplane_dead_letters"].samples
        assert [(s.labels, s.value) for s in dead if s.name.endswith("_total")] == [
            ({"reason": "malformed"}, 1.0)
        ]
        info = families["eventplane_service_info"].samples[0].labels
        assert info == {"service": "nexus", "id": "a"}
        assert "process_cpu_seconds" in families
        assert refreshed == 1
        with pytest.raises(urllib.error.HTTPError) as missing:
            await asyncio.to_thread(_get, url.replace("/metrics", "/other"))
        assert missing.value.code == 404
    finally:
        await server.stop()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body.decode()


def _occurred(event: RegionStateChanged, at: datetime) -> RegionStateChanged:
    return event.model_copy(update={"occurred_at": at})
