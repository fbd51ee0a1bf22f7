"""Every saga Nexus can run, in one list: a replica runs exactly these (name, version)s."""

from __future__ import annotations

from typing import Any

from nexus.saga.definition import SagaDefinition
from nexus.sagas import disk_create

ALL_SAGAS: tuple[SagaDefinition[Any], ...] = (disk_create.DEFINITION,)
