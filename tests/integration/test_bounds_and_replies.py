"""Bounded numbers and one reply per request, against the real processes (issue #12,
items 2 and 3): a Nexus replica (SQLite) and three crucible agents as processes, a
RabbitMQ virtual host of the module's own, and raw messages sent by the test.

- A number the database cannot store (generation 2^63, port 70000) is refused at the
  first delivery: dead-lettered once, with its reason, never redelivered, nothing
  changed.
- A generation implausibly far ahead of Nexus's record is dead-lettered
  (``implausible_generation``) and changes nothing; one generation ahead is applied.
- An API request that does not validate gets exactly one ``invalid_request`` reply that
  names the field; a request id re-used with other parameters gets ``conflict`` and the
  first disk is unchanged; the same request again gets the first answer; a ``reply_to``
  naming someone else's queue gets no reply there, and the request is not carried out.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy import select

from nexus.db.engine import create_engine, create_sessionmaker
from nexus.db.migrate import upgrade_async
from nexus.db.models import Dataset, Disk, Region, Saga
from schemas import api
from schemas.base import Envelope
from schemas.messages import Message, decode, encode
from schemas.region import Region as WireRegion
from schemas.region import RegionChange, RegionList, RegionListed, RegionState, RegionStateChanged
from schemas.topology import (
    COMMANDS_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DETAIL_HEADER,
    EVENTS_EXCHANGE,
    NEXUS_API_QUEUE,
    NEXUS_EVENTS_QUEUE,
    REASON_HEADER,
    REPLIES_EXCHANGE,
    crucible_queue,
    reply_queue,
)
from schemas.transport import Transport
from tests.harness.servers import NotSupportedInMode, RabbitMQServer
from tests.processes import ApiClient, Crucible, Service, crucible, nexus

pytestmark = [pytest.mark.integration, pytest.mark.security]

CLI_SOURCE = "cli/bounds-test"
NEXUS_SOURCE = "nexus/bounds-test"
# How long the test waits for something that must not happen (a second copy, a reply).
QUIET_SECONDS = 2.0


class Stack:
    """The running services, a broker client (the vhost's administrator, ``guest``) and
    everything that reaches the dead letters."""

    def __init__(self, url: str, workdir: Path) -> None:
        self.url = url
        self.workdir = workdir
        self.database_url = f"sqlite+aiosqlite:///{workdir / 'nexus.sqlite3'}"
        self.agents: list[Crucible] = [crucible(url, workdir) for _ in range(3)]
        self.nexus: Service = nexus(
            "r1", database_url=self.database_url, amqp_url=url, workdir=workdir
        )
        self.transport = Transport(url, name="test-bounds")
        self.client = ApiClient(self.transport)
        self.dead: list[AbstractIncomingMessage] = []
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self.engine = create_engine(self.database_url)
        self.sessions = create_sessionmaker(self.engine)

    async def start(self) -> None:
        await upgrade_async(self.database_url)
        await self.transport.connect()
        await self.transport.declare_topology()
        self._connection = await aio_pika.connect_robust(self.url)
        channel = await self._connection.channel()
        dead_letters = await channel.get_queue(DEAD_LETTER_QUEUE)
        await dead_letters.consume(self._on_dead_letter)
        for agent in self.agents:
            agent.service.start()
        self.nexus.start()
        deadline = time.monotonic() + 60
        while len(await self.rows(Dataset)) < len(self.agents):
            assert time.monotonic() < deadline, "the agents never announced themselves"
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        await self.nexus.stop()
        for agent in self.agents:
            await agent.service.stop()
        await self.transport.close()
        if self._connection is not None:
            await self._connection.close()
        await self.engine.dispose()

    async def _on_dead_letter(self, incoming: AbstractIncomingMessage) -> None:
        await incoming.ack()
        self.dead.append(incoming)

    async def dead_letters_of(self, message_id: uuid.UUID) -> list[AbstractIncomingMessage]:
        """Every copy of ``message_id`` in the dead letters, once the first is in and no
        other came for QUIET_SECONDS."""
        async with asyncio.timeout(20):
            while not self._dead_of(message_id):
                await asyncio.sleep(0.05)
        await asyncio.sleep(QUIET_SECONDS)
        return self._dead_of(message_id)

    def _dead_of(self, message_id: uuid.UUID) -> list[AbstractIncomingMessage]:
        return [m for m in self.dead if m.message_id == str(message_id)]

    async def publish_raw(
        self,
        document: dict[str, Any],
        *,
        exchange: str,
        routing_key: str,
        reply_to: str | None = None,
    ) -> uuid.UUID:
        """Publish a JSON document as it is (as any client could), as the envelope's id."""
        message_id = uuid.UUID(document["id"])
        await self.transport.publish_bytes(
            json.dumps(document).encode(),
            exchange=exchange,
            routing_key=routing_key,
            message_id=message_id,
            message_type=str(document.get("type")),
            reply_to=reply_to,
        )
        return message_id

    async def rows(self, model: type[Any]) -> list[Any]:
        async with self.sessions() as session:
            return list((await session.execute(select(model))).scalars())

    async def region(self, region_id: uuid.UUID) -> Region:
        async with self.sessions() as session:
            found = await session.get(Region, region_id)
            assert found is not None
            return found

    async def snapshot(self) -> dict[str, Any]:
        """What must not change: Nexus's disks, regions and sagas, and the agents' regions."""
        listed = {}
        for agent in self.agents:
            answer = await self.transport.request(
                RegionList(source=NEXUS_SOURCE), routing_key=crucible_queue(agent.agent_id)
            )
            assert isinstance(answer, RegionListed)
            listed[agent.agent_id] = answer.payload.model_dump()
        return {
            "disks": [(d.id, d.name, d.size_bytes, d.state) for d in await self.rows(Disk)],
            "regions": [
                (r.id, r.state, r.generation, r.port_number) for r in await self.rows(Region)
            ],
            "sagas": [(s.id, s.state, s.params) for s in await self.rows(Saga)],
            "agents": listed,
        }

    async def disk(self, name: str) -> tuple[api.Accepted, list[Region]]:
        """A disk created through the API, once its saga is done, and its regions."""
        accepted = await self.client.create_disk(name)
        view = await self.client.saga_in(accepted.saga_id, {"done", "undone", "stuck"}, 60)
        assert view.state == "done", view.error
        regions = [r for r in await self.rows(Region) if r.disk_id == accepted.resource_id]
        assert len(regions) == 3 and {r.state.value for r in regions} == {"created"}
        return accepted, regions

    async def nexus_events_drained(self) -> None:
        assert self._connection is not None
        channel = await self._connection.channel()
        try:
            async with asyncio.timeout(15):
                while True:
                    queue = await channel.declare_queue(NEXUS_EVENTS_QUEUE, passive=True)
                    if not queue.declaration_result.message_count:
                        return
                    await asyncio.sleep(0.1)
        finally:
            await channel.close()


def administered_rabbitmq(request: pytest.FixtureRequest) -> RabbitMQServer:
    server: RabbitMQServer = request.getfixturevalue("rabbitmq_server")
    try:
        server.rabbitmqctl("status")
    except NotSupportedInMode:
        server = request.getfixturevalue("restartable_rabbitmq")
    return server


@pytest.fixture(scope="module")
def broker(request: pytest.FixtureRequest) -> RabbitMQServer:
    return administered_rabbitmq(request)


@pytest.fixture(scope="module")
def vhost(broker: RabbitMQServer) -> Iterator[str]:
    name = f"bounds-{uuid.uuid4().hex[:12]}"
    broker.rabbitmqctl("add_vhost", name)
    broker.rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield name
    broker.rabbitmqctl("delete_vhost", name)


@pytest.fixture(scope="module")
async def stack(
    broker: RabbitMQServer, vhost: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    running = Stack(broker.url.rstrip("/") + f"/{vhost}", tmp_path_factory.mktemp("bounds"))
    try:
        await running.start()
        yield running
    finally:
        await running.stop()


def region_event(region: Region, stack: Stack, **changes: Any) -> dict[str, Any]:
    """The event the region's own agent would publish about it, as a JSON document with
    ``changes`` applied to the region (numbers the model itself would refuse)."""
    owner = next(a for a in stack.agents if a.agent_id == region.dataset_id)
    wire = WireRegion(
        id=region.id,
        block_size=region.block_size,
        extent_size=region.extent_size,
        extent_count=region.extent_count,
        encrypted=True,
        port_number=region.port_number or 0,
        state=RegionState(region.state.value),
        generation=region.generation,
    )
    event = RegionStateChanged(
        source=f"crucible/{owner.agent_id}",
        payload=RegionChange(agent_id=owner.agent_id, region=wire),
    )
    document: dict[str, Any] = json.loads(encode(event))
    document["payload"]["region"] |= changes
    return document


# Bounded numbers.


@pytest.mark.parametrize(
    ("field", "value"), [("generation", 2**63), ("port_number", 70_000)], ids=["gen-2^63", "port"]
)
async def test_a_number_out_of_bounds_is_refused_at_the_first_delivery(
    stack: Stack, field: str, value: int
) -> None:
    _, regions = await stack.disk(f"oob-{uuid.uuid4().hex[:8]}")
    before = await stack.snapshot()
    document = region_event(regions[0], stack, **{field: value})

    message_id = await stack.publish_raw(
        document, exchange=EVENTS_EXCHANGE, routing_key="region.created"
    )

    [dead] = await stack.dead_letters_of(message_id)
    headers = dead.headers or {}
    assert headers[REASON_HEADER] == "schema_violation"
    assert f"payload.region.{field}" in str(headers[DETAIL_HEADER])
    # Delivered once: never redelivered (no x-delivery-count), never dead-lettered by
    # the broker at its delivery limit (no x-death), and no handler ever ran on it.
    assert headers.get("x-delivery-count", 0) == 0, headers
    assert "x-death" not in headers, headers
    assert not [
        line
        for line in stack.nexus.log_text().splitlines()
        if str(message_id) in line and "handler failed" in line
    ]
    await stack.nexus_events_drained()
    assert await stack.snapshot() == before


async def test_a_generation_far_ahead_is_refused_and_one_ahead_is_applied(stack: Stack) -> None:
    _, regions = await stack.disk(f"ahead-{uuid.uuid4().hex[:8]}")
    region = regions[0]
    recorded = region.generation
    before = await stack.snapshot()

    document = region_event(region, stack, generation=recorded + 5_000)
    far = await stack.publish_raw(document, exchange=EVENTS_EXCHANGE, routing_key="region.created")

    [dead] = await stack.dead_letters_of(far)
    headers = dead.headers or {}
    assert headers[REASON_HEADER] == "implausible_generation"
    assert "5000 ahead" in str(headers[DETAIL_HEADER])
    assert headers.get("x-delivery-count", 0) == 0, headers
    await stack.nexus_events_drained()
    assert await stack.snapshot() == before
    # Reported: logged with the count of such refusals since the replica started.
    reported = [
        entry
        for entry in map(json.loads, stack.nexus.log_text().splitlines())
        if entry.get("message_id") == str(far) and "refused_so_far" in entry
    ]
    assert len(reported) == 1 and reported[0]["refused_so_far"] >= 1, reported
    assert reported[0]["reason"] == "implausible_generation"

    document = region_event(region, stack, generation=recorded + 1)
    near = await stack.publish_raw(document, exchange=EVENTS_EXCHANGE, routing_key="region.created")
    deadline = time.monotonic() + 15
    while (await stack.region(region.id)).generation != recorded + 1:
        assert time.monotonic() < deadline, "the event one generation ahead was not applied"
        await asyncio.sleep(0.1)
    assert not stack._dead_of(near)


# One reply per request.


class Replies:
    """A reply queue of ``user``'s own, on a connection of its own, and what reaches it."""

    def __init__(self, url: str, user: str) -> None:
        self.url = url
        self.name = reply_queue(user)
        self.received: list[Message] = []
        self._connection: aio_pika.abc.AbstractConnection | None = None

    async def __aenter__(self) -> Replies:
        self._connection = await aio_pika.connect(self.url)
        channel = await self._connection.channel()
        queue = await channel.declare_queue(self.name, exclusive=True, auto_delete=True)
        await queue.bind(await channel.get_exchange(REPLIES_EXCHANGE), routing_key=self.name)
        await queue.consume(self._on_reply, no_ack=True)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _on_reply(self, incoming: AbstractIncomingMessage) -> None:
        self.received.append(decode(incoming.body))

    async def settled(self, count: int) -> list[Message]:
        """The replies once ``count`` are in and no other came for QUIET_SECONDS."""
        async with asyncio.timeout(15):
            while len(self.received) < count:
                await asyncio.sleep(0.05)
        await asyncio.sleep(QUIET_SECONDS)
        return list(self.received)


def request_document(request: Envelope, **payload: Any) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(encode(request))
    document["payload"] |= payload
    return document


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"size_bytes": 0}, "payload.size_bytes"),
        ({"size_bytes": 2**63}, "payload.size_bytes"),
        ({"name": "Not A Name"}, "payload.name"),
        ({"colour": "blue"}, "payload.colour"),
    ],
    ids=["zero", "2^63", "name", "unknown-field"],
)
async def test_an_invalid_request_gets_exactly_one_invalid_request_reply(
    stack: Stack, broker: RabbitMQServer, vhost: str, payload: dict[str, Any], field: str
) -> None:
    before = await stack.snapshot()
    request = api.DiskCreate(
        source=CLI_SOURCE,
        payload=api.DiskCreateRequest(project="p", name="d-invalid", size_bytes=1 << 30),
    )
    async with Replies(stack.url, stack.transport.user) as replies:
        await stack.publish_raw(
            request_document(request, **payload),
            exchange=COMMANDS_EXCHANGE,
            routing_key=NEXUS_API_QUEUE,
            reply_to=replies.name,
        )
        [reply] = await replies.settled(1)

    assert isinstance(reply, api.ApiError), reply
    assert reply.causation_id == request.id
    assert reply.payload.code is api.ErrorCode.INVALID_REQUEST
    assert field in reply.payload.message
    [dead] = stack._dead_of(request.id)
    assert (dead.headers or {})[REASON_HEADER] == "schema_violation"
    assert await stack.snapshot() == before


async def test_a_client_gets_its_invalid_request_answered_rather_than_timing_out(
    stack: Stack,
) -> None:
    """What nexusctl sees: the error at once, not its timeout."""
    # A body the model would refuse, sent by the transport a client uses.
    invalid = api.DiskCreate(
        source=CLI_SOURCE,
        payload=api.DiskCreateRequest.model_construct(
            project="p", name="d-invalid", size_bytes=-1, block_size=512
        ),
    )
    started = time.monotonic()
    reply = await stack.transport.request(invalid, routing_key=NEXUS_API_QUEUE, timeout=10)
    assert time.monotonic() - started < 5
    assert isinstance(reply, api.ApiError)
    assert reply.payload.code is api.ErrorCode.INVALID_REQUEST
    assert "payload.size_bytes" in reply.payload.message


async def test_a_request_id_reused_with_other_parameters_is_a_conflict(stack: Stack) -> None:
    name = f"first-{uuid.uuid4().hex[:8]}"
    first_request = api.DiskCreate(
        source=CLI_SOURCE,
        payload=api.DiskCreateRequest(project="test", name=name, size_bytes=1 << 30),
    )
    first = await stack.transport.request(first_request, routing_key=NEXUS_API_QUEUE)
    assert isinstance(first, api.AcceptedReply), first
    await stack.client.saga_in(first.payload.saga_id, {"done"}, 60)
    ref = api.ResourceRef(project="test", resource=name)
    disk_before = await stack.transport.request(
        api.DiskGet(source=CLI_SOURCE, payload=ref), routing_key=NEXUS_API_QUEUE
    )
    before = await stack.snapshot()

    other_name = f"other-{uuid.uuid4().hex[:8]}"
    for payload in (
        {"size_bytes": 2 << 30},
        {"name": other_name},
        {"block_size": 4096},
    ):
        reused = first_request.model_copy(
            update={"payload": first_request.payload.model_copy(update=payload)}
        )
        answer = await stack.transport.request(reused, routing_key=NEXUS_API_QUEUE)
        assert isinstance(answer, api.ApiError), (payload, answer)
        assert answer.payload.code is api.ErrorCode.CONFLICT, answer.payload
    delete = api.DiskDelete(id=first_request.id, source=CLI_SOURCE, payload=ref)
    answer = await stack.transport.request(delete, routing_key=NEXUS_API_QUEUE)
    assert isinstance(answer, api.ApiError) and answer.payload.code is api.ErrorCode.CONFLICT

    # The first disk is unchanged, and no other was made or deleted.
    assert await stack.snapshot() == before
    disk_after = await stack.transport.request(
        api.DiskGet(source=CLI_SOURCE, payload=ref), routing_key=NEXUS_API_QUEUE
    )
    assert isinstance(disk_after, api.DiskReply) and isinstance(disk_before, api.DiskReply)
    assert disk_after.payload == disk_before.payload

    # The same request again still gets the first answer.
    again = await stack.transport.request(first_request.model_copy(), routing_key=NEXUS_API_QUEUE)
    assert isinstance(again, api.AcceptedReply) and again.payload == first.payload
    assert await stack.snapshot() == before


async def test_a_reply_to_someone_elses_queue_gets_no_reply_there(
    stack: Stack, broker: RabbitMQServer, vhost: str
) -> None:
    victim_user, password = f"victim-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    broker.rabbitmqctl("add_user", victim_user, password)
    broker.rabbitmqctl("set_permissions", "-p", vhost, victim_user, ".*", ".*", ".*")
    parts = urlsplit(stack.url)
    host = parts.netloc.rpartition("@")[2]
    victim_url = urlunsplit(parts._replace(netloc=f"{victim_user}:{password}@{host}"))
    before = await stack.snapshot()
    try:
        async with Replies(victim_url, victim_user) as victim:
            requests = []
            for payload in ({}, {"size_bytes": 0}):
                request = api.DiskCreate(
                    source=CLI_SOURCE,
                    payload=api.DiskCreateRequest(
                        project="test", name=f"hijack-{uuid.uuid4().hex[:8]}", size_bytes=1 << 30
                    ),
                )
                requests.append(request)
                await stack.publish_raw(
                    request_document(request, **payload),
                    exchange=COMMANDS_EXCHANGE,
                    routing_key=NEXUS_API_QUEUE,
                    reply_to=victim.name,
                )
            reasons = {
                str(((await stack.dead_letters_of(r.id))[0].headers or {})[REASON_HEADER])
                for r in requests
            }
            assert victim.received == []
    finally:
        broker.rabbitmqctl("delete_user", victim_user)

    assert reasons == {"foreign_reply_to", "schema_violation"}
    # The well-formed request was not carried out either.
    assert await stack.snapshot() == before
