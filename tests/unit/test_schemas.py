"""The wire contract: every message round-trips, bad bytes are refused with a reason."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError
from sqlalchemy import BigInteger, Integer

from nexus.db import models as db
from schemas import export
from schemas.api import DiskCreateRequest, DiskView, InstanceCreateRequest
from schemas.base import MAX_SAFE_INTEGER, command_id
from schemas.identity import crucible_source, queue_agent, sled_source
from schemas.instance import Vmm
from schemas.messages import MAX_BODY_BYTES, MESSAGE_TYPES, MessageRejected, decode, encode
from schemas.region import Region, RegionEnsure, RegionSpec, RegionStateChanged
from schemas.sled import CrucibleAgentInfo, SledInfo
from schemas.topology import NEXUS_API_QUEUE, crucible_queue, sled_queue
from tests.examples import BUILDERS, example


def test_every_message_type_has_an_example() -> None:
    assert sorted(BUILDERS) == sorted(MESSAGE_TYPES)


@pytest.mark.parametrize("message_type", sorted(MESSAGE_TYPES))
def test_message_round_trips_through_bytes(message_type: str) -> None:
    message = example(message_type)
    assert message_type == message.TYPE
    decoded = decode(encode(message))
    assert type(decoded) is MESSAGE_TYPES[message_type]
    assert decoded == message


def test_messages_are_frozen() -> None:
    message = example("region.ensure.v1")
    with pytest.raises(ValidationError):
        message.source = "nexus/other"  # type: ignore[misc]


def test_unknown_fields_are_refused() -> None:
    body = json.loads(encode(example("region.get.v1")))
    body["payload"]["colour"] = "blue"
    with pytest.raises(MessageRejected) as error:
        decode(json.dumps(body).encode())
    assert error.value.reason == "schema_violation"
    assert "colour" in error.value.detail


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe not json", "invalid_json"),
        (b'{"type": "region.teleport.v1"}', "unknown_type"),
        (b'{"source": "nexus/a"}', "unknown_type"),
        (
            b'{"type": "region.get.v1", "source": "nexus/a", "payload": {"id": 7}}',
            "schema_violation",
        ),
        (b"[" * (MAX_BODY_BYTES + 1), "too_large"),
    ],
)
def test_bad_bytes_are_refused_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(MessageRejected) as error:
        decode(body)
    assert error.value.reason == reason


def test_region_fields_follow_crucible() -> None:
    fields = set(Region.model_fields)
    assert {
        "id",
        "block_size",
        "extent_size",
        "extent_count",
        "encrypted",
        "port_number",
        "read_only",
        "source",
        "state",
    } <= fields
    with pytest.raises(ValidationError):
        RegionSpec(id=uuid.uuid4(), block_size=1000, extent_size=1, extent_count=1)
    with pytest.raises(ValidationError):
        RegionSpec(id=uuid.uuid4(), block_size=512, extent_size=0, extent_count=1)


def test_command_ids_are_deterministic_per_saga_and_node() -> None:
    saga = uuid.uuid4()
    assert command_id(saga, "regions_ensure") == command_id(saga, "regions_ensure")
    assert command_id(saga, "regions_ensure") != command_id(saga, "regions_delete")
    assert command_id(saga, "regions_ensure") != command_id(uuid.uuid4(), "regions_ensure")


def test_event_routing_key_follows_state() -> None:
    event = example("region.state_changed.v1")
    assert isinstance(event, RegionStateChanged)
    assert event.routing_key() == f"region.{event.payload.region.state.value}"
    assert not isinstance(event, RegionEnsure)


def test_checked_in_json_schemas_are_current() -> None:
    stale = export.stale_files()
    assert not stale, f"run `python -m schemas.export`; stale: {stale}"


# Bounded numbers: a value the database cannot store is refused at parsing (issue #12).

BIGINT_MAX = 2**63 - 1
INTEGER_MAX = 2**31 - 1


def _integers(node: object, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every ``"type": "integer"`` in a JSON Schema, with where it is."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            yield path, node
        for key, value in node.items():
            yield from _integers(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _integers(value, f"{path}/{index}")


@pytest.mark.parametrize("file_name", sorted(export.rendered()))
def test_every_integer_in_the_published_schemas_is_bounded(file_name: str) -> None:
    schema = json.loads(export.rendered()[file_name])
    for path, integer in _integers(schema, file_name):
        low = integer.get("minimum", integer.get("exclusiveMinimum"))
        high = integer.get("maximum", integer.get("exclusiveMaximum"))
        assert low is not None and high is not None, f"{path} is unbounded: {integer}"
        assert low >= 0 and high <= MAX_SAFE_INTEGER, f"{path}: {integer}"


def _maximum(model: type[BaseModel], field: str) -> int:
    schema = model.model_json_schema()["properties"][field]
    # An optional number: the bound is on its integer branch.
    schema = next((s for s in schema.get("anyOf", ()) if s.get("type") == "integer"), schema)
    return int(schema.get("maximum", schema.get("exclusiveMaximum", BIGINT_MAX + 1)))


@pytest.mark.parametrize(
    ("model", "table"),
    [
        (Region, db.Region),
        (Vmm, db.Vmm),
        (InstanceCreateRequest, db.Instance),
        (SledInfo, db.Sled),
        (CrucibleAgentInfo, db.Dataset),
        (DiskCreateRequest, db.Disk),
        (DiskView, db.Disk),
    ],
)
def test_every_number_nexus_stores_fits_its_column(
    model: type[BaseModel], table: type[db.Base]
) -> None:
    columns = table.__table__.columns
    shared = [name for name in model.model_fields if name in columns]
    stored = [name for name in shared if isinstance(columns[name].type, Integer)]
    assert stored, f"{model.__name__} shares no integer column with {table.__name__}"
    for name in stored:
        column_max = BIGINT_MAX if isinstance(columns[name].type, BigInteger) else INTEGER_MAX
        assert _maximum(model, name) <= column_max, f"{model.__name__}.{name}"


def test_a_generation_the_database_cannot_store_is_refused_at_parsing() -> None:
    body = json.loads(encode(example("region.state_changed.v1")))
    body["payload"]["region"]["generation"] = 2**63
    body["payload"]["region"]["port_number"] = 70_000
    with pytest.raises(MessageRejected) as error:
        decode(json.dumps(body).encode())
    assert error.value.reason == "schema_violation"
    assert "payload.region.generation" in error.value.detail
    assert "payload.region.port_number" in error.value.detail


def test_only_the_agent_a_queue_is_named_after_answers_on_it() -> None:
    agent = uuid.uuid4()
    assert queue_agent(crucible_queue(agent)) == crucible_source(agent)
    assert queue_agent(sled_queue(agent)) == sled_source(agent)
    for nobodys in (
        NEXUS_API_QUEUE,
        f"crucible.{str(agent).upper()}",
        f"crucible.{agent.hex}",
        f"crucible.{agent}.x",
        f"sled.{{{agent}}}",
        "reply.nexus.0123",
    ):
        assert queue_agent(nobodys) is None, nobodys
