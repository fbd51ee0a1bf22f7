"""The agent's settings: environment (prefix ``CRUCIBLE_``), overridden by ``run`` flags."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from crucible_agent.delay import Delay, parse_delay
from crucible_agent.files import NoFiles, RegionFiles
from schemas.base import Port

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class CrucibleSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CRUCIBLE_", frozen=True, extra="forbid")

    agent_id: uuid.UUID = Field(description="this agent's id; its queue is crucible.<id>")
    sled_id: uuid.UUID = Field(description="the sled its storage is on")
    data_dir: Path = Field(description="where the regions' files and the state database live")
    capacity_bytes: int = Field(
        default=1 << 40, gt=0, description="total size of the regions it may hold"
    )
    # One RabbitMQ URL, or a cluster's node URLs comma-separated (schemas/brokers.py).
    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    create_delay: str = Field(
        default="fixed:0",
        description="extra time a create takes: fixed:S | uniform:LO,HI | "
        "lognormal:MEDIAN,SIGMA,MIN,MAX (seconds)",
    )
    clone_delay: str = Field(
        default="fixed:0",
        description="what a clone (a region ensured with a source) takes on top of "
        "create_delay, for the copy from its source: the same forms as create_delay",
    )
    clone_seconds_per_gib: float = Field(
        default=0.0,
        ge=0,
        description="and a further number of seconds per GiB of the clone's size",
    )
    seed: int | None = Field(default=None, description="seed of the delay and fault draws")
    fail_fraction: Fraction = Field(default=0.0, description="fraction of creates that fail")
    crash_mid_create_fraction: Fraction = Field(
        default=0.0,
        description="fraction of creates during which the process SIGKILLs itself "
        "halfway through writing the extent files",
    )
    destroy_fail_fraction: Fraction = Field(
        default=0.0,
        description="fraction of destroys that fail: the region is recorded failed, as the "
        "real agent records a destroy it could not carry out, until a delete is sent again",
    )
    backend: Literal["files", "trivial"] = Field(
        default="files",
        description="files: regions are sparse extent files (the default, and what every "
        "deployment runs); trivial: no files are written, every other step (records, "
        "outbox, events, replies) is the same; for the benchmark's peers phase only",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="regions created or destroyed at once; the real agent has one worker "
        "for new regions, so 1 unless a benchmark needs regions that each take their own "
        "delay in parallel",
    )
    log_level: str = "INFO"
    announce_seconds: float = Field(
        default=30.0, gt=0, description="how often it re-announces its capacity"
    )
    announce_coalesce_seconds: float = Field(
        default=1.0,
        ge=0,
        description="how long after a change of free space it announces its capacity; "
        "one announcement covers every change made meanwhile",
    )
    space_reserve_bytes: int = Field(
        default=8 << 20,
        ge=0,
        description="bytes kept allocated in the data directory so that, when it fills, "
        "the agent can still record failures, deletes and announcements "
        "(crucible_agent/space.py); new regions fail while twice this is not free; "
        "0 keeps none",
    )
    health_file: Path | None = Field(
        default=None,
        description="touched every few seconds while the agent is healthy (its loops "
        "complete their passes, its broker connection is up); "
        "`crucible-agent health` (a container health check) reads its age",
    )
    metrics_port: Port | None = Field(
        default=None,
        description="serve Prometheus metrics at /metrics on this port (0: a free one, "
        "logged and written to the metrics address file); unset: no metrics",
    )
    metrics_host: str = Field(default="127.0.0.1", description="the metrics server's address")
    metrics_address_file: Path | None = Field(
        default=None, description="where the metrics URL is written once it is served"
    )
    trace_file: Path | None = Field(
        default=None,
        description="where finished trace spans are appended, one JSON object a line "
        "(schemas/tracing.py); OTLP export is configured by the OTEL_* variables",
    )

    @field_validator("create_delay", "clone_delay")
    @classmethod
    def _delay_parses(cls, value: str) -> str:
        parse_delay(value)
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(f"unknown log level {value!r}")
        return level

    @property
    def delay(self) -> Delay:
        return parse_delay(self.create_delay)

    @property
    def clone_extra_delay(self) -> Delay:
        return parse_delay(self.clone_delay)

    @property
    def database_path(self) -> Path:
        return self.data_dir / "agent.sqlite"

    @property
    def space_reserve_path(self) -> Path:
        return self.data_dir / "space.reserve"

    def region_files(self) -> RegionFiles:
        """The backend named by ``backend``."""
        return (
            NoFiles(self.regions_dir)
            if self.backend == "trivial"
            else RegionFiles(self.regions_dir)
        )

    @property
    def regions_dir(self) -> Path:
        return self.data_dir / "regions"
