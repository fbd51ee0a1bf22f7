"""Every process of a live rack (``nexusctl dev run-all``: 2 Nexus replicas, 3 crucible
agents, 2 sled agents) serves Prometheus metrics that parse with the Prometheus text
parser and count what a disk create and two instance creates did: node durations, the
wake overhead, sagas done, the command relay time at the agents, regions and VMMs by
state."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from nexus.devstack.stack import METRICS_DIR
from tests.e2e.conftest import Rack

pytestmark = pytest.mark.e2e

PROJECT = "metrics"
NEXUS = ("nexus-1", "nexus-2")
CRUCIBLE = ("crucible-1", "crucible-2", "crucible-3")
SLEDS = ("sled-1", "sled-2")

# Families every process serves, whatever it did.
SHARED = (
    "eventplane_service_info",
    "eventplane_command_relay_seconds",
    "eventplane_messages_handled",
    "eventplane_dead_letters",
    "eventplane_redeliveries",
    "eventplane_outbox_unsent",
    "process_cpu_seconds",
)
FAMILIES = {
    "nexus": (
        "nexus_sagas",
        "nexus_saga_node_duration_seconds",
        "nexus_wake_overhead_seconds",
        "nexus_saga_adoptions",
        "nexus_reconciles",
        "nexus_leases_held",
        "eventplane_outbox_oldest_unsent_age_seconds",
    ),
    "crucible-agent": ("crucible_regions", "crucible_worker_queue_depth", "crucible_workers_busy"),
    "sled-agent": ("sled_vmms", "sled_worker_queue_depth"),
}

Scraped = dict[str, list[Sample]]


def scrape(url: str) -> Scraped:
    """Every family of ``url``'s /metrics by name, parsed by Prometheus's own parser."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(scraped: Scraped, family: str, sample: str, **labels: str) -> float:
    """The sum of the samples named ``sample`` of ``family`` with ``labels``."""
    return sum(
        found.value
        for found in scraped.get(family, [])
        if found.name == sample and all(found.labels.get(k) == v for k, v in labels.items())
    )


def over(processes: Iterable[Scraped], family: str, sample: str, **labels: str) -> float:
    return sum(value(scraped, family, sample, **labels) for scraped in processes)


def test_every_process_serves_metrics_that_count_a_disk_create(rack: Rack) -> None:
    created = rack.ok("disk", "create", "m-1", "--size", "1GiB", "-p", PROJECT, "--wait")
    assert created["state"] == "done"
    rack.ok("disk", "create", "m-2", "--size", "1GiB", "-p", PROJECT, "--wait")
    for vm, disk in (("vm-1", "m-1"), ("vm-2", "m-2")):
        launched = rack.ok(
            *("instance", "create", vm, "--ncpus", "2", "--memory", "1GiB", "-p", PROJECT),
            *("--disk", disk, "--wait"),
        )
        assert launched["state"] == "done"

    # run-all printed every process's address, and each wrote it to its file.
    urls = {
        path.stem: path.read_text().strip() for path in (rack.state_dir / METRICS_DIR).glob("*.url")
    }
    assert sorted(urls) == sorted((*NEXUS, *CRUCIBLE, *SLEDS))
    printed = (rack.state_dir.parent / "run-all.out").read_text()
    assert all(url in printed for url in urls.values()), printed
    scraped = {process: scrape(url) for process, url in urls.items()}

    for process, families in scraped.items():
        service = families["eventplane_service_info"][0].labels["service"]
        for family in (*SHARED, *FAMILIES[service]):
            assert family in families, f"{process} lacks {family}"

    replicas = [scraped[name] for name in NEXUS]
    # Which replica ran which node varies; the two replicas together did it all.
    assert over(replicas, "nexus_wake_overhead_seconds", "nexus_wake_overhead_seconds_count") >= 6
    nodes = over(
        replicas,
        "nexus_saga_node_duration_seconds",
        "nexus_saga_node_duration_seconds_count",
        saga="disk_create",
    )
    assert nodes > 0
    for replica in replicas:
        # The database's figure: the same on both.
        done = value(replica, "nexus_sagas", "nexus_sagas", name="disk_create", state="done")
        assert done == 2
        assert value(replica, "nexus_sagas", "nexus_sagas", name="instance_create", state="done")
        assert value(replica, "nexus_leases_held", "nexus_leases_held") >= 0
    handled = over(
        replicas, "eventplane_messages_handled", "eventplane_messages_handled_total", outcome="ok"
    )
    assert handled > 0

    for name in CRUCIBLE:
        agent = scraped[name]
        # Each disk has a region on each of the three sleds' datasets.
        assert value(agent, "crucible_regions", "crucible_regions", state="created") == 2
        ensures = value(
            agent,
            "eventplane_command_relay_seconds",
            "eventplane_command_relay_seconds_count",
            type="region.ensure.v1",
        )
        assert ensures >= 2, name
        assert value(
            agent,
            "eventplane_messages_handled",
            "eventplane_messages_handled_total",
            type="region.ensure.v1",
            outcome="ok",
        )
        assert value(agent, "crucible_worker_queue_depth", "crucible_worker_queue_depth") == 0

    for name in SLEDS:
        # The second instance goes to the sled with the most free CPUs: the other one.
        sled = scraped[name]
        assert value(sled, "sled_vmms", "sled_vmms", state="running") == 1, name
        relayed = value(
            sled,
            "eventplane_command_relay_seconds",
            "eventplane_command_relay_seconds_count",
            type="vmm.ensure.v1",
        )
        assert relayed >= 1, name
