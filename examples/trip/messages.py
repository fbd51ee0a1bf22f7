"""The example's own wire: the bank's commands and its one event, and the wait key.

They are envelopes like every message of the project (``schemas.base.Envelope``), so
a saga node sends them through the outbox as it would a crucible command. They are
not members of the project's message union (``schemas.messages.Message``), which is
closed: the bank and the example's event intake parse them here, with their own union.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Annotated, ClassVar, Final, Literal

from pydantic import Field, TypeAdapter

from schemas.base import Envelope, Model, PositiveInt

# The bank's command queue (bound to control.commands under its own name) and the
# example's event queue (bound to control.events for payment.*).
BANK_QUEUE: Final = "example.trip.bank"
PAYMENTS_QUEUE: Final = "example.trip.payments"
PAYMENT_EVENTS: Final = "payment.*"


def payment_key(payment_id: uuid.UUID) -> str:
    """The wait key a trip parks on, and the key its bank event is recorded under."""
    return f"payment:{payment_id}"


class ChargeRequest(Model):
    payment_id: uuid.UUID
    card: str = Field(max_length=32)
    amount_cents: PositiveInt
    description: str = Field(max_length=200)


class ChargeCard(Envelope):
    IS_COMMAND: ClassVar[bool] = True
    type: Literal["bank.charge_card.v1"] = "bank.charge_card.v1"
    payload: ChargeRequest


class VoidRequest(Model):
    payment_id: uuid.UUID


class VoidCharge(Envelope):
    IS_COMMAND: ClassVar[bool] = True
    type: Literal["bank.void_charge.v1"] = "bank.void_charge.v1"
    payload: VoidRequest


class PaymentOutcome(StrEnum):
    CONFIRMED = "confirmed"
    DECLINED = "declined"


class Settlement(Model):
    payment_id: uuid.UUID
    outcome: PaymentOutcome
    amount_cents: PositiveInt
    authorisation: str | None = None
    reason: str | None = Field(default=None, max_length=200)


class PaymentSettled(Envelope):
    """The bank decided a charge: ``payment.confirmed`` or ``payment.declined``."""

    type: Literal["payment.settled.v1"] = "payment.settled.v1"
    payload: Settlement

    def routing_key(self) -> str:
        return f"payment.{self.payload.outcome.value}"


BankCommand = Annotated[ChargeCard | VoidCharge, Field(discriminator="type")]
BANK_COMMANDS: TypeAdapter[BankCommand] = TypeAdapter(BankCommand)
PAYMENT_EVENT: TypeAdapter[PaymentSettled] = TypeAdapter(PaymentSettled)
