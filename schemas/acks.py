"""Acks for one consumer channel, sent in as few frames as the delivery order allows.

A handled message is not acked on its own frame at once: its ack waits for the end of
the event loop's current pass (or until half the prefetch window is waiting), and then
one ``basic.ack`` with ``multiple`` set acks every handled delivery up to the highest tag
below the lowest delivery still being handled. A handled delivery above a delivery still
in its handler (one retrying on a transient error, say) is acked on its own frame, as
before, so a slow message never holds the others' acks and the prefetch window.

Per message this saves a frame out of the consumer and a command into the broker; for a
flood of cheap events (stale duplicates discarded without a transaction) the ack frame
is most of what is left to pay.

Why it is safe: an ack is sent only after the handler returned, as before; one still
waiting when the process dies is redelivered, which every handler here allows (each
write is guarded by a generation or an inbox row). Delivery tags belong to one channel:
when the robust connection reopens the channel, acks not yet sent for the old one are
dropped (the broker has requeued those deliveries) and the new channel starts afresh.
Messages nacked or dead-lettered are settled on their own frame, never by a multiple
ack: no ack covers a delivery that is still in a handler.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

log = logging.getLogger(__name__)


def _channel(incoming: AbstractIncomingMessage) -> Any:
    try:
        return incoming.channel
    except aio_pika.exceptions.ChannelInvalidStateError:
        return None


def _tag(incoming: AbstractIncomingMessage) -> int:
    if incoming.delivery_tag is None:
        raise TypeError("a delivery consumed without acks has nothing to ack")
    return incoming.delivery_tag


class Acks:
    """The deliveries of one consumer channel, from delivery to settlement."""

    def __init__(self, *, batch: int) -> None:
        # Send the waiting acks at once when this many are waiting.
        self._batch = max(1, batch)
        self._channel: Any = None
        # Delivered to a handler and not settled yet, by delivery tag.
        self._handling: set[int] = set()
        # Handled, ack not sent yet, by delivery tag.
        self._waiting: dict[int, AbstractIncomingMessage] = {}
        self._flush: asyncio.Task[None] | None = None
        # Since the consumer started: messages acked, and the frames their acks took.
        self.acked = 0
        self.frames = 0

    def delivered(self, incoming: AbstractIncomingMessage) -> None:
        """A delivery is about to be handled."""
        channel = _channel(incoming)
        if channel is not self._channel:
            # A reopened channel: the old one's tags mean nothing on it, and the broker
            # has requeued every delivery it had not seen acked.
            self._channel = channel
            self._handling.clear()
            self._waiting.clear()
        self._handling.add(_tag(incoming))

    def _settled(self, incoming: AbstractIncomingMessage) -> bool:
        """Forget a delivery; False if it belongs to a channel that is gone."""
        if _channel(incoming) is not self._channel:
            return False
        self._handling.discard(_tag(incoming))
        return True

    async def nack(self, incoming: AbstractIncomingMessage) -> None:
        """Back to its queue, on its own frame."""
        self._settled(incoming)
        await _settle(incoming.nack(requeue=True))

    async def ack_now(self, incoming: AbstractIncomingMessage) -> None:
        """Acked on its own frame (a message dead-lettered by a copy)."""
        self._settled(incoming)
        await _settle(incoming.ack())
        self.acked += 1
        self.frames += 1

    async def ack(self, incoming: AbstractIncomingMessage) -> None:
        """Handled: acked with the others handled in this pass of the event loop."""
        if not self._settled(incoming):
            return  # its channel is gone: the broker redelivers it
        self._waiting[_tag(incoming)] = incoming
        if len(self._waiting) >= self._batch:
            await self.send()
        elif self._flush is None:
            self._flush = asyncio.create_task(self._send_soon())

    async def _send_soon(self) -> None:
        try:
            await asyncio.sleep(0)
            await self.send()
        finally:
            self._flush = None

    async def send(self) -> None:
        """Send every waiting ack: one multiple ack up to the lowest delivery still in a
        handler, one frame each above it."""
        if not self._waiting:
            return
        waiting, self._waiting = self._waiting, {}
        lowest = min(self._handling, default=None)
        below = [tag for tag in waiting if lowest is None or tag < lowest]
        if below:
            highest = max(below)
            await _settle(waiting[highest].ack(multiple=len(below) > 1))
            self.frames += 1
        for tag, incoming in waiting.items():
            if lowest is not None and tag > lowest:
                await _settle(incoming.ack())
                self.frames += 1
        self.acked += len(waiting)


async def _settle(action: Any) -> None:
    """Ack/nack on a channel that died is harmless: the broker redelivers."""
    try:
        await action
    except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError) as error:
        log.warning("could not settle a delivery (it will be redelivered): %r", error)
