"""``nexusctl doctor``: Nexus's records against every agent's, and sagas needing a person.

Asks each crucible agent for its regions and each sled for the instances Nexus places
on it (all at once, each with a timeout), then reports what does not match:

- ``orphan_region``: a live region at an agent that no live disk owns;
- ``disk_missing_region``: a ready disk whose region is not ``created`` at its agent;
- ``instance_wrong_sled``: an instance whose sled does not have it;
- ``instance_state_mismatch``: the sled's state differs from Nexus's;
- ``saga_stuck`` / ``saga_unrecoverable``: sagas an operator must look at.

Run it on a quiet system: an operation in flight is legitimately between states.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from nexus.db.models import Dataset, Disk, Instance, Region, Saga, Sled
from nexus.db.states import DiskState, InstanceState, SagaState
from nexus.sagas.disk_create import REPLICAS
from schemas import api
from schemas.instance import InstanceGet, InstanceInfo, InstanceRef
from schemas.instance import InstanceState as WireInstanceState
from schemas.region import RegionList, RegionListed
from schemas.region import RegionState as WireRegionState
from schemas.transport import RequestTimedOut, Transport

LIVE_REGION = {WireRegionState.REQUESTED, WireRegionState.CREATED}
READY_DISK = {DiskState.DETACHED, DiskState.ATTACHED}
# Nexus states the sled reports the same way.
COMPARABLE = {InstanceState.RUNNING, InstanceState.STOPPED}


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
        regions = list((await session.execute(select(Region))).scalars())
        disks = {d.id: d for d in (await session.execute(select(Disk))).scalars()}
        placed = list(
            (
                await session.execute(
                    select(Instance, Sled.queue_name)
                    .join(Sled, Sled.id == Instance.sled_id)
                    .where(Instance.state.not_in([InstanceState.DELETED]))
                )
            ).all()
        )
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
                RegionList(source=source), routing_key=dataset.queue_name, timeout=timeout
            )
        except RequestTimedOut:
            return None
        return reply if isinstance(reply, RegionListed) else None

    listings = await asyncio.gather(*(regions_of(d) for d in datasets))
    at_agents: dict[uuid.UUID, WireRegionState] = {}
    for dataset, listing in zip(datasets, listings, strict=True):
        if listing is None:
            unreachable.append(f"crucible {dataset.id}")
            continue
        for listed in listing.payload.regions:
            at_agents[listed.id] = listed.state
    reachable_datasets = {d.id for d, listing in zip(datasets, listings, strict=True) if listing}

    owned_live = {
        r.id
        for r in regions
        if (disk := disks.get(r.disk_id)) is not None and disk.state is not DiskState.DELETED
    }
    for region_id, state in at_agents.items():
        if state in LIVE_REGION and region_id not in owned_live:
            findings.append(
                api.DoctorFinding(
                    kind="orphan_region",
                    object_id=str(region_id),
                    detail=f"{state.value} at its agent, but no live disk owns it",
                )
            )
    for disk in disks.values():
        if disk.state not in READY_DISK:
            continue
        own = [r for r in regions if r.disk_id == disk.id]
        if len(own) < REPLICAS:
            findings.append(
                api.DoctorFinding(
                    kind="disk_missing_region",
                    object_id=str(disk.id),
                    detail=f"disk {disk.name} has {len(own)} regions, not {REPLICAS}",
                )
            )
        for region in own:
            if region.dataset_id not in reachable_datasets:
                continue
            found = at_agents.get(region.id)
            if found is not WireRegionState.CREATED:
                findings.append(
                    api.DoctorFinding(
                        kind="disk_missing_region",
                        object_id=str(disk.id),
                        detail=f"disk {disk.name}: region {region.id} is "
                        f"{found.value if found else 'missing'} at its agent",
                    )
                )

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
        checked_agents=len(datasets) + len({queue for _, queue in placed}),
        unreachable_agents=tuple(sorted(set(unreachable))),
        findings=tuple(findings),
    )


async def _check_instances(
    transport: Transport,
    source: str,
    timeout: float,
    placed: Sequence[tuple[Instance, str]],
    unreachable: list[str],
) -> list[api.DoctorFinding]:
    async def ask(instance: Instance, queue: str) -> InstanceInfo | None:
        try:
            reply = await transport.request(
                InstanceGet(source=source, payload=InstanceRef(id=instance.id)),
                routing_key=queue,
                timeout=timeout,
            )
        except RequestTimedOut:
            return None
        return reply if isinstance(reply, InstanceInfo) else None

    answers = await asyncio.gather(*(ask(instance, queue) for instance, queue in placed))
    findings = []
    for (instance, queue), answer in zip(placed, answers, strict=True):
        if answer is None:
            unreachable.append(f"sled {queue.removeprefix('sled.')}")
            continue
        found = answer.payload.instance
        if found is None or found.state is WireInstanceState.DESTROYED:
            if instance.state is not InstanceState.DELETING:
                findings.append(
                    api.DoctorFinding(
                        kind="instance_wrong_sled",
                        object_id=str(instance.id),
                        detail=f"{instance.name} is on sled {instance.sled_id} in Nexus, "
                        "but that sled does not run it",
                    )
                )
        elif instance.state in COMPARABLE and found.state.value != instance.state.value:
            findings.append(
                api.DoctorFinding(
                    kind="instance_state_mismatch",
                    object_id=str(instance.id),
                    detail=f"{instance.name}: Nexus says {instance.state.value}, "
                    f"the sled says {found.state.value}",
                )
            )
    return findings
