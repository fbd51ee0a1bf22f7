"""nexusctl's output: timelines computed from a saga's log, and the JSON documents."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

from nexus.cli import disk, saga
from nexus.cli.client import ApiFailure, NexusClient
from nexus.cli.main import app
from nexus.cli.timeline import abbreviate, timeline, wakes
from schemas import api
from schemas.base import Envelope
from schemas.progress import DiskState

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
REGION = uuid.uuid4()


def at(ms: int) -> datetime:
    return T0 + timedelta(milliseconds=ms)


def disk_saga() -> api.SagaView:
    ready = at(900).isoformat()
    entries = [
        ("region_0", "started", "nexus-1", 100, None),
        ("region_0", "waiting", "nexus-1", 120, f"keys=['region:{REGION}:created'], deadline=x"),
        (
            "region_0",
            "resumed",
            "nexus-2",
            925,
            f"key=region:{REGION}:created, message_id={uuid.uuid4()}, by_reconcile=False, "
            f"event_occurred_at={ready}",
        ),
        ("region_0", "succeeded", "nexus-2", 930, None),
    ]
    return api.SagaView(
        id=uuid.uuid4(),
        name="disk_create",
        version=1,
        state="done",
        lease_owner=None,
        error=None,
        created_at=T0,
        updated_at=at(1000),
        log=tuple(
            api.SagaLogEntry(node=node, event=event, replica=replica, at=at(ms), detail=detail)
            for node, event, replica, ms, detail in entries
        ),
    )


def test_timeline_measures_each_node_from_its_start() -> None:
    rows = timeline(disk_saga())
    assert [(row.event, row.replica) for row in rows] == [
        ("started", "nexus-1"),
        ("waiting", "nexus-1"),
        ("resumed", "nexus-2"),
        ("succeeded", "nexus-2"),
    ]
    assert rows[0].offset_seconds == pytest.approx(0.1)
    assert rows[1].duration_seconds is None
    assert rows[2].duration_seconds == pytest.approx(0.825)
    assert rows[3].duration_seconds == pytest.approx(0.83)
    assert rows[2].detail == f"by event on region:{REGION}:created"


def test_wakes_give_the_gap_between_ready_at_the_agent_and_resumed() -> None:
    (wake,) = wakes(disk_saga())
    assert wake.node == "region_0"
    assert wake.replica == "nexus-2"
    assert wake.ready_at_agent == at(900)
    assert not wake.by_reconcile
    assert wake.overhead_ms == pytest.approx(25.0)


def test_long_details_are_abbreviated() -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    detail = f"keys=['region:{first}:created', 'region:{second}:failed'], deadline=x"
    assert abbreviate(detail) == f"for region:{str(first)[:8]}…:created (+1)"


class FakeClient:
    """Answers like Nexus would, in process: the reply for each request type."""

    replies: ClassVar[dict[type[Envelope], Envelope | ApiFailure]] = {}

    def __init__(self, amqp_url: str, *, timeout: float) -> None:
        self.source = "cli/test"

    async def __aenter__(self) -> FakeClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None

    async def call(self, request: Envelope, *expected: type[Any]) -> Any:
        reply = self.replies[type(request)]
        if isinstance(reply, ApiFailure):
            raise reply
        return reply


@pytest.fixture
def fake_nexus(monkeypatch: pytest.MonkeyPatch) -> type[FakeClient]:
    FakeClient.replies = {}
    for module in (disk, saga):
        monkeypatch.setattr(module, "NexusClient", FakeClient)
    return FakeClient


def test_saga_show_json_is_the_saga_with_its_wakes(fake_nexus: type[FakeClient]) -> None:
    view = disk_saga()
    fake_nexus.replies[api.SagaGet] = api.SagaReply(source="nexus/nexus-1", payload=view)
    result = CliRunner().invoke(app, ["saga", "show", str(view.id), "--output", "json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["id"] == str(view.id)
    assert [entry["event"] for entry in document["log"]] == [
        "started",
        "waiting",
        "resumed",
        "succeeded",
    ]
    assert document["wakes"][0]["replica"] == "nexus-2"
    assert document["wakes"][0]["overhead_ms"] == pytest.approx(25.0)


def test_saga_show_text_has_the_timeline(fake_nexus: type[FakeClient]) -> None:
    view = disk_saga()
    fake_nexus.replies[api.SagaGet] = api.SagaReply(source="nexus/nexus-1", payload=view)
    result = CliRunner().invoke(app, ["saga", "show", str(view.id)], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "region_0" in result.stdout
    assert "nexus-2" in result.stdout
    assert "25.0 ms" in result.stdout


def test_disk_list_json_is_a_list_of_disks(fake_nexus: type[FakeClient]) -> None:
    disk_view = api.DiskView(
        id=uuid.uuid4(),
        project="default",
        name="d1",
        size_bytes=1 << 30,
        block_size=512,
        state=DiskState.DETACHED,
        created_at=T0,
        updated_at=T0,
    )
    fake_nexus.replies[api.DiskList] = api.DiskListReply(source="nexus/n", payload=(disk_view,))
    result = CliRunner().invoke(app, ["disk", "list", "-o", "json"])
    assert result.exit_code == 0, result.output
    (document,) = json.loads(result.stdout)
    assert document["name"] == "d1"
    assert document["state"] == "detached"
    assert document["size_bytes"] == 1 << 30


def test_an_api_error_is_one_line_with_its_code(fake_nexus: type[FakeClient]) -> None:
    fake_nexus.replies[api.DiskCreate] = ApiFailure(
        api.ErrorCode.ALREADY_EXISTS, "a disk named 'd1' already exists in project 'default'"
    )
    result = CliRunner().invoke(app, ["disk", "create", "d1", "--size", "1GiB"])
    assert result.exit_code == 1
    assert result.stderr == (
        "error: a disk named 'd1' already exists in project 'default' (already_exists)\n"
    )


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (
            api.ErrorCode.CONFLICT,
            "request id 5b0e… was already used for a different request; "
            "send a new request with a new id",
        ),
        (
            api.ErrorCode.INVALID_REQUEST,
            "schema_violation: 2 error(s); payload.size_bytes: Input should be greater than 0; "
            "payload.name: String should match pattern '^[a-z]'",
        ),
    ],
)
def test_conflict_and_invalid_request_are_one_line_and_exit_1(
    fake_nexus: type[FakeClient], code: api.ErrorCode, message: str
) -> None:
    fake_nexus.replies[api.DiskCreate] = ApiFailure(code, message)
    result = CliRunner().invoke(app, ["disk", "create", "d1", "--size", "1GiB"])
    assert result.exit_code == 1
    assert result.stderr == f"error: {message} ({code.value})\n"


async def test_the_client_turns_an_error_reply_into_a_failure_with_its_code() -> None:
    request = api.DiskGet(source="cli/test", payload=api.ResourceRef(project="p", resource="d"))
    error = api.ApiError(
        source="nexus/n",
        payload=api.ApiErrorBody(code=api.ErrorCode.CONFLICT, message="used for another"),
        **request.caused(),
    )

    class Answering:
        async def request(self, message: Envelope, **_: object) -> Envelope:
            return error

    client = NexusClient("amqp://nowhere/", timeout=1)
    client._transport = Answering()  # type: ignore[assignment]
    with pytest.raises(ApiFailure) as failure:
        await client.call(request, api.DiskReply)
    assert failure.value.code is api.ErrorCode.CONFLICT
    assert str(failure.value) == "used for another (conflict)"


def test_create_without_wait_answers_with_the_saga(fake_nexus: type[FakeClient]) -> None:
    accepted = api.Accepted(saga_id=uuid.uuid4(), resource_id=uuid.uuid4())
    fake_nexus.replies[api.DiskCreate] = api.AcceptedReply(source="nexus/n", payload=accepted)
    result = CliRunner().invoke(app, ["disk", "create", "d1", "--size", "1GiB", "-o", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "saga_id": str(accepted.saga_id),
        "resource_id": str(accepted.resource_id),
        "state": "accepted",
        "saga": None,
    }
