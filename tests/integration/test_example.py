"""The runnable example (examples/trip) keeps working: both trips end as its README says.

Against the session's RabbitMQ, in a virtual host of its own (the example's queues have
fixed names, like a deployment's), and a fresh SQLite file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from examples.trip.main import run_example
from nexus.db.states import SagaState

pytestmark = pytest.mark.integration


async def test_trip_example_books_the_first_trip_and_unwinds_the_second(
    vhost_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = await run_example(
        vhost_url, f"sqlite+aiosqlite:///{tmp_path / 'trip.sqlite3'}", bank_delay=0.1
    )

    booked, declined = result.trips
    assert booked.state == SagaState.DONE
    assert booked.reservations == {"hotel": "booked", "flight": "booked", "car": "booked"}
    assert booked.resumed_by == "event"
    assert declined.state == SagaState.UNDONE
    assert declined.reservations == {"hotel": "released", "flight": "released", "car": "released"}
    # Failed by the bank's answer, not by the deadline (the saga log keeps no "resumed"
    # entry for a node whose resume failed: it rolled back with the failing step).
    assert declined.error is not None and "payment declined" in declined.error
    # Completed nodes are undone in the reverse of the order they completed in.
    assert declined.undone == ["charge", "car", "flight", "hotel"]
    assert result.ok
    story = capsys.readouterr().out
    assert "parked: waiting for payment:" in story
    assert "resumed by event after" in story
