"""The keys on which a saga and an agent's event meet: each format is written here only.

The event intake (:mod:`nexus.events`) files every event under the key built here, and
a saga waits on the key built here for the outcome it expects; a key built any other
way would never meet its event.

Only some states are ever waited for. An event in any other state (a region
``tombstoned`` on its way to ``destroyed``, an instance ``starting``) has no saga to
meet: the intake records the object's new state and keeps nothing for a saga, since
what it kept would only ever become an unclaimed event. Building a key for such a state
is refused, so a saga that starts waiting for one fails its first test until the state
is added here, where the intake sees it too.
"""

from __future__ import annotations

import uuid
from typing import Final

from schemas.instance import InstanceState
from schemas.region import RegionState

_REJECTED = "command:"

# disk_create waits for created or failed, disk_delete for destroyed.
AWAITED_REGION_STATES: Final = frozenset(
    {RegionState.CREATED, RegionState.FAILED, RegionState.DESTROYED}
)
# instance_create and start/reboot wait for running, stop for stopped, every power
# change for failed, instance_delete for destroyed.
AWAITED_INSTANCE_STATES: Final = frozenset(
    {
        InstanceState.RUNNING,
        InstanceState.STOPPED,
        InstanceState.FAILED,
        InstanceState.DESTROYED,
    }
)


class NeverAwaited(ValueError):
    """A key for a state no saga waits for: the intake keeps no event under it."""


def region_key(region_id: uuid.UUID, state: RegionState) -> str:
    if state not in AWAITED_REGION_STATES:
        raise NeverAwaited(f"no saga waits for a region {state.value} (AWAITED_REGION_STATES)")
    return f"region:{region_id}:{state.value}"


def instance_key(instance_id: uuid.UUID, state: InstanceState) -> str:
    if state not in AWAITED_INSTANCE_STATES:
        raise NeverAwaited(f"no saga waits for an instance {state.value} (AWAITED_INSTANCE_STATES)")
    return f"instance:{instance_id}:{state.value}"


def rejection_key(command_id: uuid.UUID) -> str:
    """Where an agent's refusal of the command ``command_id`` lands."""
    return f"{_REJECTED}{command_id}:rejected"


def is_rejection(key: str) -> bool:
    return key.startswith(_REJECTED)


def event_type(key: str) -> str:
    """What kind of event was filed under ``key``, as its routing key names it:
    ``region.created``, ``instance.failed``, ``command.rejected``."""
    kind, _, rest = key.partition(":")
    return f"{kind}.{rest.rpartition(':')[2]}"
