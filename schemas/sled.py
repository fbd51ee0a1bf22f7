"""Agents announcing themselves: sled registration, heartbeats, storage capacity."""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import AwareDatetime, Field

from schemas.base import (
    Envelope,
    Model,
    NonNegativeInt,
    NonNegativeInt32,
    PositiveInt,
    PositiveInt32,
)


class SledInfo(Model):
    sled_id: uuid.UUID
    hostname: str = Field(max_length=255)
    cpus: PositiveInt32
    memory_bytes: PositiveInt
    queue: str = Field(description="where its commands go: sled.<id>")


class SledRegistered(Envelope):
    type: Literal["sled.registered.v1"] = "sled.registered.v1"
    payload: SledInfo

    def routing_key(self) -> str:
        return "sled.registered"


class Heartbeat(Model):
    sled_id: uuid.UUID
    sequence: NonNegativeInt = Field(description="increases by one each beat since start")
    started_at: AwareDatetime
    cpus_used: NonNegativeInt32
    memory_used_bytes: NonNegativeInt
    instances_running: NonNegativeInt32


class SledHeartbeat(Envelope):
    type: Literal["sled.heartbeat.v1"] = "sled.heartbeat.v1"
    payload: Heartbeat

    def routing_key(self) -> str:
        return "sled.heartbeat"


class CrucibleAgentInfo(Model):
    agent_id: uuid.UUID
    sled_id: uuid.UUID
    queue: str = Field(description="where its commands go: crucible.<id>")
    capacity_bytes: NonNegativeInt
    free_bytes: NonNegativeInt
    regions: NonNegativeInt32


class AgentAnnounced(Envelope):
    """A crucible agent's capacity and free space, sent at start and after changes."""

    type: Literal["agent.announced.v1"] = "agent.announced.v1"
    payload: CrucibleAgentInfo

    def routing_key(self) -> str:
        return "agent.announced"
