"""Authority against the real Nexus (issue #12, item 1): every message type an agent can
send, sent by a *different* agent's broker user about an object that agent does not own,
changes nothing in Nexus's books and is dead-lettered with ``not_owner``; the saga (or
the doctor's check) it targeted then completes normally when the owner speaks.

Nexus runs as a real process (SQLite, its own least-privilege broker user) in a vhost
provisioned by ``nexus.devstack.access``: three crucible agents on three sleds, two sled
agents. The agents are played by the test through plain transports, each connected as
that agent's own broker user: the test decides when each one speaks, so a forgery lands
while the saga it targets waits, and the owner's answer comes after. Nexus's books
(every table an agent's message could touch, the saga log, the rendezvous rows and the
outbox, which is what Nexus tells the agents) are compared before and after each
forgery.

The cases are a table by message type; a message type an agent can send without a case
here fails ``test_every_message_type_an_agent_sends_has_a_case``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from nexus.db.engine import create_engine
from nexus.db.migrate import upgrade_async
from nexus.db.models import Base, Dataset, Instance, OutboxMessage, Region, Sled, Vmm
from nexus.devstack.access import Access, provision
from schemas import api
from schemas.base import Envelope, utcnow
from schemas.common import CommandRejected, Rejection
from schemas.identity import (
    CLI_USER,
    NEXUS_USER,
    NOT_OWNER,
    crucible_source,
    crucible_user,
    sled_source,
    sled_user,
)
from schemas.instance import (
    DiskFlushed,
    Repair,
    RepairChange,
    RepairChanged,
    RepairFound,
    RepairInfo,
    RepairRef,
    RepairState,
    VmmChange,
    VmmDiskFlushed,
    VmmEnsure,
    VmmFound,
    VmmGet,
    VmmInfo,
    VmmState,
    VmmStateChanged,
    VolumeRepairGet,
)
from schemas.instance import Vmm as WireVmm
from schemas.messages import MESSAGE_TYPES
from schemas.region import Region as WireRegion
from schemas.region import (
    RegionChange,
    RegionEnsure,
    RegionFound,
    RegionGet,
    RegionInfo,
    RegionList,
    RegionListed,
    RegionListing,
    RegionRef,
    RegionState,
    RegionStateChanged,
)
from schemas.sled import (
    AgentAnnounced,
    CrucibleAgentInfo,
    Heartbeat,
    SledHeartbeat,
    SledInfo,
    SledRegistered,
)
from schemas.snapshot import (
    RegionSnapshotChange,
    RegionSnapshotList,
    RegionSnapshots,
    RegionSnapshotsInfo,
    RegionSnapshotStateChanged,
    RunningSnapshot,
    RunningSnapshotChange,
    RunningSnapshotStateChanged,
    Snapshot,
    SnapshotState,
)
from schemas.topology import (
    DEAD_LETTER_QUEUE,
    EVENTS_EXCHANGE,
    NEXUS_EVENT_BINDINGS,
    NEXUS_EVENTS_QUEUE,
    ORIGINAL_QUEUE_HEADER,
    REASON_HEADER,
    REPLIES_EXCHANGE,
    crucible_queue,
    sled_queue,
)
from schemas.transport import Delivery, Transport
from tests.harness.servers import NotSupportedInMode, RabbitMQServer
from tests.processes import ApiClient, Service, nexus

pytestmark = [pytest.mark.integration, pytest.mark.security]

CLI_SOURCE = "cli/authority-test"
# A generation far ahead: accepted, it would keep every later real event from applying.
FORGED_GENERATION = 50
# What Nexus records and an agent's message could touch; the outbox is what it tells agents.
BOOKS = (
    "regions",
    "datasets",
    "instances",
    "vmms",
    "sleds",
    "disks",
    "sagas",
    "saga_log",
    "wait_rendezvous",
    "unclaimed_events",
    "outbox",
)


def agent_sent_types() -> set[str]:
    """Every message type an agent sends: all but commands (Nexus's and the CLI's) and
    Nexus's own replies and notices (``schemas.api``, ``schemas.progress``)."""
    return {
        message_type
        for message_type, cls in MESSAGE_TYPES.items()
        if not cls.IS_COMMAND and cls.__module__ not in {"schemas.api", "schemas.progress"}
    }


# The agents, played by the test with their own broker users.


@dataclass
class PlayedAgent:
    """An agent's broker connection, its queue, and the commands it received, for the
    test to answer; requests that ``hold`` picks are handed over instead of answered."""

    transport: Transport
    received: asyncio.Queue[Delivery] = field(default_factory=asyncio.Queue)
    hold: Callable[[Envelope], bool] = lambda _: False

    async def next(self, kind: type[Envelope], timeout: float = 20.0) -> Delivery:
        async with asyncio.timeout(timeout):
            while True:
                delivery = await self.received.get()
                if isinstance(delivery.message, kind):
                    return delivery

    async def publish_event(self, message: Envelope, routing_key: str) -> None:
        await self.transport.publish(
            message, exchange=EVENTS_EXCHANGE, routing_key=routing_key, mandatory=False
        )

    async def reply_to(self, request: Delivery, message: Envelope) -> None:
        assert request.reply_to is not None
        await self.transport.publish(
            message.model_copy(update=request.message.caused()),
            exchange=REPLIES_EXCHANGE,
            routing_key=request.reply_to,
            mandatory=False,
        )


@dataclass
class PlayedCrucible(PlayedAgent):
    agent_id: uuid.UUID = field(default_factory=uuid.uuid4)
    sled_id: uuid.UUID = field(default_factory=uuid.uuid4)
    regions: dict[uuid.UUID, WireRegion] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return crucible_source(self.agent_id)

    async def on_command(self, delivery: Delivery) -> None:
        message = delivery.message
        if isinstance(message, RegionEnsure):
            spec = message.payload
            self.regions.setdefault(
                spec.id,
                WireRegion(
                    **spec.model_dump(), port_number=0, state=RegionState.REQUESTED, generation=1
                ),
            )
        if isinstance(message, RegionGet | RegionList | RegionSnapshotList) and not self.hold(
            message
        ):
            await self.answer(delivery)
        else:
            await self.received.put(delivery)

    async def answer(self, request: Delivery) -> None:
        """The truth, as the real agent would tell it."""
        message = request.message
        answer: Envelope
        if isinstance(message, RegionGet):
            answer = RegionInfo(
                source=self.source,
                payload=RegionFound(
                    agent_id=self.agent_id,
                    region=self.regions.get(message.payload.id),
                    region_id=message.payload.id,
                ),
            )
        elif isinstance(message, RegionSnapshotList):
            held = self.regions.get(message.payload.id)
            answer = RegionSnapshotsInfo(
                source=self.source,
                payload=RegionSnapshots(
                    agent_id=self.agent_id,
                    region_id=message.payload.id,
                    region_state=None if held is None else held.state,
                ),
            )
        else:
            answer = RegionListed(
                source=self.source,
                payload=RegionListing(agent_id=self.agent_id, regions=tuple(self.regions.values())),
            )
        await self.reply_to(request, answer)

    async def create(self, region_id: uuid.UUID) -> None:
        """The region is created here, and the agent says so."""
        region = self.regions[region_id].model_copy(
            update={"state": RegionState.CREATED, "generation": 2, "port_number": 19000}
        )
        self.regions[region_id] = region
        event = RegionStateChanged(
            source=self.source, payload=RegionChange(agent_id=self.agent_id, region=region)
        )
        await self.publish_event(event, event.routing_key())

    def announcement(self) -> AgentAnnounced:
        return AgentAnnounced(
            source=self.source,
            payload=CrucibleAgentInfo(
                agent_id=self.agent_id,
                sled_id=self.sled_id,
                queue=crucible_queue(self.agent_id),
                capacity_bytes=1 << 40,
                free_bytes=1 << 40,
                regions=0,
            ),
        )


@dataclass
class PlayedSled(PlayedAgent):
    sled_id: uuid.UUID = field(default_factory=uuid.uuid4)
    vmms: dict[uuid.UUID, WireVmm] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return sled_source(self.sled_id)

    async def on_command(self, delivery: Delivery) -> None:
        message = delivery.message
        if isinstance(message, VmmEnsure):
            spec = message.payload
            self.vmms.setdefault(
                spec.id,
                WireVmm(
                    id=spec.id,
                    instance_id=spec.instance_id,
                    sled_id=self.sled_id,
                    name=spec.name,
                    ncpus=spec.ncpus,
                    memory_bytes=spec.memory_bytes,
                    disk_ids=spec.disk_ids,
                    state=VmmState.STARTING,
                    generation=1,
                ),
            )
        if isinstance(message, VmmGet) and not self.hold(message):
            await self.answer(delivery)
        else:
            await self.received.put(delivery)

    async def answer(self, request: Delivery) -> None:
        message = request.message
        assert isinstance(message, VmmGet)
        found = VmmFound(
            sled_id=self.sled_id, vmm_id=message.payload.id, vmm=self.vmms.get(message.payload.id)
        )
        await self.reply_to(request, VmmInfo(source=self.source, payload=found))

    async def run(self, vmm_id: uuid.UUID) -> None:
        """The VMM is running here, and the sled says so."""
        vmm = self.vmms[vmm_id].model_copy(update={"state": VmmState.RUNNING, "generation": 2})
        self.vmms[vmm_id] = vmm
        event = VmmStateChanged(source=self.source, payload=VmmChange(vmm=vmm))
        await self.publish_event(event, event.routing_key())

    def registration(self, **changes: Any) -> SledRegistered:
        info = SledInfo(
            sled_id=self.sled_id,
            hostname=f"sled-{self.sled_id.hex[:6]}",
            cpus=64,
            memory_bytes=1 << 40,
            queue=sled_queue(self.sled_id),
        )
        return SledRegistered(source=self.source, payload=info.model_copy(update=changes))


# The stack: Nexus as a real process, its books, the dead letters, the played agents.


@dataclass
class DiskInFlight:
    saga_id: uuid.UUID
    # Each agent's ensure (one region per agent: three agents on three sleds).
    ensures: dict[uuid.UUID, Delivery]

    def region_of(self, agent: PlayedCrucible) -> uuid.UUID:
        message = self.ensures[agent.agent_id].message
        assert isinstance(message, RegionEnsure)
        return message.payload.id


@dataclass
class InstanceInFlight:
    saga_id: uuid.UUID
    instance_id: uuid.UUID
    vmm_id: uuid.UUID
    owner: PlayedSled
    other: PlayedSled
    ensure: Delivery


class Stack:
    def __init__(self, provisioned: Access, server_url: str, workdir: Path) -> None:
        self.access = provisioned
        self.server_url = server_url
        self.database_url = f"sqlite+aiosqlite:///{workdir / 'nexus.sqlite3'}"
        self.nexus: Service = nexus(
            "r1",
            database_url=self.database_url,
            amqp_url=provisioned.url(server_url, NEXUS_USER),
            workdir=workdir,
            sweep_seconds="0.2",
            # The played sleds do not beat: they must not be taken for gone (nor, a
            # minute on, expunged) meanwhile.
            sled_timeout_seconds="3600",
            sled_expunge_seconds="7200",
        )
        self.crucibles = [
            PlayedCrucible(self.transport(crucible_user(agent)), agent_id=agent)
            for agent in provisioned.crucible_agents
        ]
        self.sleds = [
            PlayedSled(self.transport(sled_user(sled)), sled_id=sled) for sled in provisioned.sleds
        ]
        self.cli = self.transport(CLI_USER)
        self.client = ApiClient(self.cli)
        self.engine: AsyncEngine | None = None
        self.dead: dict[str, AbstractIncomingMessage] = {}
        self.forged: set[str] = set()
        self._operator: aio_pika.abc.AbstractConnection | None = None

    def transport(self, user: str) -> Transport:
        return Transport(self.access.url(self.server_url, user), name=f"authority-{user}")

    @property
    def operator_url(self) -> str:
        """The server's own user in this vhost, to read the dead letters."""
        return self.server_url.rstrip("/") + f"/{self.access.vhost}"

    async def start(self) -> None:
        await upgrade_async(self.database_url)
        self.engine = create_engine(self.database_url)
        self._operator = await aio_pika.connect(self.operator_url)
        channel = await self._operator.channel()
        await (await channel.get_queue(DEAD_LETTER_QUEUE)).consume(self._on_dead_letter)
        self.nexus.start()
        await self.cli.connect()
        for crucible in self.crucibles:
            await self._serve(crucible, crucible_queue(crucible.agent_id), crucible.on_command)
            await crucible.publish_event(crucible.announcement(), "agent.announced")
        for sled in self.sleds:
            await self._serve(sled, sled_queue(sled.sled_id), sled.on_command)
            await sled.publish_event(sled.registration(), "sled.registered")

        async def known() -> bool:
            return (await self.count(Dataset), await self.count(Sled)) == (3, 2)

        await until(known, timeout=60)

    async def _serve(
        self, agent: PlayedAgent, queue: str, handler: Callable[[Delivery], Awaitable[None]]
    ) -> None:
        await agent.transport.connect()
        await agent.transport.ensure_topology(queue)
        await agent.transport.consume(queue, handler)

    async def stop(self) -> None:
        await self.nexus.stop()
        for agent in [*self.crucibles, *self.sleds]:
            await agent.transport.close()
        await self.cli.close()
        if self._operator is not None:
            await self._operator.close()
        if self.engine is not None:
            await self.engine.dispose()

    async def restart_nexus(self, **settings: str) -> None:
        await self.nexus.stop()
        self.nexus.start({f"NEXUS_{key.upper()}": value for key, value in settings.items()})
        await self.client.request(api.DiskList(source=CLI_SOURCE), timeout=60)

    async def _on_dead_letter(self, incoming: AbstractIncomingMessage) -> None:
        await incoming.ack()
        self.dead[incoming.message_id or ""] = incoming

    # Nexus's books.

    async def count(self, model: type[Base], *where: Any) -> int:
        assert self.engine is not None
        async with self.engine.connect() as connection:
            found = await connection.scalar(select(func.count()).select_from(model).where(*where))
        return int(found or 0)

    async def books(self) -> dict[str, list[tuple[Any, ...]]]:
        assert self.engine is not None
        found: dict[str, list[tuple[Any, ...]]] = {}
        async with self.engine.connect() as connection:
            for name in BOOKS:
                table = Base.metadata.tables[name]
                rows = await connection.execute(select(table).order_by(*table.primary_key.columns))
                found[name] = [tuple(row) for row in rows]
        return found

    async def still_books(self) -> dict[str, list[tuple[Any, ...]]]:
        """The books once they stopped changing (what an event in flight does is done)."""
        await self.settled()
        books = await self.books()
        async with asyncio.timeout(20):
            while True:
                await asyncio.sleep(0.3)
                if (again := await self.books()) == books:
                    return books
                books = again

    async def settled(self) -> None:
        """Nothing left in flight: every command relayed, every event consumed."""
        assert self._operator is not None

        async def quiet() -> bool:
            channel = await self._operator.channel()  # type: ignore[union-attr]
            try:
                events = await channel.declare_queue(NEXUS_EVENTS_QUEUE, passive=True)
                pending = events.declaration_result.message_count
            finally:
                await channel.close()
            unsent = await self.count(OutboxMessage, OutboxMessage.sent_at.is_(None))
            return not pending and not unsent

        await until(quiet)

    # Forgeries.

    async def forge(self, forger: PlayedAgent, message: Envelope) -> None:
        """``forger`` publishes the event ``message``: it is dead-lettered ``not_owner``
        from ``nexus.events`` and changes nothing."""
        await self._refused(message, lambda: forger.publish_event(message, _routing_key(message)))

    async def forge_reply(self, forger: PlayedAgent, request: Delivery, message: Envelope) -> None:
        """``forger`` answers ``request`` (sent to another agent) with ``message``: it is
        dead-lettered ``not_owner`` from Nexus's reply queue and changes nothing."""
        await self._refused(
            message, lambda: forger.reply_to(request, message), original=request.reply_to
        )

    async def _refused(
        self,
        message: Envelope,
        send: Callable[[], Awaitable[None]],
        *,
        original: str | None = None,
    ) -> None:
        before = await self.still_books()
        self.forged.add(str(message.id))
        await send()
        dead = await self.dead_letter(message)
        after = await self.still_books()
        changed = sorted(name for name in BOOKS if after[name] != before[name])
        assert not changed, f"{message.TYPE} from {message.source} changed {changed}"
        assert dead is not None, f"{message.TYPE} from {message.source} was not dead-lettered"
        headers = dead.headers or {}
        assert headers[REASON_HEADER] == NOT_OWNER, headers
        assert headers[ORIGINAL_QUEUE_HEADER] == (original or NEXUS_EVENTS_QUEUE), headers

    async def dead_letter(
        self, message: Envelope, timeout: float = 15.0
    ) -> AbstractIncomingMessage | None:
        deadline = time.monotonic() + timeout
        while str(message.id) not in self.dead and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.dead.get(str(message.id))

    def unexpected_dead_letters(self) -> set[str]:
        return set(self.dead) - self.forged

    # Sagas in flight, and their owners speaking.

    async def disk_in_flight(self) -> DiskInFlight:
        accepted = await self.client.create_disk(f"d-{uuid.uuid4().hex[:8]}")
        ensures = {c.agent_id: await c.next(RegionEnsure) for c in self.crucibles}
        await self.settled()
        return DiskInFlight(accepted.saga_id, ensures)

    async def finish_disk(self, disk: DiskInFlight) -> None:
        for crucible in self.crucibles:
            if crucible.regions[disk.region_of(crucible)].state is not RegionState.CREATED:
                await crucible.create(disk.region_of(crucible))
        await self.saga_done(disk.saga_id)
        assert self.engine is not None
        async with self.engine.connect() as connection:
            for crucible in self.crucibles:
                region = (
                    await connection.execute(
                        select(Region).where(Region.id == disk.region_of(crucible))
                    )
                ).one()
                # On the agent that was asked, as the agent said: the forgery left no trace.
                assert (region.dataset_id, region.state, region.generation) == (
                    crucible.agent_id,
                    "created",
                    2,
                )

    async def instance_in_flight(self) -> InstanceInFlight:
        reply = await self.client.request(
            api.InstanceCreate(
                source=CLI_SOURCE,
                payload=api.InstanceCreateRequest(
                    project="test",
                    name=f"vm-{uuid.uuid4().hex[:8]}",
                    ncpus=1,
                    memory_bytes=1 << 30,
                ),
            )
        )
        assert isinstance(reply, api.AcceptedReply), reply
        instance_id = reply.payload.resource_id
        assert self.engine is not None

        async def placed() -> bool:
            return await self.count(Vmm, Vmm.instance_id == instance_id) == 1

        await until(placed)
        async with self.engine.connect() as connection:
            vmm_id, sled_id = (
                await connection.execute(
                    select(Vmm.id, Vmm.sled_id).where(Vmm.instance_id == instance_id)
                )
            ).one()
        owner, other = sorted(self.sleds, key=lambda sled: sled.sled_id != sled_id)
        ensure = await owner.next(VmmEnsure)
        assert isinstance(ensure.message, VmmEnsure)
        assert (ensure.message.payload.id, ensure.message.payload.instance_id) == (
            vmm_id,
            instance_id,
        )
        await self.settled()
        return InstanceInFlight(reply.payload.saga_id, instance_id, vmm_id, owner, other, ensure)

    async def finish_instance(self, instance: InstanceInFlight) -> None:
        await instance.owner.run(instance.vmm_id)
        await self.saga_done(instance.saga_id)
        assert self.engine is not None
        async with self.engine.connect() as connection:
            row = (
                await connection.execute(
                    select(Instance).where(Instance.id == instance.instance_id)
                )
            ).one()
            vmm = (await connection.execute(select(Vmm).where(Vmm.id == instance.vmm_id))).one()
        assert (row.active_vmm_id, row.state) == (instance.vmm_id, "running")
        assert (vmm.sled_id, vmm.state, vmm.generation) == (instance.owner.sled_id, "running", 2)

    async def saga_done(self, saga_id: uuid.UUID) -> None:
        view = await self.client.saga_in(saga_id, {"done", "undone", "stuck"})
        assert view.state == "done", view.error

    async def doctor(self) -> asyncio.Task[api.DoctorReport]:
        async def ask() -> api.DoctorReport:
            reply = await self.client.request(
                api.Doctor(source=CLI_SOURCE, payload=api.DoctorRequest(timeout_seconds=30)),
                timeout=60,
            )
            assert isinstance(reply, api.DoctorReply), reply
            return reply.payload

        return asyncio.create_task(ask())


def _routing_key(message: Envelope) -> str:
    key: str = message.routing_key()  # type: ignore[attr-defined]
    kind = key.partition(".")[0]
    if key in NEXUS_EVENT_BINDINGS or f"{kind}.*" in NEXUS_EVENT_BINDINGS:
        return key
    # Nexus does not bind region.requested (it placed the region itself): the forgery
    # goes under a key of its kind that Nexus consumes, where a forger would put it.
    return next(binding for binding in NEXUS_EVENT_BINDINGS if binding.startswith(f"{kind}."))


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {condition.__qualname__}"
        await asyncio.sleep(0.05)


def administered_rabbitmq(request: pytest.FixtureRequest) -> RabbitMQServer:
    server: RabbitMQServer = request.getfixturevalue("rabbitmq_server")
    try:
        server.rabbitmqctl("status")
    except NotSupportedInMode:
        server = request.getfixturevalue("restartable_rabbitmq")
    return server


@pytest.fixture(scope="module")
def provisioned(request: pytest.FixtureRequest) -> Iterator[tuple[Access, RabbitMQServer]]:
    server = administered_rabbitmq(request)
    access = Access.generate(
        f"authority-{uuid.uuid4().hex[:12]}",
        crucible_agents=[uuid.uuid4() for _ in range(3)],
        sleds=[uuid.uuid4() for _ in range(2)],
    )
    provision(access, server.rabbitmqctl)
    server.rabbitmqctl("set_permissions", "-p", access.vhost, "guest", ".*", ".*", ".*")
    yield access, server
    server.rabbitmqctl("delete_vhost", access.vhost)
    for user in access.grants():
        server.rabbitmqctl("delete_user", user)


@pytest.fixture(scope="module")
async def stack(
    provisioned: tuple[Access, RabbitMQServer], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    access, server = provisioned
    running = Stack(access, server.url, tmp_path_factory.mktemp("authority"))
    try:
        await running.start()
        yield running
    finally:
        await running.stop()


# The cases: each forges one message and then lets the owner finish.


Run = Callable[[Stack], Awaitable[None]]


@dataclass(frozen=True)
class Case:
    message_type: str
    name: str
    run: Run


def region_event(state: RegionState) -> Run:
    """Another agent reports, in its own name, on a region placed on the first agent."""

    async def run(stack: Stack) -> None:
        disk = await stack.disk_in_flight()
        owner, forger, _ = stack.crucibles
        region = owner.regions[disk.region_of(owner)].model_copy(
            update={
                "state": state,
                "generation": FORGED_GENERATION,
                "port_number": 19999,
                "failure": "forged" if state is RegionState.FAILED else None,
            }
        )
        await stack.forge(
            forger,
            RegionStateChanged(
                source=forger.source, payload=RegionChange(agent_id=forger.agent_id, region=region)
            ),
        )
        await stack.finish_disk(disk)

    return run


async def region_command_rejected(stack: Stack) -> None:
    disk = await stack.disk_in_flight()
    owner, forger, _ = stack.crucibles
    ensure = disk.ensures[owner.agent_id].message
    await stack.forge(forger, rejection(forger.source, ensure))
    await stack.finish_disk(disk)


def snapshot_of(region_id: uuid.UUID) -> Snapshot:
    return Snapshot(
        region_id=region_id,
        name=str(uuid.uuid4()),
        created=utcnow(),
        state=SnapshotState.CREATED,
        generation=1,
    )


async def region_snapshot_event(stack: Stack) -> None:
    """Another agent reports, in its own name, a snapshot of a region placed on the first
    agent; the owner's own report is taken (filed for a saga, which none waits on here)."""
    disk = await stack.disk_in_flight()
    await stack.finish_disk(disk)
    owner, forger, _ = stack.crucibles
    region_id = disk.region_of(owner)
    honest = RegionSnapshotStateChanged(
        source=owner.source,
        payload=RegionSnapshotChange(agent_id=owner.agent_id, snapshot=snapshot_of(region_id)),
    )
    await owner.publish_event(honest, honest.routing_key())
    await stack.forge(
        forger,
        RegionSnapshotStateChanged(
            source=forger.source,
            payload=RegionSnapshotChange(agent_id=forger.agent_id, snapshot=snapshot_of(region_id)),
        ),
    )


async def running_snapshot_event(stack: Stack) -> None:
    """As :func:`region_snapshot_event`, for the read-only downstairs of a snapshot."""
    disk = await stack.disk_in_flight()
    await stack.finish_disk(disk)
    owner, forger, _ = stack.crucibles
    running = RunningSnapshot(
        id=disk.region_of(owner),
        name=str(uuid.uuid4()),
        port_number=19001,
        state=RegionState.CREATED,
        generation=2,
    )
    honest = RunningSnapshotStateChanged(
        source=owner.source,
        payload=RunningSnapshotChange(agent_id=owner.agent_id, running_snapshot=running),
    )
    await owner.publish_event(honest, honest.routing_key())
    await stack.forge(
        forger,
        RunningSnapshotStateChanged(
            source=forger.source,
            payload=RunningSnapshotChange(
                agent_id=forger.agent_id,
                running_snapshot=running.model_copy(update={"generation": FORGED_GENERATION}),
            ),
        ),
    )


async def region_snapshots_info_to_a_query(stack: Stack) -> None:
    """An operator asks an agent for a region's snapshots; another agent answers first.
    The requester takes only the answer of the agent whose queue it asked."""
    owner, forger, _ = stack.crucibles
    region_id = uuid.uuid4()
    owner.hold = lambda message: isinstance(message, RegionSnapshotList)
    asked = asyncio.create_task(
        stack.cli.request(
            RegionSnapshotList(source=CLI_SOURCE, payload=RegionRef(id=region_id)),
            routing_key=crucible_queue(owner.agent_id),
            timeout=60,
        )
    )
    request = await owner.next(RegionSnapshotList)
    forged = snapshot_of(region_id)
    await stack.forge_reply(
        forger,
        request,
        RegionSnapshotsInfo(
            source=forger.source,
            payload=RegionSnapshots(
                agent_id=owner.agent_id,
                region_id=region_id,
                region_state=RegionState.CREATED,
                snapshots=(forged,),
            ),
        ),
    )
    await owner.answer(request)
    answer = await asked
    owner.hold = lambda _: False
    assert isinstance(answer, RegionSnapshotsInfo), answer
    assert (answer.source, answer.payload.region_state, answer.payload.snapshots) == (
        owner.source,
        None,
        (),
    )


def vmm_event(state: VmmState) -> Run:
    """The other sled reports on a VMM Nexus placed on the first one."""

    async def run(stack: Stack) -> None:
        instance = await stack.instance_in_flight()
        forger = instance.other
        forged = instance.owner.vmms[instance.vmm_id].model_copy(
            update={"state": state, "generation": FORGED_GENERATION, "sled_id": forger.sled_id}
        )
        await stack.forge(
            forger, VmmStateChanged(source=forger.source, payload=VmmChange(vmm=forged))
        )
        await stack.finish_instance(instance)

    return run


async def instance_command_rejected(stack: Stack) -> None:
    instance = await stack.instance_in_flight()
    await stack.forge(instance.other, rejection(instance.other.source, instance.ensure.message))
    await stack.finish_instance(instance)


def rejection(source: str, command: Envelope) -> CommandRejected:
    return CommandRejected(
        source=source,
        payload=Rejection(
            command_id=command.id, command_type=command.TYPE, code="conflict", message="forged"
        ),
    )


async def sled_registered(stack: Stack) -> None:
    """The second sled registers as the first, to be sent its commands."""
    victim, forger = stack.sleds
    forged = victim.registration(hostname="forged", cpus=1024, queue=sled_queue(forger.sled_id))
    await stack.forge(forger, forged.model_copy(update={"source": forger.source}))
    await stack.finish_instance(await stack.instance_in_flight())


async def sled_heartbeat(stack: Stack) -> None:
    """The second sled beats for the first (a sled gone silent would look alive)."""
    victim, forger = stack.sleds
    await stack.forge(
        forger,
        SledHeartbeat(
            source=forger.source,
            payload=Heartbeat(
                sled_id=victim.sled_id,
                sequence=1,
                started_at=utcnow(),
                cpus_used=0,
                memory_used_bytes=0,
                instances_running=0,
            ),
        ),
    )
    await stack.finish_instance(await stack.instance_in_flight())


async def agent_announced(stack: Stack) -> None:
    """The second agent announces itself as the first, with its own queue and all the
    space in the world, to be sent the first agent's region commands."""
    victim, forger, _ = stack.crucibles
    announced = victim.announcement()
    await stack.forge(
        forger,
        announced.model_copy(
            update={
                "source": forger.source,
                "payload": announced.payload.model_copy(
                    update={
                        "queue": crucible_queue(forger.agent_id),
                        "sled_id": forger.sled_id,
                        "capacity_bytes": 1 << 50,
                        "free_bytes": 1 << 50,
                    }
                ),
            }
        ),
    )
    # Each agent is sent exactly its own region, and the disk is made.
    await stack.finish_disk(await stack.disk_in_flight())


async def region_info_to_a_reconcile_query(stack: Stack) -> None:
    """At a region's deadline Nexus asks its agent; another agent answers first that
    the region is created. The owner's true answer then resumes the saga."""
    owner, forger, _ = stack.crucibles
    await stack.restart_nexus(region_deadline_seconds="1")
    try:
        owner.hold = lambda message: isinstance(message, RegionGet)
        disk = await stack.disk_in_flight()
        for crucible in (forger, stack.crucibles[2]):
            await crucible.create(disk.region_of(crucible))
        query = await owner.next(RegionGet)
        region = owner.regions[disk.region_of(owner)]
        created = region.model_copy(update={"state": RegionState.CREATED, "port_number": 19001})
        await stack.forge_reply(
            forger,
            query,
            RegionInfo(
                source=forger.source,
                payload=RegionFound(agent_id=owner.agent_id, region=created, region_id=region.id),
            ),
        )
        owner.hold = lambda _: False
        owner.regions[region.id] = created.model_copy(update={"generation": 2})
        await owner.answer(query)
        await stack.saga_done(disk.saga_id)
    finally:
        owner.hold = lambda _: False
        await stack.restart_nexus()


async def region_listed_to_the_doctor(stack: Stack) -> None:
    """The doctor asks an agent for its regions; another agent answers in its place
    with a region no disk owns (an orphan the doctor would report)."""
    owner, forger, _ = stack.crucibles
    owner.hold = lambda message: isinstance(message, RegionList)
    try:
        report = await stack.doctor()
        request = await owner.next(RegionList)
        orphan = WireRegion(
            id=uuid.uuid4(),
            block_size=512,
            extent_size=64,
            extent_count=8,
            encrypted=True,
            port_number=19002,
            state=RegionState.CREATED,
            generation=2,
        )
        await stack.forge_reply(
            forger,
            request,
            RegionListed(
                source=forger.source,
                payload=RegionListing(agent_id=owner.agent_id, regions=(orphan,)),
            ),
        )
        await owner.answer(request)
        found = await report
    finally:
        owner.hold = lambda _: False
    assert f"crucible {owner.agent_id}" not in found.unreachable_agents
    assert str(orphan.id) not in {finding.object_id for finding in found.findings}


async def rejection_to_the_doctor(stack: Stack) -> None:
    """Another agent refuses, in an agent's place, the doctor's request to it."""
    owner, forger, _ = stack.crucibles
    owner.hold = lambda message: isinstance(message, RegionList)
    try:
        report = await stack.doctor()
        request = await owner.next(RegionList)
        await stack.forge_reply(forger, request, rejection(forger.source, request.message))
        await owner.answer(request)
        found = await report
    finally:
        owner.hold = lambda _: False
    assert f"crucible {owner.agent_id}" not in found.unreachable_agents


async def instance_info_to_the_doctor(stack: Stack) -> None:
    """The doctor asks the sled of a running instance about its VMM; the other sled
    answers first that it has no such VMM (the doctor would report it astray)."""
    instance = await stack.instance_in_flight()
    await stack.finish_instance(instance)
    owner, forger = instance.owner, instance.other
    owner.hold = lambda message: (
        isinstance(message, VmmGet) and message.payload.id == instance.vmm_id
    )
    try:
        report = await stack.doctor()
        request = await owner.next(VmmGet)
        await stack.forge_reply(
            forger,
            request,
            VmmInfo(
                source=forger.source,
                payload=VmmFound(sled_id=owner.sled_id, vmm_id=instance.vmm_id, vmm=None),
            ),
        )
        await owner.answer(request)
        found = await report
    finally:
        owner.hold = lambda _: False
    assert str(instance.instance_id) not in {finding.object_id for finding in found.findings}


def a_repair(vmm_id: uuid.UUID, sled_id: uuid.UUID, state: RepairState) -> Repair:
    return Repair(
        id=uuid.uuid4(),
        sled_id=sled_id,
        vmm_id=vmm_id,
        disk_id=uuid.uuid4(),
        old_region_id=uuid.uuid4(),
        new_region_id=uuid.uuid4(),
        state=state,
        progress=100,
        generation=FORGED_GENERATION,
    )


async def repair_event(stack: Stack) -> None:
    """The other sled reports, in its own name, a finished live repair in a VMM Nexus
    placed on the first sled (it would wake a replacement waiting on that repair)."""
    instance = await stack.instance_in_flight()
    await stack.finish_instance(instance)
    forger = instance.other
    forged = a_repair(instance.vmm_id, forger.sled_id, RepairState.FINISHED)
    await stack.forge(
        forger, RepairChanged(source=forger.source, payload=RepairChange(repair=forged))
    )


async def disk_flushed_event(stack: Stack) -> None:
    """The other sled reports, in its own name, a flush by a VMM Nexus placed on the
    first sled (it would wake a snapshot_create parked on that flush)."""
    instance = await stack.instance_in_flight()
    await stack.finish_instance(instance)
    forger = instance.other
    flushed = DiskFlushed(
        sled_id=forger.sled_id,
        vmm_id=instance.vmm_id,
        disk_id=uuid.uuid4(),
        snapshot_id=uuid.uuid4(),
    )
    await stack.forge(forger, VmmDiskFlushed(source=forger.source, payload=flushed))


async def repair_info_to_a_query(stack: Stack) -> None:
    """Nexus's reconcile asks a VMM's sled how its repair goes; the other sled answers
    first that it finished. The requester takes only the answer of the sled it asked."""
    owner, forger = stack.sleds
    repair_id = uuid.uuid4()
    asked = asyncio.create_task(
        stack.cli.request(
            VolumeRepairGet(source=CLI_SOURCE, payload=RepairRef(id=repair_id)),
            routing_key=sled_queue(owner.sled_id),
            timeout=60,
        )
    )
    request = await owner.next(VolumeRepairGet)
    forged = a_repair(uuid.uuid4(), owner.sled_id, RepairState.FINISHED).model_copy(
        update={"id": repair_id}
    )
    await stack.forge_reply(
        forger,
        request,
        RepairInfo(
            source=forger.source,
            payload=RepairFound(sled_id=owner.sled_id, repair_id=repair_id, repair=forged),
        ),
    )
    await owner.reply_to(
        request,
        RepairInfo(
            source=owner.source,
            payload=RepairFound(sled_id=owner.sled_id, repair_id=repair_id, repair=None),
        ),
    )
    answer = await asked
    assert isinstance(answer, RepairInfo), answer
    assert (answer.source, answer.payload.repair) == (owner.source, None)


CASES = [
    *(
        Case(RegionStateChanged.TYPE, f"region-{state.value}", region_event(state))
        for state in RegionState
    ),
    *(Case(VmmStateChanged.TYPE, f"vmm-{state.value}", vmm_event(state)) for state in VmmState),
    Case(CommandRejected.TYPE, "region-command", region_command_rejected),
    Case(CommandRejected.TYPE, "instance-command", instance_command_rejected),
    Case(CommandRejected.TYPE, "reply-to-the-doctor", rejection_to_the_doctor),
    Case(SledRegistered.TYPE, "as-another-sled", sled_registered),
    Case(SledHeartbeat.TYPE, "for-another-sled", sled_heartbeat),
    Case(AgentAnnounced.TYPE, "as-another-agent", agent_announced),
    Case(RegionInfo.TYPE, "reconcile-answer", region_info_to_a_reconcile_query),
    Case(RegionListed.TYPE, "reply-to-the-doctor", region_listed_to_the_doctor),
    Case(VmmInfo.TYPE, "reply-to-the-doctor", instance_info_to_the_doctor),
    Case(RegionSnapshotStateChanged.TYPE, "of-another-agents-region", region_snapshot_event),
    Case(RunningSnapshotStateChanged.TYPE, "of-another-agents-region", running_snapshot_event),
    Case(RegionSnapshotsInfo.TYPE, "reply-to-a-query", region_snapshots_info_to_a_query),
    Case(RepairChanged.TYPE, "in-another-sleds-vmm", repair_event),
    Case(VmmDiskFlushed.TYPE, "in-another-sleds-vmm", disk_flushed_event),
    Case(RepairInfo.TYPE, "reply-to-a-query", repair_info_to_a_query),
]


def test_every_message_type_an_agent_sends_has_a_case() -> None:
    assert {case.message_type for case in CASES} == agent_sent_types()


@pytest.mark.parametrize("case", CASES, ids=[f"{c.message_type}-{c.name}" for c in CASES])
async def test_a_message_about_what_its_sender_does_not_own_changes_nothing(
    stack: Stack, case: Case
) -> None:
    await case.run(stack)
    assert not stack.unexpected_dead_letters(), "only forgeries are dead-lettered"
