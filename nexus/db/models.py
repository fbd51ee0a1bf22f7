"""Nexus's tables: the inventory it manages, its sagas, and its messaging bookkeeping.

Timestamps are always timezone-aware UTC in Python, whatever the database does with
them. Python-side defaults exist for convenience only; code that runs on an injected
clock passes its own timestamps.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from nexus.db.states import (
    AgentSnapshotState,
    DatasetState,
    DiskState,
    InstanceState,
    RegionState,
    ReplacementState,
    SagaLogEvent,
    SagaState,
    SledState,
    SnapshotState,
    VmmState,
    WaitState,
)

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Omicron's resource names: at most 63 characters.
NAME_LENGTH = 63
# Saga names, node names, replica ids and consumer names are ours, not users'.
LABEL_LENGTH = 200
STATE_LENGTH = 32


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A ``DateTime(timezone=True)`` that always gives back an aware UTC datetime.

    SQLite keeps no offset and hands back naive values; comparing those with aware
    ones raises. Naive values going in are refused for the same reason.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware one")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _state_column_type(states: type[StrEnum], name: str) -> Enum:
    # A VARCHAR plus a named CHECK constraint rather than a native PostgreSQL enum:
    # the same on both databases, and changed by an ordinary batch migration.
    return Enum(
        states,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=STATE_LENGTH,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


# SQLite auto-increments only an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT.
_BigSerial = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime, dict[str, Any]: JSON}


class Sled(Base):
    __tablename__ = "sleds"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    # Where its commands go: ``sled.<id>``.
    queue_name: Mapped[str] = mapped_column(String(255))
    cpus: Mapped[int] = mapped_column(Integer)
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[SledState] = mapped_column(_state_column_type(SledState, "sled_state"))
    last_heartbeat_at: Mapped[datetime | None]
    generation: Mapped[int] = mapped_column(BigInteger, default=1)


class Dataset(Base):
    """A storage dataset; one crucible agent serves each, and its id is the agent's."""

    __tablename__ = "datasets"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    # No foreign key: a crucible agent may announce itself before its sled registers.
    sled_id: Mapped[uuid.UUID] = mapped_column(index=True)
    # Where its commands go: ``crucible.<id>``.
    queue_name: Mapped[str] = mapped_column(String(255))
    capacity_bytes: Mapped[int] = mapped_column(BigInteger)
    free_bytes: Mapped[int] = mapped_column(BigInteger)
    last_seen_at: Mapped[datetime]
    state: Mapped[DatasetState] = mapped_column(
        _state_column_type(DatasetState, "dataset_state"),
        default=DatasetState.ACTIVE,
        server_default=DatasetState.ACTIVE.value,
    )


# How much of a fault's reason a disk keeps.
FAULT_REASON_LENGTH = 2000


class Disk(Base):
    __tablename__ = "disks"
    __table_args__ = (
        # Names are unique among a project's live disks: a deleted disk's row stays
        # for history and must not block reusing its name.
        Index(
            "uq_disks_project_name_live",
            "project",
            "name",
            unique=True,
            sqlite_where=text(f"state != '{DiskState.DELETED.value}'"),
            postgresql_where=text(f"state != '{DiskState.DELETED.value}'"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    project: Mapped[str] = mapped_column(String(NAME_LENGTH))
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    block_size: Mapped[int] = mapped_column(Integer)
    state: Mapped[DiskState] = mapped_column(_state_column_type(DiskState, "disk_state"))
    # Why it is faulted (the undo that could not finish), while it is.
    fault_reason: Mapped[str | None] = mapped_column(String(FAULT_REASON_LENGTH))
    attached_instance_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("instances.id"), index=True
    )
    # The saga now working on the disk (create, delete, attach), if any.
    saga_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("sagas.id", ondelete="SET NULL"))
    # The snapshot it was made from, if any (Omicron's ``create_snapshot_id``). No
    # foreign key: it names where the disk came from, whatever became of the snapshot.
    create_snapshot_id: Mapped[uuid.UUID | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Region(Base):
    __tablename__ = "regions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    disk_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("disks.id"), index=True)
    dataset_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("datasets.id"), index=True)
    block_size: Mapped[int] = mapped_column(Integer)
    # In blocks, as the crucible agent counts it.
    extent_size: Mapped[int] = mapped_column(BigInteger)
    extent_count: Mapped[int] = mapped_column(Integer)
    state: Mapped[RegionState] = mapped_column(_state_column_type(RegionState, "region_state"))
    generation: Mapped[int] = mapped_column(BigInteger, default=1)
    # Known once the agent reports the region created.
    port_number: Mapped[int | None] = mapped_column(Integer)
    # A clone: a read-only copy of the running snapshot at ``source`` (``host:port``),
    # as the crucible agent records it.
    read_only: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    source: Mapped[str | None] = mapped_column(String(255))


class Snapshot(Base):
    """A disk's snapshot (Omicron's ``snapshot``): one snapshot of each of the disk's
    regions, each served by a running snapshot (``region_snapshots``).

    Omicron keeps a volume for it (``volume_id``, ``destination_volume_id``); here the
    volume is the region geometry a clone needs (``extent_size``, ``extent_count``) and
    the ``region_snapshots`` addresses.
    """

    __tablename__ = "snapshots"
    __table_args__ = (
        # Names are unique among a project's live snapshots, as disks' are.
        Index(
            "uq_snapshots_project_name_live",
            "project",
            "name",
            unique=True,
            sqlite_where=text(f"state != '{SnapshotState.DESTROYED.value}'"),
            postgresql_where=text(f"state != '{SnapshotState.DESTROYED.value}'"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    project: Mapped[str] = mapped_column(String(NAME_LENGTH))
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    disk_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("disks.id"), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    block_size: Mapped[int] = mapped_column(Integer)
    # The disk's regions' geometry, which a disk made from the snapshot copies.
    extent_size: Mapped[int] = mapped_column(BigInteger)
    extent_count: Mapped[int] = mapped_column(Integer)
    state: Mapped[SnapshotState] = mapped_column(
        _state_column_type(SnapshotState, "snapshot_state")
    )
    fault_reason: Mapped[str | None] = mapped_column(String(FAULT_REASON_LENGTH))
    # The saga now working on it (create, delete), if any.
    saga_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("sagas.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class RegionSnapshot(Base):
    """One region's part of a snapshot, as Omicron's ``region_snapshot``
    (``nexus/db-model/src/region_snapshot.rs``): the region's snapshot on its dataset and
    the running snapshot (a read-only downstairs) serving it at ``snapshot_addr``.

    Beyond Omicron's columns, Nexus's record of what the agent last said of each, by
    generation, as for regions: the agent's snapshot (``snapshot_state``) and its
    running snapshot (``running_state``, ``port_number``). The agent names the snapshot
    ``str(snapshot_id)``. The row is written before the agent is asked, so every event
    about it finds it, and an unwound saga's cleanup knows what to ask for.
    """

    __tablename__ = "region_snapshots"
    __table_args__ = (
        Index("ix_region_snapshots_region_id_snapshot_id", "region_id", "snapshot_id", unique=True),
    )

    dataset_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("datasets.id"), primary_key=True)
    # No foreign key, as in Omicron: a region replaced later keeps its snapshots' rows.
    region_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    snapshot_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("snapshots.id"), primary_key=True, index=True
    )
    # ``host:port`` of the running snapshot, once it runs.
    snapshot_addr: Mapped[str | None] = mapped_column(String(255))
    # How many volumes (disks made from the snapshot) read from it.
    volume_references: Mapped[int] = mapped_column(BigInteger, default=0)
    # Its snapshot's delete has begun.
    deleting: Mapped[bool] = mapped_column(Boolean, default=False)
    snapshot_state: Mapped[AgentSnapshotState | None] = mapped_column(
        _state_column_type(AgentSnapshotState, "agent_snapshot_state")
    )
    snapshot_generation: Mapped[int] = mapped_column(BigInteger, default=0)
    running_state: Mapped[RegionState | None] = mapped_column(
        _state_column_type(RegionState, "running_snapshot_state")
    )
    running_generation: Mapped[int] = mapped_column(BigInteger, default=0)
    port_number: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# How much of a waited-for description or a failure a replacement request keeps.
WAITING_FOR_LENGTH = 500


class RegionReplacement(Base):
    """A request to replace one region whose dataset was lost, as Omicron's
    ``region_replacement`` table (``nexus/db-model/src/region_replacement.rs``): its
    phase (``state``), the saga working on it, since when, and what it waits for.

    One request per old region (unique): filing it again changes nothing. ``history``
    is every phase change, ``[state, at, waiting_for]``, oldest first.
    """

    __tablename__ = "region_replacement"
    __table_args__ = (Index("ix_region_replacement_state", "state"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    request_time: Mapped[datetime]
    old_region_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("regions.id"), unique=True)
    old_dataset_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("datasets.id"))
    # The volume whose region is replaced: a disk's (a disk is its volume here).
    disk_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("disks.id"), index=True)
    new_region_id: Mapped[uuid.UUID | None]
    new_dataset_id: Mapped[uuid.UUID | None]
    state: Mapped[ReplacementState] = mapped_column(
        _state_column_type(ReplacementState, "replacement_state")
    )
    # The saga now working on it (Omicron's ``operating_saga_id``); None in requested
    # and complete.
    operating_saga_id: Mapped[uuid.UUID | None]
    # How many sagas were started for it (a saga's id is derived from it).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    state_changed_at: Mapped[datetime]
    waiting_for: Mapped[str | None] = mapped_column(String(WAITING_FOR_LENGTH))
    # "live" (the sled agent of the running VMM repairs) or "nexus" (Nexus's own step).
    repair_mode: Mapped[str | None] = mapped_column(String(STATE_LENGTH))
    # The live repair's progress in percent, as its sled last reported.
    repair_progress: Mapped[int | None] = mapped_column(Integer)
    # Why the last saga for it unwound, if one did.
    last_failure: Mapped[str | None] = mapped_column(String(FAULT_REASON_LENGTH))
    history: Mapped[list[Any]] = mapped_column(JSON, default=list)


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (
        Index(
            "uq_instances_project_name_live",
            "project",
            "name",
            unique=True,
            sqlite_where=text(f"state != '{InstanceState.DELETED.value}'"),
            postgresql_where=text(f"state != '{InstanceState.DELETED.value}'"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    project: Mapped[str] = mapped_column(String(NAME_LENGTH))
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    ncpus: Mapped[int] = mapped_column(Integer)
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    # The VMM now running it, if any (Omicron's ``propolis_id``). No foreign key: the
    # VMM row points back at its instance, and a cycle of keys buys nothing here.
    active_vmm_id: Mapped[uuid.UUID | None]
    state: Mapped[InstanceState] = mapped_column(
        _state_column_type(InstanceState, "instance_state")
    )
    # Nexus's own: bumped by every write to the record, so that a saga's undo can tell
    # whether anything changed the instance since it wrote it (as Omicron's
    # ``sis_move_to_starting_undo`` does).
    generation: Mapped[int] = mapped_column(BigInteger, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Vmm(Base):
    """One run of an instance on one sled, as Omicron's ``vmm`` table. While its state
    has not ended it holds its CPUs and memory on its sled: the row is the reservation
    (Omicron keeps those apart, in ``sled_resource_vmm``)."""

    __tablename__ = "vmms"
    __table_args__ = (
        # Placement sums the live VMMs of each sled.
        Index("ix_vmms_sled_id_state", "sled_id", "state"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    instance_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("instances.id"), index=True)
    sled_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("sleds.id"))
    ncpus: Mapped[int] = mapped_column(Integer)
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[VmmState] = mapped_column(_state_column_type(VmmState, "vmm_state"))
    # The sled's generation of this VMM; 0 until the sled has said anything about it.
    generation: Mapped[int] = mapped_column(BigInteger, default=0)
    # Why it failed, when it did.
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Saga(Base):
    """One saga's current state; ``saga_log`` holds its history.

    ``version`` is bumped by every write so that two replicas cannot both act on the
    same state: writes are ``... WHERE id = :id AND version = :seen``. The ORM does it
    by itself (``version_id_col``); Core statements must do it explicitly.
    """

    __tablename__ = "sagas"
    __table_args__ = (
        # Finding runnable sagas and expired leases.
        Index("ix_sagas_state_lease_expires_at", "state", "lease_expires_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(LABEL_LENGTH))
    definition_version: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict[str, Any]]
    state: Mapped[SagaState] = mapped_column(_state_column_type(SagaState, "saga_state"))
    # The executor's position (stage, nodes completed, nodes waiting); its format is
    # the executor's business.
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Node name to that node's output: the only way nodes pass data to each other.
    node_outputs: Mapped[dict[str, Any]] = mapped_column(default=dict)
    lease_owner: Mapped[str | None] = mapped_column(String(LABEL_LENGTH))
    lease_expires_at: Mapped[datetime | None]
    version: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    # Declarative reads this once, at class creation; nothing mutates it.
    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012


class SagaLogEntry(Base):
    __tablename__ = "saga_log"
    __table_args__ = (
        # A saga's timeline, in order.
        Index("ix_saga_log_saga_id_id", "saga_id", "id"),
    )

    id: Mapped[int] = mapped_column(_BigSerial, primary_key=True, autoincrement=True)
    saga_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("sagas.id"))
    node_name: Mapped[str] = mapped_column(String(LABEL_LENGTH))
    event: Mapped[SagaLogEvent] = mapped_column(_state_column_type(SagaLogEvent, "saga_log_event"))
    replica_id: Mapped[str] = mapped_column(String(LABEL_LENGTH))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    data: Mapped[dict[str, Any] | None]


class WaitRendezvous(Base):
    """Where a parked saga and the event it waits for meet, whichever comes first.

    Both sides upsert the same row by ``wait_key`` (e.g. ``region:<id>:created``); the
    second one to arrive makes the saga runnable, so no wake-up is lost.
    """

    __tablename__ = "wait_rendezvous"
    __table_args__ = (
        # Finding waits past their deadline, and events nobody claimed in time.
        Index("ix_wait_rendezvous_state_deadline", "state", "deadline"),
        Index("ix_wait_rendezvous_state_event_arrived_at", "state", "event_arrived_at"),
    )

    wait_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    saga_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("sagas.id"), index=True)
    node_name: Mapped[str | None] = mapped_column(String(LABEL_LENGTH))
    deadline: Mapped[datetime | None]
    # Only an event newer than this wakes the saga: an older one is a stale repeat.
    min_generation: Mapped[int | None] = mapped_column(BigInteger)
    event_message_id: Mapped[uuid.UUID | None]
    event_payload: Mapped[dict[str, Any] | None]
    event_generation: Mapped[int | None] = mapped_column(BigInteger)
    event_arrived_at: Mapped[datetime | None]
    # When the event happened at its source (the agent's clock), for timelines.
    event_occurred_at: Mapped[datetime | None]
    parked_at: Mapped[datetime | None]
    resumed_at: Mapped[datetime | None]
    state: Mapped[WaitState] = mapped_column(_state_column_type(WaitState, "wait_state"))


class UnclaimedEvent(Base):
    """An event no saga claimed within the bounded time, kept where people can see it."""

    __tablename__ = "unclaimed_events"

    id: Mapped[int] = mapped_column(_BigSerial, primary_key=True, autoincrement=True)
    wait_key: Mapped[str] = mapped_column(String(255), index=True)
    message_id: Mapped[uuid.UUID]
    payload: Mapped[dict[str, Any] | None]
    arrived_at: Mapped[datetime]
    moved_at: Mapped[datetime] = mapped_column(default=utcnow)


class OutboxMessage(Base):
    """A message to publish, written in the same transaction as the change it reports.

    The relay (``schemas.outbox``) publishes unsent rows in ``id`` order.
    """

    __tablename__ = "outbox"
    __table_args__ = (
        # The publisher only ever scans unsent messages, which are few.
        Index(
            "ix_outbox_unsent",
            "id",
            sqlite_where=text("sent_at IS NULL"),
            postgresql_where=text("sent_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(_BigSerial, primary_key=True, autoincrement=True)
    message_id: Mapped[uuid.UUID] = mapped_column(unique=True)
    exchange: Mapped[str] = mapped_column(String(255))
    routing_key: Mapped[str] = mapped_column(String(255))
    # Exactly the bytes to publish (an encoded envelope).
    body: Mapped[bytes] = mapped_column(LargeBinary)
    # The publish's other properties (type, correlation id, reply-to, mandatory).
    headers: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class InboxMessage(Base):
    """A consumed message, recorded in the consumer's transaction to drop redeliveries.

    Keyed by consumer as well, so one message routed to two consumers is handled once
    by each.
    """

    __tablename__ = "inbox"

    message_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    consumer: Mapped[str] = mapped_column(String(LABEL_LENGTH), primary_key=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
