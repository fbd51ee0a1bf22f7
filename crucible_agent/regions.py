"""The region state machine and capacity rules, with no I/O.

Follows the real Crucible agent (docs/design.md, "Message contracts"): a region is
``requested`` until its extent files exist, then ``created``; delete goes through
``tombstoned`` (files still on disk) to ``destroyed`` (files gone, record kept so that
repeated calls stay idempotent). Every change of state is a new generation.

A region that does not fit the remaining capacity is recorded ``failed`` with the
reason, as Crucible does, rather than refused: the caller asked for a region with that
id, and the failure is its answer, visible to ``get`` and ``list`` like any other.
A failed region holds no files and no capacity. So is one its data directory has no
room for (:mod:`crucible_agent.space`): its failure starts with "out of space".

The functions here decide; the caller (``crucible_agent.service``) reads the records,
applies the decision in one transaction and performs the file work.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.region import Region, RegionSpec, RegionState

# Crucible's agents hand out downstairs ports from here upwards (Omicron starts at 19000).
FIRST_PORT = 19000
LAST_PORT = 65535

DELETABLE = frozenset({RegionState.REQUESTED, RegionState.CREATED, RegionState.FAILED})

# The code of a rejection for want of space, for a create that could not even be
# recorded failed.
OUT_OF_SPACE = "out_of_space"


def out_of_space(why: str) -> str:
    """The failure of a region, or a rejection's message, when the data directory is full."""
    return f"out of space: {why}"


def holds_space(region: Region | None) -> bool:
    """Whether the region holds (or is about to hold, or still holds) files on disk, and
    so counts against capacity and keeps its port. A failed region never does, even once
    tombstoned: its files were removed when it failed, or never written."""
    if region is None:
        return False
    if region.state is RegionState.TOMBSTONED:
        return region.failure is None
    return region.state in {RegionState.REQUESTED, RegionState.CREATED}


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
        return holds_space(self.previous) != holds_space(self.region)


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
class NotFound:
    message: str


EnsureOutcome = Changed | Unchanged | Conflict
DeleteOutcome = Changed | Unchanged | NotFound


@dataclass(frozen=True)
class Holdings:
    """What the regions that hold space (:func:`holds_space`) add up to. The store sums
    them in SQL, so that a decision does not read every region record."""

    used_bytes: int
    regions: int
    # The lowest port none of them uses; None when every port is taken.
    free_port: int | None


@dataclass(frozen=True)
class Capacity:
    total_bytes: int
    used_bytes: int

    @property
    def free_bytes(self) -> int:
        return max(self.total_bytes - self.used_bytes, 0)


def ensure(
    existing: Region | None,
    spec: RegionSpec,
    *,
    holdings: Holdings | None,
    total_bytes: int,
    shortage: str | None = None,
) -> EnsureOutcome:
    """Create is idempotent by id: the same parameters give back the existing record,
    whatever its state; different ones are a conflict. ``holdings`` are those of the
    agent's other regions, for capacity and ports: needed only for a new region (a
    repeated ensure, as a poller or a redelivery sends, need not add them up).
    ``shortage``: why the data directory has no room for a new region now, if so."""
    if existing is not None:
        if existing.spec() == spec:
            return Unchanged(existing)
        return Conflict(existing, _difference(existing.spec(), spec))
    if holdings is None:
        raise ValueError(f"region {spec.id} is new: placing it needs the agent's holdings")
    room = Capacity(total_bytes=total_bytes, used_bytes=holdings.used_bytes)
    failure: str | None = None
    if shortage is not None:
        failure = out_of_space(shortage)
    elif spec.size_bytes > room.free_bytes:
        failure = (
            f"does not fit: needs {spec.size_bytes} bytes, {room.free_bytes} of "
            f"{room.total_bytes} free"
        )
    elif holdings.free_port is None:
        failure = f"no free port in {FIRST_PORT}-{LAST_PORT}"
    region = Region(
        **spec.model_dump(),
        port_number=holdings.free_port or 0,
        state=RegionState.FAILED if failure else RegionState.REQUESTED,
        generation=1,
        failure=failure,
    )
    return Changed(region, previous=None)


def delete(existing: Region | None) -> DeleteOutcome:
    """``requested``/``created``/``failed`` become ``tombstoned``; a region already on
    its way out (or gone) is left as it is, so a repeated delete is harmless."""
    if existing is None:
        return NotFound("no such region")
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


def destroy_finished(region: Region) -> Changed | Unchanged:
    """The files of a tombstoned region are gone."""
    if region.state is not RegionState.TOMBSTONED:
        return Unchanged(region)
    return _move(region, RegionState.DESTROYED)


def needs_files(region: Region) -> bool:
    """After a restart: a region whose extent files are still to be written."""
    return region.state is RegionState.REQUESTED


def needs_removal(region: Region) -> bool:
    """After a restart: a region whose files are still to be removed."""
    return region.state is RegionState.TOMBSTONED


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
