"""The event intake: a message it has no handler for changes nothing."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nexus.saga.clock import ManualClock
from schemas.region import RegionDelete, RegionRef
from tests.saga_support import Database, Replica


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    db = await Database.migrated(f"sqlite+aiosqlite:///{tmp_path / 'nexus.sqlite3'}")
    yield db
    await db.close()


async def test_a_message_with_no_handler_is_logged_and_ignored(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    stray = RegionDelete(source="nexus/test", payload=RegionRef(id=uuid.uuid4()))

    with caplog.at_level(logging.WARNING, logger="nexus.events"):
        ingested = await Replica(database, "a", clock=ManualClock()).deliver(stray)

    assert ingested.woken is None
    assert [record.getMessage() for record in caplog.records] == [
        f"nexus.events got a {RegionDelete.TYPE}; ignored"
    ]
