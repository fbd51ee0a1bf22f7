"""Run the trip example: two trips on one Nexus replica, SQLite and RabbitMQ, then their logs.

The first trip is paid and booked (``done``); the second is declined by the bank and
unwinds (``undone``). The exit status is 0 only if both end that way, so the example
doubles as a smoke test of the engine.

    python -m examples.trip [--amqp-url URL] [--database-url URL]
                            [--bank-delay SECONDS] [--payment-deadline SECONDS]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from examples.trip import story
from examples.trip.bank import Bank
from examples.trip.intake import PaymentIntake
from examples.trip.saga import (
    DEFINITION,
    Destination,
    Params,
    ReservationState,
    TripIds,
    create_tables,
    reservations,
)
from examples.trip.story import heading, milliseconds, tell
from nexus.app import NexusApp
from nexus.db.migrate import upgrade_async
from nexus.db.models import Saga, SagaLogEntry
from nexus.db.states import SagaLogEvent, SagaState
from nexus.devstack.servers import RabbitMQNode, ServerUnavailable, amqp_answers
from nexus.sagas import ALL_SAGAS
from nexus.settings import NexusSettings
from schemas.progress import SagaProgressed, SagaStep
from schemas.redact import redact_url
from schemas.transport import Delivery

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"
# How a saga's end is heard: Nexus's progress events, as `nexusctl ... --wait` hears them.
ENDINGS = (SagaStep.DONE, SagaStep.UNDONE, SagaStep.STUCK)
# After the deadline, how long the sweeper may take to notice it and unwind.
GRACE_SECONDS = 30.0


@dataclass(frozen=True)
class Trip:
    title: str
    params: Params
    expected: SagaState
    # What every one of the trip's three reservations must end as.
    reservations: ReservationState


def trips(payment_deadline_seconds: float) -> tuple[Trip, ...]:
    return (
        Trip(
            "trip 1: Ada, 3 nights in Lisbon; the bank confirms the payment",
            Params(
                traveller="Ada",
                destination=Destination.LISBON,
                nights=3,
                card="4000-0001",
                payment_deadline_seconds=payment_deadline_seconds,
            ),
            SagaState.DONE,
            ReservationState.BOOKED,
        ),
        Trip(
            "trip 2: Grace, 7 nights in Tokyo; the bank declines, the saga unwinds",
            Params(
                traveller="Grace",
                destination=Destination.TOKYO,
                nights=7,
                card="4000-0002",
                payment_deadline_seconds=payment_deadline_seconds,
            ),
            SagaState.UNDONE,
            ReservationState.RELEASED,
        ),
    )


@dataclass(frozen=True)
class TripResult:
    trip: Trip
    saga_id: uuid.UUID
    state: str
    error: str | None
    # kind (hotel, flight, car) -> state, from the example's table
    reservations: dict[str, str]
    # Nodes whose undo finished, in the order the saga log has them.
    undone: list[str]
    # What resumed the parked payment node: "event" or "reconcile" (None: it never was).
    resumed_by: str | None

    @property
    def ok(self) -> bool:
        expected = self.trip.reservations.value
        return (
            self.state == self.trip.expected.value
            and sorted(self.reservations) == ["car", "flight", "hotel"]
            and all(state == expected for state in self.reservations.values())
        )


@dataclass(frozen=True)
class ExampleResult:
    trips: list[TripResult]

    @property
    def ok(self) -> bool:
        return all(trip.ok for trip in self.trips)


class Endings:
    """The end of each saga the example started, from Nexus's progress events."""

    def __init__(self) -> None:
        self._waiting: dict[uuid.UUID, asyncio.Future[SagaStep]] = {}

    def expect(self, saga_id: uuid.UUID) -> asyncio.Future[SagaStep]:
        """Call before the saga starts, so that its end cannot be missed."""
        future = asyncio.get_running_loop().create_future()
        self._waiting[saga_id] = future
        return future

    async def handle(self, delivery: Delivery) -> None:
        message = delivery.message
        if not isinstance(message, SagaProgressed) or message.payload.step not in ENDINGS:
            return
        future = self._waiting.pop(message.payload.saga_id, None)
        if future is not None and not future.done():
            future.set_result(message.payload.step)


async def run_example(
    amqp_url: str,
    database_url: str,
    *,
    bank_delay: float = 0.5,
    payment_deadline_seconds: float = 30.0,
) -> ExampleResult:
    """Both trips, start to end, then their saga logs; the caller provides the servers."""
    story.begin()
    await upgrade_async(database_url)
    settings = NexusSettings(
        replica_id="trip-example", database_url=database_url, amqp_url=amqp_url
    )
    # Nexus's own sagas too: the app's API front end insists on a disk_create saga.
    app = NexusApp(settings, definitions=[*ALL_SAGAS, DEFINITION])
    bank = Bank(amqp_url, delay=bank_delay)
    # consume=False: not Nexus's own queues (nexus.api, nexus.events), which a Nexus
    # running on the same broker consumes; the example consumes only its own.
    await app.start(consume=False)
    try:
        assert app.engine is not None and app.transport is not None
        await create_tables(app.engine)
        await PaymentIntake(app).start()
        await bank.start()
        endings = Endings()
        await app.transport.subscribe([f"saga.{step.value}" for step in ENDINGS], endings.handle)
        results = [
            await _run_trip(app, bank, endings, trip) for trip in trips(payment_deadline_seconds)
        ]
        for result in results:
            await _print_log(app, result)
        _print_summary(results)
        return ExampleResult(results)
    finally:
        await bank.stop()
        await app.stop()


async def _run_trip(app: NexusApp, bank: Bank, endings: Endings, trip: Trip) -> TripResult:
    heading(trip.title)
    saga_id = uuid.uuid4()
    ending = endings.expect(saga_id)
    # Runs the saga on this replica until it parks (or ends); the bank's event and
    # the intake take it from there.
    await app.start_saga(DEFINITION, trip.params, saga_id)
    try:
        await asyncio.wait_for(ending, trip.params.payment_deadline_seconds + GRACE_SECONDS)
    except TimeoutError:
        tell("[example]", "no end of the saga was heard; reading what the database says")
    result = await _read(app, trip, saga_id)
    outputs = await _outputs(app, saga_id)
    if "charge" in result.undone:
        # The void leaves through the outbox as the saga unwinds: wait for the bank's line.
        payment_id = TripIds.model_validate(outputs["ids"]).payment
        with contextlib.suppress(TimeoutError):
            await bank.voided(payment_id, timeout=10)
    tell("[nexus]", f"saga {result.state}" + (f" ({result.error})" if result.error else ""))
    return result


async def _read(app: NexusApp, trip: Trip, saga_id: uuid.UUID) -> TripResult:
    assert app.sessions is not None
    async with app.sessions() as session:
        saga = await session.get(Saga, saga_id)
        assert saga is not None
        undone = await session.scalars(
            select(SagaLogEntry.node_name)
            .where(
                SagaLogEntry.saga_id == saga_id,
                SagaLogEntry.event == SagaLogEvent.UNDO_FINISHED,
            )
            .order_by(SagaLogEntry.id)
        )
        resumed = await session.scalar(
            select(SagaLogEntry.data).where(
                SagaLogEntry.saga_id == saga_id,
                SagaLogEntry.node_name == "payment",
                SagaLogEntry.event == SagaLogEvent.RESUMED,
            )
        )
        rows = await session.execute(
            select(reservations.c.kind, reservations.c.state).where(
                reservations.c.saga_id == saga_id
            )
        )
        return TripResult(
            trip=trip,
            saga_id=saga_id,
            state=SagaState(saga.state).value,
            error=saga.error,
            reservations={row.kind: row.state for row in rows},
            undone=list(undone),
            resumed_by=None
            if resumed is None
            else "reconcile"
            if resumed.get("by_reconcile")
            else "event",
        )


async def _outputs(app: NexusApp, saga_id: uuid.UUID) -> dict[str, Any]:
    assert app.sessions is not None
    async with app.sessions() as session:
        outputs = await session.scalar(select(Saga.node_outputs).where(Saga.id == saga_id))
        return dict(outputs or {})


async def _print_log(app: NexusApp, result: TripResult) -> None:
    """The saga's history as the engine recorded it: one row per node event."""
    assert app.sessions is not None
    async with app.sessions() as session:
        saga = await session.get(Saga, result.saga_id)
        assert saga is not None
        entries = await session.scalars(
            select(SagaLogEntry)
            .where(SagaLogEntry.saga_id == result.saga_id)
            .order_by(SagaLogEntry.id)
        )
        held = await session.execute(
            select(reservations.c.kind, reservations.c.ref, reservations.c.state)
            .where(reservations.c.saga_id == result.saga_id)
            .order_by(reservations.c.kind)
        )
        heading(
            f"saga log of {result.trip.title.split(':')[0]} (saga {saga.id}), from the database"
        )
        print("     time  node       event          detail")
        for entry in entries:
            at = milliseconds(entry.at - saga.created_at)
            event = SagaLogEvent(entry.event).value
            print(f"  {at:4d} ms  {entry.node_name:<10} {event:<14} {_detail(entry)}".rstrip())
        print(
            f"  state: {SagaState(saga.state).value}"
            + (f"; error: {saga.error}" if saga.error else "")
        )
        print("  trip_reservations: " + ", ".join(f"{r.kind} {r.ref} {r.state}" for r in held))


def _detail(entry: SagaLogEntry) -> str:
    data = entry.data or {}
    if entry.event == SagaLogEvent.WAITING:
        return f"on {', '.join(data.get('keys', []))} until {str(data.get('deadline', ''))[11:19]}"
    if entry.event == SagaLogEvent.RESUMED:
        return f"by {'reconcile' if data.get('by_reconcile') else 'event'} on {data.get('key')}"
    if entry.event in (SagaLogEvent.FAILED, SagaLogEvent.UNDO_FAILED):
        return str(data.get("error", ""))
    return ""


def _print_summary(results: Sequence[TripResult]) -> None:
    heading("summary")
    for result in results:
        title = result.trip.title.split(":")[0]
        verdict = "as expected" if result.ok else "NOT AS EXPECTED"
        print(
            f"  {title}: {result.state} (expected {result.trip.expected.value}); "
            f"reservations {sorted(set(result.reservations.values()))}; {verdict}"
        )
        if result.undone:
            print(f"  {title}: undone in this order: {', '.join(result.undone)}")


# The command line: find or start a broker, make a fresh SQLite file, run.


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.trip",
        description="Two trips booked by a saga that parks until the bank's RabbitMQ event.",
    )
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("NEXUS_AMQP_URL", DEFAULT_AMQP_URL),
        help="RabbitMQ to use if it answers, else a private node is started "
        "(default: NEXUS_AMQP_URL, else %(default)s)",
    )
    parser.add_argument(
        "--database-url",
        help="default: a fresh SQLite file in a temporary directory, deleted at the end",
    )
    parser.add_argument(
        "--bank-delay", type=float, default=0.5, help="seconds the bank takes to decide"
    )
    parser.add_argument(
        "--payment-deadline",
        type=float,
        default=30.0,
        help="seconds a trip waits for the bank; below --bank-delay, both trips unwind",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # A declined payment failing its node is the story here, not something to warn about.
    logging.getLogger("nexus.saga.executor").setLevel(logging.ERROR)
    with contextlib.ExitStack() as resources:
        try:
            amqp_url = _broker(args.amqp_url, resources)
        except ServerUnavailable as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        database_url = args.database_url
        if database_url is None:
            directory = Path(resources.enter_context(tempfile.TemporaryDirectory(prefix="trip-")))
            database_url = f"sqlite+aiosqlite:///{directory / 'trip.sqlite3'}"
        print(f"database: {redact_url(database_url)}")
        result = asyncio.run(
            run_example(
                amqp_url,
                database_url,
                bank_delay=args.bank_delay,
                payment_deadline_seconds=args.payment_deadline,
            )
        )
    return 0 if result.ok else 1


def _broker(url: str, resources: contextlib.ExitStack) -> str:
    """The RabbitMQ at ``url`` if one answers, else a private node stopped at the end."""
    version = amqp_answers(url)
    if version is not None:
        print(f"broker: RabbitMQ {version} at {redact_url(url)}")
        return url
    print(f"broker: nothing answers at {redact_url(url)}; starting a private RabbitMQ node")
    node = RabbitMQNode()
    resources.callback(node.close)
    print(f"broker: {node.describe()}, stopped at the end")
    return node.url
