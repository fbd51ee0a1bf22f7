"""Nexus's own progress events, for watchers such as ``nexusctl ... --wait``."""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Literal

from pydantic import Field

from schemas.base import Envelope, Generation, Model, Name


class DiskState(StrEnum):
    CREATING = "creating"
    DETACHED = "detached"
    ATTACHED = "attached"
    DELETING = "deleting"
    DELETED = "deleted"
    FAULTED = "faulted"


class DiskProgress(Model):
    disk_id: uuid.UUID
    project: Name
    name: Name
    state: DiskState
    generation: Generation
    detail: str | None = Field(default=None, max_length=500)


class DiskUpdated(Envelope):
    type: Literal["disk.updated.v1"] = "disk.updated.v1"
    payload: DiskProgress

    def routing_key(self) -> str:
        return f"disk.{self.payload.state.value}"


class InstanceProgress(Model):
    instance_id: uuid.UUID
    project: Name
    name: Name
    state: str = Field(max_length=40)
    generation: Generation
    sled_id: uuid.UUID | None = None
    detail: str | None = Field(default=None, max_length=500)


class InstanceUpdated(Envelope):
    """Nexus's view of an instance changed (distinct from the sled's raw event)."""

    type: Literal["nexus.instance.updated.v1"] = "nexus.instance.updated.v1"
    payload: InstanceProgress

    def routing_key(self) -> str:
        return f"nexus.instance.{self.payload.state}"


class SagaStep(StrEnum):
    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    WAITING = "waiting"
    RESUMED = "resumed"
    UNDO_STARTED = "undo_started"
    UNDO_FINISHED = "undo_finished"
    UNDO_FAILED = "undo_failed"
    DONE = "done"
    # Failed, and every completed node was undone.
    UNDONE = "undone"
    STUCK = "stuck"


class SagaProgress(Model):
    saga_id: uuid.UUID
    saga_name: str = Field(max_length=100)
    node: str | None = Field(default=None, max_length=100)
    step: SagaStep
    replica: str = Field(max_length=200)
    detail: str | None = Field(default=None, max_length=2000)


class SagaProgressed(Envelope):
    type: Literal["saga.progressed.v1"] = "saga.progressed.v1"
    payload: SagaProgress

    def routing_key(self) -> str:
        return f"saga.{self.payload.step.value}"
