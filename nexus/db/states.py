"""The states Nexus records, importable without SQLAlchemy.

These are Nexus's own records, deliberately separate from the wire enums in
``schemas``: the database stores exactly these values (a CHECK constraint each), so
adding one needs a migration, which ``nexus.db.migrate.check`` reports when missing.
"""

from __future__ import annotations

from enum import StrEnum


class SledState(StrEnum):
    ACTIVE = "active"
    # Silent past NEXUS_SLED_TIMEOUT_SECONDS: no new VMMs; a heartbeat makes it active.
    UNREACHABLE = "unreachable"
    # Lost for good (silent past NEXUS_SLED_EXPUNGE_SECONDS, or expunged by an operator):
    # its VMMs have failed, and it never becomes active again (Omicron's expunged policy).
    EXPUNGED = "expunged"


class DatasetState(StrEnum):
    ACTIVE = "active"
    # Its sled was expunged: no new regions go there, and the regions it holds are lost.
    EXPUNGED = "expunged"


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


class SnapshotState(StrEnum):
    """A disk's snapshot, as Omicron's ``SnapshotState`` (``nexus/db-model/src/snapshot.rs``)
    plus ``deleting``: Omicron marks a snapshot ``destroyed`` as its delete saga starts;
    here it is ``deleting`` while the saga works and ``destroyed`` once every agent has
    confirmed (a delete that cannot finish leaves it ``faulted``)."""

    CREATING = "creating"
    READY = "ready"
    FAULTED = "faulted"
    DELETING = "deleting"
    DESTROYED = "destroyed"


class AgentSnapshotState(StrEnum):
    """What a crucible agent last said of one region's snapshot (``schemas.snapshot``)."""

    CREATED = "created"
    DESTROYED = "destroyed"


class InstanceState(StrEnum):
    """What people see of an instance: while it has an active VMM, that VMM's state;
    otherwise ``stopped`` or ``failed`` (Omicron's ``no_vmm`` and ``failed``,
    ``nexus/db-model/src/instance_state.rs``); or ``creating`` and ``deleted``."""

    CREATING = "creating"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    REBOOTING = "rebooting"
    FAILED = "failed"
    DELETED = "deleted"


class VmmState(StrEnum):
    """Nexus's record of one VMM, after Omicron's ``nexus/db-model/src/vmm_state.rs``
    (without ``migrating`` and ``stopped``, which this sled agent never reports)."""

    # Recorded by Nexus, not yet heard of from its sled.
    CREATING = "creating"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    REBOOTING = "rebooting"
    DESTROYED = "destroyed"
    FAILED = "failed"
    # The start saga that made it unwound: it never ran, or was stopped by the unwind.
    SAGA_UNWOUND = "saga_unwound"


# A VMM in one of these has ended: it holds nothing on its sled, and nothing its sled
# says about it later changes it.
ENDED_VMM_STATES = frozenset({VmmState.DESTROYED, VmmState.FAILED, VmmState.SAGA_UNWOUND})


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


class ReplacementState(StrEnum):
    """A region replacement request's phase: Omicron's ``RegionReplacementState``
    (``nexus/db-model/src/region_replacement.rs``), the same seven values."""

    # Filed when its dataset was lost; no saga works on it.
    REQUESTED = "requested"
    # A saga claimed it: a new region is being placed and ensured.
    ALLOCATING = "allocating"
    # The new region is created; the volume's repair is about to start.
    RUNNING = "running"
    # The volume is being repaired (by the sled agent of the running VMM, or by Nexus).
    DRIVING = "driving"
    # The repair finished; the volume's target is about to be swapped.
    REPLACEMENT_DONE = "replacement_done"
    # The target is swapped; the old region is being deleted.
    COMPLETING = "completing"
    COMPLETE = "complete"


# Phases in which a saga works on the request (a request in one of them is in flight).
IN_FLIGHT_REPLACEMENT_STATES = frozenset(set(ReplacementState) - {ReplacementState.COMPLETE})
