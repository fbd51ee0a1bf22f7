"""One reply per request, in process (issue #12 item 3): a request id re-used with other
parameters is a conflict and the same request sent again gets the first answer; a reply
goes only to a reply queue of the user who sent the request; a request that did not parse
is answered ``invalid_request``. The same against the real processes:
tests/integration/test_bounds_and_replies.py."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from sqlalchemy import select

from nexus.api import Api
from nexus.db.models import Disk, Saga
from nexus.saga.clock import ManualClock
from schemas import api
from schemas.base import Envelope
from schemas.messages import Message, MessageRejected
from schemas.topology import NEXUS_API_QUEUE, reply_queue
from schemas.transport import Delivery, Refused, Transport
from tests.saga_support import Database, Replica

USER = "nexusctl"
SOURCE = "cli/test"


@dataclass
class Wire:
    """What the API sent, and where: (routing key, message)."""

    sent: list[tuple[str, Envelope]] = field(default_factory=list)

    async def reply(self, delivery: Delivery, message: Envelope) -> None:
        if delivery.reply_to is not None:
            self.sent.append((delivery.reply_to, message))

    async def publish(
        self,
        message: Envelope,
        *,
        exchange: str,
        routing_key: str,
        reply_to: str | None = None,
        mandatory: bool = True,
    ) -> None:
        self.sent.append((routing_key, message))


@dataclass
class Nexus:
    api: Api
    wire: Wire
    replica: Replica
    database: Database

    async def ask(
        self, request: Message, reply_to: str | None = None, user: str = USER
    ) -> Envelope:
        """Hand ``request`` over as the transport would; the reply it got."""
        queue = reply_to or reply_queue(user)
        before = len(self.wire.sent)
        await self.api.handle(
            Delivery(
                message=request,
                queue=NEXUS_API_QUEUE,
                routing_key=NEXUS_API_QUEUE,
                reply_to=queue,
                redelivered=False,
                user_id=user,
            )
        )
        [(where, reply)] = self.wire.sent[before:]
        assert where == queue
        assert reply.causation_id == request.id
        return reply

    async def sagas(self) -> list[Saga]:
        async with self.database.sessions() as session:
            return list((await session.execute(select(Saga))).scalars())


@pytest.fixture
async def nexus(database: Database) -> AsyncIterator[Nexus]:
    await database.add_datasets(3)
    clock = ManualClock()
    replica = Replica(database, "a", clock=clock)
    wire = Wire()
    nexus_api = Api(
        sessions=database.sessions,
        executor=replica.executor,
        transport=cast(Transport, wire),
        clock=clock.now,
        replica_id="a",
    )
    yield Nexus(nexus_api, wire, replica, database)
    await replica.executor.drain()


def disk_create(
    name: str = "d1", size_bytes: int = 1 << 30, request_id: uuid.UUID | None = None
) -> api.DiskCreate:
    return api.DiskCreate(
        id=request_id or uuid.uuid4(),
        source=SOURCE,
        payload=api.DiskCreateRequest(project="p", name=name, size_bytes=size_bytes),
    )


async def test_the_same_request_sent_again_gets_the_first_answer(nexus: Nexus) -> None:
    request = disk_create()
    first = await nexus.ask(request)
    # A copy of the same request, as a client re-sends it: same id, same parameters.
    again = await nexus.ask(request.model_copy())

    assert isinstance(first, api.AcceptedReply) and isinstance(again, api.AcceptedReply)
    assert again.payload == first.payload
    assert len(await nexus.sagas()) == 1


@pytest.mark.parametrize(
    "reused",
    [
        pytest.param(lambda rid: disk_create(size_bytes=2 << 30, request_id=rid), id="other-size"),
        pytest.param(lambda rid: disk_create(name="d2", request_id=rid), id="other-name"),
        pytest.param(
            lambda rid: api.DiskDelete(
                id=rid, source=SOURCE, payload=api.ResourceRef(project="p", resource="d1")
            ),
            id="other-operation",
        ),
        pytest.param(
            lambda rid: api.InstanceCreate(
                id=rid,
                source=SOURCE,
                payload=api.InstanceCreateRequest(
                    project="p", name="vm", ncpus=1, memory_bytes=1 << 30
                ),
            ),
            id="other-type",
        ),
    ],
)
async def test_a_request_id_reused_for_anything_else_is_a_conflict(
    nexus: Nexus, reused: object
) -> None:
    request = disk_create()
    first = await nexus.ask(request)
    assert isinstance(first, api.AcceptedReply)
    await nexus.replica.executor.drain()
    before = [(saga.id, saga.params) for saga in await nexus.sagas()]

    assert callable(reused)
    answer = await nexus.ask(reused(request.id))

    assert isinstance(answer, api.ApiError), answer
    assert answer.payload.code is api.ErrorCode.CONFLICT
    assert str(request.id) in answer.payload.message
    assert [(saga.id, saga.params) for saga in await nexus.sagas()] == before
    # The first request is still answered as it was.
    again = await nexus.ask(request.model_copy())
    assert isinstance(again, api.AcceptedReply) and again.payload == first.payload


async def test_a_request_answered_with_an_error_leaves_its_id_free(nexus: Nexus) -> None:
    refused = api.DiskCreate(
        source=SOURCE,
        payload=api.DiskCreateRequest(project="p", name="d1", size_bytes=1000, block_size=512),
    )
    answer = await nexus.ask(refused)
    assert isinstance(answer, api.ApiError)
    assert answer.payload.code is api.ErrorCode.INVALID_REQUEST

    accepted = await nexus.ask(disk_create(request_id=refused.id))
    assert isinstance(accepted, api.AcceptedReply), accepted


async def test_a_reply_goes_only_to_the_requesters_own_reply_queue(nexus: Nexus) -> None:
    someone_elses = [
        reply_queue("nexus"),
        f"amq_{uuid.uuid4().hex}",
        "amq.rabbitmq.reply-to",
        NEXUS_API_QUEUE,
        f"{reply_queue(USER)}x",
    ]
    for reply_to in someone_elses:
        request = disk_create(name="d-foreign")
        with pytest.raises(MessageRejected) as refused:
            await nexus.api.handle(
                Delivery(
                    message=request,
                    queue=NEXUS_API_QUEUE,
                    routing_key=NEXUS_API_QUEUE,
                    reply_to=reply_to,
                    redelivered=False,
                    user_id=USER,
                )
            )
        assert refused.value.reason == "foreign_reply_to"
    # No user to check the queue against: no reply either.
    with pytest.raises(MessageRejected):
        await nexus.api.handle(
            Delivery(
                message=disk_create(),
                queue=NEXUS_API_QUEUE,
                routing_key=NEXUS_API_QUEUE,
                reply_to=reply_queue(USER),
                redelivered=False,
            )
        )
    assert nexus.wire.sent == []
    assert await nexus.sagas() == []


async def test_a_request_that_did_not_parse_is_answered_invalid_request(nexus: Nexus) -> None:
    request_id, own = uuid.uuid4(), reply_queue(USER)
    detail = "1 error(s); payload.size_bytes: Input should be greater than 0"

    def refused(reply_to: str | None, user: str | None) -> Refused:
        return Refused(
            queue=NEXUS_API_QUEUE,
            reason="schema_violation",
            detail=detail,
            message_id=str(request_id),
            correlation_id=None,
            reply_to=reply_to,
            user_id=user,
        )

    await nexus.api.on_refused(refused(reply_queue("nexus"), USER))
    await nexus.api.on_refused(refused(own, None))
    await nexus.api.on_refused(refused(None, USER))
    assert nexus.wire.sent == []

    await nexus.api.on_refused(refused(own, USER))
    [(where, reply)] = nexus.wire.sent
    assert where == own
    assert isinstance(reply, api.ApiError)
    assert reply.causation_id == request_id
    assert reply.payload.code is api.ErrorCode.INVALID_REQUEST
    assert reply.payload.message == f"schema_violation: {detail}"


class Blind(Api):
    """A replica that does not see, the first time it looks, what another one committed
    meanwhile: as if both had looked at the same moment."""

    looked = 0

    async def _started(self, *args: Any, **kwargs: Any) -> api.AcceptedReply | None:
        self.looked += 1
        if self.looked == 1:
            return None
        return await super()._started(*args, **kwargs)

    async def _live_disk(self, *args: Any, **kwargs: Any) -> Disk | None:
        if self.looked == 1:
            return None
        return await super()._live_disk(*args, **kwargs)


async def test_two_copies_of_one_request_at_once_get_one_saga(nexus: Nexus) -> None:
    """Another replica committed the same request first: this one's insert fails, and
    asked again, it answers from what that one committed."""
    request = disk_create()
    first = await nexus.ask(request)
    await nexus.replica.executor.drain()
    second = Blind(
        sessions=nexus.database.sessions,
        executor=nexus.replica.executor,
        transport=cast(Transport, nexus.wire),
        clock=ManualClock().now,
        replica_id="b",
    )

    answer = await second.answer(request.model_copy())

    assert second.looked == 2
    assert isinstance(first, api.AcceptedReply) and isinstance(answer, api.AcceptedReply)
    assert answer.payload == first.payload
    assert len(await nexus.sagas()) == 1
