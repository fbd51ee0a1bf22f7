"""Snapshots and running snapshots: the agent's rules for them, with no I/O.

Follows the real Crucible agent (``agent/src/server.rs``, ``agent/src/datafile.rs`` in
Oxide's crucible repository; docs/omicron.md, "Snapshots"):

- A snapshot can be taken only of a ``created`` region; the real agent lists no
  snapshots for a region in any other state (``get_snapshots_for_region``). Taking one
  that exists changes nothing. Taking one again after it was deleted is refused
  (``snapshot_deleted``): unlike ``zfs snapshot``, which would take the name anew. Nexus
  names each snapshot by a new id and takes it once, so a take of a deleted name is a
  stale command (a re-send that crossed the delete, delivered late after a broker
  restart: the chaos test, seed 1504), and taking it would leave a snapshot no record
  accounts for, which keeps its region from being deleted. (The real agent takes no
  snapshots at all: Propolis or the Pantry does, through the upstairs.)
- A snapshot cannot be deleted while a running snapshot of it is anything but
  ``destroyed`` (``delete_snapshot``: "read-only downstairs running for region …").
  Deleting one that does not exist changes nothing.
- Running a snapshot that exists records a running snapshot ``requested`` with a port
  of its own (the same port range as regions, ``get_free_port``); running it again
  answers the record as it is, whatever its state (``create_running_snapshot_request``).
  The worker starts its downstairs (``created``), and stops it (``tombstoned`` to
  ``destroyed``).
- Stopping moves ``requested`` or ``created`` to ``tombstoned``; one already on its way
  out, or one that never existed, is left as it is; a ``failed`` one is refused, to keep
  the evidence (``delete_running_snapshot_request``).
- A region with snapshots cannot be deleted (``region_delete``: "must delete snapshots
  first!"): :func:`crucible_agent.regions.delete`.

The functions here decide; ``crucible_agent.service`` reads the records, applies the
decision in one transaction with its event and does the file work.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from crucible_agent.regions import FIRST_PORT, LAST_PORT, NO_FREE_PORT, NotFound, Refused
from schemas.region import Region, RegionState
from schemas.snapshot import RunningSnapshot, Snapshot, SnapshotRef, SnapshotState

# As the real worker takes them: stops before starts, after the regions' work.
WORK_ORDER = (RegionState.TOMBSTONED, RegionState.REQUESTED)

# Codes of the refusals (``command.rejected``).
REGION_NOT_CREATED = "region_not_created"
SNAPSHOT_IN_USE = "snapshot_in_use"
SNAPSHOT_DELETED = "snapshot_deleted"
RUNNING_SNAPSHOT_FAILED = "running_snapshot_failed"


@dataclass(frozen=True)
class SnapshotChanged:
    """A snapshot was taken or deleted: record it and publish one event."""

    snapshot: Snapshot
    previous: Snapshot | None


@dataclass(frozen=True)
class RunningChanged:
    """A running snapshot moved to a new state: record it and publish one event."""

    running: RunningSnapshot
    previous: RunningSnapshot | None


@dataclass(frozen=True)
class Unchanged:
    """Already carried out: nothing to record, the answer is the records as they are."""


SnapshotOutcome = SnapshotChanged | Unchanged | Refused | NotFound
RunningOutcome = RunningChanged | Unchanged | Refused | NotFound


def exists(snapshot: Snapshot | None) -> bool:
    return snapshot is not None and snapshot.state is SnapshotState.CREATED


def holds_port(running: RunningSnapshot | None) -> bool:
    """As a region's: every running snapshot but a destroyed one keeps its port."""
    return running is not None and running.state is not RegionState.DESTROYED


def live(running: RunningSnapshot | None) -> bool:
    """A running snapshot that still keeps its snapshot from being deleted."""
    return running is not None and running.state is not RegionState.DESTROYED


def create(
    region: Region | None, existing: Snapshot | None, ref: SnapshotRef, *, now: datetime
) -> SnapshotOutcome:
    if region is None:
        return NotFound(f"region {ref.region_id} not found")
    if exists(existing):
        return Unchanged()
    if existing is not None:
        return Refused(
            SNAPSHOT_DELETED,
            f"snapshot {ref.name} of region {ref.region_id} was deleted: a deleted snapshot "
            "is not taken again (a late or repeated take)",
        )
    if region.state is not RegionState.CREATED:
        return Refused(
            REGION_NOT_CREATED,
            f"region {region.id} is {region.state.value}: only a created region has snapshots",
        )
    taken = Snapshot(
        region_id=ref.region_id,
        name=ref.name,
        created=now,
        state=SnapshotState.CREATED,
        generation=1 if existing is None else existing.generation + 1,
    )
    return SnapshotChanged(taken, previous=existing)


def delete(
    region: Region | None, existing: Snapshot | None, running: RunningSnapshot | None
) -> SnapshotOutcome:
    if region is None:
        return NotFound("no such region")
    if not exists(existing):
        return Unchanged()
    assert existing is not None
    if live(running):
        assert running is not None
        return Refused(
            SNAPSHOT_IN_USE,
            f"read-only downstairs {running.state.value} for region {region.id} snapshot "
            f"{existing.name}: stop the running snapshot first",
        )
    deleted = existing.model_copy(
        update={"state": SnapshotState.DESTROYED, "generation": existing.generation + 1}
    )
    return SnapshotChanged(deleted, previous=existing)


def run(
    region: Region | None,
    snapshot: Snapshot | None,
    existing: RunningSnapshot | None,
    ref: SnapshotRef,
    *,
    free_port: int | None,
) -> RunningOutcome:
    """``free_port``: the lowest port no region or running snapshot holds."""
    if region is None:
        return NotFound(f"region {ref.region_id} not found")
    # The snapshot is looked for first, as the real handler does (``region_run_snapshot``).
    if not exists(snapshot):
        return NotFound(f"snapshot {ref.name} of region {ref.region_id} not found")
    if existing is not None:
        return Unchanged()
    if free_port is None:
        return Refused(NO_FREE_PORT, f"no free port in {FIRST_PORT}-{LAST_PORT}")
    running = RunningSnapshot(
        id=ref.region_id,
        name=ref.name,
        port_number=free_port,
        state=RegionState.REQUESTED,
        generation=1,
    )
    return RunningChanged(running, previous=None)


def stop(region: Region | None, existing: RunningSnapshot | None) -> RunningOutcome:
    if region is None:
        return NotFound("no such region")
    if existing is None or existing.state in {RegionState.TOMBSTONED, RegionState.DESTROYED}:
        return Unchanged()
    if existing.state is RegionState.FAILED:
        return Refused(
            RUNNING_SNAPSHOT_FAILED,
            f"region {existing.id} running snapshot {existing.name} failed to provision "
            "and cannot be destroyed",
        )
    return _move(existing, RegionState.TOMBSTONED)


def start_finished(running: RunningSnapshot, failure: str | None) -> RunningChanged | Unchanged:
    """The worker started (or could not start) the downstairs of a requested running
    snapshot. One stopped meanwhile stays tombstoned (``created_rs``)."""
    if running.state is not RegionState.REQUESTED:
        return Unchanged()
    if failure is not None:
        return _move(running, RegionState.FAILED, failure=failure)
    return _move(running, RegionState.CREATED)


def stop_finished(running: RunningSnapshot) -> RunningChanged | Unchanged:
    """The worker stopped a tombstoned running snapshot's downstairs."""
    if running.state is not RegionState.TOMBSTONED:
        return Unchanged()
    return _move(running, RegionState.DESTROYED)


def _move(
    running: RunningSnapshot, state: RegionState, *, failure: str | None = None
) -> RunningChanged:
    moved = running.model_copy(
        update={
            "state": state,
            "generation": running.generation + 1,
            "failure": failure if failure is not None else running.failure,
        }
    )
    return RunningChanged(moved, previous=running)
