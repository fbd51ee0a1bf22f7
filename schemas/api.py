"""The Nexus API: requests from ``nexusctl`` on queue ``nexus.api`` and their replies.

Every request is answered on its ``reply_to`` by exactly one reply whose
``causation_id`` is the request's id: the typed result, or ``api.error.v1`` with a
stable code and a one-line message.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Literal

from pydantic import AwareDatetime, Field, model_validator

from schemas.base import (
    BlockSize,
    Envelope,
    Model,
    Name,
    NonNegativeInt,
    NonNegativeInt32,
    PositiveInt,
    PositiveInt32,
)
from schemas.progress import DiskState

# Ids and names are both accepted where a resource is named.
NameOrId = Name | uuid.UUID
MAX_DISK_BYTES = 1 << 40
MAX_ERROR_MESSAGE = 2000


class ErrorCode(StrEnum):
    INVALID_REQUEST = "invalid_request"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    CONFLICT = "conflict"
    INSUFFICIENT_CAPACITY = "insufficient_capacity"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


# Requests.


class DiskCreateRequest(Model):
    project: Name
    name: Name
    size_bytes: int | None = Field(
        default=None,
        gt=0,
        le=MAX_DISK_BYTES,
        description="required for a blank disk; from a snapshot, at least the snapshot's "
        "size, which is the default",
    )
    block_size: BlockSize = Field(
        default=512, description="from a snapshot, the snapshot's (another is refused)"
    )
    snapshot: NameOrId | None = Field(
        default=None,
        description="the snapshot the disk's data starts as: a name in the project, or an id",
    )

    @model_validator(mode="after")
    def _sized(self) -> DiskCreateRequest:
        if self.size_bytes is None and self.snapshot is None:
            raise ValueError("size_bytes is required for a disk not made from a snapshot")
        return self


class DiskCreate(Envelope):
    IS_COMMAND = True
    type: Literal["api.disk.create.v1"] = "api.disk.create.v1"
    payload: DiskCreateRequest


class ResourceRef(Model):
    project: Name
    resource: NameOrId


class DiskGet(Envelope):
    IS_COMMAND = True
    type: Literal["api.disk.get.v1"] = "api.disk.get.v1"
    payload: ResourceRef


class DiskDelete(Envelope):
    IS_COMMAND = True
    type: Literal["api.disk.delete.v1"] = "api.disk.delete.v1"
    payload: ResourceRef


class ProjectFilter(Model):
    project: Name | None = None


class DiskList(Envelope):
    IS_COMMAND = True
    type: Literal["api.disk.list.v1"] = "api.disk.list.v1"
    payload: ProjectFilter = ProjectFilter()


class SnapshotCreateRequest(Model):
    project: Name
    name: Name
    disk: NameOrId = Field(description="the disk to snapshot, in the same project")


class SnapshotCreate(Envelope):
    IS_COMMAND = True
    type: Literal["api.snapshot.create.v1"] = "api.snapshot.create.v1"
    payload: SnapshotCreateRequest


class SnapshotGet(Envelope):
    IS_COMMAND = True
    type: Literal["api.snapshot.get.v1"] = "api.snapshot.get.v1"
    payload: ResourceRef


class SnapshotDelete(Envelope):
    IS_COMMAND = True
    type: Literal["api.snapshot.delete.v1"] = "api.snapshot.delete.v1"
    payload: ResourceRef


class SnapshotList(Envelope):
    IS_COMMAND = True
    type: Literal["api.snapshot.list.v1"] = "api.snapshot.list.v1"
    payload: ProjectFilter = ProjectFilter()


class InstanceCreateRequest(Model):
    project: Name
    name: Name
    ncpus: int = Field(gt=0, le=64)
    memory_bytes: int = Field(gt=0, le=1 << 40)
    disks: tuple[NameOrId, ...] = Field(default=(), max_length=8)


class InstanceCreate(Envelope):
    IS_COMMAND = True
    type: Literal["api.instance.create.v1"] = "api.instance.create.v1"
    payload: InstanceCreateRequest


class InstanceAction(StrEnum):
    START = "start"
    STOP = "stop"
    REBOOT = "reboot"
    DELETE = "delete"


class InstanceActionRequest(Model):
    project: Name
    resource: NameOrId
    action: InstanceAction


class InstanceAct(Envelope):
    IS_COMMAND = True
    type: Literal["api.instance.act.v1"] = "api.instance.act.v1"
    payload: InstanceActionRequest


class InstanceList(Envelope):
    IS_COMMAND = True
    type: Literal["api.instance.list.v1"] = "api.instance.list.v1"
    payload: ProjectFilter = ProjectFilter()


class SagaFilter(Model):
    state: str | None = Field(default=None, max_length=40)
    limit: int = Field(default=100, gt=0, le=10_000)


class SagaList(Envelope):
    IS_COMMAND = True
    type: Literal["api.saga.list.v1"] = "api.saga.list.v1"
    payload: SagaFilter = SagaFilter()


class SagaRef(Model):
    saga_id: uuid.UUID


class SagaGet(Envelope):
    IS_COMMAND = True
    type: Literal["api.saga.get.v1"] = "api.saga.get.v1"
    payload: SagaRef


class DoctorRequest(Model):
    timeout_seconds: float = Field(default=5.0, gt=0, le=120)


class Doctor(Envelope):
    IS_COMMAND = True
    type: Literal["api.doctor.v1"] = "api.doctor.v1"
    payload: DoctorRequest = DoctorRequest()


class SledList(Envelope):
    IS_COMMAND = True
    type: Literal["api.sled.list.v1"] = "api.sled.list.v1"


class SledRef(Model):
    sled_id: uuid.UUID


class SledExpunge(Envelope):
    """An operator's decision that a sled is gone for good, with its storage."""

    IS_COMMAND = True
    type: Literal["api.sled.expunge.v1"] = "api.sled.expunge.v1"
    payload: SledRef


class ReplacementFilter(Model):
    state: str | None = Field(default=None, max_length=32, description="only in this phase")
    disk_id: uuid.UUID | None = None
    limit: int = Field(default=100, gt=0, le=1000)


class RegionReplacementList(Envelope):
    IS_COMMAND = True
    type: Literal["api.region_replacement.list.v1"] = "api.region_replacement.list.v1"
    payload: ReplacementFilter = ReplacementFilter()


class ReplacementRef(Model):
    id: uuid.UUID


class RegionReplacementGet(Envelope):
    IS_COMMAND = True
    type: Literal["api.region_replacement.get.v1"] = "api.region_replacement.get.v1"
    payload: ReplacementRef


class UnclaimedFilter(Model):
    groups: int = Field(default=20, gt=0, le=100, description="at most this many groups")
    examples: int = Field(default=3, ge=0, le=5, description="newest examples per group")


class UnclaimedEventsList(Envelope):
    """Events no saga claimed within the retention, grouped by type and source."""

    IS_COMMAND = True
    type: Literal["api.events.unclaimed.v1"] = "api.events.unclaimed.v1"
    payload: UnclaimedFilter = UnclaimedFilter()


# Views and replies.


class DiskView(Model):
    id: uuid.UUID
    project: Name
    name: Name
    size_bytes: PositiveInt
    block_size: BlockSize
    state: DiskState
    instance_id: uuid.UUID | None = None
    saga_id: uuid.UUID | None = None
    fault_reason: str | None = Field(
        default=None, max_length=2000, description="why it is faulted, while it is"
    )
    snapshot_id: uuid.UUID | None = Field(default=None, description="the snapshot it was made from")
    created_at: AwareDatetime
    updated_at: AwareDatetime


class SnapshotPartView(Model):
    """One region's snapshot and the running snapshot serving it."""

    region_id: uuid.UUID
    dataset_id: uuid.UUID
    snapshot_state: str | None = Field(default=None, description="as its agent last said")
    running_state: str | None = Field(default=None, description="as its agent last said")
    snapshot_addr: str | None = Field(default=None, description="host:port, once it runs")
    deleting: bool = False


class SnapshotView(Model):
    id: uuid.UUID
    project: Name
    name: Name
    disk_id: uuid.UUID
    size_bytes: PositiveInt
    block_size: BlockSize
    state: str = Field(description="creating, ready, faulted, deleting or destroyed")
    saga_id: uuid.UUID | None = None
    fault_reason: str | None = Field(default=None, max_length=2000)
    parts: tuple[SnapshotPartView, ...] = ()
    created_at: AwareDatetime
    updated_at: AwareDatetime


class InstanceView(Model):
    id: uuid.UUID
    project: Name
    name: Name
    ncpus: PositiveInt32
    memory_bytes: PositiveInt
    state: str
    # The sled of its active VMM, and that VMM: none while it is stopped or failed.
    sled_id: uuid.UUID | None = None
    vmm_id: uuid.UUID | None = None
    sled_reachable: bool = True
    disk_ids: tuple[uuid.UUID, ...] = ()
    saga_id: uuid.UUID | None = None
    created_at: AwareDatetime
    updated_at: AwareDatetime


class DatasetView(Model):
    id: uuid.UUID
    state: str
    capacity_bytes: NonNegativeInt
    free_bytes: NonNegativeInt
    last_seen_at: AwareDatetime


class SledView(Model):
    id: uuid.UUID
    # None for a sled known only from its datasets (no sled agent registered).
    hostname: str | None = None
    state: str | None = None
    cpus: NonNegativeInt32 | None = None
    memory_bytes: NonNegativeInt | None = None
    last_heartbeat_at: AwareDatetime | None = None
    live_vmms: NonNegativeInt = 0
    datasets: tuple[DatasetView, ...] = ()


class SledExpunged(Model):
    sled: SledView
    # What this request changed: nothing when the sled was already expunged.
    changed: bool
    datasets_expunged: NonNegativeInt
    vmms_failed: NonNegativeInt
    # Region replacement requests filed (each with its saga started) by this request.
    replacements_requested: NonNegativeInt = 0
    # Their sagas' ids, to follow (``nexusctl sled expunge --wait``).
    replacement_sagas: tuple[uuid.UUID, ...] = ()


class ReplacementPhase(Model):
    state: str
    at: AwareDatetime
    waiting_for: str | None = None


class ReplacementView(Model):
    """One region replacement request: its phase, since when, what it waits for."""

    id: uuid.UUID
    state: str
    since: AwareDatetime
    waiting_for: str | None
    request_time: AwareDatetime
    disk_id: uuid.UUID
    old_region_id: uuid.UUID
    old_dataset_id: uuid.UUID
    new_region_id: uuid.UUID | None
    new_dataset_id: uuid.UUID | None
    operating_saga_id: uuid.UUID | None
    attempts: NonNegativeInt32
    repair_mode: str | None
    repair_progress: int | None = Field(default=None, ge=0, le=100)
    last_failure: str | None = None
    history: tuple[ReplacementPhase, ...] = ()


class SagaLogEntry(Model):
    node: str | None
    event: str
    replica: str
    at: AwareDatetime
    detail: str | None = None


class WaitView(Model):
    wait_key: str
    node: str
    # Since when the node waits: a re-armed or re-sent wait keeps it.
    since: AwareDatetime
    deadline: AwareDatetime
    # How many times the wait's deadline passed and Nexus asked the agent.
    reconciles: NonNegativeInt32 = 0


class SagaView(Model):
    id: uuid.UUID
    name: str
    version: NonNegativeInt32
    state: str
    lease_owner: str | None
    error: str | None
    created_at: AwareDatetime
    updated_at: AwareDatetime
    log: tuple[SagaLogEntry, ...] = ()
    waiting_for: tuple[WaitView, ...] = ()


class Accepted(Model):
    """A saga was started for the request; follow it by its id."""

    saga_id: uuid.UUID
    resource_id: uuid.UUID


class DoctorFinding(Model):
    kind: str = Field(max_length=60)
    object_id: str = Field(max_length=100)
    detail: str = Field(max_length=1000)


class DoctorReport(Model):
    checked_agents: NonNegativeInt32
    unreachable_agents: tuple[str, ...] = ()
    findings: tuple[DoctorFinding, ...] = ()


class UnclaimedExample(Model):
    message_id: uuid.UUID
    wait_key: str = Field(max_length=255)
    summary: str = Field(max_length=200)
    arrived_at: AwareDatetime
    moved_at: AwareDatetime


class UnclaimedGroup(Model):
    type: str = Field(max_length=60, description="as its routing key: region.created, ...")
    source: str = Field(max_length=120, description="the agent the event names")
    count: PositiveInt
    oldest_at: AwareDatetime
    newest_at: AwareDatetime
    examples: tuple[UnclaimedExample, ...] = ()


class UnclaimedSummary(Model):
    total: NonNegativeInt = Field(description="unclaimed events recorded")
    scanned: NonNegativeInt = Field(description="the newest this many were grouped")
    group_count: NonNegativeInt = Field(description="groups found, of which the largest are listed")
    groups: tuple[UnclaimedGroup, ...] = ()


class ApiErrorBody(Model):
    code: ErrorCode
    message: str = Field(max_length=MAX_ERROR_MESSAGE)


class DiskReply(Envelope):
    type: Literal["api.disk.v1"] = "api.disk.v1"
    payload: DiskView


class DiskListReply(Envelope):
    type: Literal["api.disks.v1"] = "api.disks.v1"
    payload: tuple[DiskView, ...]


class SnapshotReply(Envelope):
    type: Literal["api.snapshot.v1"] = "api.snapshot.v1"
    payload: SnapshotView


class SnapshotListReply(Envelope):
    type: Literal["api.snapshots.v1"] = "api.snapshots.v1"
    payload: tuple[SnapshotView, ...]


class InstanceReply(Envelope):
    type: Literal["api.instance.v1"] = "api.instance.v1"
    payload: InstanceView


class InstanceListReply(Envelope):
    type: Literal["api.instances.v1"] = "api.instances.v1"
    payload: tuple[InstanceView, ...]


class SledListReply(Envelope):
    type: Literal["api.sleds.v1"] = "api.sleds.v1"
    payload: tuple[SledView, ...]


class SledExpungeReply(Envelope):
    type: Literal["api.sled.expunged.v1"] = "api.sled.expunged.v1"
    payload: SledExpunged


class RegionReplacementReply(Envelope):
    type: Literal["api.region_replacement.v1"] = "api.region_replacement.v1"
    payload: ReplacementView


class RegionReplacementListReply(Envelope):
    type: Literal["api.region_replacements.v1"] = "api.region_replacements.v1"
    payload: tuple[ReplacementView, ...]


class SagaReply(Envelope):
    type: Literal["api.saga.v1"] = "api.saga.v1"
    payload: SagaView


class SagaListReply(Envelope):
    type: Literal["api.sagas.v1"] = "api.sagas.v1"
    payload: tuple[SagaView, ...]


class AcceptedReply(Envelope):
    type: Literal["api.accepted.v1"] = "api.accepted.v1"
    payload: Accepted


class DoctorReply(Envelope):
    type: Literal["api.doctor_report.v1"] = "api.doctor_report.v1"
    payload: DoctorReport


class ApiError(Envelope):
    type: Literal["api.error.v1"] = "api.error.v1"
    payload: ApiErrorBody


class UnclaimedEventsReply(Envelope):
    type: Literal["api.events.unclaimed_summary.v1"] = "api.events.unclaimed_summary.v1"
    payload: UnclaimedSummary
