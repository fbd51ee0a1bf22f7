"""Sled agent: simulated VM instances, their commands and their state changes."""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Literal

from pydantic import Field

from schemas.base import Envelope, Generation, Model, Name, PositiveInt, PositiveInt32


class InstanceState(StrEnum):
    CREATING = "creating"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    REBOOTING = "rebooting"
    FAILED = "failed"
    DESTROYED = "destroyed"


class InstanceSpec(Model):
    id: uuid.UUID
    name: Name
    ncpus: PositiveInt32
    memory_bytes: PositiveInt
    disk_ids: tuple[uuid.UUID, ...] = ()
    start: bool = Field(default=True, description="run it once created")


class Instance(Model):
    id: uuid.UUID
    sled_id: uuid.UUID
    name: Name
    ncpus: PositiveInt32
    memory_bytes: PositiveInt
    disk_ids: tuple[uuid.UUID, ...] = ()
    state: InstanceState
    generation: Generation
    reason: str | None = Field(default=None, max_length=500, description="why, if unasked")


class InstanceRef(Model):
    id: uuid.UUID


# Commands (to the sled's own queue ``sled.<sled_id>``).


class InstanceEnsure(Envelope):
    IS_COMMAND = True
    type: Literal["instance.ensure.v1"] = "instance.ensure.v1"
    payload: InstanceSpec


class InstanceStart(Envelope):
    IS_COMMAND = True
    type: Literal["instance.start.v1"] = "instance.start.v1"
    payload: InstanceRef


class InstanceStop(Envelope):
    IS_COMMAND = True
    type: Literal["instance.stop.v1"] = "instance.stop.v1"
    payload: InstanceRef


class InstanceReboot(Envelope):
    IS_COMMAND = True
    type: Literal["instance.reboot.v1"] = "instance.reboot.v1"
    payload: InstanceRef


class InstanceDestroy(Envelope):
    IS_COMMAND = True
    type: Literal["instance.destroy.v1"] = "instance.destroy.v1"
    payload: InstanceRef


class CrashRequest(Model):
    id: uuid.UUID
    reason: str = Field(default="injected crash", max_length=500)


class InstanceCrash(Envelope):
    """Fault injection: the hypervisor loses the instance, as a real host would."""

    IS_COMMAND = True
    type: Literal["instance.crash.v1"] = "instance.crash.v1"
    payload: CrashRequest


class InstanceGet(Envelope):
    """The reconcile query, answered on ``reply_to`` with ``instance.info.v1``."""

    IS_COMMAND = True
    type: Literal["instance.get.v1"] = "instance.get.v1"
    payload: InstanceRef


# Replies and events.


class InstanceFound(Model):
    sled_id: uuid.UUID
    instance_id: uuid.UUID
    instance: Instance | None


class InstanceInfo(Envelope):
    type: Literal["instance.info.v1"] = "instance.info.v1"
    payload: InstanceFound


class InstanceChange(Model):
    instance: Instance


class InstanceStateChanged(Envelope):
    """Published on every change, asked for or not (routing key ``instance.<state>``)."""

    type: Literal["instance.state_changed.v1"] = "instance.state_changed.v1"
    payload: InstanceChange

    def routing_key(self) -> str:
        return f"instance.{self.payload.instance.state.value}"
