"""Sleds whose heartbeats stopped: unreachable first, then lost, with their VMMs failed.

Two thresholds, both on the database's clock:

- silent past ``NEXUS_SLED_TIMEOUT_SECONDS`` (10 s): ``unreachable``. No new VMMs go
  there; its VMMs are left alone (a network blip must not fail every guest on a sled),
  and a heartbeat makes it active again.
- silent past ``NEXUS_SLED_EXPUNGE_SECONDS`` (60 s) while Nexus hears other sleds:
  ``expunged``, for good. In the same transaction every VMM of the sled that has not
  ended is recorded ``failed`` (reason :data:`LOST_REASON`), its instance becomes
  ``failed`` with no VMM, and the failure is filed for the sagas that wait on those
  VMMs (a start waiting for ``running``, a stop for ``destroyed``), which wake at once
  rather than at their deadline.

Omicron does the last step in its instance watcher (``nexus/src/app/background/tasks/
instance_watcher.rs``: a VMM on an expunged sled is marked ``Failed``, reason
``SledExpunged``), a background task that polls every sled agent for every VMM; here no
sled is asked anything: the sweeper's pass reads heartbeat times already in the
database, and the failure reaches waiting sagas by the rendezvous, like an agent's
event. Omicron expunges only by an operator's decision (``omdb nexus sled expunge``);
here both exist: ``nexusctl sled expunge`` (:func:`expunge_sled`) and the threshold.
Either way the sled's datasets are expunged with it: no new region is placed there, and
in the same transaction each region they held gets a replacement request and its saga
(``nexus.replacements``), which the caller runs once it commits.
Nexus cannot tell a
lost sled from its own deafness, hence the rule that another sled must be heard; it is
not airtight: right after a broker outage longer than the threshold, a sled whose first
heartbeat comes after another's (about a second) can be expunged though it lives. A
sled that comes back after it stays expunged: its agent still runs the VMMs Nexus
failed (nothing tells it to destroy them yet), and nothing it says about them changes
Nexus's records.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from nexus.db.models import Dataset, Instance, Sled, Vmm
from nexus.db.states import DatasetState, SledState, VmmState
from nexus.replacements import Lost, Replacements
from nexus.saga import rendezvous
from nexus.saga.rendezvous import Woken
from nexus.vmms import LIVE_VMM_STATES, record_vmm_state
from nexus.waitkeys import vmm_key
from schemas.instance import Vmm as WireVmm
from schemas.instance import VmmChange
from schemas.instance import VmmState as WireVmmState

log = logging.getLogger(__name__)

LOST_REASON = "sled lost: it was expunged"
# The ids of the failures Nexus records for a lost sled's VMMs, one per VMM.
LOST_NAMESPACE = uuid.UUID("5b0f3f0e-7a47-4d6b-9a2c-1f64a3c1e8d5")


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


async def expunge_lost_sleds(
    sessions: async_sessionmaker[AsyncSession],
    *,
    now: datetime,
    after: timedelta,
    hearing: timedelta,
    replacements: Replacements | None = None,
) -> list[Woken]:
    """Expunge every sled silent for longer than ``after``, provided Nexus hears another
    sled (one beat within ``hearing``); the sagas its VMMs' failures woke. With
    ``replacements``, the lost regions' replacement sagas (and the waits they woke) are
    run here once the transaction commits.

    When no sled is heard at all, the silence is more likely Nexus's (the broker is
    down, or its consumer is) than every sled's: nothing is expunged.
    """
    async with sessions.begin() as session:
        last_heard = await session.scalar(
            select(func.max(Sled.last_heartbeat_at)).where(Sled.state != SledState.EXPUNGED)
        )
        if last_heard is None or last_heard < now - hearing:
            return []
        lost = (
            await session.execute(
                update(Sled)
                .where(Sled.state != SledState.EXPUNGED, Sled.last_heartbeat_at < now - after)
                .values(state=SledState.EXPUNGED)
                .returning(Sled.id)
            )
        ).scalars()
        woken: list[Woken] = []
        datasets: list[uuid.UUID] = []
        for sled_id in list(lost):
            datasets += await _expunge_datasets(session, sled_id)
            woken += [woke for woke in await fail_vmms_of(session, sled_id, now) if woke]
        replaced = await replacements.lose(session, datasets, now) if replacements else Lost()
    if replacements is not None:
        # Committed: the replacement sagas run now, and the sagas the lost regions woke.
        replacements.run(replaced)
    return woken


class Expunged(NamedTuple):
    """What an operator's expunge did: nothing the second time."""

    changed: bool
    datasets: int
    failed_vmms: int
    woken: list[Woken]
    lost: Lost


async def expunge_sled(
    session: AsyncSession,
    sled_id: uuid.UUID,
    now: datetime,
    replacements: Replacements | None = None,
) -> Expunged:
    """An operator's decision that ``sled_id`` is gone for good (Omicron's ``sled
    expunge``): the sled, whatever it last said, and its datasets are expunged, and its
    VMMs fail as when it is lost by silence. Run again, it changes nothing."""
    sled = await session.execute(
        update(Sled)
        .where(Sled.id == sled_id, Sled.state != SledState.EXPUNGED)
        .values(state=SledState.EXPUNGED)
        .returning(Sled.id)
    )
    changed = sled.scalar_one_or_none() is not None
    datasets = await _expunge_datasets(session, sled_id)
    failed = await fail_vmms_of(session, sled_id, now)
    # The VMMs first: a disk attached to a VMM of this sled is then repaired by Nexus.
    lost = await replacements.lose(session, datasets, now) if replacements else Lost()
    return Expunged(
        changed or bool(datasets) or bool(failed),
        len(datasets),
        len(failed),
        [woke for woke in failed if woke is not None],
        lost,
    )


async def _expunge_datasets(session: AsyncSession, sled_id: uuid.UUID) -> list[uuid.UUID]:
    expunged = (
        await session.execute(
            update(Dataset)
            .where(Dataset.sled_id == sled_id, Dataset.state != DatasetState.EXPUNGED)
            .values(state=DatasetState.EXPUNGED)
            .returning(Dataset.id)
        )
    ).scalars()
    ids = list(expunged)
    for dataset_id in ids:
        log.warning("dataset %s expunged with its sled %s", dataset_id, sled_id)
    return ids


async def fail_vmms_of(
    session: AsyncSession, sled_id: uuid.UUID, now: datetime
) -> list[Woken | None]:
    """Record every VMM of an expunged sled that has not ended ``failed``, as if the sled
    had said so at the next generation, and file that for the sagas waiting on it; one
    entry per VMM failed, with the saga that woke if one waited."""
    rows = await session.execute(
        select(Vmm, Instance.name)
        .join(Instance, Instance.id == Vmm.instance_id)
        .where(Vmm.sled_id == sled_id, Vmm.state.in_(LIVE_VMM_STATES))
        .order_by(Vmm.id)
    )
    woken: list[Woken | None] = []
    for vmm, name in rows.all():
        generation = vmm.generation + 1
        failed = WireVmm(
            id=vmm.id,
            instance_id=vmm.instance_id,
            sled_id=sled_id,
            name=name,
            ncpus=vmm.ncpus,
            memory_bytes=vmm.memory_bytes,
            state=WireVmmState.FAILED,
            generation=generation,
            reason=LOST_REASON,
        )
        await record_vmm_state(
            session, vmm.id, VmmState.FAILED, generation, now, reason=LOST_REASON
        )
        woke = await rendezvous.record_event(
            session,
            key=vmm_key(vmm.id, WireVmmState.FAILED),
            message_id=uuid.uuid5(LOST_NAMESPACE, str(vmm.id)),
            payload=VmmChange(vmm=failed).model_dump(mode="json"),
            generation=generation,
            now=now,
            occurred_at=now,
        )
        log.warning(
            "VMM %s of instance %s failed: %s",
            vmm.id,
            vmm.instance_id,
            LOST_REASON,
            extra={"vmm_id": str(vmm.id), "instance_id": str(vmm.instance_id)},
        )
        woken.append(woke)
    return woken
