"""Sleds whose heartbeats stopped are marked unreachable; their instances show it.

A heartbeat (applied in :mod:`nexus.events`) makes a sled active again.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from nexus.db.models import Sled
from nexus.db.states import SledState

log = logging.getLogger(__name__)


async def mark_silent_sleds(
    sessions: async_sessionmaker[AsyncSession], *, now: datetime, timeout: timedelta
) -> int:
    async with sessions.begin() as session:
        result = await session.execute(
            update(Sled)
            .where(Sled.state == SledState.ACTIVE, Sled.last_heartbeat_at < now - timeout)
            .values(state=SledState.UNREACHABLE)
            .returning(Sled.id)
        )
        silent = list(result.scalars())
    for sled_id in silent:
        log.warning("sled %s missed its heartbeats for %s: unreachable", sled_id, timeout)
    return len(silent)
