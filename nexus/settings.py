"""Nexus's configuration, read from ``NEXUS_*`` environment variables."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.base import MAX_SAFE_INTEGER, Port
from schemas.redact import redact_url

if TYPE_CHECKING:
    # SQLAlchemy comes with it: not for every `nexusctl` command that reads a default.
    from nexus.db.engine import PostgresTimeouts

# How far ahead of Nexus's record a region or instance state change may be.
MAX_GENERATION_LEAD = 1000

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]

_URL_FIELDS = frozenset({"database_url", "amqp_url"})


def default_replica_id() -> str:
    """Unique among the replicas of one machine and readable in a saga timeline."""
    return f"{socket.gethostname()}-{os.getpid()}"


class NexusSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NEXUS_", extra="ignore")

    replica_id: str = Field(default_factory=default_replica_id, min_length=1, max_length=200)
    database_url: str = "sqlite+aiosqlite:///./var/nexus.sqlite3"
    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    lease_seconds: float = Field(default=15.0, gt=0)
    # How often a replica looks for passed deadlines, expired leases and wake-ups whose
    # waker died: the safety net under notifications, never a poll of the agents.
    sweep_seconds: float = Field(default=1.0, gt=0)
    # A sled silent for this long is marked unreachable (it beats every second or so).
    sled_timeout_seconds: float = Field(default=10.0, gt=0)
    # A sled silent for this long is lost: expunged for good, its VMMs failed
    # (nexus/liveness.py).
    sled_expunge_seconds: float = Field(default=60.0, gt=0)
    # How long an event no saga claimed is kept before it moves to unclaimed_events.
    unclaimed_retention_seconds: float = Field(default=3600.0, gt=0)
    # Touched after every sweeper pass that reached the database while the broker
    # connection was up; `nexus health` (a container health check) reads its age.
    health_file: Path | None = None
    # Where finished trace spans are appended, one JSON object a line (schemas/tracing.py);
    # OTLP export is configured by the standard OTEL_* variables.
    trace_file: Path | None = None
    # How long a region may take before its saga asks the agent once (the reconcile
    # query); notifications, not this, resume the saga. Raise it when regions are slow.
    region_deadline_seconds: float = Field(default=300.0, gt=0)
    # At each deadline the agent is asked; while it says the region is still being
    # created the wait re-arms, this many times at most. Unset: for as long as it says so.
    region_max_rearms: int | None = Field(default=None, ge=0)
    # How long a region delete (a disk delete, or a create that unwinds) may take before
    # Nexus asks the agent; notifications, not this, resume the saga.
    delete_deadline_seconds: float = Field(default=120.0, gt=0)
    # Unacked events in flight per replica.
    event_prefetch: int = Field(default=32, gt=0, le=10_000)
    # A region or instance state change more than this many generations ahead of the one
    # Nexus recorded for the object is dead-lettered (implausible_generation), not applied.
    max_generation_lead: int = Field(default=MAX_GENERATION_LEAD, gt=0, le=MAX_SAFE_INTEGER)
    # A frozen replica (SIGSTOP, a paused VM) must hold nobody else up (RELIABILITY.md,
    # "A frozen replica"). Unset, each is sized from the lease (``postgres_timeouts``,
    # ``amqp_heartbeat``); 0 turns one off. The PostgreSQL ones are server-side limits on
    # every connection of the replica: a wait for a row lock, a statement, and a
    # transaction left idle, which the server ends (releasing its locks) well before the
    # leases it was writing under expire.
    db_lock_timeout_seconds: float | None = Field(default=None, ge=0)
    db_statement_timeout_seconds: float | None = Field(default=None, ge=0)
    db_idle_in_transaction_timeout_seconds: float | None = Field(default=None, ge=0)
    # The AMQP heartbeat, whole seconds: RabbitMQ closes a connection 2 to 3 heartbeats
    # after the last bytes it received, and gives the unacked messages of a frozen
    # replica to the others.
    amqp_heartbeat_seconds: int | None = Field(default=None, ge=0, le=65_534)
    log_level: LogLevel = "INFO"
    # Prometheus metrics (README, "Metrics"): served on this port at /metrics when set
    # (0: a free port, logged and written to NEXUS_METRICS_ADDRESS_FILE); off when unset.
    metrics_port: Port | None = None
    metrics_host: str = "127.0.0.1"
    metrics_address_file: Path | None = None
    # Figures read from the database (sagas by state, outbox depth, leases) are read at
    # most this often, however often the metrics are scraped.
    metrics_refresh_seconds: float = Field(default=5.0, ge=0)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    def postgres_timeouts(self) -> PostgresTimeouts:
        """The settings given, or: a lock wait and an idle transaction half the lease, at
        most 1 s (what a frozen replica may cost the others), a statement the lease, at
        most 5 s."""
        from nexus.db.engine import PostgresTimeouts

        half_lease = self.lease_seconds / 2
        return PostgresTimeouts(
            lock_seconds=_given_or(self.db_lock_timeout_seconds, min(1.0, half_lease)),
            statement_seconds=_given_or(
                self.db_statement_timeout_seconds, min(5.0, self.lease_seconds)
            ),
            idle_in_transaction_seconds=_given_or(
                self.db_idle_in_transaction_timeout_seconds, min(1.0, half_lease)
            ),
        )

    @property
    def amqp_heartbeat(self) -> int:
        """The setting given, or a third of the lease, at least 1 s: a frozen replica's
        connection is then closed within the lease (within 3 s when the lease is shorter)."""
        if self.amqp_heartbeat_seconds is not None:
            return self.amqp_heartbeat_seconds
        return max(1, int(self.lease_seconds // 3))

    def __repr_args__(self) -> Any:
        # repr() and str() end up in logs and tracebacks: never with a password.
        for name, value in super().__repr_args__():
            if name in _URL_FIELDS and isinstance(value, str):
                yield name, redact_url(value)
            else:
                yield name, value


def _given_or(value: float | None, default: float) -> float:
    return default if value is None else value
