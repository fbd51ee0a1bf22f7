"""The keys on which a saga and an agent's event meet: each format is written here only.

The event intake (:mod:`nexus.events`) files every event under the key built here, and
a saga waits on the key built here for the outcome it expects; a key built any other
way would never meet its event.

Only some states are ever waited for (the two sets below). An event in any other state
(a region ``tombstoned`` on its way to ``destroyed``, a VMM ``starting``) has no
saga to meet: the intake records the object's new state and keeps nothing for a saga,
since what it kept would only ever become an unclaimed event. A saga that starts
waiting for another state must add it here first;
``tests/unit/test_unclaimed_events.py`` fails until it does.
"""

from __future__ import annotations

import uuid
from typing import Final

from schemas.instance import RepairState, VmmState
from schemas.region import RegionState
from schemas.snapshot import SnapshotState

_REJECTED = "command:"

# disk_create waits for created or failed, disk_delete for destroyed.
AWAITED_REGION_STATES: Final = frozenset(
    {RegionState.CREATED, RegionState.FAILED, RegionState.DESTROYED}
)
# A start and a reboot wait for their VMM running, a stop for it destroyed, and each of
# them for it failed.
AWAITED_VMM_STATES: Final = frozenset({VmmState.RUNNING, VmmState.DESTROYED, VmmState.FAILED})

# snapshot_create waits for a region's snapshot created, snapshot_delete (and its unwind)
# for it destroyed.
AWAITED_SNAPSHOT_STATES: Final = frozenset({SnapshotState.CREATED, SnapshotState.DESTROYED})
# snapshot_create waits for a running snapshot created (or failed), the deletes for it
# destroyed (or failed: a stop refused or a downstairs that failed to start).
AWAITED_RUNNING_SNAPSHOT_STATES: Final = frozenset(
    {RegionState.CREATED, RegionState.DESTROYED, RegionState.FAILED}
)
# A region replacement waits for its live repair finished, or failed.
AWAITED_REPAIR_STATES: Final = frozenset({RepairState.FINISHED, RepairState.FAILED})


def region_key(region_id: uuid.UUID, state: RegionState) -> str:
    return f"region:{region_id}:{state.value}"


def region_of(key: str) -> uuid.UUID:
    """The region a ``region_key`` names."""
    return uuid.UUID(key.split(":")[1])


def vmm_key(vmm_id: uuid.UUID, state: VmmState) -> str:
    return f"vmm:{vmm_id}:{state.value}"


def snapshot_key(region_id: uuid.UUID, name: str, state: SnapshotState) -> str:
    """A region's snapshot named ``name`` (Nexus names them by the snapshot's id)."""
    return f"region_snapshot:{region_id}:{name}:{state.value}"


def running_snapshot_key(region_id: uuid.UUID, name: str, state: RegionState) -> str:
    """The running snapshot (read-only downstairs) of a region's snapshot ``name``."""
    return f"running_snapshot:{region_id}:{name}:{state.value}"


def disk_flush_key(vmm_id: uuid.UUID, snapshot_id: uuid.UUID) -> str:
    """A VMM's flush of a disk for the snapshot ``snapshot_id`` (snapshot_create)."""
    return f"vmm_flush:{vmm_id}:{snapshot_id}:flushed"


def repair_key(repair_id: uuid.UUID, state: RepairState) -> str:
    return f"repair:{repair_id}:{state.value}"


def rejection_key(command_id: uuid.UUID) -> str:
    """Where an agent's refusal of the command ``command_id`` lands."""
    return f"{_REJECTED}{command_id}:rejected"


def is_rejection(key: str) -> bool:
    return key.startswith(_REJECTED)


def event_type(key: str) -> str:
    """What kind of event was filed under ``key``: ``region.created``, ``vmm.failed``,
    ``command.rejected``."""
    kind, _, rest = key.partition(":")
    return f"{kind}.{rest.rpartition(':')[2]}"
