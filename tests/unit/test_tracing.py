"""Traces (schemas/tracing.py): the W3C context in headers, through the outboxes of Nexus
and both agents, kept with a saga so that any replica continues its trace; nothing at
all while tracing is off."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import select

from crucible_agent.store import AgentStore, Cause
from nexus.saga.clock import ManualClock
from nexus.saga.outbox import NexusOutboxStore, Outbox, outbox
from nexus.sagas import disk_create
from schemas import tracing
from schemas.outbox import OutboxRelay, OutgoingMessage
from schemas.topology import EVENTS_EXCHANGE
from sled_agent.store import SledStore
from tests.examples import a_region, example
from tests.saga_support import Database, FakeCrucible, Replica

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, into memory; off again afterwards."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.install(None)


def trace_id(headers: Mapping[str, str]) -> str:
    return headers["traceparent"].split("-")[1]


def span_id(headers: Mapping[str, str]) -> str:
    return headers["traceparent"].split("-")[2]


def hex_ids(span: ReadableSpan) -> tuple[str, str, str | None]:
    context = span.get_span_context()
    assert context is not None
    parent = f"{span.parent.span_id:016x}" if span.parent is not None else None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}", parent


def an_event() -> OutgoingMessage:
    event = example("region.state_changed.v1")
    return OutgoingMessage.of(event, exchange=EVENTS_EXCHANGE, routing_key="region.x")


# Off.


def test_off_nothing_is_carried_and_no_span_is_made() -> None:
    assert not tracing.enabled()
    assert tracing.current_headers() == {}
    assert tracing.span("x", parent={"traceparent": TRACEPARENT}) is tracing.OFF
    assert tracing.consuming({"traceparent": TRACEPARENT}, lambda: ("x", {})) is tracing.OFF
    assert an_event().trace_context == {}


def test_off_unless_the_environment_or_a_trace_file_asks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert not tracing.configure("nexus/a", trace_file=None, role="nexus")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not tracing.configure("nexus/a", trace_file=None, role="nexus")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "jaeger")
    with pytest.raises(ValueError, match="jaeger"):
        tracing.configure("nexus/a", trace_file=None, role="nexus")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(ValueError, match="http/protobuf"):
        tracing.configure("nexus/a", trace_file=None, role="nexus")
    assert not tracing.enabled()


def test_an_otlp_endpoint_turns_tracing_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    try:
        assert tracing.configure("nexus/a", trace_file=None, role="nexus")
        assert tracing.enabled()
    finally:
        tracing.install(None)


def test_the_trace_file_has_each_span_as_it_ends(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "spans" / "nexus.jsonl"
    assert tracing.configure("nexus/a", trace_file=path, role="nexus")
    try:
        with tracing.span("outer"), tracing.span("inner", attributes={"k": 1}):
            headers = tracing.current_headers()
        # Written before any shutdown: a killed process keeps what it finished.
        records = [json.loads(line) for line in path.read_text().splitlines()]
    finally:
        tracing.shutdown()
    inner, outer = records
    assert (inner["name"], outer["name"]) == ("inner", "outer")
    assert inner["trace_id"] == outer["trace_id"] == trace_id(headers)
    assert inner["span_id"] == span_id(headers)
    assert inner["parent_span_id"] == outer["span_id"] and outer["parent_span_id"] is None
    assert inner["service"] == "nexus/a" and inner["attributes"] == {"k": 1}
    assert not tracing.enabled()


# Headers.


def test_a_consumer_continues_the_trace_its_headers_carry(
    spans: InMemorySpanExporter,
) -> None:
    with tracing.span("send"):
        headers = tracing.current_headers()
    assert headers["traceparent"].startswith("00-")
    amqp_headers: dict[str, Any] = {**headers, "x-other": 3}
    with tracing.consuming(amqp_headers, lambda: ("handle region.ensure.v1", {"q": "x"})):
        inside = tracing.current_headers()
    sent, handled = spans.get_finished_spans()
    assert handled.name == "handle region.ensure.v1"
    assert hex_ids(handled)[0] == hex_ids(sent)[0] == trace_id(inside)
    assert hex_ids(handled)[2] == hex_ids(sent)[1]


def test_a_message_without_headers_starts_a_trace_of_its_own(
    spans: InMemorySpanExporter,
) -> None:
    with tracing.span("unrelated"), tracing.consuming({}, lambda: ("handle x", {})):
        pass
    handled, unrelated = spans.get_finished_spans()
    assert handled.parent is None and hex_ids(handled)[0] != hex_ids(unrelated)[0]


def test_work_of_a_stored_trace_stays_in_it_with_a_link_to_what_woke_it(
    spans: InMemorySpanExporter,
) -> None:
    stored = {"traceparent": TRACEPARENT}
    with tracing.span("woken by"), tracing.span("node", parent=stored):
        pass
    node, waker = spans.get_finished_spans()
    assert hex_ids(node)[0] == trace_id(stored) and hex_ids(node)[2] == span_id(stored)
    assert [f"{link.context.span_id:016x}" for link in node.links] == [hex_ids(waker)[1]]
    # Woken from within the stored trace: a plain child of what woke it.
    with tracing.span("event", parent=stored), tracing.span("node again", parent=stored):
        pass
    again, event = spans.get_finished_spans()[2:]
    assert hex_ids(again)[2] == hex_ids(event)[1] and not again.links


# The outboxes.


async def test_the_agents_outboxes_keep_the_context_of_the_row(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    with tracing.span("handle"):
        message = an_event()
        cause = Cause(message_id=uuid.uuid4(), correlation_id=uuid.uuid4())
        caused = Cause.of(example("region.ensure.v1"))
    assert message.trace_context and cause.trace_context == {}
    crucible = await AgentStore.open(tmp_path / "agent.sqlite")
    try:
        region = a_region()
        async with crucible.transaction() as tx:
            await tx.send(message)
            await tx.insert(region, caused)
        assert [row.trace_context for row in await crucible.unsent(10)] == [message.trace_context]
        assert (await crucible.cause(region.id)).trace_context == caused.trace_context
    finally:
        await crucible.close()
    sled = SledStore(tmp_path / "sled.sqlite")
    await sled.open()
    try:
        await sled.save([], [message])
        assert [row.trace_context for row in await sled.unsent(10)] == [message.trace_context]
    finally:
        await sled.close()


async def test_an_agent_database_from_before_traces_gets_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "agent.sqlite"
    store = await AgentStore.open(path)
    await store.close()
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE regions DROP COLUMN trace_context")
        db.execute("ALTER TABLE outbox DROP COLUMN trace_context")
    store = await AgentStore.open(path)
    try:
        async with store.transaction() as tx:
            await tx.send(an_event())
        assert [row.trace_context for row in await store.unsent(10)] == [{}]
    finally:
        await store.close()


class Published:
    """A transport that keeps the headers of what it was asked to publish."""

    def __init__(self) -> None:
        self.headers: list[dict[str, Any] | None] = []

    async def publish_bytes(self, body: bytes, **kwargs: Any) -> None:
        self.headers.append(kwargs.get("headers"))


async def test_nexus_outbox_rows_carry_the_context_to_the_wire(
    spans: InMemorySpanExporter, database: Database
) -> None:
    clock = ManualClock()
    outbox = Outbox(clock.now)
    with tracing.span("saga node"):
        node = tracing.current_headers()
        row = outbox.row(example("region.ensure.v1"), exchange="x", routing_key="y")
    async with database.sessions.begin() as session:
        await outbox.add_rows(session, [row])
    store = NexusOutboxStore(database.sessions, outbox, clock=clock.now)
    (unsent,) = await store.unsent(10)
    assert unsent.trace_context == node

    wire = Published()
    relay = OutboxRelay(store, wire)  # type: ignore[arg-type]
    await relay.flush()
    (headers,) = wire.headers
    assert headers is not None and trace_id(headers) == trace_id(node)
    # The relay's publish span, a child of the node's, is the consumer's parent.
    publish = spans.get_finished_spans()[-1]
    assert publish.name == "publish region.ensure.v1"
    assert hex_ids(publish)[1] == span_id(headers) and hex_ids(publish)[2] == span_id(node)


async def test_a_relay_that_does_not_trace_passes_the_stored_context_on() -> None:
    row = OutgoingMessage.of(example("region.ensure.v1"), exchange="x", routing_key="y")
    stored = OutgoingMessage(**{**row.__dict__, "trace_context": {"traceparent": TRACEPARENT}})

    class One:
        async def unsent(self, limit: int) -> list[OutgoingMessage]:
            return [stored]

        async def mark_sent(self, message_ids: object) -> None:
            pass

    wire = Published()
    await OutboxRelay(One(), wire).flush()  # type: ignore[arg-type]
    assert wire.headers == [{"traceparent": TRACEPARENT}]


# A saga.


async def test_a_saga_resumed_on_another_replica_continues_its_trace(
    spans: InMemorySpanExporter, database: Database
) -> None:
    await database.add_datasets(3)
    a = Replica(database, "a", clock=ManualClock())
    b = Replica(database, "b", clock=ManualClock())
    crucible = FakeCrucible.new(database)
    params = disk_create.Params(
        disk_id=uuid.uuid4(), project="p", name="d", size_bytes=3 << 30, block_size=512
    )
    with tracing.span("api request"):
        request = tracing.current_headers()
        saga_id = await a.executor.start(disk_create.DEFINITION, params)
    saga = await database.saga(saga_id)
    assert saga.params[tracing.SAGA_TRACE_PARAM] == request
    async with database.sessions() as session:
        rows = (await session.execute(select(outbox.c.routing_key, outbox.c.headers))).all()
    commands = [row.headers for row in rows if row.routing_key.startswith("crucible.")]
    assert len(commands) == 3 and {trace_id(h) for h in commands} == {trace_id(request)}

    # B runs it with no span of its own (an adoption, a sweep): the stored trace it is.
    for event in await crucible.created_events():
        await b.deliver(event)
    assert (await database.saga(saga_id)).state == "done"
    nodes = [s for s in spans.get_finished_spans() if s.name.startswith("disk_create.")]
    assert {hex_ids(s)[0] for s in nodes} == {trace_id(request)}
    by_replica = {(s.attributes or {}).get("nexus.replica") for s in nodes}
    assert by_replica == {"a", "b"}
    resumed = [s for s in nodes if s.name.endswith(" resume")]
    assert resumed and all(hex_ids(s)[2] == span_id(request) for s in resumed)


async def test_each_resume_is_a_child_of_the_event_that_woke_its_node(
    spans: InMemorySpanExporter, database: Database
) -> None:
    """One run resumes every node that is ready, whichever event started it: each
    resume's parent is still the handling of its own node's event."""
    await database.add_datasets(3)
    a = Replica(database, "a", clock=ManualClock())
    b = Replica(database, "b", clock=ManualClock())
    crucible = FakeCrucible.new(database)
    params = disk_create.Params(
        disk_id=uuid.uuid4(), project="p", name="d", size_bytes=3 << 30, block_size=512
    )
    with tracing.span("api request"):
        saga_id = await a.executor.start(disk_create.DEFINITION, params)
        agent = tracing.current_headers()
    handled: dict[str, str] = {}
    for event in await crucible.created_events():
        with tracing.consuming(agent, lambda: ("handle event", {})):
            ingested = await b.intake.ingest(event)
            assert ingested.woken is not None
            handled[ingested.woken.node] = span_id(tracing.current_headers())
            b.executor.spawn(saga_id, woken=ingested.woken.node)
    await b.executor.drain()
    assert (await database.saga(saga_id)).state == "done"
    resumed = {
        str((s.attributes or {})["saga.node"]): hex_ids(s)[2]
        for s in spans.get_finished_spans()
        if s.name.endswith(" resume")
    }
    assert resumed == handled and len(set(handled.values())) == 3


def test_otel_service_name_names_the_process_when_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "nexus-east")
    path = tmp_path / "spans.jsonl"
    assert tracing.configure("nexus/a", trace_file=path, role="nexus")
    try:
        with tracing.span("one"):
            pass
    finally:
        tracing.shutdown()
    assert json.loads(path.read_text())["service"] == "nexus-east"
