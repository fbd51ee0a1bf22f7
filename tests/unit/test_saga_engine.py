"""The engine's semantics on real SQLite and PostgreSQL databases (the ``database``
fixture), with an injected clock."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
from pydantic import BaseModel
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import DBAPIError

from nexus.db.models import Saga, UnclaimedEvent, WaitRendezvous
from nexus.db.states import SagaLogEvent, SagaState, WaitState
from nexus.saga.clock import ManualClock
from nexus.saga.definition import Ctx, Node, Reconciled, SagaDefinition, sequence
from nexus.saga.errors import LeaseLost
from nexus.saga.position import SagaRow
from schemas.instance import VmmState
from tests.saga_support import (
    Database,
    Reconciler,
    Replica,
    WaitParams,
    Woke,
    placed_vmm,
    vmm_event,
    wait_saga,
)


async def running_key(database: Database) -> tuple[uuid.UUID, str]:
    """A wait key about a VMM placed on a sled (events from that sled are believed)."""
    instance_id = await placed_vmm(database)
    return instance_id, f"vmm:{instance_id}:running"


async def resumed_count(database: Database, saga_id: uuid.UUID) -> int:
    return sum(1 for e in await database.log(saga_id) if e.event == SagaLogEvent.RESUMED)


async def test_an_event_resumes_a_parked_saga(database: Database) -> None:
    clock = ManualClock()
    definition = wait_saga()
    a = Replica(database, "a", clock=clock, definitions=[definition])
    instance_id, key = await running_key(database)
    saga_id = await a.executor.start(definition, WaitParams(key=key))
    assert (await database.saga(saga_id)).state == SagaState.WAITING

    await a.deliver(vmm_event(instance_id, VmmState.RUNNING, 2))

    saga = await database.saga(saga_id)
    assert saga.state == SagaState.DONE
    assert Woke.model_validate(saga.node_outputs["wait"]).generation == 2


async def test_an_event_that_arrives_before_the_saga_parks_is_not_lost(
    database: Database,
) -> None:
    definition = wait_saga()
    a = Replica(database, "a", clock=ManualClock(), definitions=[definition])
    instance_id, key = await running_key(database)
    ingested = await a.deliver(vmm_event(instance_id, VmmState.RUNNING, 2))
    assert ingested.woken is None

    saga_id = await a.executor.start(definition, WaitParams(key=key))

    assert (await database.saga(saga_id)).state == SagaState.DONE
    assert await resumed_count(database, saga_id) == 1


async def test_a_duplicate_or_stale_event_changes_nothing(database: Database) -> None:
    definition = wait_saga()
    a = Replica(database, "a", clock=ManualClock(), definitions=[definition])
    instance_id, key = await running_key(database)
    saga_id = await a.executor.start(definition, WaitParams(key=key, min_generation=4))

    stale = await a.deliver(vmm_event(instance_id, VmmState.RUNNING, 3))
    assert stale.woken is None
    assert (await database.saga(saga_id)).state == SagaState.WAITING

    event = vmm_event(instance_id, VmmState.RUNNING, 5)
    first = await a.deliver(event)
    assert first.woken is not None
    after_first = await database.saga(saga_id)
    assert after_first.state == SagaState.DONE

    again = await a.deliver(event)
    assert again.woken is None
    older = await a.deliver(vmm_event(instance_id, VmmState.RUNNING, 4))
    assert older.woken is None
    final = await database.saga(saga_id)
    assert final.version == after_first.version
    assert await resumed_count(database, saga_id) == 1
    async with database.sessions() as session:
        row = await session.get(WaitRendezvous, key)
    assert row is not None and row.event_generation == 5


async def test_a_reused_key_is_not_satisfied_by_an_old_event(database: Database) -> None:
    definition = wait_saga()
    a = Replica(database, "a", clock=ManualClock(), definitions=[definition])
    instance_id, key = await running_key(database)
    await a.deliver(vmm_event(instance_id, VmmState.RUNNING, 2))

    saga_id = await a.executor.start(definition, WaitParams(key=key, min_generation=2))

    assert (await database.saga(saga_id)).state == SagaState.WAITING
    await a.deliver(vmm_event(instance_id, VmmState.RUNNING, 3))
    assert (await database.saga(saga_id)).state == SagaState.DONE


async def test_a_lost_notification_is_recovered_at_the_deadline_by_one_query(
    database: Database,
) -> None:
    clock = ManualClock()
    reconciler = Reconciler()
    definition = wait_saga(reconciler)
    a = Replica(database, "a", clock=clock, definitions=[definition])
    instance_id, key = await running_key(database)
    saga_id = await a.executor.start(definition, WaitParams(key=key, deadline_seconds=30))
    found = vmm_event(instance_id, VmmState.RUNNING, 2)
    reconciler.answers.append(Reconciled.resume(key, found.payload.model_dump(mode="json"), 2))

    clock.advance(timedelta(seconds=29))
    await a.executor.sweep()
    assert reconciler.asked == 0, "nothing is asked before the deadline"
    assert (await database.saga(saga_id)).state == SagaState.WAITING

    clock.advance(timedelta(seconds=2))
    await a.executor.sweep()
    await a.executor.sweep()

    assert reconciler.asked == 1
    saga = await database.saga(saga_id)
    assert saga.state == SagaState.DONE
    assert Woke.model_validate(saga.node_outputs["wait"]).by_reconcile
    told = [(step, node) for saga, step, node in a.told if saga == saga_id]
    # Watchers are told of a resume by reconcile as of one by an event.
    assert told[-4:] == [
        ("resumed", "wait"),
        ("succeeded", "wait"),
        ("succeeded", "finish"),
        ("done", None),
    ], told


async def test_a_deadline_rearms_then_fails(database: Database) -> None:
    clock = ManualClock()
    reconciler = Reconciler()
    definition = wait_saga(reconciler)
    a = Replica(database, "a", clock=clock, definitions=[definition])
    _, key = await running_key(database)
    saga_id = await a.executor.start(definition, WaitParams(key=key, deadline_seconds=10, rearms=1))

    clock.advance(timedelta(seconds=11))
    await a.executor.sweep()
    assert reconciler.asked == 1
    assert (await database.saga(saga_id)).state == SagaState.WAITING

    clock.advance(timedelta(seconds=5))
    await a.executor.sweep()
    assert reconciler.asked == 1, "a re-armed wait is not asked again before its deadline"

    clock.advance(timedelta(seconds=6))
    await a.executor.sweep()
    assert reconciler.asked == 2
    saga = await database.saga(saga_id)
    assert saga.state == SagaState.UNDONE
    assert "deadline passed" in (saga.error or "")
    told = [(step, node) for saga, step, node in a.told if saga == saga_id]
    assert told[-2:] == [("failed", "wait"), ("undone", None)], told


async def test_a_reconcile_is_bounded_by_the_lease_and_no_answer_spends_no_rearm(
    database: Database,
) -> None:
    clock = ManualClock()
    reconciler = Reconciler(answers_after=30.0)
    definition = wait_saga(reconciler)
    lease = timedelta(seconds=0.4)
    a = Replica(database, "a", clock=clock, definitions=[definition], lease=lease)
    _, key = await running_key(database)
    saga_id = await a.executor.start(definition, WaitParams(key=key, deadline_seconds=10, rearms=0))

    clock.advance(timedelta(seconds=11))
    started = time.monotonic()
    await a.executor.sweep()
    waited = time.monotonic() - started

    assert reconciler.asked == 1
    assert waited < lease.total_seconds() + 1.0, f"the query held the saga {waited:.1f}s"
    saga = await database.saga(saga_id)
    assert saga.state == SagaState.WAITING, "an agent that does not answer re-arms the wait"
    assert saga.progress["waiting"]["wait"]["rearms"] == 0
    log = await database.log(saga_id)
    assert "reconcile query failed" in str(log[-1].data)


async def test_one_sagas_trouble_does_not_cost_the_others_their_sweep(
    database: Database,
) -> None:
    clock = ManualClock()
    definition = wait_saga(Reconciler())
    a = Replica(database, "a", clock=clock, definitions=[definition])
    _, broken_key = await running_key(database)
    _, good_key = await running_key(database)
    broken = await a.executor.start(definition, WaitParams(key=broken_key, deadline_seconds=5))
    good = await a.executor.start(
        definition, WaitParams(key=good_key, deadline_seconds=5, rearms=0)
    )
    async with database.sessions.begin() as session:
        # Its log names a node its definition no longer has (a change without a new version).
        saga = await session.get(Saga, broken)
        assert saga is not None
        waiting = dict(saga.progress["waiting"])
        waiting["renamed"] = waiting.pop("wait")
        saga.progress = {**saga.progress, "waiting": waiting}

    clock.advance(timedelta(seconds=6))
    await a.executor.sweep()

    assert (await database.saga(good)).state == SagaState.UNDONE
    unrecoverable = await database.saga(broken)
    assert unrecoverable.state == SagaState.UNRECOVERABLE
    assert "renamed" in (unrecoverable.error or "")


async def claim(replica: Replica, saga_id: uuid.UUID) -> SagaRow | None:
    async with replica.executor.store.step(replica.clock.now()) as tx:
        return await tx.claim(saga_id)


async def test_a_replica_that_lost_its_lease_cannot_write(database: Database) -> None:
    clock = ManualClock()
    definition = wait_saga()
    a = Replica(database, "a", clock=clock, definitions=[definition])
    b = Replica(database, "b", clock=clock, definitions=[definition])
    instance_id, key = await running_key(database)
    saga_id = await a.executor.start(definition, WaitParams(key=key), run=False)
    claimed = await claim(a, saga_id)
    assert claimed is not None
    assert await claim(b, saga_id) is None, "a live lease is not taken over"

    clock.advance(timedelta(seconds=16))
    await b.executor.sweep()
    assert (await database.saga(saga_id)).state == SagaState.WAITING

    with pytest.raises(LeaseLost):
        await a.executor.runner.run(claimed, saga_id)
    await b.deliver(vmm_event(instance_id, VmmState.RUNNING, 2))
    assert (await database.saga(saga_id)).state == SagaState.DONE
    replicas = {entry.replica_id for entry in await database.log(saga_id)}
    assert replicas == {"b"}


async def test_an_unrecoverable_saga_is_marked_and_does_not_block_others(
    database: Database,
) -> None:
    clock = ManualClock()
    definition = wait_saga()
    a = Replica(database, "a", clock=clock, definitions=[definition])
    broken_id = uuid.uuid4()
    async with database.sessions.begin() as session:
        await session.execute(
            insert(Saga).values(
                id=broken_id,
                name="test_wait",
                definition_version=1,
                params={"not": "the params"},
                state=SagaState.RUNNING.value,
                node_outputs={},
                progress={},
                version=1,
                created_at=clock.now(),
                updated_at=clock.now(),
            )
        )
    _instance_id, key = await running_key(database)
    good_id = await a.executor.start(definition, WaitParams(key=key), run=False)
    async with database.sessions.begin() as session:
        await session.execute(update(Saga).values(lease_owner=None))

    await a.executor.sweep()

    broken = await database.saga(broken_id)
    assert broken.state == SagaState.UNRECOVERABLE
    assert "unrecoverable" in (broken.error or "")
    assert (await database.saga(good_id)).state == SagaState.WAITING


async def test_a_saga_of_an_unknown_version_is_left_alone_and_reported(
    database: Database,
) -> None:
    clock = ManualClock()
    newer = wait_saga(version=2)
    old_replica = Replica(database, "old", clock=clock, definitions=[wait_saga(version=1)])
    new_replica = Replica(database, "new", clock=clock, definitions=[newer])
    _, key = await running_key(database)
    saga_id = await new_replica.executor.start(newer, WaitParams(key=key), run=False)
    clock.advance(timedelta(seconds=60))

    await old_replica.executor.sweep()

    saga = await database.saga(saga_id)
    assert saga.state == SagaState.RUNNING and saga.lease_owner == "new"
    assert await old_replica.executor.unrunnable() == [("test_wait", 2, 1)]


async def test_an_event_no_saga_claims_is_moved_where_an_operator_sees_it(
    database: Database,
) -> None:
    clock = ManualClock()
    a = Replica(database, "a", clock=clock, definitions=[wait_saga()])
    instance_id, _key = await running_key(database)
    event = vmm_event(instance_id, VmmState.FAILED, 7)
    await a.deliver(event)

    assert await a.executor.sweep_unclaimed(timedelta(hours=1)) == 0
    clock.advance(timedelta(hours=2))
    assert await a.executor.sweep_unclaimed(timedelta(hours=1)) == 1

    async with database.sessions() as session:
        moved = list((await session.execute(select(UnclaimedEvent))).scalars())
        left = await session.scalar(select(func.count()).select_from(WaitRendezvous))
    assert [(m.wait_key, m.message_id) for m in moved] == [(f"vmm:{instance_id}:failed", event.id)]
    assert left == 0


async def test_parked_waits_hold_no_lease_and_show_their_deadline(database: Database) -> None:
    clock = ManualClock()
    definition = wait_saga()
    a = Replica(database, "a", clock=clock, definitions=[definition])
    _, key = await running_key(database)
    saga_id = await a.executor.start(definition, WaitParams(key=key, deadline_seconds=45))
    async with database.sessions() as session:
        row = await session.get(WaitRendezvous, key)
    saga = await database.saga(saga_id)
    assert saga.lease_owner is None and saga.lease_expires_at is None
    assert row is not None and row.state == WaitState.PARKED and row.saga_id == saga_id
    assert row.deadline == clock.now() + timedelta(seconds=45)


class _Contended(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"sqlstate {sqlstate}")
        self.sqlstate = sqlstate


# Deadlock, serialization failure, lock_timeout, statement_timeout.
@pytest.mark.parametrize("sqlstate", ["40P01", "40001", "55P03", "57014"])
async def test_a_step_that_loses_a_database_race_runs_again(
    database: Database, sqlstate: str
) -> None:
    """A deadlock, a serialization failure, or a wait for a lock or a statement that took
    too long is not the node failing: the step reruns."""
    attempts: list[int] = []

    class Nothing(BaseModel):
        pass

    async def racy(ctx: Ctx[Nothing]) -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise DBAPIError("UPDATE datasets ...", {}, _Contended(sqlstate))

    definition = SagaDefinition(
        name="test_racy", version=1, params=Nothing, stages=sequence(Node("racy", racy))
    )
    a = Replica(database, "a", clock=ManualClock(), definitions=[definition])
    saga_id = await a.executor.start(definition, Nothing())

    assert len(attempts) == 3
    saga = await database.saga(saga_id)
    assert saga.state == SagaState.DONE
    assert [e.event for e in await database.log(saga_id)] == [
        SagaLogEvent.STARTED,
        SagaLogEvent.SUCCEEDED,
    ]


async def test_a_connection_the_server_closed_pauses_the_saga_and_fails_no_node(
    database: Database,
) -> None:
    """A connection the database closed (a restart; the idle-in-transaction timeout that
    ended the transaction of a replica that was frozen) rolls the step back: no node
    failed, and the saga waits for its lease to expire, to be adopted."""

    class Nothing(BaseModel):
        pass

    async def cut(ctx: Ctx[Nothing]) -> None:
        raise DBAPIError(
            "UPDATE datasets ...",
            {},
            ConnectionResetError("terminating connection due to idle-in-transaction timeout"),
            connection_invalidated=True,
        )

    definition = SagaDefinition(
        name="test_cut", version=1, params=Nothing, stages=sequence(Node("cut", cut))
    )
    a = Replica(database, "a", clock=ManualClock(), definitions=[definition])
    saga_id = await a.executor.start(definition, Nothing())

    saga = await database.saga(saga_id)
    assert saga.state == SagaState.RUNNING and saga.lease_owner == "a"
    assert await database.log(saga_id) == []
