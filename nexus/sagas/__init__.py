"""Every saga Nexus can run, in one list: a replica runs exactly these (name, version)s."""

from __future__ import annotations

from typing import Any

from nexus.saga.definition import SagaDefinition
from nexus.sagas import (
    disk_create,
    disk_create_from_snapshot,
    disk_delete,
    instance_create,
    instance_delete,
    instance_power,
    instance_start,
    region_replacement,
    snapshot_create,
    snapshot_delete,
)

ALL_SAGAS: tuple[SagaDefinition[Any], ...] = (
    disk_create.DEFINITION,
    disk_create_from_snapshot.DEFINITION,
    disk_delete.DEFINITION,
    instance_create.DEFINITION,
    instance_start.DEFINITION,
    instance_power.STOP,
    instance_power.REBOOT,
    instance_delete.DEFINITION,
    snapshot_create.DEFINITION,
    snapshot_delete.DEFINITION,
    region_replacement.DEFINITION,
)
