"""``nexusctl doctor`` against the real rack: it believes Nexus's records only as far as
the agents themselves confirm them. A healthy rack gives exit 0; a forged placement in
Nexus's database, or a region created at an agent behind Nexus's back, gives exit 1 and
says what is wrong. And the events no saga claimed are listed, from real agents."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from nexus.db.engine import create_engine, create_sessionmaker
from nexus.saga import rendezvous
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
    assert rack.ctl("doctor").code == 0

    # A dataset recorded with another agent's queue, as an announcement under a new id
    # would leave it: Nexus would command that agent. The doctor asks the dataset's own
    # queue, which nothing consumes. (A live agent's own row would be rewritten by its
    # next announcement, within a second.)
    ghost = uuid.uuid4()
    insert_dataset(database, ghost, queue=crucible_queue(second[1]))
    report = rack.ctl("doctor")
    assert report.code == 1, report.document
    assert report.document["unreachable_agents"] == [f"crucible {ghost}"]
    assert [(f["kind"], f["object_id"]) for f in report.document["findings"]] == [
        ("agent_identity", str(ghost))
    ]
    write(database, "DELETE FROM datasets WHERE id = ?", ghost.hex)
    assert rack.ctl("doctor").code == 0

    # A region created at an agent by someone other than Nexus.
    stray = uuid.uuid4()
    asyncio.run(ensure_behind_nexus(rack.amqp_url, first[1], stray))
    assert findings_of(rack) == {("region_unknown", str(stray))}


def test_unclaimed_events_are_listed_and_a_delete_leaves_none(rack: Rack) -> None:
    """Real agents' events, recorded by real replicas; an hour's retention later (the
    sweep Nexus runs, run here with a cutoff a day ahead), ``nexusctl events unclaimed``
    lists the one no saga could claim: a region created behind Nexus's back. The three
    ``tombstoned`` of a disk delete were never kept."""
    rack.ok("disk", "create", "a", "--size", "64MiB", "-p", PROJECT, "--wait")
    rack.ok("disk", "delete", "a", "-p", PROJECT, "--wait")
    database = rack.state_dir / "nexus.sqlite3"
    dataset = regions_of(database, disk_id(database, "a"))[0][1]
    stray = uuid.uuid4()
    asyncio.run(ensure_behind_nexus(rack.amqp_url, dataset, stray))
    key = f"region:{stray}:created"
    deadline = time.monotonic() + 30
    while not query(database, "SELECT 1 FROM wait_rendezvous WHERE wait_key = ?", key):
        assert time.monotonic() < deadline, "Nexus never recorded the stray region's creation"
        time.sleep(0.2)

    assert asyncio.run(sweep_as_if_a_day_passed(database)) == 1

    listed = rack.ok("events", "unclaimed")
    assert (listed["total"], listed["group_count"]) == (1, 1)
    (group,) = listed["groups"]
    assert (group["type"], group["source"], group["count"]) == (
        "region.created",
        f"crucible/{dataset}",
        1,
    )
    assert [example["wait_key"] for example in group["examples"]] == [key]
    # The doctor shows them too, and its verdict is about the region, not the event.
    report = rack.ctl("doctor")
    assert report.document["unclaimed"]["total"] == 1
    assert {(f["kind"], f["object_id"]) for f in report.document["findings"]} == {
        ("region_unknown", str(stray))
    }


async def sweep_as_if_a_day_passed(database: Path) -> int:
    """What every replica's sweeper does once a minute, with a cutoff a day ahead."""
    engine = create_engine(f"sqlite+aiosqlite:///{database}")
    try:
        async with create_sessionmaker(engine).begin() as session:
            later = datetime.now(UTC) + timedelta(days=1)
            return await rendezvous.sweep_unclaimed(session, older_than=later, now=later)
    finally:
        await engine.dispose()


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


def insert_dataset(database: Path, dataset: uuid.UUID, *, queue: str) -> None:
    """A dataset row as an announcement would leave it, seen long ago (so no disk is
    placed on it)."""
    write(
        database,
        "INSERT INTO datasets (id, sled_id, queue_name, capacity_bytes, free_bytes,"
        " last_seen_at) VALUES (?, ?, ?, ?, ?, ?)",
        dataset.hex,
        uuid.uuid4().hex,
        queue,
        1 << 30,
        1 << 30,
        "2000-01-01 00:00:00.000000",
    )


def write(database: Path, sql: str, *parameters: Any) -> None:
    with closing(sqlite3.connect(database, timeout=30)) as connection, connection:
        assert connection.execute(sql, parameters).rowcount == 1
