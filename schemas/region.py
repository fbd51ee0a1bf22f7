"""Crucible agent: regions, the commands that manage them and the events they emit.

The field set and states follow the real Crucible agent API (``crucible-agent`` in
Oxide's crucible repository): a region is ``requested`` until its extent files exist,
then ``created``; delete goes through ``tombstoned`` to ``destroyed``.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Literal

from pydantic import Field

from schemas.base import (
    BlockSize,
    Envelope,
    Generation,
    Model,
    Port,
    PositiveInt,
    PositiveInt32,
)


class RegionState(StrEnum):
    REQUESTED = "requested"
    CREATED = "created"
    TOMBSTONED = "tombstoned"
    DESTROYED = "destroyed"
    FAILED = "failed"


# The code of a delete refused because the region is a clone still being copied (the
# real agent answers 503 for a region ``Creating``): Nexus deletes it again once it is
# created or failed.
CLONING_REFUSAL = "unavailable"


def reservation_bytes(size_bytes: int) -> int:
    """What a region of ``size_bytes`` takes from its dataset: 1.25 times its size, for
    metadata and snapshots (``RESERVATION_FACTOR`` in the real crucible agent's
    agent/src/main.rs), rounded half up as Rust's ``round``. The agent reserves it, and
    Nexus places and accounts regions by it, so the two agree on what fits."""
    return (5 * size_bytes + 2) // 4


class RegionSpec(Model):
    """What a caller asks for; create is idempotent on ``id`` with these fields."""

    id: uuid.UUID
    block_size: BlockSize
    extent_size: PositiveInt = Field(description="blocks per extent")
    extent_count: PositiveInt32
    encrypted: bool = True
    source: str | None = Field(default=None, max_length=255)

    @property
    def size_bytes(self) -> int:
        return self.block_size * self.extent_size * self.extent_count


class Region(Model):
    """A region as the agent records it."""

    id: uuid.UUID
    block_size: BlockSize
    extent_size: PositiveInt
    extent_count: PositiveInt32
    encrypted: bool
    port_number: Port
    read_only: bool = False
    source: str | None = None
    state: RegionState
    generation: Generation
    failure: str | None = Field(default=None, description="why it is failed")

    @property
    def size_bytes(self) -> int:
        return self.block_size * self.extent_size * self.extent_count

    def spec(self) -> RegionSpec:
        return RegionSpec(
            id=self.id,
            block_size=self.block_size,
            extent_size=self.extent_size,
            extent_count=self.extent_count,
            encrypted=self.encrypted,
            source=self.source,
        )


# Commands (to the agent's own queue ``crucible.<agent_id>``).


class RegionEnsure(Envelope):
    IS_COMMAND = True
    type: Literal["region.ensure.v1"] = "region.ensure.v1"
    payload: RegionSpec


class RegionRef(Model):
    id: uuid.UUID


class RegionDelete(Envelope):
    IS_COMMAND = True
    type: Literal["region.delete.v1"] = "region.delete.v1"
    payload: RegionRef


class RegionGet(Envelope):
    """The reconcile query: the region's current state, answered on ``reply_to``."""

    IS_COMMAND = True
    type: Literal["region.get.v1"] = "region.get.v1"
    payload: RegionRef


class Empty(Model):
    pass


class RegionList(Envelope):
    IS_COMMAND = True
    type: Literal["region.list.v1"] = "region.list.v1"
    payload: Empty = Empty()


# Replies.


class RegionFound(Model):
    agent_id: uuid.UUID
    region: Region | None = Field(description="None when the agent never had it")
    region_id: uuid.UUID


class RegionInfo(Envelope):
    type: Literal["region.info.v1"] = "region.info.v1"
    payload: RegionFound


class RegionListing(Model):
    agent_id: uuid.UUID
    regions: tuple[Region, ...]


class RegionListed(Envelope):
    type: Literal["region.listed.v1"] = "region.listed.v1"
    payload: RegionListing


# Events (topic ``control.events``, routing key ``region.<state>``).


class RegionChange(Model):
    agent_id: uuid.UUID
    region: Region


class RegionStateChanged(Envelope):
    type: Literal["region.state_changed.v1"] = "region.state_changed.v1"
    payload: RegionChange

    def routing_key(self) -> str:
        return f"region.{self.payload.region.state.value}"
