"""``nexusctl events unclaimed`` and the doctor's section of unclaimed events: the
documents and tables they print from Nexus's answers."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from nexus.cli import doctor, events
from nexus.cli.main import app
from schemas import api
from tests.unit.test_cli_output import FakeClient

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
AGENT = uuid.uuid4()
REGION = uuid.uuid4()
WIDE = {"COLUMNS": "200"}


@pytest.fixture
def fake_nexus(monkeypatch: pytest.MonkeyPatch) -> type[FakeClient]:
    FakeClient.replies = {}
    for module in (events, doctor):
        monkeypatch.setattr(module, "NexusClient", FakeClient)
    return FakeClient


def summary(total: int = 7) -> api.UnclaimedSummary:
    example = api.UnclaimedExample(
        message_id=uuid.uuid4(),
        wait_key=f"region:{REGION}:created",
        summary=f"region {REGION} created (generation 3)",
        arrived_at=T0 + timedelta(minutes=5),
        moved_at=T0 + timedelta(hours=1, minutes=5),
    )
    groups = (
        api.UnclaimedGroup(
            type="region.created",
            source=f"crucible/{AGENT}",
            count=5,
            oldest_at=T0,
            newest_at=T0 + timedelta(minutes=5),
            examples=(example,),
        ),
        api.UnclaimedGroup(
            type="instance.failed", source="sled/s1", count=2, oldest_at=T0, newest_at=T0
        ),
    )
    return api.UnclaimedSummary(total=total, scanned=7, group_count=3, groups=groups)


def reply(payload: api.UnclaimedSummary) -> api.UnclaimedEventsReply:
    return api.UnclaimedEventsReply(source="nexus/nexus-1", payload=payload)


def test_unclaimed_json_is_the_groups_with_counts_and_examples(
    fake_nexus: type[FakeClient],
) -> None:
    fake_nexus.replies[api.UnclaimedEventsList] = reply(summary())

    result = CliRunner().invoke(app, ["events", "unclaimed", "--output", "json"])

    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert (document["total"], document["group_count"]) == (7, 3)
    first = document["groups"][0]
    assert (first["type"], first["source"], first["count"]) == (
        "region.created",
        f"crucible/{AGENT}",
        5,
    )
    assert first["examples"][0]["wait_key"] == f"region:{REGION}:created"


def test_unclaimed_text_is_a_table_of_groups(fake_nexus: type[FakeClient]) -> None:
    fake_nexus.replies[api.UnclaimedEventsList] = reply(summary(total=9))

    result = CliRunner().invoke(app, ["events", "unclaimed"], env=WIDE)

    assert result.exit_code == 0, result.output
    assert "9 unclaimed events in 3 groups (grouped: the newest 7)" in result.stdout
    assert "the 2 largest groups shown" in result.stdout
    assert f"crucible/{AGENT}" in result.stdout
    assert f"region {REGION} created (generation 3)" in result.stdout


def test_no_unclaimed_events_is_one_line(fake_nexus: type[FakeClient]) -> None:
    empty = api.UnclaimedSummary(total=0, scanned=0, group_count=0)
    fake_nexus.replies[api.UnclaimedEventsList] = reply(empty)

    result = CliRunner().invoke(app, ["events", "unclaimed"])

    assert (result.exit_code, result.stdout) == (0, "no unclaimed events\n")


def test_the_doctor_shows_unclaimed_events_without_failing_for_them(
    fake_nexus: type[FakeClient],
) -> None:
    fake_nexus.replies[api.Doctor] = api.DoctorReply(
        source="nexus/nexus-1", payload=api.DoctorReport(checked_agents=5)
    )
    fake_nexus.replies[api.UnclaimedEventsList] = reply(summary())

    text = CliRunner().invoke(app, ["doctor"], env=WIDE)
    as_json = CliRunner().invoke(app, ["doctor", "--output", "json"])

    assert text.exit_code == 0, text.output
    assert "unclaimed events" in text.stdout and "region.created" in text.stdout
    assert "all consistent" in text.stdout
    assert as_json.exit_code == 0, as_json.output
    document = json.loads(as_json.stdout)
    assert document["healthy"] is True
    assert document["unclaimed"]["groups"][0]["count"] == 5
