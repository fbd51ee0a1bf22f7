"""The wire contract: every message round-trips, bad bytes are refused with a reason."""

from __future__ import annotations

import json
import uuid

import pytest
from pydantic import ValidationError

from schemas import export
from schemas.base import command_id
from schemas.messages import MAX_BODY_BYTES, MESSAGE_TYPES, MessageRejected, decode, encode
from schemas.region import Region, RegionEnsure, RegionSpec, RegionStateChanged
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
