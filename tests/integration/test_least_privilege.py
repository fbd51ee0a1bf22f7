"""Least privilege against the real server: per-service users in their own vhost, and a
message's source checked against the user the broker authenticated.

The module provisions a fresh vhost with ``nexus.devstack.access`` (the definitions that
``dev run-all`` and compose load; once, as rabbitmqctl is slow), and each test connects
as the services' users.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractIncomingMessage

from nexus.db.migrate import upgrade_async
from nexus.devstack.access import Access, provision
from schemas import api
from schemas.base import Envelope
from schemas.identity import CLI_USER, NEXUS_USER, crucible_user, sled_user
from schemas.messages import encode
from schemas.progress import SagaProgressed
from schemas.region import RegionGet, RegionInfo, RegionRef
from schemas.topology import (
    COMMANDS_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DETAIL_HEADER,
    EVENTS_EXCHANGE,
    NEXUS_API_QUEUE,
    NEXUS_EVENTS_QUEUE,
    ORIGINAL_QUEUE_HEADER,
    REASON_HEADER,
    crucible_queue,
    sled_queue,
)
from schemas.transport import Delivery, Handler, PublishFailed, Transport
from tests.examples import example
from tests.harness.servers import NotSupportedInMode, RabbitMQServer
from tests.processes import BIN, ApiClient, Service, crucible, nexus

pytestmark = [pytest.mark.integration, pytest.mark.security]


@dataclass
class Provisioned:
    access: Access
    server_url: str

    @property
    def crucibles(self) -> tuple[uuid.UUID, ...]:
        return self.access.crucible_agents

    @property
    def sled(self) -> uuid.UUID:
        return self.access.sleds[0]

    def url(self, user: str) -> str:
        return self.access.url(self.server_url, user)

    @property
    def operator_url(self) -> str:
        """The server's own user (an operator) in this vhost, to look behind the scenes."""
        return self.server_url.rstrip("/") + f"/{self.access.vhost}"

    def transport(self, user: str) -> Transport:
        return Transport(self.url(user), name=f"test-{user}")


def administered_rabbitmq(request: pytest.FixtureRequest) -> RabbitMQServer:
    """A server this process can run rabbitmqctl against."""
    server: RabbitMQServer = request.getfixturevalue("rabbitmq_server")
    try:
        server.rabbitmqctl("status")
    except NotSupportedInMode:
        server = request.getfixturevalue("restartable_rabbitmq")
    return server


@pytest.fixture(scope="module")
def provisioned(request: pytest.FixtureRequest) -> Iterator[Provisioned]:
    server = administered_rabbitmq(request)
    access = Access.generate(
        f"cp-{uuid.uuid4().hex[:12]}",
        crucible_agents=[uuid.uuid4() for _ in range(3)],
        sleds=[uuid.uuid4()],
    )
    provision(access, server.rabbitmqctl)
    server.rabbitmqctl("set_permissions", "-p", access.vhost, "guest", ".*", ".*", ".*")
    yield Provisioned(access, server.url)
    server.rabbitmqctl("delete_vhost", access.vhost)
    for user in access.grants():
        server.rabbitmqctl("delete_user", user)


async def queue_depth(url: str, queue: str) -> int:
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


async def dead_letters(url: str, messages: list[Envelope]) -> list[AbstractIncomingMessage]:
    """The dead letters of ``messages``; others are held unacked (so ``get`` moves past
    them) and go back to the queue when the connection closes."""
    wanted = {str(message.id) for message in messages}
    found: list[AbstractIncomingMessage] = []
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        queue = await channel.get_queue(DEAD_LETTER_QUEUE)
        async with asyncio.timeout(15):
            while len(found) < len(wanted):
                incoming = await queue.get(fail=False)
                if incoming is None:
                    await asyncio.sleep(0.05)
                elif incoming.message_id in wanted:
                    await incoming.ack()
                    found.append(incoming)
    return found


def as_source(message: Envelope, source: str) -> Envelope:
    return message.model_copy(update={"source": source})


def replying(transport: Transport, answer: Envelope) -> Handler:
    async def handle(delivery: Delivery) -> None:
        await transport.reply(delivery, answer.model_copy(update=delivery.message.caused()))

    return handle


# What the provisioning gives each service.


async def test_nexus_redeclares_the_provisioned_topology_and_agents_only_find_it(
    provisioned: Provisioned,
) -> None:
    async with provisioned.transport(NEXUS_USER) as transport:
        # Equivalent arguments, or the broker would refuse the re-declaration.
        await transport.declare_topology()
    for agent in provisioned.crucibles:
        async with provisioned.transport(crucible_user(agent)) as transport:
            await transport.ensure_topology(crucible_queue(agent))
    async with provisioned.transport(sled_user(provisioned.sled)) as transport:
        await transport.ensure_topology(sled_queue(provisioned.sled))


async def test_each_service_does_its_job_with_its_own_user(provisioned: Provisioned) -> None:
    agent = provisioned.crucibles[0]
    nexus_transport = provisioned.transport(NEXUS_USER)
    agent_transport = provisioned.transport(crucible_user(agent))
    cli_transport = provisioned.transport(CLI_USER)
    async with nexus_transport, agent_transport, cli_transport:
        await nexus_transport.declare_topology()
        await agent_transport.ensure_topology(crucible_queue(agent))
        events: asyncio.Queue[Delivery] = asyncio.Queue()
        await nexus_transport.consume(NEXUS_EVENTS_QUEUE, events.put)
        disks = api.DiskListReply(source="nexus/r1", payload=())
        await nexus_transport.consume(NEXUS_API_QUEUE, replying(nexus_transport, disks))
        region_info = as_source(example("region.info.v1"), f"crucible/{agent}")
        await agent_transport.consume(
            crucible_queue(agent),
            replying(agent_transport, region_info),
        )
        watched: asyncio.Queue[Delivery] = asyncio.Queue()
        await cli_transport.subscribe(["saga.*"], watched.put)

        # The CLI asks Nexus and hears the answer.
        reply = await cli_transport.request(
            api.DiskList(source="cli/test"), routing_key=NEXUS_API_QUEUE
        )
        assert isinstance(reply, api.DiskListReply)
        # Nexus asks the agent and hears the answer.
        answer = await nexus_transport.request(
            RegionGet(source="nexus/r1", payload=RegionRef(id=uuid.uuid4())),
            routing_key=crucible_queue(agent),
        )
        assert isinstance(answer, RegionInfo)
        # The agent notifies Nexus.
        event = as_source(example("region.state_changed.v1"), f"crucible/{agent}")
        await agent_transport.publish_event(event)
        assert (await asyncio.wait_for(events.get(), 10)).message == event
        # Nexus's progress reaches the CLI's watch.
        progress = as_source(example("saga.progressed.v1"), "nexus/r1")
        await nexus_transport.publish_event(progress)
        assert (await asyncio.wait_for(watched.get(), 10)).message == progress


async def test_the_real_services_run_with_least_privilege(
    provisioned: Provisioned, tmp_path: Path
) -> None:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'nexus.sqlite3'}"
    await upgrade_async(database_url)
    agents = [
        crucible(provisioned.url(crucible_user(agent)), tmp_path, agent_id=agent).service
        for agent in provisioned.crucibles
    ]
    sled = Service(
        name="sled",
        argv=[str(BIN / "sled-agent"), "run"],
        env={
            "SLED_SLED_ID": str(provisioned.sled),
            "SLED_DATA_DIR": str(tmp_path / "sled"),
            "SLED_AMQP_URL": provisioned.url(sled_user(provisioned.sled)),
        },
        log_path=tmp_path / "sled.log",
    )
    replica = nexus(
        "r1",
        database_url=database_url,
        amqp_url=provisioned.url(NEXUS_USER),
        workdir=tmp_path,
        sweep_seconds="0.2",
    )
    # Nexus last, so that it consumes whatever the agents publish while they stop.
    services = [*agents, sled, replica]
    for service in services:
        service.start()
    try:
        async with provisioned.transport(CLI_USER) as cli:
            client = ApiClient(cli)
            view = await disk_created(client)
        assert view.state == "done", view.error
        assert all(service.running for service in services)
    finally:
        for service in services:
            await service.stop()
    for service in services:
        assert "ACCESS_REFUSED" not in service.log_text(), service.log_text()[-3000:]


async def disk_created(client: ApiClient, timeout: float = 60.0) -> api.SagaView:
    """A disk create that ran to its end once the agents had announced themselves."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            accepted = await client.create_disk(f"d-{uuid.uuid4().hex[:8]}")
            view = await client.saga_in(accepted.saga_id, {"done", "undone", "stuck"})
        except (RuntimeError, TimeoutError):
            # Nexus not consuming yet, or no dataset announced yet: the stack is starting.
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
            continue
        if view.state == "done" or time.monotonic() > deadline:
            return view
        await asyncio.sleep(0.5)


# What an agent's credentials cannot do.


@pytest.mark.parametrize("exchange", [COMMANDS_EXCHANGE, ""], ids=["commands", "default"])
async def test_an_agent_cannot_publish_to_nexus_api(
    provisioned: Provisioned, exchange: str
) -> None:
    agent = provisioned.crucibles[0]
    request = api.DiskList(source=f"crucible/{agent}")
    async with provisioned.transport(crucible_user(agent)) as transport:
        with pytest.raises(PublishFailed, match="ACCESS_REFUSED"):
            await transport.publish(request, exchange=exchange, routing_key=NEXUS_API_QUEUE)
    assert await queue_depth(provisioned.operator_url, NEXUS_API_QUEUE) == 0


async def test_an_agent_cannot_send_commands_to_another_agent(provisioned: Provisioned) -> None:
    agent, other = provisioned.crucibles[:2]
    command = as_source(example("region.delete.v1"), f"crucible/{agent}")
    async with provisioned.transport(crucible_user(agent)) as transport:
        with pytest.raises(PublishFailed, match="ACCESS_REFUSED"):
            await transport.send_command(command, crucible_queue(other))


async def test_an_agent_cannot_publish_events_under_another_services_keys(
    provisioned: Provisioned,
) -> None:
    agent = provisioned.crucibles[0]
    progress = as_source(example("saga.progressed.v1"), f"crucible/{agent}")
    assert isinstance(progress, SagaProgressed)
    async with provisioned.transport(crucible_user(agent)) as transport:
        with pytest.raises(PublishFailed, match="ACCESS_REFUSED"):
            await transport.publish_event(progress)


@pytest.mark.parametrize("target", ["nexus.events", "nexus.api", "other-crucible", "sled"])
async def test_an_agent_cannot_read_nexus_queues_or_another_agents(
    provisioned: Provisioned, target: str
) -> None:
    agent, other = provisioned.crucibles[:2]
    queue = {
        "nexus.events": NEXUS_EVENTS_QUEUE,
        "nexus.api": NEXUS_API_QUEUE,
        "other-crucible": crucible_queue(other),
        "sled": sled_queue(provisioned.sled),
    }[target]
    received: asyncio.Queue[Delivery] = asyncio.Queue()
    async with provisioned.transport(crucible_user(agent)) as transport:
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await transport.consume(queue, received.put)


async def test_an_agent_cannot_bind_its_queue_to_other_traffic_nor_declare_queues(
    provisioned: Provisioned,
) -> None:
    agent = provisioned.crucibles[0]
    async with await aio_pika.connect(provisioned.url(crucible_user(agent))) as connection:
        channel = await connection.channel()
        own = await channel.get_queue(crucible_queue(agent))
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await own.bind(COMMANDS_EXCHANGE, routing_key=NEXUS_API_QUEUE)
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await channel.declare_queue(crucible_queue(uuid.uuid4()), durable=True)


@pytest.mark.parametrize("who", ["agent", "nexus", "unknown-user"])
async def test_a_wrong_password_is_refused(provisioned: Provisioned, who: str) -> None:
    user = {
        "agent": crucible_user(provisioned.crucibles[0]),
        "nexus": NEXUS_USER,
        "unknown-user": "mallory",
    }[who]
    wrong = Access(provisioned.access.vhost, passwords={user: "not-the-password"})
    transport = Transport(wrong.url(provisioned.server_url, user), name="test-wrong-password")
    with pytest.raises(aio_pika.exceptions.AMQPConnectionError):
        await transport.connect(timeout=5)


# A user can speak only for itself.


async def test_the_broker_refuses_a_user_id_that_is_not_the_connections(
    provisioned: Provisioned,
) -> None:
    agent = provisioned.crucibles[0]
    event = as_source(example("region.state_changed.v1"), "nexus/r1")
    async with await aio_pika.connect(provisioned.url(crucible_user(agent))) as connection:
        channel = await connection.channel(publisher_confirms=True)
        events = await channel.get_exchange(EVENTS_EXCHANGE)
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
            await events.publish(
                aio_pika.Message(encode(event), user_id=NEXUS_USER),
                routing_key="region.created",
            )


async def test_a_source_its_user_may_not_claim_is_dead_lettered_and_the_consumer_goes_on(
    provisioned: Provisioned,
) -> None:
    agent, other = provisioned.crucibles[:2]
    honest = as_source(example("region.state_changed.v1"), f"crucible/{agent}")
    forged = [
        as_source(example("region.state_changed.v1"), "nexus/r1"),
        as_source(example("region.state_changed.v1"), f"crucible/{other}"),
        as_source(example("region.state_changed.v1"), f"sled/{agent}"),
    ]
    async with (
        provisioned.transport(NEXUS_USER) as nexus_transport,
        provisioned.transport(crucible_user(agent)) as agent_transport,
    ):
        received: asyncio.Queue[Delivery] = asyncio.Queue()
        await nexus_transport.consume(NEXUS_EVENTS_QUEUE, received.put)
        for message in [*forged, honest]:
            await agent_transport.publish_event(message)
        assert (await asyncio.wait_for(received.get(), 10)).message == honest
        # The consumer dead-letters concurrently with handling the honest event: look
        # while it still runs (closing it first sends an unconfirmed one back to the queue).
        dead = await dead_letters(provisioned.operator_url, forged)
        assert received.empty()
    assert {incoming.message_id for incoming in dead} == {str(m.id) for m in forged}
    for incoming in dead:
        headers = incoming.headers or {}
        assert headers[REASON_HEADER] == "source_mismatch"
        assert headers[ORIGINAL_QUEUE_HEADER] == NEXUS_EVENTS_QUEUE
        # Re-published by the consumer (whose user it now carries); the detail says who sent it.
        assert crucible_user(agent) in str(headers[DETAIL_HEADER])


@pytest.mark.parametrize("require", [True, False], ids=["required", "optional"])
async def test_a_message_without_user_id_is_refused_only_when_one_is_required(
    vhost_url: str, require: bool
) -> None:
    queue = f"test.{uuid.uuid4()}"
    sent = example("region.get.v1")
    async with Transport(vhost_url, name="test-consumer", require_user_id=require) as transport:
        await transport.declare_topology()
        await transport.declare_command_queue(queue)
        received: asyncio.Queue[Delivery] = asyncio.Queue()
        await transport.consume(queue, received.put)
        async with await aio_pika.connect(vhost_url) as connection:
            channel = await connection.channel(publisher_confirms=True)
            commands = await channel.get_exchange(COMMANDS_EXCHANGE)
            await commands.publish(
                aio_pika.Message(encode(sent), message_id=str(sent.id)), routing_key=queue
            )
        if require:
            (dead,) = await dead_letters(vhost_url, [sent])
            assert (dead.headers or {})[REASON_HEADER] == "no_user_id"
            assert received.empty()
        else:
            assert (await asyncio.wait_for(received.get(), 10)).message == sent
