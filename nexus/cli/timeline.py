"""A saga's log as a timeline, and for sagas that waited on agents, the wake overhead:
how long after a region was ready at its agent the saga resumed, and on which replica."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from rich.table import Table

from schemas import api

# Log events that end the span a node's "started" opened.
_ENDS_SPAN = frozenset({"succeeded", "failed", "resumed", "undo_finished", "undo_failed"})
_OPENS_SPAN = frozenset({"started", "undo_started"})
_FIELD = re.compile(r"(\w+)=([^,]*)")
_UUID = re.compile(r"\b([0-9a-f]{8})-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
_KEYS = re.compile(r"keys=\[([^\]]*)\]")


def abbreviate(detail: str) -> str:
    """A detail short enough for a table cell: ids cut to 8 digits, one wait key of several.

    A node waits on its object's success and on its failures; the first key says what
    it waits for.
    """
    keys = _KEYS.search(detail)
    if keys is not None:
        names = [key.strip(" '\"") for key in keys.group(1).split(",") if key.strip()]
        detail = f"for {names[0]}" + (f" (+{len(names) - 1})" if len(names) > 1 else "")
    elif detail.count(", ") and detail.startswith("region:"):
        names = detail.split(", ")
        detail = f"for {names[0]} (+{len(names) - 1})"
    return _UUID.sub(lambda match: match.group(1) + "…", detail)


@dataclass(frozen=True)
class TimelineRow:
    at: datetime
    offset_seconds: float
    node: str
    event: str
    replica: str
    # Since the node's start (or undo start), for the events that end a span.
    duration_seconds: float | None
    detail: str | None


@dataclass(frozen=True)
class Wake:
    """A wait that an event ended: when it happened at the agent, when the saga resumed."""

    node: str
    key: str
    ready_at_agent: datetime | None
    resumed_at: datetime
    replica: str
    by_reconcile: bool

    @property
    def overhead_ms(self) -> float | None:
        if self.ready_at_agent is None:
            return None
        return (self.resumed_at - self.ready_at_agent).total_seconds() * 1000

    def as_json(self) -> dict[str, object]:
        return {
            "node": self.node,
            "key": self.key,
            "ready_at_agent": self.ready_at_agent.isoformat() if self.ready_at_agent else None,
            "resumed_at": self.resumed_at.isoformat(),
            "replica": self.replica,
            "by_reconcile": self.by_reconcile,
            "overhead_ms": self.overhead_ms,
        }


def timeline(saga: api.SagaView) -> list[TimelineRow]:
    opened: dict[str, datetime] = {}
    rows = []
    for entry in saga.log:
        node = entry.node or saga.name
        duration = None
        if entry.event in _OPENS_SPAN:
            opened[node] = entry.at
        elif entry.event in _ENDS_SPAN and node in opened:
            duration = (entry.at - opened[node]).total_seconds()
        rows.append(
            TimelineRow(
                at=entry.at,
                offset_seconds=(entry.at - saga.created_at).total_seconds(),
                node=node,
                event=entry.event,
                replica=entry.replica,
                duration_seconds=duration,
                detail=_short_detail(entry),
            )
        )
    return rows


def wakes(saga: api.SagaView) -> list[Wake]:
    """Every resumption by an event (or reconcile), from the ``resumed`` log entries."""
    found = []
    for entry in saga.log:
        if entry.event != "resumed" or entry.detail is None:
            continue
        fields = dict(_FIELD.findall(entry.detail))
        occurred = fields.get("event_occurred_at", "None")
        found.append(
            Wake(
                node=entry.node or saga.name,
                key=fields.get("key", ""),
                ready_at_agent=None if occurred == "None" else datetime.fromisoformat(occurred),
                resumed_at=entry.at,
                replica=entry.replica,
                by_reconcile=fields.get("by_reconcile") == "True",
            )
        )
    return found


def _short_detail(entry: api.SagaLogEntry) -> str | None:
    if entry.event == "resumed" and entry.detail is not None:
        fields = dict(_FIELD.findall(entry.detail))
        how = "by reconcile" if fields.get("by_reconcile") == "True" else "by event"
        return f"{how} on {fields.get('key', '?')}"
    return entry.detail if entry.detail is None else abbreviate(entry.detail)


def _clock(at: datetime) -> str:
    return at.astimezone().strftime("%H:%M:%S.%f")[:-3]


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def timeline_table(saga: api.SagaView) -> Table:
    table = Table(
        title=f"saga {saga.id} ({saga.name}, {saga.state}), started {_clock(saga.created_at)}",
        title_justify="left",
    )
    for column in ("start", "node", "event", "replica", "duration", "detail"):
        table.add_column(column, overflow="fold")
    for row in timeline(saga):
        table.add_row(
            f"{row.offset_seconds:+.3f}s",
            row.node,
            row.event,
            row.replica,
            _seconds(row.duration_seconds),
            row.detail or "",
        )
    return table


def waiting_table(saga: api.SagaView, now: datetime) -> Table:
    table = Table(title="waiting for", title_justify="left")
    columns = ("node", "wait key", "waiting since", "for", "reconciles", "deadline", "deadline in")
    for column in columns:
        table.add_column(column, overflow="fold")
    for wait in saga.waiting_for:
        table.add_row(
            wait.node,
            wait.wait_key,
            _clock(wait.since),
            _seconds(max((now - wait.since).total_seconds(), 0.0)),
            str(wait.reconciles),
            _clock(wait.deadline),
            _seconds(max((wait.deadline - now).total_seconds(), 0.0)),
        )
    return table


def wakes_table(saga: api.SagaView, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("node", "ready at agent", "resumed", "replica", "wake overhead"):
        table.add_column(column)
    for wake in wakes(saga):
        overhead = wake.overhead_ms
        table.add_row(
            wake.node,
            _clock(wake.ready_at_agent) if wake.ready_at_agent else "",
            _clock(wake.resumed_at),
            wake.replica,
            ", ".join(
                part
                for part in (
                    "by reconcile" if wake.by_reconcile else "",
                    f"{overhead:.1f} ms" if overhead is not None else "",
                )
                if part
            ),
        )
    return table
