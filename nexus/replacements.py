"""Region replacement requests: filed when a dataset is lost, each with its saga at once.

When a sled is expunged (``nexusctl sled expunge``, or silent past
``NEXUS_SLED_EXPUNGE_SECONDS``: ``nexus.liveness``), its datasets' regions are lost. In
the transaction that expunges it, :meth:`Replacements.lose` decides, for every region
on those datasets that is not destroyed, by its disk's state:

- the new region of a replacement in flight, not yet created: ``failed`` is filed for
  its wait, and that replacement unwinds and is tried again elsewhere (once created, it
  is a region of its disk like the others);
- a ready disk (``detached``, ``attached``): a replacement request (one per region,
  Omicron's ``region_replacement`` row) and its ``region_replacement`` saga, created in
  the same transaction; the caller runs the sagas once it commits. A replica that dies
  before running them leaves their leases to expire, and any replica adopts them.
- a disk being created: its waits on that region end at once, with ``failed`` filed
  for a region not yet created (``disk_create`` unwinds; its cleanup asks no lost
  agent), and ``disk_finalize`` refuses a disk with a region on an expunged dataset;
  a region already created is recorded ``destroyed``, filed as below, for an unwind
  that already waits for its delete (the chaos test found one waiting for ever);
- a disk being deleted: the region is recorded ``destroyed`` and that is filed for the
  delete's wait (its agent is gone: Omicron treats the region as gone).

Omicron files the requests in a background task that looks for regions on expunged
physical disks (``region_replacement`` task, every 30 s) and starts the start saga from
it; here the expunge itself does both. The one timer left is the retry of a request
whose saga unwound (:meth:`Replacements.retry`, from the sweeper's pass): a backoff from
5 s, doubling to at most a minute per attempt.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from nexus.db.engine import upsert_insert
from nexus.db.models import Disk, Region, RegionReplacement, Saga
from nexus.db.states import (
    IN_FLIGHT_REPLACEMENT_STATES,
    DiskState,
    RegionState,
    ReplacementState,
    SagaState,
)
from nexus.replacement_ids import request_id_for, saga_id_for
from nexus.saga import rendezvous
from nexus.saga.executor import SagaExecutor
from nexus.saga.position import SagaRow
from nexus.saga.rendezvous import Woken
from nexus.sagas import disk_create, region_replacement
from nexus.waitkeys import region_key
from schemas import api
from schemas.region import Region as WireRegion
from schemas.region import RegionChange
from schemas.region import RegionState as WireRegionState

log = logging.getLogger(__name__)

# The ids of the events Nexus files for the regions of a lost dataset, one per region.
LOST_REGION_NAMESPACE = uuid.UUID("9c3c1b0e-2f57-4a0e-8d43-6a1d2e7c5b19")
LOST_REASON = "its dataset was expunged"
RETRY_FIRST = timedelta(seconds=5)
RETRY_MOST = timedelta(minutes=1)
READY_DISK = (DiskState.DETACHED, DiskState.ATTACHED)
CLAIMABLE_SAGA = (SagaState.RUNNING, SagaState.WAITING, SagaState.UNWINDING)


def retry_delay(attempts: int) -> timedelta:
    """How long a request whose ``attempts``-th saga unwound waits for the next."""
    return min(RETRY_MOST, RETRY_FIRST * float(2 ** max(0, min(attempts, 8) - 1)))


@dataclass
class Lost:
    """What losing datasets did, in the caller's transaction."""

    requested: int = 0
    # Sagas created in the transaction: run them once it commits.
    sagas: list[SagaRow] = field(default_factory=list)
    # Sagas woken by the filed region events (disks being created or deleted).
    woken: list[Woken] = field(default_factory=list)


class Replacements:
    """Files requests and starts their sagas on one replica's executor."""

    def __init__(
        self,
        executor: SagaExecutor,
        *,
        region_deadline: timedelta = disk_create.REGION_DEADLINE,
        delete_deadline: timedelta = disk_create.DELETE_DEADLINE,
        repair_deadline: timedelta = region_replacement.REPAIR_DEADLINE,
    ) -> None:
        self._executor = executor
        self._deadlines = {
            "region_deadline_seconds": region_deadline.total_seconds(),
            "delete_deadline_seconds": delete_deadline.total_seconds(),
            "repair_deadline_seconds": repair_deadline.total_seconds(),
        }

    async def lose(
        self, session: AsyncSession, dataset_ids: Iterable[uuid.UUID], now: datetime
    ) -> Lost:
        """Every region on ``dataset_ids`` (just expunged) as the module says; in the
        caller's transaction. Run again, it files nothing new."""
        lost = Lost()
        ids = sorted(set(dataset_ids))
        if not ids:
            return lost
        rows = (
            await session.execute(
                select(Region, Disk.state)
                .join(Disk, Disk.id == Region.disk_id)
                .where(Region.dataset_id.in_(ids), Region.state != RegionState.DESTROYED)
                .order_by(Region.id)
            )
        ).all()
        replacing = set(
            (
                await session.execute(
                    select(RegionReplacement.new_region_id).where(
                        RegionReplacement.new_region_id.in_([r.id for r, _ in rows]),
                        RegionReplacement.state.in_(IN_FLIGHT_REPLACEMENT_STATES),
                    )
                )
            ).scalars()
        )
        for region, disk_state in rows:
            if region.id in replacing and region.state == RegionState.REQUESTED:
                # The new region of a replacement in flight, lost before it was created:
                # that saga's wait ends (failed) and it unwinds; its retry places anew.
                woke = await _file(session, region, WireRegionState.FAILED, now)
                lost.woken += [woke] if woke is not None else []
            elif disk_state in READY_DISK and region.state != RegionState.TOMBSTONED:
                started = await self._request(session, region, now)
                if started is not None:
                    lost.requested += 1
                    lost.sagas.append(started)
            elif disk_state == DiskState.CREATING and region.state == RegionState.REQUESTED:
                woke = await _file(session, region, WireRegionState.FAILED, now)
                lost.woken += [woke] if woke is not None else []
            elif disk_state in (DiskState.CREATING, DiskState.DELETING):
                # A disk being deleted, or a create whose region was made (it cannot
                # finish now, and its unwind may already wait for that region's
                # destroyed): the region is gone with its agent.
                woke = await _file(session, region, WireRegionState.DESTROYED, now)
                lost.woken += [woke] if woke is not None else []
                region.state = RegionState.DESTROYED
                region.generation += 1
        return lost

    async def _request(
        self, session: AsyncSession, region: Region, now: datetime
    ) -> SagaRow | None:
        request_id = await file_request(session, region, now)
        if request_id is None:
            return None
        return await self._create_saga(session, request_id, region.disk_id, region.id, 1)

    async def _create_saga(
        self,
        session: AsyncSession,
        request_id: uuid.UUID,
        disk_id: uuid.UUID,
        region_id: uuid.UUID,
        attempt: int,
    ) -> SagaRow:
        params = region_replacement.Params(
            request_id=request_id, disk_id=disk_id, old_region_id=region_id, **self._deadlines
        )
        return await self._executor.create(
            session, region_replacement.DEFINITION, params, saga_id_for(request_id, attempt)
        )

    def run(self, lost: Lost) -> None:
        """After the commit: run the sagas created and the ones the events woke."""
        for row in lost.sagas:
            self._executor.spawn(row.id, row)
        for woke in lost.woken:
            self._executor.spawn(woke.saga_id)

    async def retry(self, sessions: async_sessionmaker[AsyncSession], now: datetime) -> int:
        """Start a new saga for each request whose last one unwound, once its backoff
        has passed; how many were started. Two replicas doing this at once start one
        (the attempt count is the guard)."""
        started: list[SagaRow] = []
        async with sessions.begin() as session:
            waiting = (
                await session.execute(
                    select(RegionReplacement)
                    .where(
                        RegionReplacement.state == ReplacementState.REQUESTED,
                        RegionReplacement.operating_saga_id.is_(None),
                    )
                    .order_by(RegionReplacement.id)
                    .limit(100)
                )
            ).scalars()
            for request in list(waiting):
                last = await session.get(Saga, saga_id_for(request.id, request.attempts))
                if last is not None and last.state in CLAIMABLE_SAGA:
                    continue  # its saga has not claimed it yet
                if request.state_changed_at > now - retry_delay(request.attempts):
                    continue
                seen, attempt = request.attempts, request.attempts + 1
                bumped = await session.execute(
                    update(RegionReplacement)
                    .where(RegionReplacement.id == request.id, RegionReplacement.attempts == seen)
                    .values(attempts=attempt)
                    .execution_options(synchronize_session=False)
                )
                if not bumped.rowcount:  # type: ignore[attr-defined]
                    continue
                log.info(
                    "region replacement %s: attempt %d (the last one unwound: %s)",
                    request.id,
                    attempt,
                    request.last_failure,
                )
                started.append(
                    await self._create_saga(
                        session, request.id, request.disk_id, request.old_region_id, attempt
                    )
                )
        for row in started:
            self._executor.spawn(row.id, row)
        return len(started)


async def file_request(session: AsyncSession, region: Region, now: datetime) -> uuid.UUID | None:
    """File the replacement of a lost region (no saga); its id, None if it was filed."""
    request_id = request_id_for(region.id)
    inserted = await session.execute(
        upsert_insert(session, RegionReplacement.__table__)
        .values(
            id=request_id,
            request_time=now,
            old_region_id=region.id,
            old_dataset_id=region.dataset_id,
            disk_id=region.disk_id,
            state=ReplacementState.REQUESTED.value,
            attempts=1,
            state_changed_at=now,
            waiting_for="its saga to claim it",
            history=[[ReplacementState.REQUESTED.value, now.isoformat(), None]],
        )
        .on_conflict_do_nothing(index_elements=["old_region_id"])
    )
    if not inserted.rowcount:  # type: ignore[attr-defined]
        return None
    log.warning(
        "region %s of disk %s lost with dataset %s: replacement %s requested",
        region.id,
        region.disk_id,
        region.dataset_id,
        request_id,
        extra={"request_id": str(request_id)},
    )
    return request_id


async def _file(
    session: AsyncSession, region: Region, state: WireRegionState, now: datetime
) -> Woken | None:
    """File ``state`` for the lost region's waits, as if its agent had said so at the
    next generation."""
    generation = region.generation + 1
    change = RegionChange(
        agent_id=region.dataset_id,
        region=WireRegion(
            id=region.id,
            block_size=region.block_size,
            extent_size=region.extent_size,
            extent_count=region.extent_count,
            encrypted=True,
            port_number=region.port_number or 0,
            state=state,
            generation=generation,
            failure=LOST_REASON if state is WireRegionState.FAILED else None,
        ),
    )
    return await rendezvous.record_event(
        session,
        key=region_key(region.id, state),
        message_id=uuid.uuid5(LOST_REGION_NAMESPACE, f"{region.id}:{state.value}"),
        payload=change.model_dump(mode="json"),
        generation=generation,
        now=now,
        occurred_at=now,
    )


async def in_flight_for(session: AsyncSession, disk_id: uuid.UUID) -> RegionReplacement | None:
    """A replacement of one of the disk's regions that has not completed, if any."""
    return (
        await session.execute(
            select(RegionReplacement)
            .where(
                RegionReplacement.disk_id == disk_id,
                RegionReplacement.state.in_(IN_FLIGHT_REPLACEMENT_STATES),
            )
            .limit(1)
        )
    ).scalar_one_or_none()


def view(request: RegionReplacement) -> api.ReplacementView:
    return api.ReplacementView(
        id=request.id,
        state=request.state.value,
        since=request.state_changed_at,
        waiting_for=request.waiting_for,
        request_time=request.request_time,
        disk_id=request.disk_id,
        old_region_id=request.old_region_id,
        old_dataset_id=request.old_dataset_id,
        new_region_id=request.new_region_id,
        new_dataset_id=request.new_dataset_id,
        operating_saga_id=request.operating_saga_id,
        attempts=request.attempts,
        repair_mode=request.repair_mode,
        repair_progress=request.repair_progress,
        last_failure=request.last_failure,
        history=tuple(_phases(request.history)),
    )


def _phases(history: Sequence[Any]) -> list[api.ReplacementPhase]:
    return [
        api.ReplacementPhase(state=state, at=datetime.fromisoformat(at), waiting_for=waiting)
        for state, at, waiting in history
    ]
