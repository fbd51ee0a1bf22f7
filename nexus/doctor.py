"""``nexusctl doctor``: Nexus's records against the agents themselves, and sagas needing
a person.

Nexus's records say where it placed each region and what state it was in last; only
the agents know what they hold. The doctor asks every crucible agent for all its regions
and each sled for the VMMs Nexus placed on it (all at once, each with a timeout),
on the queue the agent's identity implies (``crucible.<dataset id>``, ``sled.<sled
id>``) rather than the one Nexus recorded, and checks the answer came from that agent.
Then it decides, with no I/O (:func:`region_findings`), what does not match:

- ``agent_identity``: a dataset or sled whose recorded queue is not its own, or whose
  queue was answered by another agent;
- ``disk_region_count``: a ready disk without exactly ``REPLICAS`` live writable regions,
  and ``REPLICAS`` clones when made from a snapshot, none otherwise (any live disk with
  more), unless a replacement of one of its regions is in flight;
- ``disk_regions_share_sled``: two live writable regions, or two clones, of a live disk
  on one sled (a clone may share a sled with a writable region);
- ``region_lost_unreplaced``: a live region of a ready disk on an expunged dataset with
  no replacement in flight (``nexus.replacements`` files one with the expunge);
- ``region_missing``: a ready disk's region that its dataset's agent does not have;
- ``region_state_mismatch``: a ready disk's region in another state or generation at its
  agent than Nexus records (a deleted disk's: not ``destroyed``, and not live);
- ``region_spec_mismatch``: a region whose size at its agent is not the one Nexus placed,
  or a clone its agent does not have as one (read-only, copied from the same source);
- ``region_wrong_dataset``: a region live at an agent other than the one Nexus placed
  it on;
- ``orphan_region``: a region live at its agent although its disk is deleted;
- ``region_unknown``: a region live at an agent that Nexus never asked for;
- ``instance_wrong_sled`` / ``instance_state_mismatch``: a sled that does not have a live
  VMM Nexus placed on it, or runs it in another state;
- ``saga_stuck`` / ``saga_unrecoverable``: sagas an operator must look at;
- snapshots against what the agents hold (``nexus/doctor_snapshots.py``:
  ``snapshot_part_count``, ``snapshot_missing``, ``running_snapshot_mismatch``,
  ``orphan_snapshot``, ``orphan_running_snapshot``, ``snapshot_faulted``).

An expunged dataset's agent is not asked (Nexus has written it off, as Omicron writes off
an expunged disk), and regions on it are checked only by the rules above.

Run it on a quiet system: an operation in flight is legitimately between states, which
is why regions of disks being created, deleted or faulted are checked only for where
they are, not for their state.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from nexus.db.models import Dataset, Disk, Instance, Region, RegionReplacement, Saga, Sled, Vmm
from nexus.db.states import (
    IN_FLIGHT_REPLACEMENT_STATES,
    DatasetState,
    DiskState,
    RegionState,
    SagaState,
    VmmState,
)
from nexus.doctor_snapshots import ask_agents, read_records, snapshot_findings
from nexus.sagas.disk_create import REPLICAS
from schemas import api
from schemas.instance import ENDED_VMM_STATES as WIRE_ENDED_VMM_STATES
from schemas.instance import VmmGet, VmmInfo, VmmRef
from schemas.region import Region as WireRegion
from schemas.region import RegionList, RegionListed
from schemas.region import RegionState as WireRegionState
from schemas.topology import crucible_queue, sled_queue
from schemas.transport import PublishFailed, RequestTimedOut, Transport

LIVE_REGION = {WireRegionState.REQUESTED, WireRegionState.CREATED}
# Regions out of their disk's volume: destroyed, or swapped out by a replacement.
GONE_REGION = {RegionState.DESTROYED, RegionState.TOMBSTONED}
READY_DISK = {DiskState.DETACHED, DiskState.ATTACHED}
# VMM states that stay put long enough to compare with the sled's.
COMPARABLE = {VmmState.RUNNING}
# VMMs whose sled has said something about them and that have not ended: the sled has them.
HEARD_OF = [VmmState.STARTING, VmmState.RUNNING, VmmState.STOPPING, VmmState.REBOOTING]


@dataclass(frozen=True)
class DiskRecord:
    id: uuid.UUID
    name: str
    state: DiskState
    # Made from this snapshot: it has clones beside its writable regions.
    snapshot_id: uuid.UUID | None = None


@dataclass(frozen=True)
class RegionRecord:
    """Where Nexus placed a region, its size, and its state as Nexus last heard it."""

    id: uuid.UUID
    disk_id: uuid.UUID
    dataset_id: uuid.UUID
    state: RegionState
    generation: int
    block_size: int
    extent_size: int
    extent_count: int
    # A clone: a read-only copy of the running snapshot at ``source``.
    read_only: bool = False
    source: str | None = None


@dataclass(frozen=True)
class Records:
    """What Nexus's database says about disks and their regions."""

    disks: Mapping[uuid.UUID, DiskRecord]
    regions: Sequence[RegionRecord]
    # Each dataset's sled, as its agent announced it.
    sled_of_dataset: Mapping[uuid.UUID, uuid.UUID]
    # Datasets lost with their sled.
    expunged_datasets: frozenset[uuid.UUID] | set[uuid.UUID] = frozenset()
    # Disks with a region replacement in flight.
    replacing: frozenset[uuid.UUID] | set[uuid.UUID] = frozenset()


async def run_doctor(
    sessions: async_sessionmaker[AsyncSession],
    transport: Transport,
    source: str,
    timeout: float,
) -> api.DoctorReport:
    findings: list[api.DoctorFinding] = []
    unreachable: list[str] = []
    async with sessions() as session:
        datasets = list((await session.execute(select(Dataset))).scalars())
        records = Records(
            disks={
                disk.id: DiskRecord(disk.id, disk.name, disk.state, disk.create_snapshot_id)
                for disk in (await session.execute(select(Disk))).scalars()
            },
            regions=[
                RegionRecord(
                    id=region.id,
                    disk_id=region.disk_id,
                    dataset_id=region.dataset_id,
                    state=region.state,
                    generation=region.generation,
                    block_size=region.block_size,
                    extent_size=region.extent_size,
                    extent_count=region.extent_count,
                    read_only=region.read_only,
                    source=region.source,
                )
                for region in (await session.execute(select(Region))).scalars()
            ],
            sled_of_dataset={dataset.id: dataset.sled_id for dataset in datasets},
            expunged_datasets={d.id for d in datasets if d.state == DatasetState.EXPUNGED},
            replacing=set(
                (
                    await session.execute(
                        select(RegionReplacement.disk_id).where(
                            RegionReplacement.state.in_(IN_FLIGHT_REPLACEMENT_STATES)
                        )
                    )
                ).scalars()
            ),
        )
        # An expunged dataset's agent is written off: not asked.
        datasets = [d for d in datasets if d.state != DatasetState.EXPUNGED]
        # The VMMs a sled has heard of and that have not ended, by Nexus's records.
        placed = [
            (vmm, name, queue)
            for vmm, name, queue in (
                await session.execute(
                    select(Vmm, Instance.name, Sled.queue_name)
                    .join(Sled, Sled.id == Vmm.sled_id)
                    .join(Instance, Instance.id == Vmm.instance_id)
                    .where(Vmm.state.in_(HEARD_OF))
                )
            ).all()
        ]
        snapshot_records = await read_records(session)
        troubled = list(
            (
                await session.execute(
                    select(Saga).where(Saga.state.in_([SagaState.STUCK, SagaState.UNRECOVERABLE]))
                )
            ).scalars()
        )

    async def regions_of(dataset: Dataset) -> RegionListed | None:
        try:
            reply = await transport.request(
                RegionList(source=source), routing_key=crucible_queue(dataset.id), timeout=timeout
            )
        except (RequestTimedOut, PublishFailed):
            # No answer in time, or no queue to take the question: unreachable.
            return None
        return reply if isinstance(reply, RegionListed) else None

    listings = await asyncio.gather(*(regions_of(d) for d in datasets))
    held: dict[uuid.UUID, Sequence[WireRegion]] = {}
    for dataset, listing in zip(datasets, listings, strict=True):
        if dataset.queue_name != crucible_queue(dataset.id):
            findings.append(_foreign_queue(f"dataset {dataset.id}", dataset.queue_name))
        if listing is None:
            unreachable.append(f"crucible {dataset.id}")
        elif listing.payload.agent_id != dataset.id or listing.source != f"crucible/{dataset.id}":
            findings.append(
                _impostor(
                    f"dataset {dataset.id}",
                    crucible_queue(dataset.id),
                    f"{listing.source} (agent {listing.payload.agent_id})",
                )
            )
        else:
            held[dataset.id] = listing.payload.regions

    findings += region_findings(records, held)
    snapshots_held = await ask_agents(transport, source, timeout, held, unreachable)
    findings += snapshot_findings(snapshot_records, set(held), snapshots_held)
    findings += await _check_instances(transport, source, timeout, placed, unreachable)
    for saga in troubled:
        findings.append(
            api.DoctorFinding(
                kind=f"saga_{saga.state.value}",
                object_id=str(saga.id),
                detail=f"{saga.name}: {saga.error or 'no error recorded'}"[:1000],
            )
        )
    return api.DoctorReport(
        checked_agents=len(datasets) + len({vmm.sled_id for vmm, _, _ in placed}),
        unreachable_agents=tuple(sorted(set(unreachable))),
        findings=tuple(findings),
    )


def region_findings(
    records: Records, held: Mapping[uuid.UUID, Sequence[WireRegion]]
) -> list[api.DoctorFinding]:
    """What Nexus's records and the agents' regions disagree on.

    ``held`` has the regions of every agent that answered, by its dataset id; what only
    an agent that did not answer could tell is not checked.
    """
    at_agent = {
        (dataset_id, found.id): found for dataset_id, regions in held.items() for found in regions
    }
    return [
        *_disks_placed_apart(records),
        *(
            finding
            for record in records.regions
            if record.dataset_id in held and record.dataset_id not in records.expunged_datasets
            for finding in _region_at_its_agent(
                records, record, at_agent.get((record.dataset_id, record.id))
            )
        ),
        *_regions_held_elsewhere(records, at_agent),
    ]


def _disks_placed_apart(records: Records) -> list[api.DoctorFinding]:
    """Each live disk has its number of live writable regions, and of clones, each group
    on sleds of its own, none lost (unless a replacement of one is in flight)."""
    findings: list[api.DoctorFinding] = []
    by_disk: dict[tuple[uuid.UUID, bool], list[RegionRecord]] = defaultdict(list)
    for record in records.regions:
        if record.state not in GONE_REGION:
            by_disk[(record.disk_id, record.read_only)].append(record)
    for disk in records.disks.values():
        if disk.state is DiskState.DELETED:
            continue
        replacing = disk.id in records.replacing
        for clones in (False, True):
            own = by_disk.get((disk.id, clones), [])
            if disk.state in READY_DISK and not replacing:
                findings += [
                    _finding(
                        "region_lost_unreplaced",
                        record.id,
                        f"region {record.id} of disk {disk.name} is on expunged dataset "
                        f"{record.dataset_id}, and no replacement of it is in flight",
                    )
                    for record in own
                    if record.dataset_id in records.expunged_datasets
                ]
            expected = REPLICAS if not clones or disk.snapshot_id is not None else 0
            if not replacing and (
                len(own) > expected or (disk.state in READY_DISK and len(own) != expected)
            ):
                kind = "clones" if clones else "regions"
                findings.append(
                    _finding(
                        "disk_region_count",
                        disk.id,
                        f"disk {disk.name} ({disk.state.value}) has {len(own)} {kind}, "
                        f"not {expected}",
                    )
                )
            findings += _shared_sleds(records, disk, own)
    return findings


def _shared_sleds(
    records: Records, disk: DiskRecord, own: Sequence[RegionRecord]
) -> list[api.DoctorFinding]:
    sleds: dict[uuid.UUID, list[uuid.UUID]] = defaultdict(list)
    for record in own:
        sled_id = records.sled_of_dataset.get(record.dataset_id)
        if sled_id is not None:
            sleds[sled_id].append(record.id)
    return [
        _finding(
            "disk_regions_share_sled",
            disk.id,
            f"disk {disk.name}: regions {', '.join(map(str, sorted(together)))} "
            f"are all on sled {sled_id}",
        )
        for sled_id, together in sleds.items()
        if len(together) > 1
    ]


def _region_at_its_agent(
    records: Records, record: RegionRecord, found: WireRegion | None
) -> list[api.DoctorFinding]:
    """The region as the agent of the dataset Nexus placed it on has it (``found``)."""
    disk = records.disks.get(record.disk_id)
    if disk is None:
        return []
    where = f"region {record.id} of disk {disk.name}"
    findings = []
    if found is not None and (
        (found.block_size, found.extent_size, found.extent_count, found.read_only, found.source)
        != (
            record.block_size,
            record.extent_size,
            record.extent_count,
            record.read_only,
            record.source,
        )
    ):
        findings.append(
            _finding(
                "region_spec_mismatch",
                record.id,
                f"{where}: Nexus placed {record.extent_count} extents of "
                f"{record.extent_size} blocks of {record.block_size} bytes"
                f"{_cloned(record.source)}; its agent has {found.extent_count} of "
                f"{found.extent_size} of {found.block_size}{_cloned(found.source)}",
            )
        )
    if disk.state in READY_DISK:
        if found is None:
            findings.append(
                _finding(
                    "region_missing",
                    record.id,
                    f"{where}: the agent of dataset {record.dataset_id}, where Nexus "
                    "placed it, does not have it",
                )
            )
        elif (found.state.value, found.generation) != (record.state.value, record.generation):
            findings.append(_state_mismatch(where, record, found))
    elif disk.state is DiskState.DELETED and found is not None:
        if found.state in LIVE_REGION:
            findings.append(
                _finding(
                    "orphan_region",
                    record.id,
                    f"{where}: {found.state.value} at its agent, but the disk is deleted",
                )
            )
        elif found.state.value != record.state.value:
            findings.append(_state_mismatch(where, record, found))
    return findings


def _regions_held_elsewhere(
    records: Records, at_agent: Mapping[tuple[uuid.UUID, uuid.UUID], WireRegion]
) -> list[api.DoctorFinding]:
    """Live regions at an agent that Nexus did not place there, or never asked for."""
    placed = {record.id: record for record in records.regions}
    findings = []
    for (dataset_id, region_id), found in at_agent.items():
        if found.state not in LIVE_REGION:
            continue
        record = placed.get(region_id)
        if record is None:
            findings.append(
                _finding(
                    "region_unknown",
                    region_id,
                    f"{found.state.value} at the agent of dataset {dataset_id}, "
                    "but Nexus never asked for it",
                )
            )
        elif record.dataset_id != dataset_id:
            disk = records.disks.get(record.disk_id)
            findings.append(
                _finding(
                    "region_wrong_dataset",
                    region_id,
                    f"region of disk {disk.name if disk else record.disk_id} is "
                    f"{found.state.value} at the agent of dataset {dataset_id}, but Nexus "
                    f"placed it on dataset {record.dataset_id}",
                )
            )
    return findings


def _cloned(source: str | None) -> str:
    return "" if source is None else f", cloned from {source}"


def _finding(kind: str, object_id: object, detail: str) -> api.DoctorFinding:
    return api.DoctorFinding(kind=kind, object_id=str(object_id), detail=detail[:1000])


def _state_mismatch(where: str, region: RegionRecord, found: WireRegion) -> api.DoctorFinding:
    return _finding(
        "region_state_mismatch",
        region.id,
        f"{where}: Nexus records {region.state.value} (generation {region.generation}), "
        f"its agent has {found.state.value} (generation {found.generation})",
    )


def _foreign_queue(what: str, queue: str) -> api.DoctorFinding:
    return _finding("agent_identity", what.split()[-1], f"{what} is recorded with queue {queue}")


def _impostor(what: str, queue: str, answered_by: str) -> api.DoctorFinding:
    return _finding(
        "agent_identity", what.split()[-1], f"{what}: {queue} answered by {answered_by}"
    )


async def _check_instances(
    transport: Transport,
    source: str,
    timeout: float,
    placed: Sequence[tuple[Vmm, str, str]],
    unreachable: list[str],
) -> list[api.DoctorFinding]:
    async def ask(vmm: Vmm) -> VmmInfo | None:
        try:
            reply = await transport.request(
                VmmGet(source=source, payload=VmmRef(id=vmm.id)),
                routing_key=sled_queue(vmm.sled_id),
                timeout=timeout,
            )
        except (RequestTimedOut, PublishFailed):
            # No answer in time, or no queue to take the question: unreachable.
            return None
        return reply if isinstance(reply, VmmInfo) else None

    answers = await asyncio.gather(*(ask(vmm) for vmm, _, _ in placed))
    findings = []
    judged: set[uuid.UUID] = set()
    for (vmm, name, queue), answer in zip(placed, answers, strict=True):
        sled_id = vmm.sled_id
        sled = f"sled {sled_id}"
        first = sled_id not in judged
        judged.add(sled_id)
        if first and queue != sled_queue(sled_id):
            findings.append(_foreign_queue(sled, queue))
        if answer is None:
            unreachable.append(sled)
            continue
        if answer.payload.sled_id != sled_id or answer.source != f"sled/{sled_id}":
            if first:
                answered_by = f"{answer.source} (sled {answer.payload.sled_id})"
                findings.append(_impostor(sled, sled_queue(sled_id), answered_by))
            continue
        found = answer.payload.vmm
        if found is None or found.state in WIRE_ENDED_VMM_STATES:
            findings.append(
                api.DoctorFinding(
                    kind="instance_wrong_sled",
                    object_id=str(vmm.instance_id),
                    detail=f"{name}: its VMM {vmm.id} is {vmm.state.value} on sled {sled_id} "
                    "in Nexus, but that sled "
                    + ("does not have it" if found is None else f"says {found.state.value}"),
                )
            )
        elif vmm.state in COMPARABLE and found.state.value != vmm.state.value:
            findings.append(
                api.DoctorFinding(
                    kind="instance_state_mismatch",
                    object_id=str(vmm.instance_id),
                    detail=f"{name}: Nexus says its VMM {vmm.id} is {vmm.state.value}, "
                    f"the sled says {found.state.value}",
                )
            )
    return findings
