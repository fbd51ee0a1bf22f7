"""``nexusctl disk create --from-snapshot`` against the whole rack (``nexusctl dev
run-all``), every step a real ``nexusctl`` process."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Rack

pytestmark = pytest.mark.e2e

PROJECT = "e2e"


def test_a_disk_from_a_snapshot_through_the_cli(rack: Rack) -> None:
    made = rack.ok("disk", "create", "source", "--size", "256MiB", "-p", PROJECT, "--wait")
    assert made["state"] == "done"
    snapped = rack.ok("snapshot", "create", "snap", "--disk", "source", "-p", PROJECT, "--wait")
    assert snapped["state"] == "done"

    # Refused before anything is created: a size below the snapshot's, an unknown one.
    small = rack.ctl(
        *("disk", "create", "tiny", "--from-snapshot", "snap", "--size", "1MiB", "-p", PROJECT)
    )
    assert small.code == 1 and "at least snapshot snap's size" in small.stderr, small
    unknown = rack.ctl("disk", "create", "nope", "--from-snapshot", "ghost", "-p", PROJECT)
    assert unknown.code == 1 and "not_found" in unknown.stderr, unknown

    copied = rack.ok("disk", "create", "copy", "--from-snapshot", "snap", "-p", PROJECT, "--wait")
    assert copied["state"] == "done"
    timeline = rack.ok("saga", "show", copied["saga_id"])
    assert timeline["name"] == "disk_create_from_snapshot"
    assert len(timeline["wakes"]) == 6, "three regions and three clones, each by its event"
    shown = rack.ok("disk", "show", "copy", "-p", PROJECT)
    snapshot = rack.ok("snapshot", "show", "snap", "-p", PROJECT)
    assert (shown["state"], shown["snapshot_id"]) == ("detached", snapshot["id"])
    assert shown["size_bytes"] == 256 << 20

    doctor = rack.ctl("doctor")
    assert doctor.code == 0, doctor

    # The disk is made: the snapshot can go, and so can both disks.
    assert rack.ok("snapshot", "delete", "snap", "-p", PROJECT, "--wait")["state"] == "done"
    for disk in ("copy", "source"):
        assert rack.ok("disk", "delete", disk, "-p", PROJECT, "--wait")["state"] == "done"
    assert rack.ctl("doctor").code == 0
