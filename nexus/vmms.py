"""How a VMM's state reaches Nexus's records, whoever learned it: the rule in one place.

The event intake (:mod:`nexus.events`) applies what a sled says about its VMMs, the
liveness check (:mod:`nexus.liveness`) fails the VMMs of a sled that is lost, and the
power sagas record the state their wait reached. All of them go through
:func:`record_vmm_state`, which follows Omicron's rules
(``nexus/src/app/instance.rs``, ``process_vmm_update``; ``nexus/db-model/src/vmm_state.rs``):

- a VMM's record moves only to a newer generation, and never out of an ended state
  (``destroyed``, ``failed``, ``saga_unwound``): a late or repeated message about a run
  that has ended changes nothing;
- the instance follows only its **active** VMM: a message about any other VMM of the
  instance (an earlier run) leaves the instance alone;
- when the active VMM ends, the instance has none: ``stopped`` after ``destroyed``,
  ``failed`` after ``failed``.

Where Omicron runs an ``instance-update`` saga for the last step, this is one guarded
``UPDATE`` in the transaction that recorded the VMM's state.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from nexus.db.models import Instance, Vmm
from nexus.db.states import ENDED_VMM_STATES, InstanceState, VmmState

# What people see of an instance whose active VMM is in each state.
INSTANCE_STATE_OF_VMM = {
    VmmState.CREATING: InstanceState.STARTING,
    VmmState.STARTING: InstanceState.STARTING,
    VmmState.RUNNING: InstanceState.RUNNING,
    VmmState.STOPPING: InstanceState.STOPPING,
    VmmState.REBOOTING: InstanceState.REBOOTING,
    VmmState.DESTROYED: InstanceState.STOPPED,
    VmmState.SAGA_UNWOUND: InstanceState.STOPPED,
    VmmState.FAILED: InstanceState.FAILED,
}
# States in which a VMM holds its CPUs and memory on its sled.
LIVE_VMM_STATES = [state for state in VmmState if state not in ENDED_VMM_STATES]


async def record_vmm_state(
    session: AsyncSession,
    vmm_id: uuid.UUID,
    state: VmmState,
    generation: int,
    now: datetime,
    *,
    reason: str | None = None,
) -> bool:
    """Record that VMM ``vmm_id`` reached ``state`` at ``generation``, and make its
    instance follow if it is the instance's active VMM. False, with nothing written,
    when the VMM is unknown, has ended, or already has that generation or a newer one."""
    values: dict[str, Any] = {"state": state, "generation": generation, "updated_at": now}
    if state is VmmState.FAILED:
        values["reason"] = reason
    instance_id = (
        await session.execute(
            update(Vmm)
            .where(
                Vmm.id == vmm_id,
                Vmm.generation < generation,
                Vmm.state.not_in(ENDED_VMM_STATES),
            )
            .values(**values)
            .returning(Vmm.instance_id)
        )
    ).scalar_one_or_none()
    if instance_id is None:
        return False
    await follow_active_vmm(session, instance_id, vmm_id, state, now)
    return True


async def follow_active_vmm(
    session: AsyncSession, instance_id: uuid.UUID, vmm_id: uuid.UUID, state: VmmState, now: datetime
) -> None:
    """The instance shows the state of ``vmm_id`` if that is its active VMM, and has no
    active VMM once it has ended; any other VMM leaves it alone."""
    values: dict[str, Any] = {
        "state": INSTANCE_STATE_OF_VMM[state],
        "generation": Instance.generation + 1,
        "updated_at": now,
    }
    if state in ENDED_VMM_STATES:
        values["active_vmm_id"] = None
    await session.execute(
        update(Instance)
        .where(Instance.id == instance_id, Instance.active_vmm_id == vmm_id)
        .values(**values)
    )


async def vmm_is_recorded(session: AsyncSession, vmm_id: uuid.UUID) -> bool:
    return (await session.scalar(select(Vmm.id).where(Vmm.id == vmm_id))) is not None
