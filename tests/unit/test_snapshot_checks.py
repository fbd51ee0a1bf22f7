"""Pure decisions around snapshots: the doctor's snapshot findings
(``nexus/doctor_snapshots.py``) and the sled agent's flush of a disk for a snapshot
(``sled_agent.service.disk_flush``)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from nexus.db.states import SnapshotState
from nexus.doctor_snapshots import PartRecord, SnapshotRecord, SnapshotRecords, snapshot_findings
from schemas import api
from schemas.instance import DiskSnapshotRequest, VmmSpec
from schemas.region import RegionState
from schemas.snapshot import RegionSnapshots, RunningSnapshot, Snapshot
from schemas.snapshot import SnapshotState as Taken
from sled_agent.hypervisor import Capacity, Cause, Hypervisor, Rejected
from sled_agent.service import disk_flush

NOW = datetime(2026, 12, 1, tzinfo=UTC)
SNAP = uuid.UUID(int=7)
DATASETS = [uuid.UUID(int=100 + n) for n in range(3)]
REGIONS = [uuid.UUID(int=200 + n) for n in range(3)]


def records(state: SnapshotState = SnapshotState.READY, parts: int = 3) -> SnapshotRecords:
    return SnapshotRecords(
        snapshots={SNAP: SnapshotRecord(SNAP, "s1", state, None)},
        parts=[PartRecord(SNAP, DATASETS[n], REGIONS[n], 19100 + n) for n in range(parts)],
    )


def at_agent(
    n: int, *, name: str = str(SNAP), running: RegionState = RegionState.CREATED, port: int = 0
) -> RegionSnapshots:
    return RegionSnapshots(
        agent_id=DATASETS[n],
        region_id=REGIONS[n],
        region_state=RegionState.CREATED,
        snapshots=(
            Snapshot(
                region_id=REGIONS[n], name=name, created=NOW, state=Taken.CREATED, generation=1
            ),
        ),
        running_snapshots=(
            RunningSnapshot(
                id=REGIONS[n], name=name, port_number=port or 19100 + n, state=running, generation=2
            ),
        ),
    )


def healthy() -> dict[tuple[uuid.UUID, uuid.UUID], RegionSnapshots]:
    return {(DATASETS[n], REGIONS[n]): at_agent(n) for n in range(3)}


def kinds(found: Sequence[api.DoctorFinding]) -> list[tuple[str, str]]:
    return [(f.kind, f.object_id) for f in found]


def test_a_ready_snapshot_served_where_nexus_recorded_it_is_healthy() -> None:
    assert snapshot_findings(records(), set(DATASETS), healthy()) == []


def test_a_part_missing_or_not_served_is_reported() -> None:
    held = healthy()
    del held[(DATASETS[0], REGIONS[0])]
    held[(DATASETS[1], REGIONS[1])] = at_agent(1, running=RegionState.TOMBSTONED)
    held[(DATASETS[2], REGIONS[2])] = at_agent(2, port=19999)
    assert kinds(snapshot_findings(records(), set(DATASETS), held)) == [
        ("snapshot_missing", str(SNAP)),
        ("running_snapshot_mismatch", str(SNAP)),
        ("running_snapshot_mismatch", str(SNAP)),
    ]


def test_an_agent_that_did_not_answer_is_not_judged() -> None:
    held = healthy()
    del held[(DATASETS[0], REGIONS[0])]
    assert snapshot_findings(records(), set(DATASETS[1:]), held) == []


def test_a_ready_snapshot_without_its_parts_is_reported() -> None:
    held = healthy()
    del held[(DATASETS[2], REGIONS[2])]
    assert kinds(snapshot_findings(records(parts=2), set(DATASETS), held)) == [
        ("snapshot_part_count", str(SNAP))
    ]


@pytest.mark.parametrize("state", [SnapshotState.DESTROYED, None])
def test_what_an_agent_holds_for_no_live_snapshot_is_left_behind(
    state: SnapshotState | None,
) -> None:
    """A destroyed snapshot's parts, or a snapshot Nexus never recorded (an unwound saga's
    leftovers, a take behind its back)."""
    recorded = records(state) if state else SnapshotRecords(snapshots={}, parts=[])
    held = {(DATASETS[0], REGIONS[0]): at_agent(0)}
    assert kinds(snapshot_findings(recorded, set(DATASETS), held)) == [
        ("orphan_snapshot", str(REGIONS[0])),
        ("orphan_running_snapshot", str(REGIONS[0])),
    ]


def test_snapshots_in_flight_are_checked_only_for_leftovers_and_a_faulted_one_is_reported() -> None:
    assert snapshot_findings(records(SnapshotState.CREATING, parts=1), set(DATASETS), {}) == []
    assert kinds(snapshot_findings(records(SnapshotState.FAULTED), set(DATASETS), {})) == [
        ("snapshot_faulted", str(SNAP))
    ]


# The sled's flush.


def running_vmm(disk_id: uuid.UUID) -> tuple[Hypervisor, uuid.UUID]:
    hypervisor = Hypervisor(uuid.uuid4(), Capacity(16, 64 << 30))
    spec = VmmSpec(
        id=uuid.uuid4(),
        instance_id=uuid.uuid4(),
        name="vm",
        ncpus=1,
        memory_bytes=1 << 30,
        disk_ids=(disk_id,),
    )
    cause = Cause(uuid.uuid4(), uuid.uuid4())
    change = hypervisor.ensure(spec, cause)
    assert change is not None
    hypervisor.apply(change)
    while (vm := hypervisor.get(spec.id)) is not None and vm.transitional:
        moved = hypervisor.advance(spec.id, vm.generation)
        assert moved is not None
        hypervisor.apply(moved)
    return hypervisor, spec.id


def test_a_disk_of_a_running_vmm_is_flushed_and_anything_else_refused() -> None:
    disk = uuid.uuid4()
    hypervisor, vmm_id = running_vmm(disk)
    sled = uuid.uuid4()
    flushed = disk_flush(
        hypervisor, DiskSnapshotRequest(id=vmm_id, disk_id=disk, snapshot_id=SNAP), sled
    )
    assert (flushed.vmm_id, flushed.disk_id, flushed.snapshot_id, flushed.sled_id) == (
        vmm_id,
        disk,
        SNAP,
        sled,
    )
    for request, code in (
        (
            DiskSnapshotRequest(id=vmm_id, disk_id=uuid.uuid4(), snapshot_id=SNAP),
            "disk_not_attached",
        ),
        (DiskSnapshotRequest(id=uuid.uuid4(), disk_id=disk, snapshot_id=SNAP), "not_found"),
    ):
        with pytest.raises(Rejected) as refused:
            disk_flush(hypervisor, request, sled)
        assert refused.value.code == code
    stop = hypervisor.stop(vmm_id, Cause(uuid.uuid4(), uuid.uuid4()))
    assert stop is not None
    hypervisor.apply(stop)
    with pytest.raises(Rejected) as refused:
        disk_flush(hypervisor, DiskSnapshotRequest(id=vmm_id, disk_id=disk, snapshot_id=SNAP), sled)
    assert refused.value.code == "not_running"
