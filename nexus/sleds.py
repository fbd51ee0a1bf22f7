"""What ``nexusctl sled list`` shows: each sled with its datasets and live VMMs.

A crucible agent announces the sled its storage is on before (or without) a sled agent
registering it, so a sled is every id that either table names.
"""

from __future__ import annotations

import uuid
from collections import defaultdict

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from nexus.db.models import Dataset, Sled, Vmm
from nexus.vmms import LIVE_VMM_STATES
from schemas import api


async def sled_views(session: AsyncSession, only: uuid.UUID | None = None) -> list[api.SledView]:
    """Every sled (or only ``only``), registered ones first by hostname."""
    sleds_query = select(Sled)
    datasets_query = select(Dataset).order_by(Dataset.id)
    vmms_query = (
        select(Vmm.sled_id, func.count())
        .where(Vmm.state.in_(LIVE_VMM_STATES))
        .group_by(Vmm.sled_id)
    )
    if only is not None:
        sleds_query = sleds_query.where(Sled.id == only)
        datasets_query = datasets_query.where(Dataset.sled_id == only)
        vmms_query = vmms_query.where(Vmm.sled_id == only)
    sleds = {sled.id: sled for sled in (await session.execute(sleds_query)).scalars()}
    datasets: dict[uuid.UUID, list[api.DatasetView]] = defaultdict(list)
    for dataset in (await session.execute(datasets_query)).scalars():
        datasets[dataset.sled_id].append(
            api.DatasetView(
                id=dataset.id,
                state=dataset.state.value,
                capacity_bytes=dataset.capacity_bytes,
                free_bytes=dataset.free_bytes,
                last_seen_at=dataset.last_seen_at,
            )
        )
    live = {sled_id: count for sled_id, count in (await session.execute(vmms_query)).all()}
    views = []
    for sled_id in sleds.keys() | datasets.keys():
        sled = sleds.get(sled_id)
        views.append(
            api.SledView(
                id=sled_id,
                hostname=sled.hostname if sled else None,
                state=sled.state.value if sled else None,
                cpus=sled.cpus if sled else None,
                memory_bytes=sled.memory_bytes if sled else None,
                last_heartbeat_at=sled.last_heartbeat_at if sled else None,
                live_vmms=live.get(sled_id, 0),
                datasets=tuple(datasets.get(sled_id, ())),
            )
        )
    views.sort(key=lambda view: (view.hostname is None, view.hostname or "", str(view.id)))
    return views
