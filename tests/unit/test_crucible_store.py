"""The crucible agent's SQLite store: what it sums up in SQL matches the domain's rules."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import uuid
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from crucible_agent import regions
from crucible_agent.store import AgentStore, Cause
from schemas.region import Region, RegionState
from tests.unit.test_crucible_regions import holding

CAUSE = Cause(message_id=uuid.uuid4(), correlation_id=uuid.uuid4())


class RolledBack(Exception):
    pass


async def stored_holdings(
    held: list[Region], path: Path | None = None, reserved: dict[uuid.UUID, int] | None = None
) -> regions.Holdings:
    """The store's holdings of ``held`` with ``reserved`` (inserted, then rolled back: no
    commit to wait for)."""
    with tempfile.TemporaryDirectory() as directory:
        store = await AgentStore.open(path or Path(directory) / "agent.sqlite")
        try:
            async with store.transaction() as tx:
                for one in held:
                    await tx.insert(one, CAUSE)
                    await tx.set_reserved(one.id, (reserved or {}).get(one.id, 0))
                answer = await tx.holdings()
                raise RolledBack
        except RolledBack:
            return answer
        finally:
            await store.close()


def region(state: RegionState, port: int, extents: int, failed: bool) -> Region:
    return Region(
        id=uuid.uuid4(),
        block_size=512,
        extent_size=2048,
        extent_count=extents,
        encrypted=True,
        port_number=port,
        state=state,
        generation=1,
        failure="injected" if failed else None,
    )


regions_held = st.lists(
    st.builds(
        region,
        st.sampled_from(list(RegionState)),
        st.integers(regions.FIRST_PORT, regions.FIRST_PORT + 6),
        st.integers(1, 4),
        st.booleans(),
    ),
    max_size=12,
)


@settings(max_examples=100, deadline=None)
@given(regions_held, st.lists(st.integers(0, 1 << 30), min_size=12, max_size=12))
def test_holdings_sum_exactly_the_regions_not_destroyed(
    held: list[Region], sizes: list[int]
) -> None:
    reserved = {region.id: size for region, size in zip(held, sizes, strict=False)}
    assert asyncio.run(stored_holdings(held, reserved=reserved)) == holding(
        *held, reserved=reserved
    )


def test_the_next_work_is_a_tombstoned_region_before_a_requested_one_in_id_order() -> None:
    async def next_of(held: list[Region]) -> Region | None:
        with tempfile.TemporaryDirectory() as directory:
            store = await AgentStore.open(Path(directory) / "agent.sqlite")
            try:
                async with store.transaction() as tx:
                    for one in held:
                        await tx.insert(one, CAUSE)
                    return await tx.next_work(regions.WORK_ORDER)
            finally:
                await store.close()

    requested = sorted(
        (region(RegionState.REQUESTED, 0, 1, failed=False) for _ in range(3)), key=lambda r: r.id
    )
    tombstoned = region(RegionState.TOMBSTONED, 0, 1, failed=False)
    created = region(RegionState.CREATED, 0, 1, failed=False)
    assert asyncio.run(next_of([*requested, tombstoned, created])) == tombstoned
    assert asyncio.run(next_of([*reversed(requested), created])) == requested[0]
    assert asyncio.run(next_of([created])) is None


def test_ports_are_the_lowest_free_and_come_back_when_a_region_is_destroyed() -> None:
    first = region(RegionState.CREATED, regions.FIRST_PORT, 1, failed=False)
    second = region(RegionState.CREATED, regions.FIRST_PORT + 1, 1, failed=False)
    assert asyncio.run(stored_holdings([first, second])).free_port == regions.FIRST_PORT + 2
    gone = first.model_copy(update={"state": RegionState.DESTROYED})
    assert asyncio.run(stored_holdings([gone, second])).free_port == regions.FIRST_PORT


def test_no_free_port_when_every_one_is_taken(tmp_path: Path) -> None:
    path = tmp_path / "agent.sqlite"
    asyncio.run(stored_holdings([], path))
    ports = range(regions.FIRST_PORT, regions.LAST_PORT + 1)
    # Tens of thousands of regions: written directly, in one statement.
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO regions (id, block_size, extent_size, extent_count, encrypted, "
            "port_number, read_only, state, generation, cause_id, correlation_id) "
            "VALUES (?, 512, 1, 1, 1, ?, 0, 'created', 1, ?, ?)",
            [
                (uuid.uuid4().hex, port, CAUSE.message_id.hex, CAUSE.message_id.hex)
                for port in ports
            ],
        )
    assert asyncio.run(stored_holdings([], path)) == regions.Holdings(
        used_bytes=0, regions=len(ports), free_port=None
    )


def test_a_database_from_before_reservations_gets_them(tmp_path: Path) -> None:
    path = tmp_path / "agent.sqlite"
    asyncio.run(stored_holdings([], path))
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE regions DROP COLUMN reserved_bytes")
        db.execute(
            "INSERT INTO regions (id, block_size, extent_size, extent_count, encrypted, "
            "port_number, read_only, state, generation, cause_id, correlation_id) "
            "VALUES (?, 512, 2, 3, 1, 19000, 0, 'created', 2, ?, ?)",
            (uuid.uuid4().hex, CAUSE.message_id.hex, CAUSE.message_id.hex),
        )
    assert asyncio.run(stored_holdings([], path)).used_bytes == regions.reservation_bytes(3072)
