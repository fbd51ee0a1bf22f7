"""The region state machine and the agent's resource rules, with no I/O.

Follows the real Crucible agent (``agent/src/datafile.rs`` and ``agent/src/main.rs`` in
Oxide's crucible repository; docs/omicron.md lists each rule with its
source): a region is ``requested`` until its extent files exist, then ``created``;
delete goes through ``tombstoned`` (files still on disk) to ``destroyed`` (files gone,
record kept so that repeated calls stay idempotent). Every change of state is a new
generation.

A create is recorded ``requested`` with a port, or refused with no record when no port
is free. Whether it fits is decided later, by the one worker, when it reserves the
region's space (:func:`reserve`): a region that cannot reserve is ``failed`` with the
reason, and keeps its port until it is destroyed. A destroy that cannot remove the
files makes the region ``failed`` too, so that a delete sent again tombstones it again.

The functions here decide; the caller (``crucible_agent.service``) reads the records,
applies the decision in one transaction and performs the file work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from schemas.region import CLONING_REFUSAL, Region, RegionSpec, RegionState, reservation_bytes

# The real agent's downstairs ports: ``portbase`` 19000 (agent/smf/agent.xml) up to
# ``lowport + 999`` (agent/src/main.rs), both included.
FIRST_PORT = 19000
LAST_PORT = 19999

# The real worker takes tombstoned regions before requested ones (``first_in_states``
# in agent/src/main.rs), so a delete never waits behind a queue of creates.
WORK_ORDER = (RegionState.TOMBSTONED, RegionState.REQUESTED)

DELETABLE = frozenset({RegionState.REQUESTED, RegionState.CREATED, RegionState.FAILED})

# The code of a rejection for want of space, for a create that could not even be
# recorded.
OUT_OF_SPACE = "out_of_space"
# The code of a create refused because every port in the range is taken.
NO_FREE_PORT = "no_free_port"
# The codes of a delete refused: the region has snapshots; a clone is being copied.
HAS_SNAPSHOTS = "has_snapshots"
CLONING = CLONING_REFUSAL


def out_of_space(why: str) -> str:
    """The failure of a region, or a rejection's message, when the data directory is full."""
    return f"out of space: {why}"


def failed_out_of_space(failure: str) -> bool:
    """Whether a region's failure is for want of space (:func:`out_of_space`)."""
    return failure.startswith(out_of_space(""))


def holds_port(region: Region | None) -> bool:
    """Every region keeps its port until it is destroyed, a failed one too: its
    downstairs may still be bound to it (``get_free_port`` in agent/src/datafile.rs)."""
    return region is not None and region.state is not RegionState.DESTROYED


# What a command or a finished piece of work does to a region.


@dataclass(frozen=True)
class Changed:
    """The region moved to a new state; record it and publish one event."""

    region: Region
    previous: Region | None

    @property
    def previous_state(self) -> RegionState | None:
        return None if self.previous is None else self.previous.state

    @property
    def capacity_changed(self) -> bool:
        """Whether the announced capacity moves: a new region counts, a destroyed one no
        longer holds its reservation. A reservation taken or given back without a change
        of state is announced by whoever changes it."""
        return self.previous is None or self.region.state is RegionState.DESTROYED


@dataclass(frozen=True)
class Unchanged:
    """Nothing to record: the command was already carried out (or cannot apply)."""

    region: Region


@dataclass(frozen=True)
class Conflict:
    """The id exists with other parameters: a clear error that changes nothing."""

    existing: Region
    message: str


@dataclass(frozen=True)
class Refused:
    """A command that cannot be carried out (a new region that cannot even be recorded, a
    delete the agent refuses): nothing changes, a rejection with ``code``."""

    code: str
    message: str


@dataclass(frozen=True)
class NotFound:
    message: str


@dataclass(frozen=True)
class Reserve:
    """The worker may create the region: record that it holds ``bytes``."""

    bytes: int


EnsureOutcome = Changed | Unchanged | Conflict | Refused
DeleteOutcome = Changed | Unchanged | NotFound | Refused


@dataclass(frozen=True)
class Holdings:
    """What the agent's regions add up to. The store sums them in SQL, so that a
    decision does not read every region record."""

    # The reservations of the regions whose space is reserved and not yet destroyed.
    used_bytes: int
    # Regions not destroyed (each holds a port).
    regions: int
    # The lowest port no region holds (:func:`holds_port`); None when every one is.
    free_port: int | None


@dataclass(frozen=True)
class Capacity:
    total_bytes: int
    used_bytes: int

    @property
    def free_bytes(self) -> int:
        return max(self.total_bytes - self.used_bytes, 0)


def ensure(
    existing: Region | None, spec: RegionSpec, *, holdings: Holdings | None
) -> EnsureOutcome:
    """Create is idempotent by id: the same parameters give back the existing record,
    whatever its state; different ones are a conflict. ``holdings`` are the agent's, for
    the port: needed only for a new region (a repeated ensure, as a poller or a
    redelivery sends, need not add them up). With no free port nothing is recorded, as
    the real agent answers an error and records nothing (``create_region_request``)."""
    if existing is not None:
        if existing.spec() == spec:
            return Unchanged(existing)
        return Conflict(existing, _difference(existing.spec(), spec))
    if holdings is None:
        raise ValueError(f"region {spec.id} is new: placing it needs the agent's holdings")
    if holdings.free_port is None:
        return Refused(NO_FREE_PORT, f"no free port in {FIRST_PORT}-{LAST_PORT}")
    region = Region(
        **spec.model_dump(),
        port_number=holdings.free_port,
        # A region cloned from another downstairs is served read-only.
        read_only=spec.source is not None,
        state=RegionState.REQUESTED,
        generation=1,
    )
    return Changed(region, previous=None)


def reserve(
    region: Region, *, others: Holdings, total_bytes: int, shortage: str | None
) -> Reserve | Changed:
    """The worker is about to create ``region``: it reserves 1.25 times the region's size
    among what ``others`` hold, or fails with the reason and without files, as the real
    agent does when it cannot create the region's dataset with its reservation.
    ``shortage``: why the data directory has no room for a new region now, if so."""
    need = reservation_bytes(region.size_bytes)
    room = Capacity(total_bytes=total_bytes, used_bytes=others.used_bytes)
    if shortage is not None:
        return _move(region, RegionState.FAILED, failure=out_of_space(shortage))
    if need > room.free_bytes:
        return _move(
            region,
            RegionState.FAILED,
            failure=(
                f"cannot reserve {need} bytes (1.25 x {region.size_bytes}): "
                f"{room.free_bytes} of {room.total_bytes} free"
            ),
        )
    return Reserve(need)


def delete(
    existing: Region | None, *, snapshots: Sequence[str] = (), cloning: bool = False
) -> DeleteOutcome:
    """``requested``/``created``/``failed`` become ``tombstoned``; a region already on
    its way out (or gone) is left as it is, so a repeated delete is harmless. A region
    whose destroy failed is ``failed``: deleting it again tries the destroy again.

    Refused, changing nothing, as the real agent refuses them: a region with
    ``snapshots`` (the names of those that exist; ``region_delete`` answers "must delete
    snapshots first!"), and a clone the worker is copying now (``cloning``;
    ``DataFile::destroy`` answers 503 for a region ``Creating``): its delete is sent
    again once the region is ``created`` or ``failed``."""
    if existing is None:
        return NotFound("no such region")
    if existing.state in DELETABLE and snapshots:
        return Refused(
            HAS_SNAPSHOTS,
            f"must delete snapshots first: region {existing.id} has "
            f"{len(snapshots)} ({', '.join(sorted(snapshots)[:5])}"
            f"{', ...' if len(snapshots) > 5 else ''})",
        )
    if existing.state in DELETABLE and cloning:
        return Refused(
            CLONING,
            f"cannot destroy region {existing.id} while it is being cloned; "
            "delete it again once it is created or failed",
        )
    if existing.state in DELETABLE:
        return _move(existing, RegionState.TOMBSTONED)
    return Unchanged(existing)


def create_finished(region: Region, failure: str | None) -> Changed | Unchanged:
    """The file work for a region ended. A region deleted meanwhile stays tombstoned."""
    if region.state is not RegionState.REQUESTED:
        return Unchanged(region)
    if failure is not None:
        return _move(region, RegionState.FAILED, failure=failure)
    return _move(region, RegionState.CREATED)


def destroy_finished(region: Region, failure: str | None) -> Changed | Unchanged:
    """The worker tried to remove a tombstoned region's files. Removed: ``destroyed``.
    Not removed: ``failed`` with the reason, as the real worker records it (``df.fail``
    after a failed ``worker_region_destroy``); the region keeps its port and files."""
    if region.state is not RegionState.TOMBSTONED:
        return Unchanged(region)
    if failure is not None:
        return _move(region, RegionState.FAILED, failure=f"destroy failed: {failure}")
    return _move(region, RegionState.DESTROYED)


def needs_files(region: Region) -> bool:
    """A region whose extent files are still to be written."""
    return region.state is RegionState.REQUESTED


def _move(region: Region, state: RegionState, *, failure: str | None = None) -> Changed:
    moved = region.model_copy(
        update={
            "state": state,
            "generation": region.generation + 1,
            "failure": failure if failure is not None else region.failure,
        }
    )
    return Changed(moved, previous=region)


def _difference(existing: RegionSpec, requested: RegionSpec) -> str:
    old, new = existing.model_dump(), requested.model_dump()
    fields = ", ".join(
        f"{name}: has {old[name]!r}, asked {new[name]!r}" for name in old if old[name] != new[name]
    )
    return f"region {existing.id} exists with other parameters ({fields})"
