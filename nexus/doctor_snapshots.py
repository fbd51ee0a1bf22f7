"""The doctor's snapshot checks (``nexus/doctor.py``): Nexus's snapshots and their parts
against what the crucible agents hold.

Each agent that answered the doctor's region listing is asked, for every region it has,
for that region's snapshots and running snapshots (``region_snapshot.list.v1``); then
:func:`snapshot_findings` decides, with no I/O:

- ``snapshot_part_count``: a ready snapshot without exactly ``REPLICAS`` parts;
- ``snapshot_missing``: a ready snapshot's part whose agent does not have the snapshot;
- ``running_snapshot_mismatch``: a ready snapshot's part whose running snapshot is not
  ``created`` at its agent, or serves another port than Nexus recorded;
- ``orphan_snapshot`` / ``orphan_running_snapshot``: a snapshot, or a running snapshot
  that is not destroyed, at an agent with no live record in Nexus (an unwound saga or a
  lost delete left it behind);
- ``snapshot_faulted``: a snapshot whose create or delete could not finish.

Snapshots being created or deleted are in flight and are checked only for leftovers.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from nexus.db.models import RegionSnapshot, Snapshot
from nexus.db.states import SnapshotState
from nexus.sagas.disk_create import REPLICAS
from schemas import api
from schemas.region import Region as WireRegion
from schemas.region import RegionRef
from schemas.region import RegionState as WireRegionState
from schemas.snapshot import RegionSnapshotList, RegionSnapshots, RegionSnapshotsInfo
from schemas.topology import crucible_queue
from schemas.transport import PublishFailed, RequestTimedOut, Transport

# States in which a snapshot's records change as a saga works.
IN_FLIGHT = {SnapshotState.CREATING, SnapshotState.DELETING}


@dataclass(frozen=True)
class SnapshotRecord:
    id: uuid.UUID
    name: str
    state: SnapshotState
    fault_reason: str | None


@dataclass(frozen=True)
class PartRecord:
    snapshot_id: uuid.UUID
    dataset_id: uuid.UUID
    region_id: uuid.UUID
    port_number: int | None


@dataclass(frozen=True)
class SnapshotRecords:
    snapshots: Mapping[uuid.UUID, SnapshotRecord]
    parts: Sequence[PartRecord]


async def read_records(session: AsyncSession) -> SnapshotRecords:
    return SnapshotRecords(
        snapshots={
            s.id: SnapshotRecord(s.id, s.name, s.state, s.fault_reason)
            for s in (await session.execute(select(Snapshot))).scalars()
        },
        parts=[
            PartRecord(p.snapshot_id, p.dataset_id, p.region_id, p.port_number)
            for p in (await session.execute(select(RegionSnapshot))).scalars()
        ],
    )


async def ask_agents(
    transport: Transport,
    source: str,
    timeout: float,
    held: Mapping[uuid.UUID, Sequence[WireRegion]],
    unreachable: list[str],
) -> dict[tuple[uuid.UUID, uuid.UUID], RegionSnapshots]:
    """Each answering agent's snapshots of each region it has that is not destroyed."""
    asked = [
        (dataset_id, region.id)
        for dataset_id, regions in held.items()
        for region in regions
        if region.state is not WireRegionState.DESTROYED
    ]

    async def ask(dataset_id: uuid.UUID, region_id: uuid.UUID) -> RegionSnapshots | None:
        try:
            reply = await transport.request(
                RegionSnapshotList(source=source, payload=RegionRef(id=region_id)),
                routing_key=crucible_queue(dataset_id),
                timeout=timeout,
            )
        except (RequestTimedOut, PublishFailed):
            return None
        if not isinstance(reply, RegionSnapshotsInfo) or reply.source != f"crucible/{dataset_id}":
            return None
        return reply.payload if reply.payload.agent_id == dataset_id else None

    answers = await asyncio.gather(*(ask(*pair) for pair in asked))
    found: dict[tuple[uuid.UUID, uuid.UUID], RegionSnapshots] = {}
    for (dataset_id, region_id), answer in zip(asked, answers, strict=True):
        if answer is None:
            unreachable.append(f"crucible {dataset_id}")
        else:
            found[(dataset_id, region_id)] = answer
    return found


def snapshot_findings(
    records: SnapshotRecords,
    answered: set[uuid.UUID],
    held: Mapping[tuple[uuid.UUID, uuid.UUID], RegionSnapshots],
) -> list[api.DoctorFinding]:
    """What Nexus's snapshot records and the agents disagree on. ``answered``: the
    datasets whose agents listed their regions; ``held``: what each of them has, by
    (dataset, region)."""
    findings: list[api.DoctorFinding] = []
    by_snapshot: dict[uuid.UUID, list[PartRecord]] = defaultdict(list)
    for part in records.parts:
        by_snapshot[part.snapshot_id].append(part)
    for snapshot in records.snapshots.values():
        if snapshot.state is SnapshotState.FAULTED:
            findings.append(
                _finding(
                    "snapshot_faulted",
                    snapshot.id,
                    f"snapshot {snapshot.name}: {snapshot.fault_reason or 'no reason recorded'}",
                )
            )
        if snapshot.state is not SnapshotState.READY:
            continue
        own = by_snapshot.get(snapshot.id, [])
        if len(own) != REPLICAS:
            findings.append(
                _finding(
                    "snapshot_part_count",
                    snapshot.id,
                    f"snapshot {snapshot.name} is ready with {len(own)} parts, not {REPLICAS}",
                )
            )
        for part in own:
            if part.dataset_id in answered:
                findings += _part_at_its_agent(
                    snapshot, part, held.get((part.dataset_id, part.region_id))
                )
    findings += _leftovers(records, held)
    return findings


def _part_at_its_agent(
    snapshot: SnapshotRecord, part: PartRecord, found: RegionSnapshots | None
) -> list[api.DoctorFinding]:
    where = f"snapshot {snapshot.name}, region {part.region_id}"
    name = str(snapshot.id)
    taken = found is not None and any(s.name == name for s in found.snapshots)
    if not taken:
        return [
            _finding(
                "snapshot_missing",
                snapshot.id,
                f"{where}: the agent of dataset {part.dataset_id} does not have it",
            )
        ]
    assert found is not None
    running = next((r for r in found.running_snapshots if r.name == name), None)
    if running is None or running.state is not WireRegionState.CREATED:
        return [
            _finding(
                "running_snapshot_mismatch",
                snapshot.id,
                f"{where}: its running snapshot is "
                f"{running.state.value if running else 'absent'} at its agent, not created",
            )
        ]
    if running.port_number != part.port_number:
        return [
            _finding(
                "running_snapshot_mismatch",
                snapshot.id,
                f"{where}: Nexus records port {part.port_number}, its agent serves it on "
                f"{running.port_number}",
            )
        ]
    return []


def _leftovers(
    records: SnapshotRecords, held: Mapping[tuple[uuid.UUID, uuid.UUID], RegionSnapshots]
) -> list[api.DoctorFinding]:
    """Snapshots and running snapshots at agents that no live record of Nexus accounts
    for: not a part Nexus recorded, or a part of a snapshot destroyed."""
    recorded = {
        (part.dataset_id, part.region_id, str(part.snapshot_id))
        for part in records.parts
        if (s := records.snapshots.get(part.snapshot_id)) is not None
        and s.state is not SnapshotState.DESTROYED
    }
    findings = []
    for (dataset_id, region_id), found in held.items():
        for taken in found.snapshots:
            if (dataset_id, region_id, taken.name) not in recorded:
                findings.append(
                    _finding(
                        "orphan_snapshot",
                        region_id,
                        f"snapshot {taken.name} of region {region_id} at the agent of dataset "
                        f"{dataset_id}: no snapshot of Nexus's accounts for it",
                    )
                )
        for running in found.running_snapshots:
            if running.state is WireRegionState.DESTROYED:
                continue
            if (dataset_id, region_id, running.name) not in recorded:
                findings.append(
                    _finding(
                        "orphan_running_snapshot",
                        region_id,
                        f"running snapshot {running.name} of region {region_id} "
                        f"({running.state.value}, port {running.port_number}) at the agent "
                        f"of dataset {dataset_id}: no snapshot of Nexus's accounts for it",
                    )
                )
    return findings


def _finding(kind: str, object_id: object, detail: str) -> api.DoctorFinding:
    return api.DoctorFinding(kind=kind, object_id=str(object_id), detail=detail[:1000])
