"""The states Nexus records, importable without SQLAlchemy.

These are Nexus's own records, deliberately separate from the wire enums in
``schemas``: the database stores exactly these values (a CHECK constraint each), so
adding one needs a migration, which ``nexus.db.migrate.check`` reports when missing.
"""

from __future__ import annotations

from enum import StrEnum


class SledState(StrEnum):
    ACTIVE = "active"
    UNREACHABLE = "unreachable"


class DiskState(StrEnum):
    CREATING = "creating"
    # Created and ready to attach.
    DETACHED = "detached"
    ATTACHED = "attached"
    DELETING = "deleting"
    DELETED = "deleted"
    FAULTED = "faulted"


class RegionState(StrEnum):
    REQUESTED = "requested"
    CREATED = "created"
    TOMBSTONED = "tombstoned"
    DESTROYED = "destroyed"
    FAILED = "failed"


class InstanceState(StrEnum):
    CREATING = "creating"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    REBOOTING = "rebooting"
    FAILED = "failed"
    DELETING = "deleting"
    DELETED = "deleted"


class SagaState(StrEnum):
    RUNNING = "running"
    # Parked on a wait key; no replica holds it.
    WAITING = "waiting"
    DONE = "done"
    UNWINDING = "unwinding"
    UNDONE = "undone"
    # An undo failed: needs an operator.
    STUCK = "stuck"
    # Its log or definition cannot be used; skipped by every replica.
    UNRECOVERABLE = "unrecoverable"


class SagaLogEvent(StrEnum):
    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    WAITING = "waiting"
    RESUMED = "resumed"
    UNDO_STARTED = "undo_started"
    UNDO_FINISHED = "undo_finished"
    UNDO_FAILED = "undo_failed"


class WaitState(StrEnum):
    # The saga parked first; its event has not arrived.
    PARKED = "parked"
    # The event arrived first; no saga has claimed it yet.
    EVENT_ARRIVED = "event_arrived"
    # Both sides have met: the saga is runnable.
    READY = "ready"
    RESUMED = "resumed"
