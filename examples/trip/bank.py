"""The bank: a participant outside Nexus that answers charge commands with an event.

It shares nothing with the saga but the broker: it takes ``bank.charge_card.v1`` and
``bank.void_charge.v1`` from its own queue (fed by ``control.commands``), takes a moment
to decide, and publishes ``payment.settled.v1`` to ``control.events`` under
``payment.confirmed`` or ``payment.declined``. It runs in the example's process for
convenience, on a broker connection of its own; it could as well run anywhere else.

Like any consumer of an at-least-once queue it is idempotent: a redelivered charge
gets the same decision, published with the same event id.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pydantic import ValidationError

from examples.trip.messages import (
    BANK_COMMANDS,
    BANK_QUEUE,
    ChargeCard,
    PaymentOutcome,
    PaymentSettled,
    Settlement,
    VoidCharge,
)
from examples.trip.story import money, tell
from schemas.base import command_id
from schemas.topology import EVENTS_EXCHANGE
from schemas.transport import Transport

log = logging.getLogger(__name__)

# What every card may spend: the second trip of the example asks for more.
CARD_LIMIT_CENTS = 2_000_00


class Bank:
    def __init__(self, amqp_url: str, *, delay: float = 0.5, name: str = "moneybank") -> None:
        self._transport = Transport(amqp_url, name=f"bank/{name}")
        self._source = f"bank/{name}"
        self._delay = delay
        self._channel: AbstractChannel | None = None
        self._decided: dict[uuid.UUID, Settlement] = {}
        self._voids: set[uuid.UUID] = set()
        self._voided: dict[uuid.UUID, asyncio.Event] = {}

    async def start(self) -> None:
        """Connect and take commands; control.commands must exist (Nexus declares it)."""
        await self._transport.connect()
        await self._transport.declare_command_queue(BANK_QUEUE)
        # Not Transport.consume: it parses with the project's closed message union,
        # which knows nothing of the bank's commands.
        self._channel = await self._transport.connection.channel()
        await self._channel.set_qos(prefetch_count=8)
        queue = await self._channel.get_queue(BANK_QUEUE, ensure=True)
        await queue.consume(self._on_command, no_ack=False)

    async def stop(self) -> None:
        await self._transport.close()

    async def voided(self, payment_id: uuid.UUID, timeout: float) -> None:
        """Until the void of ``payment_id`` was handled (the story waits for the last line)."""
        await asyncio.wait_for(self._voided.setdefault(payment_id, asyncio.Event()).wait(), timeout)

    async def _on_command(self, incoming: AbstractIncomingMessage) -> None:
        try:
            command = BANK_COMMANDS.validate_json(incoming.body)
        except ValidationError as error:
            log.warning("bank: refusing an unreadable command: %s", error)
            await incoming.reject(requeue=False)  # to the dead letters
            return
        try:
            if isinstance(command, ChargeCard):
                await self._charge(command)
            else:
                self._void(command)
        except Exception:
            log.exception("bank: command failed; it is delivered again")
            await incoming.nack(requeue=True)
            return
        await incoming.ack()

    async def _charge(self, command: ChargeCard) -> None:
        request = command.payload
        settlement = self._decided.get(request.payment_id)
        if settlement is None:
            await asyncio.sleep(self._delay)  # a card network takes a moment
            if request.payment_id in self._voids:
                # The saga gave up (its deadline passed) and voided the payment while the
                # bank was still deciding: a void must win, or the card pays for nothing.
                settlement = Settlement(
                    payment_id=request.payment_id,
                    outcome=PaymentOutcome.DECLINED,
                    amount_cents=request.amount_cents,
                    reason="voided before it was decided",
                )
            elif request.amount_cents <= CARD_LIMIT_CENTS:
                settlement = Settlement(
                    payment_id=request.payment_id,
                    outcome=PaymentOutcome.CONFIRMED,
                    amount_cents=request.amount_cents,
                    authorisation=f"AUTH-{request.payment_id.hex[:8].upper()}",
                )
            else:
                settlement = Settlement(
                    payment_id=request.payment_id,
                    outcome=PaymentOutcome.DECLINED,
                    amount_cents=request.amount_cents,
                    reason=f"over the card's limit of {money(CARD_LIMIT_CENTS)}",
                )
            self._decided[request.payment_id] = settlement
        event = PaymentSettled(
            id=command_id(request.payment_id, "settled"),
            source=self._source,
            payload=settlement,
            **command.caused(),
        )
        why = f" ({settlement.reason})" if settlement.reason else ""
        tell(
            "[bank]",
            f"{settlement.outcome.value} {money(request.amount_cents)}{why}: "
            f"publishing {event.routing_key()}",
        )
        await self._transport.publish(
            event, exchange=EVENTS_EXCHANGE, routing_key=event.routing_key()
        )

    def _void(self, command: VoidCharge) -> None:
        payment_id = command.payload.payment_id
        settlement = self._decided.get(payment_id)
        if settlement is not None and settlement.outcome is PaymentOutcome.CONFIRMED:
            tell("[bank]", f"voided payment {payment_id}: refunded")
        else:
            tell("[bank]", f"void of payment {payment_id}: nothing was charged")
        self._voids.add(payment_id)
        self._voided.setdefault(payment_id, asyncio.Event()).set()
