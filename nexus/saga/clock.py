"""The engine's clock, a dependency so deadline paths are tested without sleeping.

One clock for decisions: the database's, as each replica reads it (``DatabaseClock``).
Leases, adoption, deadlines, heartbeat freshness and the outbox's grace compare times
that different replicas wrote. Each replica's own clock may be off (a VM restored from
a snapshot, NTP not yet synced): a replica 30 s ahead would take live leases, one 30 s
behind would write leases that the others find expired at once, and a heartbeat
stamped by one replica would look stale or fresh to another. So every replica reads
the database server's clock instead: its own clock plus an offset measured against the
server (``clock_timestamp()``), measured again every few seconds so that a clock
stepped later is followed too. That costs one statement per measurement, not one per
decision. SQLite runs inside this process: its clock is the process's, offset 0.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime.now(UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, by: timedelta) -> None:
        self._now += by


log = logging.getLogger(__name__)

# A measured offset that moves by more than this is worth a line in the log: a clock
# was stepped, on this host or on the database's.
NOTEWORTHY_STEP = timedelta(seconds=1)


class DatabaseClock:
    """This process's clock corrected to the database server's."""

    def __init__(self, local: Clock | None = None) -> None:
        self._local = local or SystemClock()
        self.offset = timedelta(0)
        # Half the round trip of the last measurement: how far off the offset may be.
        self.uncertainty = timedelta(0)

    def now(self) -> datetime:
        return self._local.now() + self.offset

    async def measure(self, engine: AsyncEngine) -> timedelta:
        """Measure the offset to the database's clock now; returns it."""
        if engine.dialect.name == "sqlite":
            return self.offset
        async with engine.connect() as connection:
            before = self._local.now()
            server: datetime = (
                await connection.execute(text("SELECT clock_timestamp()"))
            ).scalar_one()
            after = self._local.now()
        round_trip = after - before
        offset = server.astimezone(UTC) - (before + round_trip / 2)
        if abs(offset - self.offset) > NOTEWORTHY_STEP:
            log.warning(
                "this host's clock is %+.3f s from the database's (was %+.3f s); "
                "decisions follow the database's",
                -offset.total_seconds(),
                -self.offset.total_seconds(),
            )
        self.offset = offset
        self.uncertainty = round_trip / 2
        return offset
