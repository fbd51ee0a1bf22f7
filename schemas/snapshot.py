"""Crucible agent: a region's snapshots and the read-only downstairs that serve them.

Follows the real Crucible agent (``agent-types/src/snapshot.rs``, ``agent/src/server.rs``
in Oxide's crucible repository; docs/omicron.md, "Snapshots"):

- A **snapshot** of a region is named by its caller (Nexus uses the snapshot's id) and
  has the time it was taken. The real agent lists a region's ZFS snapshots and deletes
  them; here the agent also takes them (``region_snapshot.create.v1``), since there is no
  downstairs here to take one on a flush.
- A **running snapshot** is a read-only downstairs serving one snapshot on a port of
  its own. It is named like the real one, by its region's id and the snapshot's name
  (``id`` is the region's id), and goes through the region states: ``requested`` until
  its downstairs runs, then ``created``; stopped through ``tombstoned`` to
  ``destroyed``. Its address is what a clone (a region ensured with ``source``) copies
  from.

Every change is an event with a generation, published through the agent's outbox like
a region's.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AwareDatetime, Field, StringConstraints

from schemas.base import Envelope, Generation, Model, Port
from schemas.region import RegionRef, RegionState

# A snapshot's name is a directory name on the agent (as a ZFS snapshot's is part of a
# dataset's name): no separators, and never "." or "..".
SnapshotName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$", max_length=128)
]


class SnapshotState(StrEnum):
    CREATED = "created"
    DESTROYED = "destroyed"


class Snapshot(Model):
    """A snapshot as the agent records it. A deleted one keeps its record (``destroyed``)
    so that a repeated delete stays idempotent; listings show only ``created`` ones, as
    the real agent lists only the snapshots that exist."""

    region_id: uuid.UUID
    name: SnapshotName
    created: AwareDatetime = Field(description="when it was taken")
    state: SnapshotState
    generation: Generation


class RunningSnapshot(Model):
    """A read-only downstairs serving a snapshot (the real agent's ``RunningSnapshot``)."""

    id: uuid.UUID = Field(description="the region's id, as in the real agent")
    name: SnapshotName
    port_number: Port
    state: RegionState
    generation: Generation
    failure: str | None = Field(default=None, description="why it is failed")


class SnapshotRef(Model):
    region_id: uuid.UUID
    name: SnapshotName


# Commands (to the agent's own queue ``crucible.<agent_id>``). Each is answered, when it
# has a ``reply_to``, with ``region_snapshot.info.v1``; a refusal is ``command.rejected``.


class RegionSnapshotCreate(Envelope):
    """Take a snapshot of a ``created`` region; idempotent by (region, name)."""

    IS_COMMAND = True
    type: Literal["region_snapshot.create.v1"] = "region_snapshot.create.v1"
    payload: SnapshotRef


class RegionSnapshotDelete(Envelope):
    """Delete a snapshot; refused while a running snapshot of it is not destroyed.
    Deleting one that does not exist changes nothing (the real agent's is idempotent)."""

    IS_COMMAND = True
    type: Literal["region_snapshot.delete.v1"] = "region_snapshot.delete.v1"
    payload: SnapshotRef


class RegionSnapshotGet(Envelope):
    """One snapshot of a region and its running snapshot, if any."""

    IS_COMMAND = True
    type: Literal["region_snapshot.get.v1"] = "region_snapshot.get.v1"
    payload: SnapshotRef


class RegionSnapshotList(Envelope):
    """Every snapshot and running snapshot of a region (``region_get_snapshots``)."""

    IS_COMMAND = True
    type: Literal["region_snapshot.list.v1"] = "region_snapshot.list.v1"
    payload: RegionRef


class RunningSnapshotRun(Envelope):
    """Start a read-only downstairs for a snapshot (``region_run_snapshot``); idempotent
    by (region, name): an existing running snapshot is answered as it is."""

    IS_COMMAND = True
    type: Literal["running_snapshot.run.v1"] = "running_snapshot.run.v1"
    payload: SnapshotRef


class RunningSnapshotStop(Envelope):
    """Stop a snapshot's read-only downstairs (``region_delete_running_snapshot``)."""

    IS_COMMAND = True
    type: Literal["running_snapshot.stop.v1"] = "running_snapshot.stop.v1"
    payload: SnapshotRef


# Replies.


class RegionSnapshots(Model):
    agent_id: uuid.UUID
    region_id: uuid.UUID
    region_state: RegionState | None = Field(description="None when the agent never had it")
    snapshots: tuple[Snapshot, ...] = ()
    running_snapshots: tuple[RunningSnapshot, ...] = ()


class RegionSnapshotsInfo(Envelope):
    type: Literal["region_snapshot.info.v1"] = "region_snapshot.info.v1"
    payload: RegionSnapshots


# Events (topic ``control.events``).


class RegionSnapshotChange(Model):
    agent_id: uuid.UUID
    snapshot: Snapshot


class RegionSnapshotStateChanged(Envelope):
    """Routing key ``region_snapshot.<state>``."""

    type: Literal["region_snapshot.state_changed.v1"] = "region_snapshot.state_changed.v1"
    payload: RegionSnapshotChange

    def routing_key(self) -> str:
        return f"region_snapshot.{self.payload.snapshot.state.value}"


class RunningSnapshotChange(Model):
    agent_id: uuid.UUID
    running_snapshot: RunningSnapshot


class RunningSnapshotStateChanged(Envelope):
    """Routing key ``running_snapshot.<state>``."""

    type: Literal["running_snapshot.state_changed.v1"] = "running_snapshot.state_changed.v1"
    payload: RunningSnapshotChange

    def routing_key(self) -> str:
        return f"running_snapshot.{self.payload.running_snapshot.state.value}"
