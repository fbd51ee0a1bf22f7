"""Batched acks against a real RabbitMQ (quorum queues, as in production): every handled
message leaves the queue, in fewer ack frames than messages, and a message still in its
handler never holds the others' acks nor is covered by a multiple ack."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest

from schemas.messages import MessageRejected
from schemas.region import RegionGet, RegionRef
from schemas.transport import Delivery, Transport
from tests.integration.test_transport import dead_letters_from

pytestmark = pytest.mark.integration


@pytest.fixture
async def transport(rabbitmq_url: str) -> AsyncIterator[Transport]:
    async with Transport(rabbitmq_url, name=f"test-acks-{uuid.uuid4().hex[:8]}") as connected:
        await connected.declare_topology()
        yield connected


async def fill(transport: Transport, count: int) -> tuple[str, list[RegionGet]]:
    """A fresh quorum queue holding ``count`` messages."""
    queue = f"test.acks.{uuid.uuid4()}"
    await transport.declare_command_queue(queue)
    messages = [
        RegionGet(source="nexus/test", payload=RegionRef(id=uuid.uuid4())) for _ in range(count)
    ]
    await asyncio.gather(*(transport.send_command(message, queue) for message in messages))
    return queue, messages


async def ready(rabbitmq_url: str, queue: str) -> int:
    """Messages ready in ``queue`` (none is unacked: no consumer holds any)."""
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        assert declared.declaration_result.message_count is not None
        return declared.declaration_result.message_count


async def test_every_handled_message_is_acked_in_fewer_frames(
    transport: Transport, rabbitmq_url: str
) -> None:
    queue, messages = await fill(transport, 400)
    handled: list[Delivery] = []
    all_in = asyncio.Event()

    async def handle(delivery: Delivery) -> None:
        handled.append(delivery)
        if len(handled) == len(messages):
            all_in.set()

    async with Transport(rabbitmq_url, name="test-acks-consumer") as consumer:
        await consumer.consume(queue, handle, prefetch=64)
        underlay = await consumer._consumers[queue].get_underlay_channel()
        async with asyncio.timeout(30):
            await all_in.wait()
        await asyncio.sleep(0.2)  # the last batch's ack
        acks = consumer._acks[queue]
        # No ack closed the channel (an unknown or repeated tag would).
        assert await consumer._consumers[queue].get_underlay_channel() is underlay
        assert not underlay.is_closed
    # After close: anything not acked would be back in the queue.
    assert await ready(rabbitmq_url, queue) == 0
    assert {d.message.id for d in handled} == {m.id for m in messages}
    assert acks.acked == len(messages)
    assert acks.frames < len(messages) / 4, f"{acks.frames} ack frames for {acks.acked}"


async def test_a_message_in_its_handler_holds_no_other_ack(
    transport: Transport, rabbitmq_url: str
) -> None:
    """The first message blocks in its handler; with a window of 4 the other 39 can only
    all be handled if their acks are sent around it, and none of those acks may cover
    it: when the consumer's connection drops while it is still in its handler, it alone
    goes back to the queue, and another consumer takes it."""
    queue, messages = await fill(transport, 40)
    release = asyncio.Event()
    handled: list[uuid.UUID] = []
    others_in = asyncio.Event()
    blocked = messages[0].id

    async def handle(delivery: Delivery) -> None:
        if delivery.message.id == blocked:
            await release.wait()
        handled.append(delivery.message.id)
        if len(handled) == len(messages) - 1:
            others_in.set()

    consumer = Transport(rabbitmq_url, name="test-acks-consumer")
    await consumer.connect()
    try:
        await consumer.consume(queue, handle, prefetch=4)
        underlay = await consumer._consumers[queue].get_underlay_channel()
        async with asyncio.timeout(30):
            await others_in.wait()
        await asyncio.sleep(0.2)  # the last batch's ack
        assert blocked not in handled
        # No ack closed the channel (an unknown or repeated tag would).
        assert await consumer._consumers[queue].get_underlay_channel() is underlay
        assert not underlay.is_closed
        # The process dies with the first message still in its handler.
        await consumer.connection.close()
        assert await ready(rabbitmq_url, queue) == 1
        release.set()
    finally:
        await consumer.close()
    again: asyncio.Queue[Delivery] = asyncio.Queue()
    async with Transport(rabbitmq_url, name="test-acks-second") as second:
        await second.consume(queue, again.put)
        async with asyncio.timeout(30):
            assert (await again.get()).message.id == blocked
        await asyncio.sleep(0.2)
    assert await ready(rabbitmq_url, queue) == 0


async def test_refused_and_handled_messages_mixed_all_leave_the_queue(
    transport: Transport, rabbitmq_url: str
) -> None:
    """Every third message is refused (dead-lettered and acked on its own frame) among
    ones acked in batches: each is settled once, the refused ones are in the dead letters."""
    queue, messages = await fill(transport, 60)
    refused = {m.id for m in messages[::3]}
    seen: list[uuid.UUID] = []
    all_in = asyncio.Event()

    async def handle(delivery: Delivery) -> None:
        seen.append(delivery.message.id)
        if len(seen) == len(messages):
            all_in.set()
        if delivery.message.id in refused:
            raise MessageRejected("test_refusal", "refused by the test")

    async with Transport(rabbitmq_url, name="test-acks-consumer") as consumer:
        await consumer.consume(queue, handle, prefetch=16)
        underlay = await consumer._consumers[queue].get_underlay_channel()
        async with asyncio.timeout(30):
            await all_in.wait()
        await asyncio.sleep(0.2)  # the last batch's ack
        assert await consumer._consumers[queue].get_underlay_channel() is underlay
        assert not underlay.is_closed
    assert await ready(rabbitmq_url, queue) == 0
    assert len(seen) == len(messages)  # none redelivered
    dead = await dead_letters_from(rabbitmq_url, queue, len(refused))
    assert {uuid.UUID(d.message_id or "") for d in dead} == refused


async def test_acks_waiting_when_the_channel_dies_are_dropped_and_redelivered(
    transport: Transport, rabbitmq_url: str
) -> None:
    """The broker closes the consumer's channel while 8 handled messages wait for their
    acks' turn: the robust channel reopens and consumes again with tags starting anew.
    Nothing is acked with the old tags (on the new channel that would ack other messages,
    or close it with PRECONDITION_FAILED); the broker redelivers those 8, and every
    message ends handled and acked, none lost."""
    queue, messages = await fill(transport, 50)
    handled: list[uuid.UUID] = []
    release = asyncio.Event()
    window_full = asyncio.Event()
    all_in = asyncio.Event()

    async def handle(delivery: Delivery) -> None:
        if not release.is_set():
            handled.append(delivery.message.id)
            if len(handled) == 8:
                window_full.set()
            await release.wait()
            return
        handled.append(delivery.message.id)
        if {*handled} >= {m.id for m in messages}:
            all_in.set()

    async with Transport(rabbitmq_url, name="test-acks-consumer") as consumer:
        await consumer.consume(queue, handle, prefetch=8)
        async with asyncio.timeout(30):
            await window_full.wait()
        channel = consumer._consumers[queue]
        # A passive declare of an exchange that does not exist: the broker closes the
        # channel (404), and the robust channel reopens it.
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
            await channel.declare_exchange(f"missing.{uuid.uuid4()}", passive=True)
        release.set()  # the 8 finish on the dead channel: their acks must be dropped
        async with asyncio.timeout(60):
            await all_in.wait()
        reopened = await channel.get_underlay_channel()
        await asyncio.sleep(0.3)  # the last batch's ack
        # Reopened once, and no ack with an old tag closed it again.
        assert await channel.get_underlay_channel() is reopened
        assert not reopened.is_closed
    assert await ready(rabbitmq_url, queue) == 0
    first_eight = handled[:8]
    # Redelivered after the channel died: each of the 8 was handled again.
    assert all(handled.count(message_id) == 2 for message_id in first_eight)
    assert len(handled) == len(messages) + 8
