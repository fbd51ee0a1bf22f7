"""Sled agent: VMMs, their commands and their state changes.

An instance is Nexus's record; what runs on a sled is a **VMM**, one run of the
instance with an id of its own, as in Omicron (``nexus/db-model/src/vmm.rs``,
``sled-agent/src/instance.rs``). A start makes a new VMM (``vmm.ensure``), a stop ends
it, and an ended VMM (``destroyed`` or ``failed``) never runs again. Every command and
event names the VMM, so a late or redelivered message about a run that has ended is
recognisably about that run, and changes nothing.

The states a sled publishes are Omicron's sled-agent VMM states
(``sled-agent/types/versions/src/initial/instance.rs``, ``VmmState``) without
``migrating`` (no migration here) and without ``stopped``: this agent releases a
stopped VMM's resources at once, so ``stopping`` leads straight to ``destroyed``.

State changes keep the routing key ``instance.<state>`` (the state of the instance's
VMM), so the broker's bindings and each sled's topic permission are unchanged.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Literal

from pydantic import Field

from schemas.base import Envelope, Generation, Model, Name, PositiveInt, PositiveInt32


class VmmState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    REBOOTING = "rebooting"
    # Ended: the VMM never runs again, and holds nothing on its sled.
    DESTROYED = "destroyed"
    FAILED = "failed"


ENDED_VMM_STATES = frozenset({VmmState.DESTROYED, VmmState.FAILED})


class VmmSpec(Model):
    id: uuid.UUID = Field(description="the VMM's own id, new for every start")
    instance_id: uuid.UUID
    name: Name
    ncpus: PositiveInt32
    memory_bytes: PositiveInt
    disk_ids: tuple[uuid.UUID, ...] = ()


class Vmm(Model):
    id: uuid.UUID
    instance_id: uuid.UUID
    sled_id: uuid.UUID
    name: Name
    ncpus: PositiveInt32
    memory_bytes: PositiveInt
    disk_ids: tuple[uuid.UUID, ...] = ()
    state: VmmState
    generation: Generation
    reason: str | None = Field(default=None, max_length=500, description="why, if unasked")


class VmmRef(Model):
    id: uuid.UUID


# Commands (to the sled's own queue ``sled.<sled_id>``).


class VmmEnsure(Envelope):
    """Create the VMM and boot it. A VMM that exists (running or ended) is left as it is."""

    IS_COMMAND = True
    type: Literal["vmm.ensure.v1"] = "vmm.ensure.v1"
    payload: VmmSpec


class VmmStop(Envelope):
    """End the VMM: stop it and release what it holds. An ended VMM is left as it is."""

    IS_COMMAND = True
    type: Literal["vmm.stop.v1"] = "vmm.stop.v1"
    payload: VmmRef


class VmmReboot(Envelope):
    IS_COMMAND = True
    type: Literal["vmm.reboot.v1"] = "vmm.reboot.v1"
    payload: VmmRef


class CrashRequest(Model):
    id: uuid.UUID = Field(description="the VMM")
    reason: str = Field(default="injected crash", max_length=500)


class VmmCrash(Envelope):
    """Fault injection: the hypervisor loses the VMM, as a real host would."""

    IS_COMMAND = True
    type: Literal["vmm.crash.v1"] = "vmm.crash.v1"
    payload: CrashRequest


class VmmGet(Envelope):
    """The reconcile query, answered on ``reply_to`` with ``vmm.info.v1``."""

    IS_COMMAND = True
    type: Literal["vmm.get.v1"] = "vmm.get.v1"
    payload: VmmRef


# Replies and events.


class VmmFound(Model):
    sled_id: uuid.UUID
    vmm_id: uuid.UUID
    vmm: Vmm | None


class VmmInfo(Envelope):
    type: Literal["vmm.info.v1"] = "vmm.info.v1"
    payload: VmmFound


class VmmChange(Model):
    vmm: Vmm


class VmmStateChanged(Envelope):
    """Published on every change, asked for or not (routing key ``instance.<state>``)."""

    type: Literal["vmm.state_changed.v1"] = "vmm.state_changed.v1"
    payload: VmmChange

    def routing_key(self) -> str:
        return f"instance.{self.payload.vmm.state.value}"


# A disk's flush for a snapshot (Omicron's ``vmm_issue_disk_snapshot_request``: the
# propolis server sends the volume a flush with a snapshot name, so every downstairs
# holds the same data when its snapshot is taken). Omicron's call is answered in place;
# here the sled answers with an event, so the snapshot saga parks on it.


class DiskSnapshotRequest(Model):
    id: uuid.UUID = Field(description="the VMM")
    disk_id: uuid.UUID
    snapshot_id: uuid.UUID


class VmmDiskSnapshot(Envelope):
    """Flush a disk attached to a running VMM before its snapshot is taken; answered by
    ``vmm.disk_flushed.v1``, or refused (``not_found``, ``not_running``,
    ``disk_not_attached``). Asked again, it flushes again: a flush changes nothing."""

    IS_COMMAND = True
    type: Literal["vmm.disk_snapshot.v1"] = "vmm.disk_snapshot.v1"
    payload: DiskSnapshotRequest


class DiskFlushed(Model):
    sled_id: uuid.UUID
    vmm_id: uuid.UUID
    disk_id: uuid.UUID
    snapshot_id: uuid.UUID


class VmmDiskFlushed(Envelope):
    """The VMM flushed the disk for the snapshot (routing key ``instance.disk_flushed``,
    within a sled's ``instance.*`` permission and Nexus's binding)."""

    type: Literal["vmm.disk_flushed.v1"] = "vmm.disk_flushed.v1"
    payload: DiskFlushed

    def routing_key(self) -> str:
        return "instance.disk_flushed"


# Live repair: a region of an attached disk's volume is replaced while the VMM runs
# (Crucible's upstairs "live repair", which Omicron's region replacement drive saga asks
# a Propolis for). The sled agent copies to the new target and reports by event.


class RepairState(StrEnum):
    STARTED = "started"
    # Still copying; ``progress`` says how far.
    PROGRESS = "progress"
    FINISHED = "finished"
    # The VMM ended before the repair finished (or could not repair).
    FAILED = "failed"


ENDED_REPAIR_STATES = frozenset({RepairState.FINISHED, RepairState.FAILED})


class RepairSpec(Model):
    id: uuid.UUID = Field(description="the repair's own id, chosen by Nexus")
    vmm_id: uuid.UUID
    disk_id: uuid.UUID
    old_region_id: uuid.UUID = Field(description="the target being replaced (lost)")
    new_region_id: uuid.UUID = Field(description="the target that replaces it")
    new_dataset_id: uuid.UUID = Field(description="the dataset serving the new target")


class Repair(Model):
    id: uuid.UUID
    sled_id: uuid.UUID
    vmm_id: uuid.UUID
    disk_id: uuid.UUID
    old_region_id: uuid.UUID
    new_region_id: uuid.UUID
    state: RepairState
    progress: int = Field(ge=0, le=100)
    generation: Generation
    reason: str | None = Field(default=None, max_length=500)


class RepairRef(Model):
    id: uuid.UUID


class VolumeRepair(Envelope):
    """Start a live repair of a disk's volume in a running VMM, replacing the target
    ``old_region_id`` by ``new_region_id``. A repair that exists is left as it is."""

    IS_COMMAND = True
    type: Literal["volume.repair.v1"] = "volume.repair.v1"
    payload: RepairSpec


class VolumeRepairGet(Envelope):
    """The reconcile query, answered on ``reply_to`` with ``volume.repair_info.v1``."""

    IS_COMMAND = True
    type: Literal["volume.repair_get.v1"] = "volume.repair_get.v1"
    payload: RepairRef


class RepairFound(Model):
    sled_id: uuid.UUID
    repair_id: uuid.UUID
    repair: Repair | None


class RepairInfo(Envelope):
    type: Literal["volume.repair_info.v1"] = "volume.repair_info.v1"
    payload: RepairFound


class RepairChange(Model):
    repair: Repair


class RepairChanged(Envelope):
    """Published on every step of a live repair. Its routing key is under ``instance.``
    (``instance.repair_<state>``): a repair is its VMM's, and the sled's topic
    permission and Nexus's binding already cover it."""

    type: Literal["volume.repair_changed.v1"] = "volume.repair_changed.v1"
    payload: RepairChange

    def routing_key(self) -> str:
        return f"instance.repair_{self.payload.repair.state.value}"
