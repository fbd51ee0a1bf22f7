"""Bad input to every consumer of the real services (hypothesis): garbage is dead-lettered
with its reason, well-formed nonsense is answered with a clear error or ignored, no
consumer dies and nothing changes state.

One stack for the module in its own vhost: a Nexus replica (SQLite), a crucible agent
and a sled agent as real processes. Hypothesis runs synchronously; the broker clients
live on an event loop in a thread of their own (:class:`Portal`).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nexus.db.migrate import upgrade_async
from nexus.db.states import SagaState
from schemas import api
from schemas.base import MAX_SAFE_INTEGER, Envelope
from schemas.common import CommandRejected
from schemas.instance import (
    VmmGet,
    VmmInfo,
    VmmReboot,
    VmmRef,
    VmmStop,
)
from schemas.messages import MAX_BODY_BYTES, Message, MessageRejected, decode, encode
from schemas.region import (
    RegionDelete,
    RegionEnsure,
    RegionGet,
    RegionInfo,
    RegionList,
    RegionListed,
    RegionRef,
    RegionSpec,
)
from schemas.topology import (
    COMMANDS_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EVENTS_EXCHANGE,
    NEXUS_API_QUEUE,
    NEXUS_EVENTS_QUEUE,
    REASON_HEADER,
    crucible_queue,
    sled_queue,
)
from schemas.transport import Transport
from tests.examples import example
from tests.harness.servers import NotSupportedInMode, RabbitMQServer
from tests.processes import BIN, Service, crucible, nexus

pytestmark = [pytest.mark.integration, pytest.mark.security]

_T = TypeVar("_T")
NEXUS_SOURCE = "nexus/bad-input-test"
CLI_SOURCE = "cli/bad-input-test"
REJECTION_REASONS = {"invalid_json", "unknown_type", "schema_violation", "too_large"}
EXAMPLES = 100
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Where each consumer is reached, and the message types it is meant to receive.
TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "crucible": (
        COMMANDS_EXCHANGE,
        ("region.ensure.v1", "region.delete.v1", "region.get.v1", "region.list.v1"),
    ),
    "sled": (
        COMMANDS_EXCHANGE,
        ("vmm.ensure.v1", "vmm.stop.v1", "vmm.reboot.v1", "vmm.get.v1"),
    ),
    "nexus.events": (
        EVENTS_EXCHANGE,
        ("region.state_changed.v1", "vmm.state_changed.v1", "sled.heartbeat.v1"),
    ),
    "nexus.api": (
        COMMANDS_EXCHANGE,
        ("api.disk.create.v1", "api.disk.get.v1", "api.instance.create.v1", "api.saga.list.v1"),
    ),
}


class Portal:
    """An event loop in a thread, for the synchronous hypothesis tests to call into."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, _T], timeout: float = 30.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class Stack:
    """The running services, and a broker client that talks to them and reads dead letters."""

    def __init__(self, url: str, workdir: Path, portal: Portal) -> None:
        self.url = url
        self.portal = portal
        self.database_url = f"sqlite+aiosqlite:///{workdir / 'nexus.sqlite3'}"
        agent = crucible(url, workdir)
        self.agent_id = agent.agent_id
        self.sled_id = uuid.uuid4()
        self.services = [
            agent.service,
            Service(
                name="sled",
                argv=[str(BIN / "sled-agent"), "run"],
                env={
                    "SLED_SLED_ID": str(self.sled_id),
                    "SLED_DATA_DIR": str(workdir / "sled"),
                    "SLED_AMQP_URL": url,
                },
                log_path=workdir / "sled.log",
            ),
            nexus("r1", database_url=self.database_url, amqp_url=url, workdir=workdir),
        ]
        self.transport = Transport(url, name="test-bad-input")
        self._dead: dict[str, asyncio.Future[AbstractIncomingMessage]] = {}
        self._connection: aio_pika.abc.AbstractConnection | None = None

    def routing_key(self, target: str) -> str:
        return {
            "crucible": crucible_queue(self.agent_id),
            "sled": sled_queue(self.sled_id),
            # Bound to nexus.events (region.*), whatever the body claims to be.
            "nexus.events": "region.created",
            "nexus.api": NEXUS_API_QUEUE,
        }[target]

    async def start(self) -> None:
        await upgrade_async(self.database_url)
        await self.transport.connect()
        await self.transport.declare_topology()
        self._connection = await aio_pika.connect(self.url)
        channel = await self._connection.channel()
        dead_letters = await channel.get_queue(DEAD_LETTER_QUEUE)
        await dead_letters.consume(self._on_dead_letter)
        for service in self.services:
            service.start()

    async def _on_dead_letter(self, incoming: AbstractIncomingMessage) -> None:
        await incoming.ack()
        future = self._dead.setdefault(
            incoming.message_id or "", asyncio.get_running_loop().create_future()
        )
        if not future.done():
            future.set_result(incoming)

    async def stop(self) -> None:
        for service in self.services:
            await service.stop()
        await self.transport.close()
        if self._connection is not None:
            await self._connection.close()

    async def dead_letter_reason(self, body: bytes, target: str) -> str:
        """Publish ``body`` to ``target``'s consumer and wait for it in the dead letters."""
        message_id = uuid.uuid4()
        future = self._dead.setdefault(str(message_id), asyncio.get_running_loop().create_future())
        exchange, _ = TARGETS[target]
        await self.transport.publish_bytes(
            body,
            exchange=exchange,
            routing_key=self.routing_key(target),
            message_id=message_id,
            message_type="garbage",
        )
        incoming = await asyncio.wait_for(future, 15)
        return str((incoming.headers or {}).get(REASON_HEADER))

    async def ask(self, message: Envelope, target: str) -> Message:
        return await self.transport.request(message, routing_key=self.routing_key(target))

    async def state(self) -> dict[str, Any]:
        """What must not change: the agent's regions, Nexus's disks, instances and sagas."""
        regions = await self.ask(RegionList(source=NEXUS_SOURCE), "crucible")
        assert isinstance(regions, RegionListed)
        disks = await self.ask(api.DiskList(source=CLI_SOURCE), "nexus.api")
        instances = await self.ask(api.InstanceList(source=CLI_SOURCE), "nexus.api")
        sagas = await self.ask(api.SagaList(source=CLI_SOURCE), "nexus.api")
        assert isinstance(disks, api.DiskListReply)
        assert isinstance(instances, api.InstanceListReply)
        assert isinstance(sagas, api.SagaListReply)
        return {
            "regions": regions.payload.model_dump(),
            "disks": disks.payload,
            "instances": instances.payload,
            "sagas": sagas.payload,
        }

    async def serves_every_consumer(self) -> None:
        """Each process is alive and answers a good message."""
        for service in self.services:
            assert service.running, f"{service.name} died:\n{service.log_text()[-3000:]}"
        missing = await self.ask(
            VmmGet(source=NEXUS_SOURCE, payload=VmmRef(id=uuid.uuid4())), "sled"
        )
        assert isinstance(missing, VmmInfo) and missing.payload.vmm is None
        await self.state()
        # Nexus consumed all the events it was sent (none left waiting or redelivered).
        async with asyncio.timeout(15):
            while await self._depth(NEXUS_EVENTS_QUEUE):
                await asyncio.sleep(0.1)

    async def _depth(self, queue: str) -> int:
        assert self._connection is not None
        channel = await self._connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
            return int(declared.declaration_result.message_count or 0)
        finally:
            await channel.close()

    async def until_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self.serves_every_consumer()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)


def administered_rabbitmq(request: pytest.FixtureRequest) -> RabbitMQServer:
    server: RabbitMQServer = request.getfixturevalue("rabbitmq_server")
    try:
        server.rabbitmqctl("status")
    except NotSupportedInMode:
        server = request.getfixturevalue("restartable_rabbitmq")
    return server


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    server = administered_rabbitmq(request)
    vhost = f"bad-input-{uuid.uuid4().hex[:12]}"
    server.rabbitmqctl("add_vhost", vhost)
    server.rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    portal = Portal()
    running = Stack(server.url.rstrip("/") + f"/{vhost}", tmp_path_factory.mktemp("stack"), portal)
    try:
        portal.call(running.start())
        portal.call(running.until_ready(), timeout=90)
        yield running
    finally:
        portal.call(running.stop(), timeout=90)
        portal.close()
        server.rabbitmqctl("delete_vhost", vhost)


# Garbage: bytes that are not a message this system accepts.

JsonValue = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
)


def leaf_paths(value: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(value, dict) and value:
        return [path for key, item in value.items() for path in leaf_paths(item, (*prefix, key))]
    return [prefix]


def parent_and_key(document: dict[str, Any], path: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    return parent, path[-1]


@st.composite
def mutated(draw: st.DrawFn, message_types: tuple[str, ...]) -> bytes:
    """A valid message of one of ``message_types`` with one field broken."""
    document = json.loads(encode(example(draw(st.sampled_from(message_types)))))
    path = draw(st.sampled_from(leaf_paths(document)))
    parent, key = parent_and_key(document, path)
    how = draw(st.sampled_from(["drop", "retype", "unknown-field", "unknown-type"]))
    if how == "drop":
        del parent[key]
    elif how == "retype":
        parent[key] = draw(JsonValue)
    elif how == "unknown-field":
        parent[draw(st.text(min_size=1, max_size=12))] = draw(JsonValue)
    else:
        document["type"] = draw(st.text(max_size=40))
    return json.dumps(document).encode()


def garbage(message_types: tuple[str, ...]) -> st.SearchStrategy[bytes]:
    valid = st.sampled_from(message_types).map(lambda kind: encode(example(kind)))
    # Broken messages weigh as much as all the rest: they reach the deepest validation.
    broken = mutated(message_types)
    return st.one_of(
        broken,
        broken,
        broken,
        broken,
        st.binary(max_size=300),
        st.text(max_size=300).map(str.encode),
        # Cut short, mid-value.
        st.tuples(valid, st.integers(min_value=1)).map(lambda cut: cut[0][: cut[1] % len(cut[0])]),
        # Huge: a valid message padded past the limit, and a huge string field.
        valid.map(lambda body: b" " * (MAX_BODY_BYTES + 1 - len(body)) + body),
        st.just(json.dumps({"type": "region.get.v1", "x": "y" * MAX_BODY_BYTES}).encode()),
    )


def is_refused(body: bytes) -> bool:
    try:
        decode(body)
    except MessageRejected:
        return True
    return False


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_garbage_is_dead_lettered_with_its_reason_and_changes_nothing(
    stack: Stack, target: str
) -> None:
    before = stack.portal.call(stack.state())

    @PROPERTY
    @given(body=garbage(TARGETS[target][1]))
    def property_(body: bytes) -> None:
        # A mutation that happens to leave a valid message is not garbage.
        assume(is_refused(body))
        reason = stack.portal.call(stack.dead_letter_reason(body, target))
        assert reason in REJECTION_REASONS

    property_()
    stack.portal.call(stack.serves_every_consumer())
    assert stack.portal.call(stack.state()) == before


# Well-formed nonsense: answered with a clear error, or ignored; no state changes.


def test_a_region_create_replayed_with_other_parameters_is_refused(stack: Stack) -> None:
    original = RegionSpec(id=uuid.uuid4(), block_size=512, extent_size=64, extent_count=8)
    created = stack.portal.call(
        stack.ask(RegionEnsure(source=NEXUS_SOURCE, payload=original), "crucible")
    )
    assert isinstance(created, RegionInfo)
    # The ensure answers while the region is still being created; the snapshot to
    # compare against must be taken once that background work has finished.
    deadline = time.monotonic() + 30
    while True:
        found = stack.portal.call(
            stack.ask(RegionGet(source=NEXUS_SOURCE, payload=RegionRef(id=original.id)), "crucible")
        )
        assert isinstance(found, RegionInfo)
        if found.payload.region is not None and found.payload.region.state.value == "created":
            break
        assert time.monotonic() < deadline, f"region never created: {found}"
        time.sleep(0.05)
    before = stack.portal.call(stack.state())

    @PROPERTY
    @given(
        block_size=st.sampled_from([512, 1024, 2048, 4096]),
        extent_size=st.integers(1, 1 << 20),
        extent_count=st.integers(1, 1 << 12),
        encrypted=st.booleans(),
    )
    def property_(block_size: int, extent_size: int, extent_count: int, encrypted: bool) -> None:
        changed = original.model_copy(
            update={
                "block_size": block_size,
                "extent_size": extent_size,
                "extent_count": extent_count,
                "encrypted": encrypted,
            }
        )
        assume(changed != original)
        answer = stack.portal.call(
            stack.ask(RegionEnsure(source=NEXUS_SOURCE, payload=changed), "crucible")
        )
        assert isinstance(answer, CommandRejected), answer
        assert answer.payload.code == "conflict"

    property_()
    assert stack.portal.call(stack.state()) == before


def test_commands_about_unknown_objects_are_answered_and_change_nothing(stack: Stack) -> None:
    before = stack.portal.call(stack.state())
    region_commands = {"get": RegionGet, "delete": RegionDelete}
    vmm_commands = {"stop": VmmStop, "reboot": VmmReboot, "get": VmmGet}

    @PROPERTY
    @given(
        object_id=st.uuids(),
        agent=st.sampled_from(["crucible", "sled"]),
        command=st.sampled_from(sorted(vmm_commands)),
    )
    def property_(object_id: uuid.UUID, agent: str, command: str) -> None:
        message: Envelope
        if agent == "crucible":
            kind = region_commands.get(command, RegionGet)
            message = kind(source=NEXUS_SOURCE, payload=RegionRef(id=object_id))
        else:
            message = vmm_commands[command](source=NEXUS_SOURCE, payload=VmmRef(id=object_id))
        answer = stack.portal.call(stack.ask(message, agent))
        if isinstance(answer, CommandRejected):
            assert answer.payload.code and answer.payload.message
        elif isinstance(answer, RegionInfo | VmmInfo):
            # Deleting what never existed is a no-op that says so, as Crucible's API does.
            found = answer.payload.region if isinstance(answer, RegionInfo) else None
            assert found is None or found.state.value == "destroyed"
            if isinstance(answer, VmmInfo):
                assert answer.payload.vmm is None
        else:
            raise AssertionError(f"unexpected answer {answer!r}")

    property_()
    stack.portal.call(stack.serves_every_consumer())
    assert stack.portal.call(stack.state()) == before


def test_events_about_unknown_objects_at_any_generation_change_nothing(stack: Stack) -> None:
    before = stack.portal.call(stack.state())

    @PROPERTY
    @given(
        kind=st.sampled_from(["region.state_changed.v1", "vmm.state_changed.v1"]),
        generation=st.one_of(st.just(1), st.integers(1, 2**31), st.just(MAX_SAFE_INTEGER)),
    )
    def property_(kind: str, generation: int) -> None:
        event = example(kind)
        document = json.loads(encode(event))
        subject = "region" if kind.startswith("region") else "vmm"
        document["payload"][subject]["generation"] = generation
        stack.portal.call(
            stack.transport.publish_event(
                type(event).model_validate_json(json.dumps(document).encode())
            )
        )

    property_()
    stack.portal.call(stack.serves_every_consumer())
    assert stack.portal.call(stack.state()) == before


SAGA_STATES = {state.value for state in SagaState}
NAMES = st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z0-9]", fullmatch=True)


@st.composite
def nonsense_requests(draw: st.DrawFn) -> tuple[Envelope, set[api.ErrorCode]]:
    """A well-formed API request that cannot be done, and the error codes that say why."""
    project, name = draw(NAMES), draw(NAMES)
    resource = draw(st.one_of(NAMES, st.uuids().map(str)))
    ref = api.ResourceRef(project=project, resource=resource)
    not_found = {api.ErrorCode.NOT_FOUND}
    choice = draw(st.integers(0, 6))
    if choice == 0:
        return api.DiskGet(source=CLI_SOURCE, payload=ref), not_found
    if choice == 1:
        return api.DiskDelete(source=CLI_SOURCE, payload=ref), not_found
    if choice == 2:
        action = draw(st.sampled_from(list(api.InstanceAction)))
        body = api.InstanceActionRequest(project=project, resource=resource, action=action)
        return api.InstanceAct(source=CLI_SOURCE, payload=body), not_found
    if choice == 3:
        block_size = draw(st.sampled_from([512, 1024, 2048, 4096]))
        size = draw(st.integers(1, 1 << 40).filter(lambda size: size % block_size != 0))
        create = api.DiskCreateRequest(
            project=project, name=name, size_bytes=size, block_size=block_size
        )
        return api.DiskCreate(source=CLI_SOURCE, payload=create), {api.ErrorCode.INVALID_REQUEST}
    if choice == 4:
        saga = api.SagaGet(source=CLI_SOURCE, payload=api.SagaRef(saga_id=draw(st.uuids())))
        return saga, not_found
    if choice == 5:
        state = draw(st.text(max_size=40).filter(lambda s: s not in SAGA_STATES))
        sagas = api.SagaList(source=CLI_SOURCE, payload=api.SagaFilter(state=state))
        return sagas, {api.ErrorCode.INVALID_REQUEST}
    # Not an API request at all, though a valid message.
    return example(draw(st.sampled_from(TARGETS["crucible"][1]))), {api.ErrorCode.INVALID_REQUEST}


def test_nonsense_api_requests_get_a_stable_error_code_and_change_nothing(stack: Stack) -> None:
    before = stack.portal.call(stack.state())

    @PROPERTY
    @given(case=nonsense_requests())
    def property_(case: tuple[Envelope, set[api.ErrorCode]]) -> None:
        request, codes = case
        answer = stack.portal.call(stack.ask(request, "nexus.api"))
        assert isinstance(answer, api.ApiError), answer
        assert answer.payload.code in codes, answer.payload
        assert answer.payload.message

    property_()
    stack.portal.call(stack.serves_every_consumer())
    assert stack.portal.call(stack.state()) == before
