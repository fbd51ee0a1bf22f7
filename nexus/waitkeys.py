"""The keys on which a saga and an agent's event meet: each format is written here only.

The event intake (:mod:`nexus.events`) files every event under the key built here, and
a saga waits on the key built here for the outcome it expects; a key built any other
way would never meet its event.
"""

from __future__ import annotations

import uuid

from schemas.instance import InstanceState
from schemas.region import RegionState

_REJECTED = "command:"


def region_key(region_id: uuid.UUID, state: RegionState) -> str:
    return f"region:{region_id}:{state.value}"


def instance_key(instance_id: uuid.UUID, state: InstanceState) -> str:
    return f"instance:{instance_id}:{state.value}"


def rejection_key(command_id: uuid.UUID) -> str:
    """Where an agent's refusal of the command ``command_id`` lands."""
    return f"{_REJECTED}{command_id}:rejected"


def is_rejection(key: str) -> bool:
    return key.startswith(_REJECTED)
