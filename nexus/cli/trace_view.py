"""A saga's trace read from trace files (schemas/trace_file.py) and drawn as a span tree.

The standard library only: ``nexusctl saga trace`` needs no OpenTelemetry, and the tests
that collect the files of real processes use the same reading.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    service: str
    start_ns: int
    end_ns: int
    status: str
    attributes: dict[str, Any]

    @classmethod
    def of(cls, record: dict[str, Any]) -> Span:
        return cls(
            trace_id=record["trace_id"],
            span_id=record["span_id"],
            parent_span_id=record.get("parent_span_id"),
            name=record["name"],
            service=str(record.get("service") or "?"),
            start_ns=int(record["start_ns"]),
            end_ns=int(record["end_ns"]),
            status=str(record.get("status", "UNSET")),
            attributes=dict(record.get("attributes") or {}),
        )

    @property
    def milliseconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def load(paths: Iterable[Path]) -> list[Span]:
    """Every span of the files (a directory: its ``*.jsonl``); a torn last line (a
    process killed mid-write) is skipped."""
    spans: list[Span] = []
    for path in paths:
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        for file in files:
            for line in file.read_text(encoding="utf-8").splitlines():
                try:
                    spans.append(Span.of(json.loads(line)))
                except (ValueError, KeyError):
                    continue
    return spans


def saga_trace(spans: Sequence[Span], saga_id: str) -> list[Span]:
    """The spans of the trace(s) the saga's nodes ran in, oldest first."""
    traces = {s.trace_id for s in spans if s.attributes.get("saga.id") == saga_id}
    return sorted((s for s in spans if s.trace_id in traces), key=lambda s: s.start_ns)


def tree_lines(spans: Sequence[Span]) -> list[str]:
    """One line per span, indented under its parent: offset from the trace's start,
    duration, service, name. A span whose parent is not among them is a root."""
    if not spans:
        return []
    ids = {s.span_id for s in spans}
    children: dict[str | None, list[Span]] = defaultdict(list)
    for one in sorted(spans, key=lambda s: s.start_ns):
        parent = one.parent_span_id if one.parent_span_id in ids else None
        children[parent].append(one)
    start = min(s.start_ns for s in spans)
    lines: list[str] = []

    def draw(parent: str | None, depth: int) -> None:
        for one in children.get(parent, []):
            failed = "  ERROR" if one.status == "ERROR" else ""
            lines.append(
                f"{(one.start_ns - start) / 1e6:9.1f} ms {one.milliseconds:8.1f} ms  "
                f"{'  ' * depth}{one.name}  [{one.service}]{failed}"
            )
            draw(one.span_id, depth + 1)

    draw(None, 0)
    return lines
