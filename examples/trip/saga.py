"""book_trip: hold a hotel, a flight and a car, charge the card, wait for the bank, book.

Steno's ``examples/trip.rs`` (the canonical distributed-sagas talk) with the one thing
this project adds: the payment node *parks* in the database until the bank's event
arrives on RabbitMQ, on a deadline, and no process polls the bank meanwhile. If the
bank declines, the node fails and the saga unwinds: every completed node's undo runs,
in the reverse order of completion.

Nodes, in order (each action beside its undo):

    ids        the trip's ids, generated once
    hotel      hold a room                  undo: release it    (side by side
    flight     hold a seat                  undo: release it     with hotel
    car        hold a car                   undo: release it     and car)
    charge     ask the bank to charge       undo: ask it to void the charge
    payment    park on payment:<id>; resume on the bank's event (fail if declined)
    itinerary  the three holds become bookings

The holds are rows of the example's own table (``trip_reservations``), written in the
node's transaction, so a hold and the log entry saying it happened commit together.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import BaseModel, Field
from sqlalchemy import Column, Integer, MetaData, String, Table, Uuid, update
from sqlalchemy.ext.asyncio import AsyncEngine

from examples.trip.messages import (
    BANK_QUEUE,
    ChargeCard,
    ChargeRequest,
    PaymentOutcome,
    Settlement,
    VoidCharge,
    VoidRequest,
    payment_key,
)
from examples.trip.story import milliseconds, money, tell
from nexus.db.engine import upsert_insert
from nexus.saga.definition import (
    ActionFailed,
    Ctx,
    Node,
    Reconciled,
    SagaDefinition,
    Wait,
    WakeUp,
    parallel,
    sequence,
)

PAYMENT_DEADLINE = timedelta(seconds=30)


@dataclass(frozen=True)
class Prices:
    hotel_per_night: int
    flight: int
    car_per_day: int


class Destination(StrEnum):
    LISBON = "lisbon"
    TOKYO = "tokyo"


# In cents.
DESTINATIONS = {
    Destination.LISBON: Prices(hotel_per_night=120_00, flight=340_00, car_per_day=35_00),
    Destination.TOKYO: Prices(hotel_per_night=310_00, flight=1_450_00, car_per_day=60_00),
}


class Params(BaseModel):
    traveller: str = Field(min_length=1, max_length=100)
    destination: Destination
    nights: int = Field(gt=0, le=60)
    card: str = Field(min_length=4, max_length=32)
    payment_deadline_seconds: float = Field(default=PAYMENT_DEADLINE.total_seconds(), gt=0)


class TripIds(BaseModel):
    hotel: uuid.UUID
    flight: uuid.UUID
    car: uuid.UUID
    payment: uuid.UUID


class Hold(BaseModel):
    reservation_id: uuid.UUID
    ref: str
    price_cents: int


class Charge(BaseModel):
    payment_id: uuid.UUID
    amount_cents: int
    requested_at: datetime


class Paid(BaseModel):
    authorisation: str
    parked_ms: int


class Itinerary(BaseModel):
    refs: list[str]
    total_cents: int
    authorisation: str


# The example's own table: what a hotel, airline and car-rental desk would keep. A real
# service would add it with a migration; the example creates it when it starts.


class ReservationState(StrEnum):
    HELD = "held"
    BOOKED = "booked"
    RELEASED = "released"


metadata = MetaData()
reservations = Table(
    "trip_reservations",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("saga_id", Uuid, nullable=False, index=True),
    Column("kind", String(16), nullable=False),
    Column("ref", String(16), nullable=False),
    Column("price_cents", Integer, nullable=False),
    Column("state", String(16), nullable=False),
)


async def create_tables(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)


# ids


async def ids(ctx: Ctx[Params]) -> TripIds:
    trip = TripIds(hotel=uuid.uuid4(), flight=uuid.uuid4(), car=uuid.uuid4(), payment=uuid.uuid4())
    tell("ids", f"payment id {trip.payment}")
    return trip


# hotel, flight, car


async def hold_hotel(ctx: Ctx[Params]) -> Hold:
    p = ctx.params
    price = DESTINATIONS[p.destination].hotel_per_night * p.nights
    return await _hold(ctx, "hotel", ctx.output("ids", TripIds).hotel, price)


async def release_hotel(ctx: Ctx[Params]) -> None:
    await _release(ctx, "hotel")


async def hold_flight(ctx: Ctx[Params]) -> Hold:
    price = DESTINATIONS[ctx.params.destination].flight
    return await _hold(ctx, "flight", ctx.output("ids", TripIds).flight, price)


async def release_flight(ctx: Ctx[Params]) -> None:
    await _release(ctx, "flight")


async def hold_car(ctx: Ctx[Params]) -> Hold:
    p = ctx.params
    price = DESTINATIONS[p.destination].car_per_day * p.nights
    return await _hold(ctx, "car", ctx.output("ids", TripIds).car, price)


async def release_car(ctx: Ctx[Params]) -> None:
    await _release(ctx, "car")


# charge: the command leaves through the outbox when this node's transaction commits


async def charge_card(ctx: Ctx[Params]) -> Charge:
    payment_id = ctx.output("ids", TripIds).payment
    amount = sum(ctx.output(kind, Hold).price_cents for kind in ("hotel", "flight", "car"))
    p = ctx.params
    await ctx.send(
        ChargeCard(
            id=ctx.command_id(),
            payload=ChargeRequest(
                payment_id=payment_id,
                card=p.card,
                amount_cents=amount,
                description=f"{p.traveller}: {p.nights} nights in {p.destination.value.title()}",
            ),
            **ctx.envelope(),
        ),
        BANK_QUEUE,
    )
    tell("charge", f"asked the bank to charge {money(amount)} to card {p.card}")
    return Charge(payment_id=payment_id, amount_cents=amount, requested_at=ctx.now)


async def void_charge(ctx: Ctx[Params]) -> None:
    """Compensation is a command too: the bank voids the charge, or finds nothing to void."""
    payment_id = ctx.output("charge", Charge).payment_id
    await ctx.send(
        VoidCharge(
            id=ctx.command_id("void"), payload=VoidRequest(payment_id=payment_id), **ctx.envelope()
        ),
        BANK_QUEUE,
    )
    tell("charge", f"undo: asked the bank to void payment {payment_id}")


# payment: park until the bank's event; no process holds the saga meanwhile


async def await_payment(ctx: Ctx[Params]) -> Wait:
    key = payment_key(ctx.output("charge", Charge).payment_id)
    deadline = timedelta(seconds=ctx.params.payment_deadline_seconds)
    tell("payment", f"parked: waiting for {key} (deadline {ctx.now + deadline:%H:%M:%S} UTC)")
    return Wait(keys=(key,), deadline=deadline, rearms=0)


async def payment_settled(ctx: Ctx[Params], wake: WakeUp) -> Paid:
    settlement = Settlement.model_validate(wake.payload)
    parked = milliseconds(ctx.now - ctx.output("charge", Charge).requested_at)
    since_event = (
        f", {milliseconds(ctx.now - wake.occurred_at)} ms after the bank published it"
        if wake.occurred_at is not None
        else ""
    )
    tell("payment", f"resumed by event after {parked} ms{since_event}")
    if settlement.outcome is not PaymentOutcome.CONFIRMED or settlement.authorisation is None:
        raise ActionFailed(f"payment declined: {settlement.reason}")
    tell("payment", f"confirmed, authorisation {settlement.authorisation}")
    return Paid(authorisation=settlement.authorisation, parked_ms=parked)


async def payment_unanswered(ctx: Ctx[Params], keys: Sequence[str]) -> Reconciled:
    """The deadline passed without the bank's event: the one query a deadline allows.

    A real client would ask the bank for the payment's status here; the example's
    bank has no such query, so a silent bank fails the trip (and unwinds it).
    """
    return Reconciled.fail(f"the bank did not answer on {', '.join(keys)} in time")


# itinerary


async def issue_itinerary(ctx: Ctx[Params]) -> Itinerary:
    await ctx.session.execute(
        update(reservations)
        .where(reservations.c.saga_id == ctx.saga_id)
        .values(state=ReservationState.BOOKED.value)
    )
    holds = [ctx.output(kind, Hold) for kind in ("hotel", "flight", "car")]
    itinerary = Itinerary(
        refs=[hold.ref for hold in holds],
        total_cents=sum(hold.price_cents for hold in holds),
        authorisation=ctx.output("payment", Paid).authorisation,
    )
    tell("itinerary", f"booked {', '.join(itinerary.refs)} for {money(itinerary.total_cents)}")
    return itinerary


# helpers


async def _hold(ctx: Ctx[Params], kind: str, reservation_id: uuid.UUID, price: int) -> Hold:
    ref = f"{kind[0].upper()}-{reservation_id.hex[:6].upper()}"
    # Idempotent: a node that runs again (after a crash) finds its row.
    await ctx.session.execute(
        upsert_insert(ctx.session, reservations)
        .values(
            id=reservation_id,
            saga_id=ctx.saga_id,
            kind=kind,
            ref=ref,
            price_cents=price,
            state=ReservationState.HELD.value,
        )
        .on_conflict_do_nothing(index_elements=[reservations.c.id])
    )
    tell(kind, f"held {ref} ({money(price)})")
    return Hold(reservation_id=reservation_id, ref=ref, price_cents=price)


async def _release(ctx: Ctx[Params], kind: str) -> None:
    hold = ctx.output(kind, Hold)
    await ctx.session.execute(
        update(reservations)
        .where(reservations.c.id == hold.reservation_id)
        .values(state=ReservationState.RELEASED.value)
    )
    tell(kind, f"undo: released {hold.ref}")


DEFINITION: SagaDefinition[Params] = SagaDefinition(
    name="book_trip",
    version=1,
    params=Params,
    stages=(
        *sequence(Node("ids", ids)),
        *parallel(
            Node("hotel", hold_hotel, undo=release_hotel),
            Node("flight", hold_flight, undo=release_flight),
            Node("car", hold_car, undo=release_car),
        ),
        *sequence(
            Node("charge", charge_card, undo=void_charge),
            Node("payment", await_payment, resume=payment_settled, reconcile=payment_unanswered),
            Node("itinerary", issue_itinerary),
        ),
    ),
)
