"""Traces: OpenTelemetry spans, and the W3C trace context that ties them across processes.

One disk create is one trace. The context (``traceparent``, ``tracestate``) travels
wherever the work does: in the AMQP headers of every message, in the outbox rows a
message waits in (Nexus's ``headers`` JSON, a ``trace_context`` column in the agents'
tables), in a saga's parameters (so that whichever replica runs a node later, after
an event, an adoption or a restart, continues the same trace), and in a crucible
region's record (so that its worker's create, long after the command was acked,
belongs to the command's trace).

Tracing is off unless a process is configured for it (:func:`configure`): then every
helper here returns at once (``enabled()`` is one global read) and nothing is written
into headers or rows. It is on when the standard OpenTelemetry variables ask for an
exporter (``OTEL_TRACES_EXPORTER=otlp`` or ``console``, or an
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; OTLP over
HTTP/protobuf, batched), or when the service's trace file is set (``NEXUS_TRACE_FILE``,
``CRUCIBLE_TRACE_FILE``, ``SLED_TRACE_FILE``): one JSON object per finished span, written
as it ends, so that a test collects the spans of processes it kills.

The OpenTelemetry API is imported with this module (16 ms, only by what imports the
transport); the SDK and the exporters only by :func:`configure`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Tracer
from opentelemetry.trace import SpanKind as SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

# The headers that carry the context (W3C Trace Context), in messages and in rows.
TRACE_HEADERS = ("traceparent", "tracestate")
# The key of a saga's parameters that holds the trace it belongs to.
SAGA_TRACE_PARAM = "_trace"

_PROPAGATOR = TraceContextTextMapPropagator()
_tracer: Tracer | None = None
_provider: TracerProvider | None = None

Headers = Mapping[str, str]


def enabled() -> bool:
    return _tracer is not None


# Configuration.


def configure(service_name: str, *, trace_file: Path | None, role: str) -> bool:
    """Turn tracing on for this process when the environment or ``trace_file`` asks for
    it; returns whether it did. ``service_name``: this process (``nexus/<replica>``,
    ``crucible/<agent>``, ``sled/<sled>``), unless ``OTEL_SERVICE_NAME`` says otherwise;
    ``role``: which kind of process it is."""
    exporters = _exporters_from_environment()
    if not exporters and trace_file is None:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = Resource.create(
        {
            # Given attributes win over the environment's: the variable is looked up here.
            "service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name,
            "service.namespace": "eventplane",
            "eventplane.role": role,
        }
    )
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    if trace_file is not None:
        # Written as each span ends: a process that is killed loses none of its spans.
        from schemas.trace_file import JsonLinesExporter

        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(trace_file)))
    install(provider)
    return True


def install(provider: TracerProvider | None) -> None:
    """Trace through ``provider`` from now on (None: tracing off). Tests install one
    with an in-memory exporter."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer("eventplane") if provider is not None else None


def shutdown() -> None:
    """Export what is still buffered (a process that ends calls this)."""
    provider = _provider
    install(None)
    if provider is not None:
        provider.shutdown()


def _exporters_from_environment() -> list[SpanExporter]:
    names = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not names and (
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        names = "otlp"
    exporters: list[SpanExporter] = []
    for name in filter(None, (part.strip() for part in names.split(","))):
        if name == "none":
            continue
        if name == "otlp":
            exporters.append(_otlp_exporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (otlp, console)")
    return exporters


def _otlp_exporter() -> SpanExporter:
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    )
    if protocol not in ("", "http/protobuf"):
        raise ValueError(
            f"OTLP protocol {protocol!r} is not supported here: only http/protobuf "
            "(an OpenTelemetry Collector accepts it on port 4318)"
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


# Carrying the context.


def current_headers() -> dict[str, str]:
    """The current span's context as headers (empty when tracing is off or no span)."""
    if _tracer is None:
        return {}
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier


def headers_of(carrier: Mapping[str, Any] | None) -> dict[str, str]:
    """The trace headers among ``carrier``'s (AMQP headers, a row's JSON)."""
    if not carrier:
        return {}
    return {key: carrier[key] for key in TRACE_HEADERS if isinstance(carrier.get(key), str)}


def dumps(headers: Headers) -> str | None:
    """Headers as a column keeps them (None: no context)."""
    return json.dumps(dict(headers), separators=(",", ":")) if headers else None


def loads(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    try:
        return headers_of(json.loads(text))
    except ValueError:
        return {}


# Spans.


Attributes = Mapping[str, str | int | bool]
# What a helper returns while tracing is off: nothing to enter, nothing to allocate.
OFF: AbstractContextManager[None] = contextlib.nullcontext()


def span(
    name: str,
    *,
    parent: Headers | None = None,
    via: Headers | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Attributes | None = None,
) -> AbstractContextManager[None]:
    """A span around the block, current inside it (what the block sends carries it).

    Its parent is what caused the work, ``via`` (an event's handling) or else the
    current span, when that belongs to ``parent``'s trace (or when no ``parent`` is
    given); otherwise ``parent`` itself, with a link to the cause: work that belongs to
    a stored trace (a saga's, a region's) stays in it whoever woke it. Without any of
    them it starts a trace.
    """
    if _tracer is None:
        return OFF
    return _span(_tracer, name, parent, via, kind, attributes)


def consuming(
    headers: Mapping[str, Any] | None, describe: Callable[[], tuple[str, Attributes]]
) -> AbstractContextManager[None]:
    """The span of a consumer handling a message, a child of the span that sent it;
    ``describe`` gives its name and attributes (called only while tracing is on)."""
    if _tracer is None:
        return OFF
    name, attributes = describe()
    return _consuming(_tracer, name, headers_of(headers), attributes)


@contextlib.contextmanager
def _span(
    tracer: Tracer,
    name: str,
    parent: Headers | None,
    via: Headers | None,
    kind: SpanKind,
    attributes: Attributes | None,
) -> Iterator[None]:
    context, links = _parent_context(parent, via)
    with tracer.start_as_current_span(
        name, context=context, kind=kind, attributes=attributes, links=links
    ):
        yield


@contextlib.contextmanager
def _consuming(
    tracer: Tracer, name: str, headers: Headers, attributes: Attributes
) -> Iterator[None]:
    # Without headers, a trace of its own (not whatever context the consumer runs in).
    context = _PROPAGATOR.extract(dict(headers))
    with tracer.start_as_current_span(
        name, context=context, kind=SpanKind.CONSUMER, attributes=attributes
    ):
        yield


def _parent_context(
    parent: Headers | None, via: Headers | None
) -> tuple[Context | None, list[Link]]:
    """The context a new span starts in (None: the current one), and its links."""
    cause_context: Context | None = None  # the current one
    if via:
        extracted = _PROPAGATOR.extract(dict(via))
        if trace.get_current_span(extracted).get_span_context().is_valid:
            cause_context = extracted
    cause = trace.get_current_span(cause_context).get_span_context()
    if not parent:
        return cause_context, []
    stored_context = _PROPAGATOR.extract(dict(parent))
    stored = trace.get_current_span(stored_context).get_span_context()
    if not stored.is_valid:
        return cause_context, []
    if cause.is_valid and cause.trace_id == stored.trace_id:
        return cause_context, []
    return stored_context, [Link(cause)] if cause.is_valid else []
