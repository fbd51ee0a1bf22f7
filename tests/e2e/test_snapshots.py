"""Snapshots on the real rack (``nexusctl dev run-all``: real Nexus, crucible and sled
agents over a real RabbitMQ), through ``nexusctl snapshot`` as real processes: a disk
attached to a running instance is flushed and snapshotted, the snapshot is listed and
shown with its three parts served at their addresses, the doctor confirms them at the
agents, and the delete leaves nothing behind; clear refusals for a name taken, an unknown
disk or snapshot, and a disk with snapshots; a snapshot taken behind Nexus's back is
reported by the doctor."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from schemas.region import RegionState
from schemas.snapshot import RegionSnapshotCreate, RegionSnapshotsInfo, SnapshotRef
from schemas.topology import crucible_queue
from schemas.transport import Transport
from tests.e2e.conftest import Rack
from tests.e2e.test_doctor import disk_id, regions_of

pytestmark = pytest.mark.e2e

PROJECT = "doctor"  # test_doctor's helpers read this project's rows


def test_a_snapshot_of_an_attached_disk_is_made_checked_and_deleted(rack: Rack) -> None:
    rack.ok("disk", "create", "a", "--size", "64MiB", "-p", PROJECT, "--wait")
    rack.ok("instance", "create", "vm", "--disk", "a", "-p", PROJECT, "--wait")

    created = rack.ok("snapshot", "create", "s1", "--disk", "a", "-p", PROJECT, "--wait")
    assert created["state"] == "done", created
    saga = created["saga"]
    # The VMM was asked to flush the disk, and it did (the node resumed on its event).
    flush = [e for e in saga["log"] if e["node"] == "disk_flush"]
    assert [e["event"] for e in flush][-1] == "succeeded", flush

    shown = rack.ok("snapshot", "show", "s1", "-p", PROJECT)
    assert shown["state"] == "ready"
    database = rack.state_dir / "nexus.sqlite3"
    regions = regions_of(database, disk_id(database, "a"))
    assert (
        sorted((uuid.UUID(p["region_id"]), uuid.UUID(p["dataset_id"])) for p in shown["parts"])
        == regions
    )
    for part in shown["parts"]:
        assert (part["snapshot_state"], part["running_state"]) == ("created", "created")
        host, _, port = part["snapshot_addr"].rpartition(":")
        assert host and 19000 <= int(port) <= 19999
    assert [s["name"] for s in rack.ok("snapshot", "list", "-p", PROJECT)] == ["s1"]
    healthy = rack.ctl("doctor")
    assert healthy.code == 0, healthy.document

    taken = rack.ctl("snapshot", "create", "s1", "--disk", "a", "-p", PROJECT)
    assert taken.code != 0 and "a snapshot named 's1' already exists" in taken.stderr
    unknown = rack.ctl("snapshot", "create", "s2", "--disk", "nope", "-p", PROJECT)
    assert unknown.code != 0 and "disk nope in project doctor" in unknown.stderr
    missing = rack.ctl("snapshot", "show", "nope", "-p", PROJECT)
    assert missing.code != 0 and "snapshot nope in project doctor" in missing.stderr

    rack.ok("instance", "stop", "vm", "-p", PROJECT, "--wait")
    rack.ok("instance", "delete", "vm", "-p", PROJECT, "--wait")
    refused = rack.ctl("disk", "delete", "a", "-p", PROJECT)
    assert refused.code != 0
    assert "disk a has 1 snapshot(s) (s1): delete them first" in refused.stderr

    deleted = rack.ok("snapshot", "delete", "s1", "-p", PROJECT, "--wait")
    assert deleted["state"] == "done", deleted
    assert rack.ok("snapshot", "list", "-p", PROJECT) == []
    assert rack.ctl("doctor").code == 0
    rack.ok("disk", "delete", "a", "-p", PROJECT, "--wait")
    assert rack.ctl("doctor").code == 0


def test_a_snapshot_taken_behind_nexus_back_is_reported(rack: Rack) -> None:
    rack.ok("disk", "create", "b", "--size", "64MiB", "-p", PROJECT, "--wait")
    database = rack.state_dir / "nexus.sqlite3"
    region, dataset = regions_of(database, disk_id(database, "b"))[0]
    name = str(uuid.uuid4())
    asyncio.run(take_behind_nexus(rack.amqp_url, dataset, region, name))
    report = rack.ctl("doctor")
    assert report.code == 1, report.document
    assert [(f["kind"], f["object_id"]) for f in report.document["findings"]] == [
        ("orphan_snapshot", str(region))
    ]
    assert name in report.document["findings"][0]["detail"]


async def take_behind_nexus(
    amqp_url: str, dataset: uuid.UUID, region_id: uuid.UUID, name: str
) -> None:
    async with Transport(amqp_url, name="test: behind Nexus's back") as transport:
        take = RegionSnapshotCreate(
            source="cli/test", payload=SnapshotRef(region_id=region_id, name=name)
        )
        reply = await transport.request(take, routing_key=crucible_queue(dataset), timeout=10)
        assert isinstance(reply, RegionSnapshotsInfo), reply
        assert reply.payload.region_state is RegionState.CREATED
