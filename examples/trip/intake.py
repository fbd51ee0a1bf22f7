"""The example's event intake: the bank's events into the saga engine's rendezvous.

This is the part of Nexus's ``EventIngest`` (``nexus/events.py``) that the example
needs, for an event type Nexus does not know: parse the event, record it under its
wait key in one transaction (``rendezvous.record_event``: it wakes the saga parked on
that key, or keeps the event for a saga that has not parked yet), then run the woken
saga on this replica and ack. A redelivered event changes nothing: its generation is
not newer than the one recorded.
"""

from __future__ import annotations

import logging

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from examples.trip.messages import PAYMENT_EVENT, PAYMENT_EVENTS, PAYMENTS_QUEUE, payment_key
from examples.trip.story import tell
from nexus.app import NexusApp
from nexus.saga import rendezvous
from schemas.identity import source_allowed
from schemas.topology import EVENTS_EXCHANGE

log = logging.getLogger(__name__)

# Each payment is decided once: its one event is generation 1.
SETTLEMENT_GENERATION = 1


class PaymentIntake:
    def __init__(self, app: NexusApp) -> None:
        self._app = app

    async def start(self) -> None:
        """Declare the example's queue on control.events and consume it."""
        transport = self._app.transport
        assert transport is not None, "start the NexusApp first"
        await transport.declare_queue(PAYMENTS_QUEUE, [(EVENTS_EXCHANGE, PAYMENT_EVENTS)])
        # Not Transport.consume: it parses with the project's closed message union.
        channel = await transport.connection.channel()
        await channel.set_qos(prefetch_count=32)
        queue = await channel.get_queue(PAYMENTS_QUEUE, ensure=True)
        await queue.consume(self._on_event, no_ack=False)

    async def _on_event(self, incoming: AbstractIncomingMessage) -> None:
        app = self._app
        assert app.sessions is not None and app.executor is not None
        try:
            event = PAYMENT_EVENT.validate_json(incoming.body)
        except ValidationError as error:
            log.warning("payments: refusing an unreadable event: %s", error)
            await incoming.reject(requeue=False)  # to the dead letters
            return
        # As Transport does for the project's messages: the broker vouches for user_id,
        # and that user must be allowed to speak as the envelope's source.
        if incoming.user_id is None or not source_allowed(incoming.user_id, event.source):
            log.warning("payments: %r may not send as %r", incoming.user_id, event.source)
            await incoming.reject(requeue=False)
            return
        key = payment_key(event.payload.payment_id)
        try:
            async with app.sessions.begin() as session:
                woken = await rendezvous.record_event(
                    session,
                    key=key,
                    message_id=event.id,
                    payload=event.payload.model_dump(mode="json"),
                    generation=SETTLEMENT_GENERATION,
                    now=app.clock.now(),
                    occurred_at=event.occurred_at,
                )
        except Exception:
            log.exception("payments: could not record %s; it is delivered again", key)
            await incoming.nack(requeue=True)
            return
        if woken is not None:
            tell("[intake]", f"{incoming.routing_key} recorded under {key}: woke the saga")
            app.executor.spawn(woken.saga_id)
        else:
            # Either no saga parked yet (it finds the event when it does) or none ever will.
            tell("[intake]", f"{incoming.routing_key} recorded under {key}: no saga waits on it")
        await incoming.ack()
