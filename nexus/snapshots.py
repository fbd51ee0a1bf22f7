"""Snapshots as the API shows them, and finding one by name or id (``nexus/api.py``)."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from nexus.db.models import RegionSnapshot, Snapshot
from nexus.db.states import SnapshotState
from schemas import api


async def snapshot_view(session: AsyncSession, snapshot: Snapshot) -> api.SnapshotView:
    parts = (
        await session.execute(
            select(RegionSnapshot)
            .where(RegionSnapshot.snapshot_id == snapshot.id)
            .order_by(RegionSnapshot.region_id)
        )
    ).scalars()
    return api.SnapshotView(
        id=snapshot.id,
        project=snapshot.project,
        name=snapshot.name,
        disk_id=snapshot.disk_id,
        size_bytes=snapshot.size_bytes,
        block_size=snapshot.block_size,
        state=snapshot.state.value,
        saga_id=snapshot.saga_id,
        fault_reason=snapshot.fault_reason,
        parts=tuple(
            api.SnapshotPartView(
                region_id=part.region_id,
                dataset_id=part.dataset_id,
                snapshot_state=part.snapshot_state.value if part.snapshot_state else None,
                running_state=part.running_state.value if part.running_state else None,
                snapshot_addr=part.snapshot_addr,
                deleting=part.deleting,
            )
            for part in parts
        ),
        created_at=snapshot.created_at,
        updated_at=snapshot.updated_at,
    )


async def live_snapshot(session: AsyncSession, project: str, name: str) -> Snapshot | None:
    """The project's snapshot of that name that is not destroyed (names are unique among
    those)."""
    return (
        await session.execute(
            select(Snapshot).where(
                Snapshot.project == project,
                Snapshot.name == name,
                Snapshot.state != SnapshotState.DESTROYED,
            )
        )
    ).scalar_one_or_none()


async def find_snapshot(session: AsyncSession, ref: api.ResourceRef) -> Snapshot | None:
    if isinstance(ref.resource, uuid.UUID):
        snapshot = await session.get(Snapshot, ref.resource)
        return snapshot if snapshot is not None and snapshot.project == ref.project else None
    return await live_snapshot(session, ref.project, ref.resource)
