"""The sled agent's settings: environment (prefix ``SLED_``), overridden by ``run`` flags."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.base import Port

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
Seconds = float


class SledSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLED_", frozen=True, extra="forbid")

    sled_id: uuid.UUID = Field(description="this sled's id; its command queue is sled.<id>")
    data_dir: Path = Field(description="where the VMM database (sled.sqlite3) lives")
    hostname: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=255,
        description="announced in the sled's registration",
    )
    cpus: int = Field(default=64, gt=0, description="vCPUs the VMMs may reserve")
    memory_bytes: int = Field(default=512 << 30, gt=0, description="memory they may reserve")
    # One RabbitMQ URL, or a cluster's node URLs comma-separated (schemas/brokers.py).
    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    heartbeat_seconds: Seconds = Field(default=1.0, gt=0, description="time between heartbeats")
    boot_seconds: Seconds = Field(default=0.2, ge=0, description="time spent in starting")
    stop_seconds: Seconds = Field(default=0.2, ge=0, description="time spent in stopping")
    reboot_seconds: Seconds = Field(default=0.2, ge=0, description="time spent in rebooting")
    repair_seconds: Seconds = Field(
        default=1.0, ge=0, description="how long a live repair of a disk's volume takes"
    )
    crash_rate_per_hour: float = Field(
        default=0.0, ge=0, description="unrequested crashes per running VMM per hour"
    )
    seed: int | None = Field(default=None, description="seed of the random crashes")
    log_level: LogLevel = "INFO"
    health_file: Path | None = Field(
        default=None,
        description="touched every few seconds while the agent is healthy (its loops "
        "complete their passes, its broker connection is up); "
        "`sled-agent health` (a container health check) reads its age",
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

    @property
    def database_path(self) -> Path:
        return self.data_dir / "sled.sqlite3"
