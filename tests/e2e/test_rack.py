"""The whole rack through the CLI: ``nexusctl dev run-all`` as a real process tree, and
every operation as a real ``nexusctl ... --output json`` process against it."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.e2e.conftest import Rack

pytestmark = pytest.mark.e2e

PROJECT = "e2e"


def test_disks_and_instances_through_the_cli(rack: Rack) -> None:
    started = time.monotonic()

    def mark(what: str) -> None:
        print(f"{time.monotonic() - started:6.1f}s {what}")

    disks = [f"disk-{n}" for n in range(10)]
    created = rack.all_ok(
        [["disk", "create", name, "--size", "256MiB", "-p", PROJECT, "--wait"] for name in disks]
    )
    assert all(outcome["state"] == "done" for outcome in created)
    mark("10 disks created")

    listed = rack.ok("disk", "list", "-p", PROJECT)
    assert sorted(disk["name"] for disk in listed) == disks
    assert {disk["state"] for disk in listed} == {"detached"}

    # The timeline of a disk: three regions, each woken by its agent's notification.
    timeline = rack.ok("saga", "show", created[0]["saga_id"])
    assert timeline["state"] == "done"
    assert len(timeline["wakes"]) == 3
    assert not any(wake["by_reconcile"] for wake in timeline["wakes"])

    # Mistakes are one line and exit 1: a duplicate name, an unknown id.
    duplicate = rack.ctl("disk", "create", disks[0], "--size", "1GiB", "-p", PROJECT)
    assert duplicate.code == 1 and "already exists" in duplicate.stderr
    assert len(duplicate.stderr.strip().splitlines()) == 1
    unknown = rack.ctl("disk", "show", str(uuid.uuid4()), "-p", PROJECT)
    assert unknown.code == 1 and "not_found" in unknown.stderr

    vms = ["vm-1", "vm-2"]
    launched = rack.all_ok(
        [
            [
                *("instance", "create", vm, "--ncpus", "2", "--memory", "1GiB", "-p", PROJECT),
                *("--disk", disks[2 * n], "--disk", disks[2 * n + 1], "--wait"),
            ]
            for n, vm in enumerate(vms)
        ]
    )
    assert all(outcome["state"] == "done" for outcome in launched)
    mark("2 instances created")
    instances = {i["name"]: i for i in rack.ok("instance", "list", "-p", PROJECT)}
    assert {name: i["state"] for name, i in instances.items()} == dict.fromkeys(vms, "running")
    attached = {disk["id"]: disk for disk in rack.ok("disk", "list", "-p", PROJECT)}
    for n, vm in enumerate(vms):
        assert len(instances[vm]["disk_ids"]) == 2
        for disk_id in instances[vm]["disk_ids"]:
            assert attached[disk_id]["name"] in disks[2 * n : 2 * n + 2]
            assert attached[disk_id]["state"] == "attached"

    # Back to stopped at the end: only a stopped (or failed) instance can be deleted.
    for action, state in (("stop", "stopped"), ("start", "running"), ("stop", "stopped")):
        rack.all_ok([["instance", action, vm, "-p", PROJECT, "--wait"] for vm in vms])
        listed_instances = rack.ok("instance", "list", "-p", PROJECT)
        assert {i["state"] for i in listed_instances} == {state}
        mark(f"instances {state}")

    rack.all_ok([["instance", "delete", vm, "-p", PROJECT, "--wait"] for vm in vms])
    assert rack.ok("instance", "list", "-p", PROJECT) == []
    rack.all_ok([["disk", "delete", name, "-p", PROJECT, "--wait"] for name in disks])
    assert rack.ok("disk", "list", "-p", PROJECT) == []
    mark("instances and disks deleted")

    report = rack.ctl("doctor")
    assert report.code == 0, report.document
    assert report.document["healthy"] is True
    assert report.document["unreachable_agents"] == []
    assert rack.ok("saga", "list", "--state", "stuck") == []
