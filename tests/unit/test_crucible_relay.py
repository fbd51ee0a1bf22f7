"""The crucible agent's outbox relay on its real store: a batch of rows is published
with its confirms awaited together (not one publish, one confirm, the next), rows are
deleted only once confirmed, and the delete of a batch is one grouped commit."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from crucible_agent.store import AgentStore
from schemas.outbox import PIPELINE_WINDOW, OutboxRelay, OutgoingMessage
from schemas.transport import PublishFailed, Transport


@dataclass
class GatedTransport:
    """Publishes wait for ``confirm``, as confirms come back from a broker."""

    confirm: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: int = 0
    most_in_flight: int = 0
    confirmed: list[uuid.UUID] = field(default_factory=list)
    refuse: uuid.UUID | None = None

    async def publish_bytes(self, body: bytes, *, message_id: uuid.UUID, **_: Any) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.confirm.wait()
            # A confirm is a frame from the broker: never before the others were sent.
            await asyncio.sleep(0)
        finally:
            self.in_flight -= 1
        if message_id == self.refuse:
            raise PublishFailed("nack")
        self.confirmed.append(message_id)


def row(n: int) -> OutgoingMessage:
    return OutgoingMessage(
        message_id=uuid.uuid4(),
        message_type="test.v1",
        exchange="events",
        routing_key=f"test.{n}",
        body=b"{}",
    )


async def filled(tmp_path: Path, count: int) -> tuple[AgentStore, list[OutgoingMessage]]:
    store = await AgentStore.open(tmp_path / "agent.sqlite")
    rows = [row(n) for n in range(count)]
    async with store.transaction() as tx:
        for message in rows:
            await tx.send(message)
    return store, rows


async def test_a_batch_is_published_with_its_confirms_awaited_together(tmp_path: Path) -> None:
    store, rows = await filled(tmp_path, 5)
    transport = GatedTransport()
    relay = OutboxRelay(store, cast(Transport, transport))
    try:
        flushing = asyncio.create_task(relay.flush())
        while transport.in_flight < len(rows):
            await asyncio.sleep(0.001)
        # All five are out before the first confirm; nothing is deleted yet.
        assert len(await store.unsent(100)) == 5
        groups_before = store.group.counts.groups
        transport.confirm.set()
        assert await flushing == 5
        assert transport.most_in_flight == 5
        assert transport.confirmed == [r.message_id for r in rows]
        assert await store.unsent(100) == []
        assert store.group.counts.groups - groups_before == 1, "one commit deletes the batch"
    finally:
        await store.close()


async def test_a_window_is_at_most_the_pipeline_window(tmp_path: Path) -> None:
    store, _ = await filled(tmp_path, PIPELINE_WINDOW + 4)
    transport = GatedTransport()
    transport.confirm.set()
    relay = OutboxRelay(store, cast(Transport, transport))
    try:
        assert await relay.flush() == PIPELINE_WINDOW + 4
        assert transport.most_in_flight == PIPELINE_WINDOW
    finally:
        await store.close()


async def test_only_the_confirmed_rows_before_a_refused_one_are_deleted(tmp_path: Path) -> None:
    store, rows = await filled(tmp_path, 4)
    transport = GatedTransport(refuse=rows[2].message_id)
    transport.confirm.set()
    relay = OutboxRelay(store, cast(Transport, transport))
    try:
        try:
            await relay.flush()
        except PublishFailed:
            pass
        else:
            raise AssertionError("the refused publish was not raised")
        left = [r.message_id for r in await store.unsent(100)]
        assert left == [rows[2].message_id, rows[3].message_id]
    finally:
        await store.close()
