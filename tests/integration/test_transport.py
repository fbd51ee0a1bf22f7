"""The transport against a real RabbitMQ: round trips, dead letters, request/reply."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Mapping

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy.exc import OperationalError

from schemas.base import Envelope
from schemas.messages import MAX_BODY_BYTES, MESSAGE_TYPES, encode
from schemas.region import RegionFound, RegionGet, RegionInfo, RegionRef
from schemas.topology import (
    COMMANDS_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DELIVERY_LIMIT,
    ORIGINAL_QUEUE_HEADER,
    REASON_HEADER,
)
from schemas.transport import Delivery, PublishFailed, RequestTimedOut, Transport
from tests.examples import example

pytestmark = pytest.mark.integration


@pytest.fixture
async def transport(rabbitmq_url: str) -> AsyncIterator[Transport]:
    async with Transport(rabbitmq_url, name=f"test-{uuid.uuid4().hex[:8]}") as connected:
        await connected.declare_topology()
        yield connected


async def private_queue(transport: Transport) -> str:
    name = f"test.{uuid.uuid4()}"
    await transport.declare_command_queue(name)
    return name


async def collect(transport: Transport, queue: str) -> asyncio.Queue[Delivery]:
    received: asyncio.Queue[Delivery] = asyncio.Queue()
    await transport.consume(queue, received.put)
    return received


async def dead_letters_from(
    rabbitmq_url: str, queue: str, count: int
) -> list[AbstractIncomingMessage]:
    """Read the dead-letter queue until ``count`` messages from ``queue`` have arrived.

    Other tests' dead letters are held unacked while reading (so ``get`` moves past
    them) and go back to the queue when the connection closes.
    """
    found: list[AbstractIncomingMessage] = []
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        dlq = await channel.get_queue(DEAD_LETTER_QUEUE)
        async with asyncio.timeout(20):
            while len(found) < count:
                incoming = await dlq.get(fail=False)
                if incoming is None:
                    await asyncio.sleep(0.05)
                    continue
                headers = incoming.headers or {}
                if headers.get(ORIGINAL_QUEUE_HEADER) == queue or _died_in(headers, queue):
                    await incoming.ack()
                    found.append(incoming)
    return found


def _died_in(headers: Mapping[str, object], queue: str) -> bool:
    deaths = headers.get("x-death")
    return isinstance(deaths, list) and any(
        isinstance(death, dict) and death.get("queue") == queue for death in deaths
    )


@pytest.mark.parametrize("message_type", sorted(MESSAGE_TYPES))
async def test_every_message_type_survives_the_broker(
    transport: Transport, message_type: str
) -> None:
    queue = await private_queue(transport)
    received = await collect(transport, queue)
    sent = example(message_type)

    await transport.send_command(sent, queue)

    delivery = await asyncio.wait_for(received.get(), 10)
    assert delivery.message == sent
    assert type(delivery.message) is type(sent)


async def test_amqp_properties_mirror_the_envelope(transport: Transport, rabbitmq_url: str) -> None:
    queue = await private_queue(transport)
    sent = example("region.state_changed.v1")
    await transport.send_command(sent, queue)
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        amqp_queue = await channel.get_queue(queue)
        async with asyncio.timeout(10), amqp_queue.iterator() as messages:
            incoming = await anext(messages)
            await incoming.ack()
    assert incoming.message_id == str(sent.id)
    assert incoming.type == "region.state_changed.v1"
    assert incoming.correlation_id == str(sent.correlation_id)
    assert incoming.content_type == "application/json"
    assert incoming.delivery_mode == aio_pika.DeliveryMode.PERSISTENT


async def test_bad_bytes_are_dead_lettered_and_the_consumer_goes_on(
    transport: Transport, rabbitmq_url: str
) -> None:
    queue = await private_queue(transport)
    received = await collect(transport, queue)
    violation = json.loads(encode(example("region.get.v1")))
    violation["payload"] = {"id": "not-a-uuid"}
    bad = {
        "invalid_json": b"\x00\x01 garbage {",
        "unknown_type": json.dumps({"type": "region.teleport.v1", "source": "x/y"}).encode(),
        "schema_violation": json.dumps(violation).encode(),
        "too_large": b" " * (MAX_BODY_BYTES + 1),
    }
    for body in bad.values():
        await transport.publish_bytes(
            body,
            exchange=COMMANDS_EXCHANGE,
            routing_key=queue,
            message_id=uuid.uuid4(),
            message_type="whatever",
        )
    good = example("region.delete.v1")
    await transport.send_command(good, queue)

    delivery = await asyncio.wait_for(received.get(), 10)
    assert delivery.message == good
    dead = await dead_letters_from(rabbitmq_url, queue, len(bad))
    reasons = {str((letter.headers or {})[REASON_HEADER]): letter.body for letter in dead}
    assert reasons == bad
    assert received.empty()


async def test_a_handler_that_keeps_failing_is_dead_lettered_past_the_limit(
    transport: Transport, rabbitmq_url: str
) -> None:
    queue = await private_queue(transport)
    poison = example("region.get.v1")
    good = example("region.delete.v1")
    attempts: list[uuid.UUID] = []
    handled: asyncio.Queue[Delivery] = asyncio.Queue()

    async def handler(delivery: Delivery) -> None:
        attempts.append(delivery.message.id)
        if delivery.message.id == poison.id:
            raise RuntimeError("this handler cannot cope")
        await handled.put(delivery)

    await transport.consume(queue, handler)
    await transport.send_command(poison, queue)
    await transport.send_command(good, queue)

    assert (await asyncio.wait_for(handled.get(), 10)).message == good
    (dead,) = await dead_letters_from(rabbitmq_url, queue, 1)
    assert dead.message_id == str(poison.id)
    assert attempts.count(poison.id) > 1


async def test_a_handler_failing_on_a_transient_error_is_never_dead_lettered(
    transport: Transport, rabbitmq_url: str
) -> None:
    """More transient failures (the database is down) than the delivery limit (20): the
    handler runs again in place on the one delivery, the message is acked once it
    succeeds, and nothing of its queue reaches the dead-letter queue."""
    queue = await private_queue(transport)
    message = example("region.get.v1")
    attempts: list[Delivery] = []
    handled: asyncio.Queue[Delivery] = asyncio.Queue()

    async def handler(delivery: Delivery) -> None:
        attempts.append(delivery)
        if len(attempts) <= DELIVERY_LIMIT + 5:
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError(111, "refused"))
        await handled.put(delivery)

    async with Transport(
        rabbitmq_url, name="test-retrying", retry_first_seconds=0.005, retry_max_seconds=0.02
    ) as consumer:
        await consumer.consume(queue, handler)
        await transport.send_command(message, queue)
        delivery = await asyncio.wait_for(handled.get(), 20)
        assert consumer.retrying == 0

    assert delivery.message == message
    assert len(attempts) == DELIVERY_LIMIT + 6
    assert not any(attempt.redelivered for attempt in attempts), "one delivery, never requeued"
    assert await queue_depth(rabbitmq_url, queue) == 0, "acked"
    assert await dead_letters_in(rabbitmq_url, queue) == []


async def queue_depth(rabbitmq_url: str, queue: str) -> int:
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        return int(count or 0)


async def dead_letters_in(rabbitmq_url: str, queue: str) -> list[AbstractIncomingMessage]:
    """Every message of the dead-letter queue that came from ``queue``, read without
    taking any (they go back when the connection closes)."""
    found: list[AbstractIncomingMessage] = []
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        dlq = await channel.get_queue(DEAD_LETTER_QUEUE)
        while (incoming := await dlq.get(fail=False)) is not None:
            headers = incoming.headers or {}
            if headers.get(ORIGINAL_QUEUE_HEADER) == queue or _died_in(headers, queue):
                found.append(incoming)
    return found


async def test_request_reply_and_timeout(transport: Transport, rabbitmq_url: str) -> None:
    queue = await private_queue(transport)
    agent_id = uuid.uuid4()

    async with Transport(rabbitmq_url, name="responder") as responder:

        async def answer(delivery: Delivery) -> None:
            request = delivery.message
            assert isinstance(request, RegionGet)
            reply = RegionInfo(
                source=f"crucible/{agent_id}",
                payload=RegionFound(agent_id=agent_id, region=None, region_id=request.payload.id),
                **request.caused(),
            )
            await responder.reply(delivery, reply)

        await responder.consume(queue, answer)
        region_id = uuid.uuid4()
        reply = await transport.request(
            RegionGet(source="nexus/test", payload=RegionRef(id=region_id)),
            routing_key=queue,
            timeout=10,
        )
    assert isinstance(reply, RegionInfo)
    assert reply.payload.region_id == region_id

    silent = await private_queue(transport)
    with pytest.raises(RequestTimedOut, match="no reply"):
        await transport.request(
            RegionGet(source="nexus/test", payload=RegionRef(id=uuid.uuid4())),
            routing_key=silent,
            timeout=0.3,
        )


async def test_a_command_to_a_queue_that_does_not_exist_fails_loudly(
    transport: Transport,
) -> None:
    message: Envelope = example("region.get.v1")
    with pytest.raises(PublishFailed):
        await transport.send_command(message, f"crucible.{uuid.uuid4()}")


async def test_a_returned_command_fails_alone_not_the_publishes_beside_it(
    transport: Transport,
) -> None:
    """The doctor asks every agent at once; one with no queue (a ghost dataset) must not
    make the others unreachable: a message returned unroutable is that publish's failure,
    not the channel's (renewing the channel failed every publish in flight on it)."""
    queue = await private_queue(transport)
    received = await collect(transport, queue)
    ghost = f"crucible.{uuid.uuid4()}"
    for _ in range(3):
        messages = [example("region.get.v1") for _ in range(20)]
        outcomes = await asyncio.gather(
            transport.send_command(example("region.get.v1"), ghost),
            *(transport.send_command(message, queue) for message in messages),
            return_exceptions=True,
        )
        assert isinstance(outcomes[0], PublishFailed)
        assert outcomes[1:] == [None] * len(messages), outcomes[1:]
        got = {(await asyncio.wait_for(received.get(), 10)).message.id for _ in messages}
        assert got == {message.id for message in messages}


async def test_concurrent_first_requests_declare_one_reply_queue(rabbitmq_url: str) -> None:
    """Requests sent at once before any other share one reply queue (each declared its
    own on a channel of its own: 10,000 at once reached the broker's channel limit)."""
    async with Transport(rabbitmq_url, name=f"test-{uuid.uuid4().hex[:8]}") as fresh:
        await fresh.declare_topology()
        queue = await private_queue(fresh)
        channels = len(fresh._consumer_channels)
        outcomes = await asyncio.gather(
            *(
                fresh.request(example("region.get.v1"), routing_key=queue, timeout=0.5)
                for _ in range(50)
            ),
            return_exceptions=True,
        )
        assert all(isinstance(outcome, RequestTimedOut) for outcome in outcomes)
        assert len(fresh._consumer_channels) == channels + 1
