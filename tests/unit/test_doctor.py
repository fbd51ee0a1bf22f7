"""The doctor's judgement of placement: Nexus's records of disks and regions against the
regions the agents hold (:func:`nexus.doctor.region_findings`, no I/O). The same checks
against real processes, through ``nexusctl doctor``: tests/e2e/test_doctor.py."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field

from nexus.db.states import DiskState, RegionState
from nexus.doctor import DiskRecord, Records, RegionRecord, region_findings
from nexus.sagas.disk_create import REPLICAS
from schemas.region import Region as WireRegion
from schemas.region import RegionState as WireRegionState

BLOCK, EXTENT, COUNT = 512, 131072, 2


@dataclass
class Rack:
    """Datasets on sleds of their own, disks placed on them, agents holding the regions."""

    sled_of_dataset: dict[uuid.UUID, uuid.UUID] = field(default_factory=dict)
    disks: dict[uuid.UUID, DiskRecord] = field(default_factory=dict)
    regions: list[RegionRecord] = field(default_factory=list)
    held: dict[uuid.UUID, list[WireRegion]] = field(default_factory=dict)

    @classmethod
    def with_datasets(cls, count: int) -> Rack:
        rack = cls()
        for _ in range(count):
            dataset_id = uuid.uuid4()
            rack.sled_of_dataset[dataset_id] = uuid.uuid4()
            rack.held[dataset_id] = []
        return rack

    @property
    def datasets(self) -> list[uuid.UUID]:
        return list(self.sled_of_dataset)

    def disk(self, state: DiskState = DiskState.DETACHED) -> DiskRecord:
        """A disk whose regions are created on the first REPLICAS datasets, as Nexus says
        and as their agents have them."""
        disk = DiskRecord(uuid.uuid4(), f"disk-{len(self.disks)}", state)
        self.disks[disk.id] = disk
        for dataset_id in self.datasets[:REPLICAS]:
            record = RegionRecord(
                id=uuid.uuid4(),
                disk_id=disk.id,
                dataset_id=dataset_id,
                state=RegionState.CREATED,
                generation=2,
                block_size=BLOCK,
                extent_size=EXTENT,
                extent_count=COUNT,
            )
            self.regions.append(record)
            self.held[dataset_id].append(wire(record.id, WireRegionState.CREATED, 2))
        return disk

    def of(self, disk: DiskRecord) -> list[RegionRecord]:
        return [record for record in self.regions if record.disk_id == disk.id]

    def replace(self, record: RegionRecord, **changes: object) -> RegionRecord:
        changed = dataclasses.replace(record, **changes)  # type: ignore[arg-type]
        self.regions[self.regions.index(record)] = changed
        return changed

    def findings(self) -> list[tuple[str, str]]:
        records = Records(self.disks, self.regions, self.sled_of_dataset)
        return sorted(
            (finding.kind, finding.object_id) for finding in region_findings(records, self.held)
        )


def wire(region_id: uuid.UUID, state: WireRegionState, generation: int) -> WireRegion:
    return WireRegion(
        id=region_id,
        block_size=BLOCK,
        extent_size=EXTENT,
        extent_count=COUNT,
        encrypted=True,
        port_number=19000,
        state=state,
        generation=generation,
    )


def test_disks_with_their_regions_created_where_nexus_placed_them_are_healthy() -> None:
    rack = Rack.with_datasets(4)
    rack.disk()
    rack.disk(DiskState.ATTACHED)
    assert rack.findings() == []


def test_a_region_moved_onto_another_disks_region_sled_is_reported_three_ways() -> None:
    rack = Rack.with_datasets(4)
    disk = rack.disk()
    first, second, _ = rack.of(disk)
    rack.replace(first, dataset_id=second.dataset_id)

    assert rack.findings() == sorted(
        [
            ("disk_regions_share_sled", str(disk.id)),
            # Its dataset's agent does not have it; the agent that has it is not its own.
            ("region_missing", str(first.id)),
            ("region_wrong_dataset", str(first.id)),
        ]
    )


def test_two_datasets_recorded_on_one_sled_put_a_disk_on_it_twice() -> None:
    rack = Rack.with_datasets(3)
    disk = rack.disk()
    first, second, _ = rack.of(disk)
    rack.sled_of_dataset[second.dataset_id] = rack.sled_of_dataset[first.dataset_id]

    assert rack.findings() == [("disk_regions_share_sled", str(disk.id))]


def test_a_region_the_agent_has_in_another_state_or_generation_is_reported() -> None:
    rack = Rack.with_datasets(3)
    disk = rack.disk()
    first, second, _ = rack.of(disk)
    rack.held[first.dataset_id] = [wire(first.id, WireRegionState.FAILED, 3)]
    rack.replace(second, generation=1 << 62)

    assert rack.findings() == sorted(
        [("region_state_mismatch", str(first.id)), ("region_state_mismatch", str(second.id))]
    )


def test_a_region_of_another_size_at_its_agent_is_reported() -> None:
    rack = Rack.with_datasets(3)
    first = rack.of(rack.disk())[0]
    rack.replace(first, extent_count=COUNT + 1)
    assert rack.findings() == [("region_spec_mismatch", str(first.id))]


def test_a_region_nexus_never_asked_for_is_reported() -> None:
    rack = Rack.with_datasets(3)
    rack.disk()
    stray = uuid.uuid4()
    rack.held[rack.datasets[0]].append(wire(stray, WireRegionState.CREATED, 2))
    # Destroyed or failed ones hold nothing.
    rack.held[rack.datasets[1]].append(wire(uuid.uuid4(), WireRegionState.DESTROYED, 4))
    rack.held[rack.datasets[2]].append(wire(uuid.uuid4(), WireRegionState.FAILED, 2))

    assert rack.findings() == [("region_unknown", str(stray))]


def test_a_ready_disk_without_its_regions_is_reported() -> None:
    rack = Rack.with_datasets(3)
    disk = rack.disk()
    lost = rack.of(disk)[0]
    rack.regions.remove(lost)
    # A disk being created has none before placement: not a finding.
    creating = DiskRecord(uuid.uuid4(), "new", DiskState.CREATING)
    rack.disks[creating.id] = creating

    # Its agent still has the region whose record is gone.
    assert rack.findings() == sorted(
        [("disk_region_count", str(disk.id)), ("region_unknown", str(lost.id))]
    )


def test_a_live_region_of_a_deleted_disk_is_an_orphan() -> None:
    rack = Rack.with_datasets(3)
    disk = rack.disk(DiskState.DELETED)
    first, second, third = rack.of(disk)
    for record in (first, second, third):
        rack.replace(record, state=RegionState.DESTROYED, generation=4)
    rack.held[first.dataset_id] = [wire(first.id, WireRegionState.CREATED, 2)]
    rack.held[second.dataset_id] = [wire(second.id, WireRegionState.DESTROYED, 4)]
    rack.held[third.dataset_id] = []

    assert rack.findings() == [("orphan_region", str(first.id))]


def test_regions_of_disks_in_flight_are_checked_for_place_not_state() -> None:
    rack = Rack.with_datasets(3)
    creating = rack.disk(DiskState.CREATING)
    first = rack.of(creating)[0]
    rack.held[first.dataset_id] = [wire(first.id, WireRegionState.REQUESTED, 1)]
    rack.held[rack.of(creating)[1].dataset_id] = []

    assert rack.findings() == []


def test_an_agent_that_did_not_answer_is_not_judged() -> None:
    rack = Rack.with_datasets(3)
    disk = rack.disk()
    silent = rack.of(disk)[0].dataset_id
    del rack.held[silent]
    assert rack.findings() == []
