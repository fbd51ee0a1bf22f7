"""``nexusctl doctor`` against the real rack: it believes Nexus's records only as far as
the agents themselves confirm them. A healthy rack gives exit 0; a forged placement in
Nexus's database, or a region created at an agent behind Nexus's back, gives exit 1 and
says what is wrong."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest

from schemas.region import RegionEnsure, RegionSpec
from schemas.topology import crucible_queue
from schemas.transport import Transport
from tests.e2e.conftest import Rack

pytestmark = pytest.mark.e2e

PROJECT = "doctor"


def test_a_healthy_rack_passes_and_every_forged_placement_is_reported(rack: Rack) -> None:
    rack.all_ok(
        [["disk", "create", name, "--size", "64MiB", "-p", PROJECT, "--wait"] for name in "ab"]
    )
    healthy = rack.ctl("doctor")
    assert healthy.code == 0, healthy.document
    assert (healthy.document["healthy"], healthy.document["findings"]) == (True, [])
    # A disk create leaves no unclaimed event behind, nor would a delete's tombstones.
    assert healthy.document["unclaimed"]["total"] == 0

    database = rack.state_dir / "nexus.sqlite3"
    disk = disk_id(database, "a")
    first, second, _ = regions_of(database, disk)

    # Two regions of one disk on one sled: its first region's row moved onto the
    # dataset of its second.
    with forged(database, "regions", "dataset_id", second[1], first[0]):
        assert findings_of(rack) == {
            ("disk_regions_share_sled", str(disk)),
            ("region_missing", str(first[0])),
            ("region_wrong_dataset", str(first[0])),
        }
    # A state Nexus never heard from the agent (as a forged event would leave it).
    with forged(database, "regions", "generation", 1 << 62, first[0]):
        assert findings_of(rack) == {("region_state_mismatch", str(first[0]))}
    # A dataset recorded with another agent's queue (as a forged announcement left it):
    # Nexus would command that agent; the doctor asks the dataset's own.
    foreign = crucible_queue(second[1])
    with forged(database, "datasets", "queue_name", foreign, first[1]):
        assert findings_of(rack) == {("agent_identity", str(first[1]))}
    assert rack.ctl("doctor").code == 0

    # A region created at an agent by someone other than Nexus.
    stray = uuid.uuid4()
    asyncio.run(ensure_behind_nexus(rack.amqp_url, first[1], stray))
    assert findings_of(rack) == {("region_unknown", str(stray))}


def findings_of(rack: Rack) -> set[tuple[str, str]]:
    report = rack.ctl("doctor")
    assert report.code == 1, report.document
    assert report.document["healthy"] is False
    assert report.document["unreachable_agents"] == []
    return {(finding["kind"], finding["object_id"]) for finding in report.document["findings"]}


async def ensure_behind_nexus(amqp_url: str, dataset: uuid.UUID, region_id: uuid.UUID) -> None:
    """What Nexus would send to create a region, sent by someone else; back once the
    agent has taken it."""
    spec = RegionSpec(id=region_id, block_size=512, extent_size=64, extent_count=2)
    async with Transport(amqp_url, name="test: behind Nexus's back") as transport:
        ensure = RegionEnsure(source="cli/test", payload=spec)
        await transport.request(ensure, routing_key=crucible_queue(dataset), timeout=10)


# Nexus's SQLite database, as the replicas share it (uuids are stored as 32 hex digits).


def disk_id(database: Path, name: str) -> uuid.UUID:
    (found,) = query(database, "SELECT id FROM disks WHERE project = ? AND name = ?", PROJECT, name)
    return uuid.UUID(found[0])


def regions_of(database: Path, disk: uuid.UUID) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """(region id, dataset id) of each region of ``disk``."""
    rows = query(database, "SELECT id, dataset_id FROM regions WHERE disk_id = ?", disk.hex)
    return sorted((uuid.UUID(region), uuid.UUID(dataset)) for region, dataset in rows)


def query(database: Path, sql: str, *parameters: Any) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(database, timeout=30)) as connection:
        return connection.execute(sql, parameters).fetchall()


@contextmanager
def forged(
    database: Path, table: str, column: str, value: object, row: uuid.UUID
) -> Iterator[None]:
    """One column of one row changed while the block runs, then put back."""
    select = f"SELECT {column} FROM {table} WHERE id = ?"
    update = f"UPDATE {table} SET {column} = ? WHERE id = ?"
    ((before,),) = query(database, select, row.hex)
    write(database, update, value.hex if isinstance(value, uuid.UUID) else value, row.hex)
    try:
        yield
    finally:
        write(database, update, before, row.hex)


def write(database: Path, sql: str, *parameters: Any) -> None:
    with closing(sqlite3.connect(database, timeout=30)) as connection, connection:
        assert connection.execute(sql, parameters).rowcount == 1
