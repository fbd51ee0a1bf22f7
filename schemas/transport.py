"""The one aio-pika transport every process uses to speak the messages in this package.

- A robust connection: aio-pika reconnects and restores exchanges, queues, bindings and
  consumers after a broker restart. Given several URLs (the nodes of a cluster,
  comma-separated: :mod:`schemas.brokers`), it connects to the first that answers and,
  when that connection is lost, reconnects to the next (:mod:`schemas.failover`).
- Publishing always uses publisher confirms and persistent delivery; ``publish``
  returns only once the broker has taken responsibility for the message. It has a
  channel of its own, replaced by a new one after a publish the broker refused (nack)
  or never confirmed: RabbitMQ 3.10 can leave a channel that published to a quorum queue
  while the queue was electing a leader (its node just died) nacking every later
  publish to that queue, while a new channel's go through.
- Consuming acks only after the handler returned. A handler that fails because a
  dependency of its own is unavailable (:func:`schemas.transient.is_transient`: the
  database, the disk, the broker) is run again in place, with backoff, until it
  succeeds or the transport closes: the message stays unacked, so the failure never
  counts toward dead-lettering. A handler that raises anything else gets the message
  requeued, and the quorum queue dead-letters it past ``DELIVERY_LIMIT``.
- Bytes that are not a message we accept are dead-lettered at once with the reason in
  a header, and the consumer goes on with the next message; so is a message whose
  handler refuses it by raising ``MessageRejected`` (never redelivered).
- Every publish carries the connection's user as ``user_id``, which RabbitMQ refuses
  unless it is the user that really published. A consumer dead-letters a message whose
  envelope ``source`` that user may not claim (:mod:`schemas.identity`), and, when
  ``require_user_id`` (the default), one without a ``user_id`` (it cannot be verified).
- A request to an agent's queue is answered only by that agent
  (:func:`schemas.identity.queue_agent`): a reply from anyone else is dead-lettered
  with ``not_owner`` and the request goes on waiting for its agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pamqp.commands import Basic
from yarl import URL

from schemas import failover, tracing
from schemas.base import Envelope
from schemas.brokers import address, broker_urls, same_identity
from schemas.identity import NOT_OWNER, queue_agent, source_allowed
from schemas.messages import Message, MessageRejected, decode, encode
from schemas.tasks import FIRST_DELAY_SECONDS, MAX_DELAY_SECONDS, TransientRetries
from schemas.topology import (
    COMMANDS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DELIVERY_LIMIT,
    DETAIL_HEADER,
    EVENTS_EXCHANGE,
    NEXUS_API_QUEUE,
    NEXUS_EVENT_BINDINGS,
    NEXUS_EVENTS_QUEUE,
    ORIGINAL_QUEUE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    REASON_HEADER,
    REPLIES_EXCHANGE,
    reply_queue,
)
from schemas.transient import Transient

if TYPE_CHECKING:
    # prometheus_client only in the processes that serve metrics, not in nexusctl.
    from schemas.metrics import MessageMetrics

log = logging.getLogger(__name__)

HeaderValue = str | int | bool | None
PUBLISH_TIMEOUT_SECONDS = 10.0
# How long ``close`` lets messages waiting for a retry go back to their queue.
CLOSE_RETRIES_SECONDS = 1.0


class PublishFailed(Transient, RuntimeError):
    """The broker did not confirm a publish (nack, return, or timeout)."""


class RequestTimedOut(TimeoutError):
    """Nobody answered a request in time."""


def quorum_arguments(*, dead_letter: bool = True) -> dict[str, Any]:
    arguments: dict[str, Any] = {"x-queue-type": "quorum"}
    if dead_letter:
        arguments |= {
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "x-delivery-limit": DELIVERY_LIMIT,
            # At-least-once dead-lettering (needs reject-publish overflow): a message
            # dead-lettered by the queue is not dropped if the DLQ is briefly unavailable.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
    return arguments


@dataclass(frozen=True)
class Delivery:
    """A parsed inbound message with what a handler may need from its AMQP frame."""

    message: Message
    queue: str
    routing_key: str
    reply_to: str | None
    redelivered: bool
    headers: Mapping[str, Any] = field(default_factory=dict)
    # The broker-validated user that published it (None when the publisher set none).
    user_id: str | None = None


Handler = Callable[[Delivery], Awaitable[None]]


@dataclass(frozen=True)
class Refused:
    """A message that a consumer's queue dead-lettered, as its consumer may want to know
    it (the API answers the requester): the AMQP properties, never the unchecked body."""

    queue: str
    reason: str
    detail: str
    message_id: str | None
    correlation_id: str | None
    reply_to: str | None
    user_id: str | None


RefusalHook = Callable[[Refused], Awaitable[None]]


class Publisher(Protocol):
    """What code that only sends needs; tests substitute an in-memory one."""

    async def publish(
        self,
        message: Envelope,
        *,
        exchange: str,
        routing_key: str,
        reply_to: str | None = None,
        mandatory: bool = True,
    ) -> None: ...


def amqp_message(
    body: bytes,
    *,
    message_id: uuid.UUID,
    message_type: str,
    correlation_id: uuid.UUID | None,
    reply_to: str | None = None,
    headers: Mapping[str, HeaderValue] | None = None,
    user_id: str | None = None,
) -> aio_pika.Message:
    """AMQP properties mirror the envelope (docs/design.md, "Message contracts")."""
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(message_id),
        type=message_type,
        correlation_id=str(correlation_id) if correlation_id else None,
        reply_to=reply_to,
        headers=dict(headers or {}),
        user_id=user_id,
    )


class Transport:
    """One connection per process, a confirmed publishing channel, channels per consumer."""

    def __init__(
        self,
        url: str,
        *,
        name: str,
        require_user_id: bool = True,
        retry_first_seconds: float = FIRST_DELAY_SECONDS,
        retry_max_seconds: float = MAX_DELAY_SECONDS,
        heartbeat: int | None = None,
        metrics: MessageMetrics | None = None,
    ) -> None:
        """``url``: one broker URL, or several comma-separated (a cluster's nodes, all with
        the same user and vhost). ``retry_first_seconds`` and ``retry_max_seconds``: the
        backoff between runs of
        a handler that failed on a transient error (doubling from the first, with
        jitter). ``heartbeat``: the AMQP heartbeat in seconds (0: none; None: the URL's,
        else aio-pika's 60 s); the broker closes a connection it heard nothing on for 2
        to 3 heartbeats and hands its unacked messages to other consumers. ``metrics``:
        where consumed messages are counted (``schemas.metrics``), if anywhere."""
        self._urls = broker_urls(url)
        same_identity(self._urls)
        self._name = name
        self._heartbeat = heartbeat
        # The user the broker authenticates (aio-pika's default when the URL names none).
        self.user = URL(self._urls[0]).user or "guest"
        self._require_user_id = require_user_id
        self._connection: aio_pika.RobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._notice_exchange: AbstractExchange | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        # The channel publish_bytes uses, opened when first needed, and its exchanges.
        self._publisher: AbstractChannel | None = None
        self._published_to: dict[str, AbstractExchange] = {}
        self._reply_queue: AbstractQueue | None = None
        # Concurrent first requests would each declare a reply queue on a channel of its
        # own (10,000 at once reached the broker's channel limit): one declares it.
        self._reply_queue_lock = asyncio.Lock()
        self._pending: dict[uuid.UUID, asyncio.Future[Message]] = {}
        # The only source that may answer a pending request (to an agent's queue).
        self._answerers: dict[uuid.UUID, str] = {}
        # Replies refused because their sender was not the agent asked, on this connection.
        self.refused_replies = 0
        self._consumer_channels: list[AbstractChannel] = []
        self._consumers: dict[str, AbstractChannel] = {}
        self._retries = TransientRetries(
            first_delay=retry_first_seconds, max_delay=retry_max_seconds
        )
        self._refusal_hooks: dict[str, RefusalHook] = {}
        self._metrics = metrics

    # Lifecycle.

    async def connect(self, *, timeout: float = 30.0) -> None:
        self._retries.stopping.clear()
        self._connection = await failover.connect(
            self._urls, name=self._name, timeout=timeout, heartbeat=self._heartbeat
        )
        if len(self._urls) > 1:
            log.info("connected to the broker node at %s", self.address)
            self._connection.reconnect_callbacks.add(self._on_reconnected)
        self._publish_channel = await self._connection.channel(publisher_confirms=True)
        self._notice_exchange = None
        self._publisher = None

    def _on_reconnected(self, connection: AbstractRobustConnection | None, /) -> None:
        log.info("reconnected to the broker node at %s", self.address)

    @property
    def address(self) -> str:
        """The broker node this transport is connected (or reconnecting) to, as
        ``host:port/vhost``."""
        if self._connection is None:
            raise RuntimeError("transport is not connected; call connect() first")
        return address(str(self._connection.url))

    async def close(self) -> None:
        """Close the connection. Messages waiting to run their handler again go back to
        their queue first (within ``CLOSE_RETRIES_SECONDS``); any other unacked message
        the broker requeues when the connection closes."""
        await self._retries.stop(CLOSE_RETRIES_SECONDS)
        if self._connection is not None:
            await self._connection.close()
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()

    async def __aenter__(self) -> Transport:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise RuntimeError("transport is not connected; call connect() first")
        return self._connection

    @property
    def channel(self) -> AbstractChannel:
        if self._publish_channel is None:
            raise RuntimeError("transport is not connected; call connect() first")
        return self._publish_channel

    @property
    def is_connected(self) -> bool:
        """Connected now: a robust connection that is reconnecting is not closed, but
        it is not connected either."""
        return (
            self._connection is not None
            and not self._connection.is_closed
            and self._connection.connected.is_set()
        )

    def health_problem(self, *, stuck_after: float) -> str | None:
        """What keeps this transport from doing its work, if anything (None: nothing): no
        broker connection, a consumer's channel closed, or a message whose handler has
        been failing on a transient error for more than ``stuck_after`` seconds."""
        if not self.is_connected:
            return "not connected to the broker"
        for queue, channel in self._consumers.items():
            if channel.is_closed:
                return f"the channel consuming {queue} is closed"
        return self._retries.problem(stuck_after=stuck_after)

    @property
    def retrying(self) -> int:
        """How many delivered messages are waiting to run their handler again."""
        return len(self._retries)

    # Topology: every declaration is idempotent, so each process declares what it uses.

    async def declare_topology(self) -> None:
        """Exchanges, the dead-letter queue and Nexus's queues."""
        channel = self.channel
        self._exchanges[COMMANDS_EXCHANGE] = await channel.declare_exchange(
            COMMANDS_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
        )
        self._exchanges[EVENTS_EXCHANGE] = await channel.declare_exchange(
            EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        self._exchanges[REPLIES_EXCHANGE] = await channel.declare_exchange(
            REPLIES_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
        )
        dead_letters = await channel.declare_exchange(
            DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
        )
        self._exchanges[DEAD_LETTER_EXCHANGE] = dead_letters
        dlq = await channel.declare_queue(
            DEAD_LETTER_QUEUE, durable=True, arguments=quorum_arguments(dead_letter=False)
        )
        await dlq.bind(dead_letters, routing_key="")
        await self.declare_queue(
            NEXUS_EVENTS_QUEUE, [(EVENTS_EXCHANGE, key) for key in NEXUS_EVENT_BINDINGS]
        )
        await self.declare_queue(NEXUS_API_QUEUE, [(COMMANDS_EXCHANGE, NEXUS_API_QUEUE)])

    async def declare_command_queue(self, queue_name: str) -> None:
        """An agent's own queue, fed by ``control.commands`` under its own name."""
        await self.declare_queue(queue_name, [(COMMANDS_EXCHANGE, queue_name)])

    async def ensure_topology(self, command_queue: str) -> None:
        """For agents: the topology and their own queue, declared only if missing.

        Under least privilege (``nexus.devstack.access``) an agent may declare nothing:
        an administrator provisioned its queue and the shared names beforehand, which
        also keeps it from binding its queue to other agents' (or Nexus's) commands. On
        a broker where it may declare (development, tests), whatever is missing is
        declared here so an agent can start before any Nexus has.
        """
        exchanges = (COMMANDS_EXCHANGE, EVENTS_EXCHANGE, REPLIES_EXCHANGE, DEAD_LETTER_EXCHANGE)
        queues = (DEAD_LETTER_QUEUE, NEXUS_EVENTS_QUEUE, NEXUS_API_QUEUE, command_queue)
        for kind, names in (("exchange", exchanges), ("queue", queues)):
            for name in names:
                if not await self._exists(kind, name):
                    await self.declare_topology()
                    await self.declare_command_queue(command_queue)
                    return

    async def _exists(self, kind: str, name: str) -> bool:
        # A passive declare needs no permission; the broker closes the channel of one that
        # fails, so it runs on a plain (not robust, never reopened) channel of its own.
        transport = self.connection.transport
        if transport is None:
            raise RuntimeError("transport is not connected; call connect() first")
        channel = await transport.connection.channel()
        try:
            if kind == "exchange":
                await channel.exchange_declare(name, passive=True)
            else:
                await channel.queue_declare(name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        await channel.close()
        return True

    async def declare_queue(self, name: str, bindings: Iterable[tuple[str, str]]) -> AbstractQueue:
        queue = await self.channel.declare_queue(name, durable=True, arguments=quorum_arguments())
        for exchange_name, routing_key in bindings:
            await queue.bind(await self._exchange(exchange_name), routing_key=routing_key)
        return queue

    async def _exchange(self, name: str) -> AbstractExchange:
        if name == "":
            return self.channel.default_exchange
        if name not in self._exchanges:
            self._exchanges[name] = await self.channel.get_exchange(name, ensure=True)
        return self._exchanges[name]

    # Publishing.

    async def publish(
        self,
        message: Envelope,
        *,
        exchange: str,
        routing_key: str,
        reply_to: str | None = None,
        mandatory: bool = True,
    ) -> None:
        await self.publish_bytes(
            encode(message),
            exchange=exchange,
            routing_key=routing_key,
            message_id=message.id,
            message_type=message.TYPE,
            correlation_id=message.correlation_id,
            reply_to=reply_to,
            headers=tracing.current_headers() or None,
            mandatory=mandatory,
        )

    async def publish_bytes(
        self,
        body: bytes,
        *,
        exchange: str,
        routing_key: str,
        message_id: uuid.UUID,
        message_type: str,
        correlation_id: uuid.UUID | None = None,
        reply_to: str | None = None,
        headers: Mapping[str, HeaderValue] | None = None,
        mandatory: bool = True,
    ) -> None:
        """Publish already-encoded bytes (the outbox relay stores them that way)."""
        publisher, target = await self._publishing_exchange(exchange)
        amqp = amqp_message(
            body,
            message_id=message_id,
            message_type=message_type,
            correlation_id=correlation_id,
            reply_to=reply_to,
            headers=headers,
            user_id=self.user,
        )
        # A channel that the broker closed (outage, restart) raises a RuntimeError subclass
        # until the robust connection has reopened it; that is a failed publish too.
        try:
            confirmation = await target.publish(
                amqp, routing_key=routing_key, mandatory=mandatory, timeout=PUBLISH_TIMEOUT_SECONDS
            )
        except (
            TimeoutError,
            aio_pika.exceptions.AMQPError,
            aio_pika.exceptions.ChannelInvalidStateError,
            ConnectionError,
        ) as error:
            # aiormq raises a nack as DeliveryError (and, on a channel that raises on
            # returns, a returned message as PublishError, which renewing here keeps as
            # before: the least-privilege tests depend on it; this project's channels hand
            # returns back as the confirmation, below).
            if isinstance(error, TimeoutError | aio_pika.exceptions.DeliveryError):
                await self._renew_publisher(publisher)
            raise PublishFailed(f"{message_type} to {exchange}/{routing_key}: {error!r}") from error
        if not isinstance(confirmation, Basic.Ack):
            # A message returned unroutable comes back as the confirmation itself (the
            # channel does not raise on returns): that publish failed, not the channel.
            if not isinstance(getattr(confirmation, "delivery", None), Basic.Return):
                await self._renew_publisher(publisher)
            raise PublishFailed(
                f"{message_type} to {exchange}/{routing_key}: broker answered {confirmation!r}"
            )

    async def _publishing_exchange(self, name: str) -> tuple[AbstractChannel, AbstractExchange]:
        """The publishing channel (opened if there is none) and its exchange ``name``."""
        if self._publisher is None:
            self._publisher = await self.connection.channel(publisher_confirms=True)
            self._published_to = {}
        publisher = self._publisher
        if name == "":
            return publisher, publisher.default_exchange
        if name not in self._published_to:
            self._published_to[name] = await publisher.get_exchange(name, ensure=True)
        return publisher, self._published_to[name]

    async def _renew_publisher(self, failed: AbstractChannel) -> None:
        """Publish on a new channel from now on, instead of ``failed`` (why: the module
        docstring); once per channel, however many of its publishes failed."""
        if self._publisher is not failed:
            return
        self._publisher = None
        log.warning("a publish was refused or not confirmed; publishing on a new channel")
        with contextlib.suppress(Exception):
            await failed.close()

    async def send_command(
        self, message: Envelope, queue: str, *, reply_to: str | None = None
    ) -> None:
        await self.publish(
            message, exchange=COMMANDS_EXCHANGE, routing_key=queue, reply_to=reply_to
        )

    async def publish_event(self, message: Envelope) -> None:
        routing_key: Callable[[], str] | None = getattr(message, "routing_key", None)
        if routing_key is None:
            raise TypeError(f"{message.TYPE} is not an event (it has no routing key)")
        # An event nobody is bound to yet is not an error: watchers come and go.
        await self.publish(
            message, exchange=EVENTS_EXCHANGE, routing_key=routing_key(), mandatory=False
        )

    async def publish_notice(self, message: Envelope) -> None:
        """Publish an event for watchers without waiting for a confirm: best effort.

        For progress reports that are not state (``saga.progressed``): a confirm per
        report would cost the publisher a round trip and the broker a confirm for
        something a watcher can afford to miss. Raises PublishFailed when the channel
        is down.
        """
        routing_key: Callable[[], str] | None = getattr(message, "routing_key", None)
        if routing_key is None:
            raise TypeError(f"{message.TYPE} is not an event (it has no routing key)")
        if self._notice_exchange is None:
            channel = await self.connection.channel(publisher_confirms=False)
            self._notice_exchange = await channel.get_exchange(EVENTS_EXCHANGE, ensure=False)
        amqp = amqp_message(
            encode(message),
            message_id=message.id,
            message_type=message.TYPE,
            correlation_id=message.correlation_id,
            user_id=self.user,
        )
        amqp.delivery_mode = aio_pika.DeliveryMode.NOT_PERSISTENT
        try:
            await self._notice_exchange.publish(amqp, routing_key=routing_key(), mandatory=False)
        except (
            TimeoutError,
            aio_pika.exceptions.AMQPError,
            aio_pika.exceptions.ChannelInvalidStateError,
            ConnectionError,
        ) as error:
            raise PublishFailed(f"{message.TYPE}: {error!r}") from error

    async def reply(self, delivery: Delivery, message: Envelope) -> None:
        """Answer a request; a requester that gave up (its queue is gone) is not an error."""
        if delivery.reply_to is None:
            return
        await self.publish(
            message, exchange=REPLIES_EXCHANGE, routing_key=delivery.reply_to, mandatory=False
        )

    # Consuming.

    async def consume(
        self,
        queue_name: str,
        handler: Handler,
        *,
        prefetch: int = 16,
        on_refused: RefusalHook | None = None,
    ) -> None:
        """Deliver parsed messages from ``queue_name`` to ``handler`` until closed.

        ``on_refused`` is told of each message from this queue that is dead-lettered
        (bytes that do not parse, a source that does not verify, a ``MessageRejected``
        from ``handler``), once it is in the dead letters and before it is acked.
        """
        if on_refused is not None:
            self._refusal_hooks[queue_name] = on_refused
        channel = await self.connection.channel()
        self._consumer_channels.append(channel)
        self._consumers[queue_name] = channel
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(queue_name, ensure=True)

        async def on_message(incoming: AbstractIncomingMessage) -> None:
            await self._dispatch(queue_name, incoming, handler)

        await queue.consume(on_message, no_ack=False)

    async def subscribe(self, routing_keys: Iterable[str], handler: Handler) -> str:
        """Watch events (``--wait``, tests): a private queue that dies with the connection.

        Bind before acting, so no event caused by the action can be missed.
        """
        channel = await self.connection.channel()
        self._consumer_channels.append(channel)
        await channel.set_qos(prefetch_count=64)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        events = await channel.get_exchange(EVENTS_EXCHANGE, ensure=True)
        for routing_key in routing_keys:
            await queue.bind(events, routing_key=routing_key)

        async def on_message(incoming: AbstractIncomingMessage) -> None:
            await self._dispatch(queue.name, incoming, handler)

        await queue.consume(on_message, no_ack=False)
        return queue.name

    async def _dispatch(
        self, queue_name: str, incoming: AbstractIncomingMessage, handler: Handler
    ) -> None:
        try:
            message = decode(incoming.body)
        except MessageRejected as rejected:
            await self._dead_letter(queue_name, incoming, rejected.reason, rejected.detail)
            return
        refused = self._unverified_source(incoming.user_id, message.source)
        if refused is not None:
            await self._dead_letter(queue_name, incoming, *refused)
            return
        delivery = Delivery(
            message=message,
            queue=queue_name,
            routing_key=incoming.routing_key or "",
            reply_to=incoming.reply_to,
            redelivered=bool(incoming.redelivered),
            headers=dict(incoming.headers or {}),
            user_id=incoming.user_id,
        )
        if self._metrics is not None:
            self._metrics.received(message, delivery.redelivered)
        try:
            with tracing.consuming(delivery.headers, lambda: _handling_span(delivery)):
                handled = await self._retries.run(
                    queue_name,
                    f"{message.TYPE} {message.id}",
                    lambda: handler(delivery),
                    go_on=lambda: _channel_open(incoming),
                )
        except asyncio.CancelledError:
            await _settle(incoming.nack(requeue=True))
            raise
        except MessageRejected as rejected:
            # The handler judged the message itself bad: dead-lettered now, with its
            # reason, never redelivered toward the delivery limit.
            await self._dead_letter(queue_name, incoming, rejected.reason, rejected.detail)
            return
        except Exception:
            log.exception(
                "handler failed; message requeued",
                extra={"message_id": str(message.id), "type": message.TYPE, "queue": queue_name},
            )
            await _settle(incoming.nack(requeue=True))
            if self._metrics is not None:
                self._metrics.outcome(message.TYPE, "requeued")
            return
        if handled:
            await _settle(incoming.ack())
            if self._metrics is not None:
                self._metrics.outcome(message.TYPE, "ok")
        else:
            # Closing, or the channel is gone, while the handler was failing on a
            # transient error: back to the queue now (or with the channel).
            await _settle(incoming.nack(requeue=True))

    def _unverified_source(self, user_id: str | None, source: str) -> tuple[str, str] | None:
        """Why a message's envelope source is not to be believed (reason, detail), if so."""
        if user_id is None:
            if self._require_user_id:
                return "no_user_id", f"source {source!r} cannot be verified without a user_id"
            return None
        if not source_allowed(user_id, source):
            return "source_mismatch", f"user {user_id!r} may not send as {source!r}"
        return None

    async def _dead_letter(
        self, queue_name: str, incoming: AbstractIncomingMessage, reason: str, detail: str
    ) -> None:
        log.warning(
            "dead-lettering message from %s: %s: %s",
            queue_name,
            reason,
            detail,
            extra={"message_id": incoming.message_id, "queue": queue_name, "reason": reason},
        )
        try:
            await self._publish_dead_letter(queue_name, incoming, reason, detail)
        except PublishFailed:
            # Keep it on its queue rather than lose it; it is tried again on redelivery.
            log.exception("could not dead-letter; message requeued")
            await _settle(incoming.nack(requeue=True))
            return
        if self._metrics is not None:
            self._metrics.dead_lettered(reason)
            self._metrics.outcome(incoming.type or "unknown", "dead_lettered")
        hook = self._refusal_hooks.get(queue_name)
        if hook is not None:
            refused = Refused(
                queue=queue_name,
                reason=reason,
                detail=detail,
                message_id=incoming.message_id,
                correlation_id=incoming.correlation_id,
                reply_to=incoming.reply_to,
                user_id=incoming.user_id,
            )
            try:
                await hook(refused)
            except Exception:
                log.exception("the refusal hook of %s failed", queue_name)
        await _settle(incoming.ack())

    async def _publish_dead_letter(
        self, queue_name: str, incoming: AbstractIncomingMessage, reason: str, detail: str
    ) -> None:
        headers: dict[str, HeaderValue] = {
            key: value
            for key, value in (incoming.headers or {}).items()
            if isinstance(value, str | int | bool)
        }
        headers |= {
            REASON_HEADER: reason,
            DETAIL_HEADER: detail[:1000],
            ORIGINAL_QUEUE_HEADER: queue_name,
            ORIGINAL_ROUTING_KEY_HEADER: incoming.routing_key or "",
        }
        await self.publish_bytes(
            incoming.body,
            exchange=DEAD_LETTER_EXCHANGE,
            routing_key="",
            message_id=_parse_uuid(incoming.message_id),
            message_type=incoming.type or "unknown",
            headers=headers,
        )

    # Request/reply (the CLI and reconcile queries).

    async def request(
        self,
        message: Envelope,
        *,
        routing_key: str,
        timeout: float = 10.0,
        answerer: str | None = None,
    ) -> Message:
        """Send a command to a queue and wait for the reply caused by it, taken only from
        ``answerer`` (a source), by default the agent whose queue ``routing_key`` is."""
        try:
            reply_queue = await self._ensure_reply_queue()
        except (aio_pika.exceptions.AMQPError, ConnectionError) as error:
            # No control.replies exchange (no Nexus ever set up this vhost) or no right to
            # a reply queue: the request cannot be sent.
            raise PublishFailed(f"{message.TYPE}: no reply queue: {error!r}") from error
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[message.id] = future
        answerer = answerer or queue_agent(routing_key)
        if answerer is not None:
            self._answerers[message.id] = answerer
        try:
            await self.send_command(message, routing_key, reply_to=reply_queue.name)
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise RequestTimedOut(
                f"no reply to {message.TYPE} from {routing_key} within {timeout:g}s"
            ) from None
        finally:
            self._pending.pop(message.id, None)
            self._answerers.pop(message.id, None)

    async def _ensure_reply_queue(self) -> AbstractQueue:
        if self._reply_queue is not None:
            return self._reply_queue
        async with self._reply_queue_lock:
            if self._reply_queue is None:
                self._reply_queue = await self._declare_reply_queue()
        return self._reply_queue

    async def _declare_reply_queue(self) -> AbstractQueue:
        channel = await self.connection.channel()
        self._consumer_channels.append(channel)
        queue = await channel.declare_queue(
            reply_queue(self.user), exclusive=True, auto_delete=True
        )
        await queue.bind(
            await channel.get_exchange(REPLIES_EXCHANGE, ensure=True), routing_key=queue.name
        )
        await queue.consume(self._on_reply, no_ack=True)
        return queue

    async def _on_reply(self, incoming: AbstractIncomingMessage) -> None:
        try:
            message = decode(incoming.body)
        except MessageRejected as rejected:
            log.warning("ignoring an unreadable reply: %s", rejected)
            return
        refused = self._unverified_source(incoming.user_id, message.source)
        if refused is not None:
            log.warning("ignoring a reply: %s: %s", *refused)
            return
        future = self._pending.get(message.causation_id) if message.causation_id else None
        if future is None or future.done():
            return
        answerer = self._answerers.get(message.causation_id) if message.causation_id else None
        if answerer is not None and message.source != answerer:
            await self._refuse_reply(incoming, message, answerer)
            return
        future.set_result(message)

    async def _refuse_reply(
        self, incoming: AbstractIncomingMessage, message: Message, answerer: str
    ) -> None:
        """A reply from someone other than the agent asked: dead-lettered, never used.

        Replies are consumed without acks (a reply queue dies with its connection), so
        the dead letter is a copy published here, as the consumer's others are.
        """
        self.refused_replies += 1
        detail = f"{message.TYPE} from {message.source!r} answers a request to {answerer!r}"
        log.warning(
            "refusing a reply: %s: %s (%d refused on this connection)",
            NOT_OWNER,
            detail,
            self.refused_replies,
            extra={"message_id": str(message.id), "reason": NOT_OWNER},
        )
        # A reply is routed by its queue's name (there may be more than one reply queue).
        queue_name = incoming.routing_key or "reply"
        try:
            await self._publish_dead_letter(queue_name, incoming, NOT_OWNER, detail)
        except PublishFailed:
            log.exception("could not dead-letter a refused reply; it is dropped")
            return
        if self._metrics is not None:
            self._metrics.dead_lettered(NOT_OWNER)


async def _settle(action: Awaitable[None]) -> None:
    """Ack/nack on a channel that died is harmless: the broker redelivers."""
    try:
        await action
    except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError) as error:
        log.warning("could not settle a delivery (it will be redelivered): %r", error)


def _handling_span(delivery: Delivery) -> tuple[str, dict[str, str | int | bool]]:
    """The name and attributes of the span that handles ``delivery``."""
    message = delivery.message
    return f"handle {message.TYPE}", {
        "messaging.system": "rabbitmq",
        "messaging.destination.name": delivery.queue,
        "messaging.rabbitmq.destination.routing_key": delivery.routing_key,
        "messaging.message.id": str(message.id),
        "messaging.message.conversation_id": str(message.correlation_id or ""),
        "eventplane.message.type": message.TYPE,
        "eventplane.message.source": message.source,
        "messaging.rabbitmq.redelivered": delivery.redelivered,
    }


def _channel_open(incoming: AbstractIncomingMessage) -> bool:
    try:
        return not incoming.channel.is_closed
    except aio_pika.exceptions.ChannelInvalidStateError:
        return False


def _parse_uuid(value: str | None) -> uuid.UUID:
    try:
        return uuid.UUID(value or "")
    except ValueError:
        return uuid.uuid4()
