"""The baselines: disk_create waiting for regions by polling, as others do.

Same saga as ``nexus.sagas.disk_create`` except the region nodes: they send the same
ensure command, then instead of waiting for the agent's notification they ask the
agent again and again — with the same reconcile query, through the same broker:

- ``disk_create_backoff``: Omicron's disk-create saga, which re-requests each region on
  an exponential backoff: 250 ms initial interval, doubling, capped at 180 s, ±50 %
  jitter.
- ``disk_create_fixed``: OpenStack Nova waiting for a Cinder volume: every 3 s.
- ``disk_create_longpoll``: omicron#996's other proposal, a long poll: Nexus asks the
  agent, which answers when the region changes or after 30 s, and Nexus asks again at
  once (:mod:`bench.longpoll`; its agents are ``python -m bench.longpoll agent``). The
  loop runs in the memory of the replica that ran the node; the wait's deadline
  (``region_deadline_seconds``, as the event-driven saga's) is the only thing that
  asks again if that replica dies.

Each poll is a deadline of the engine's wait whose reconcile re-arms it with the next
interval, so the baselines run on the same executor; the wait's key is one no event
ever fills, so notifications are ignored. Run only by the benchmark's replica
(``python -m bench.nexus_replica --disk-create-saga disk_create_backoff``).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from bench.longpoll import LongPoller
from nexus.db.models import SagaLogEntry, WaitRendezvous
from nexus.db.states import SagaLogEvent, WaitState
from nexus.saga import rendezvous
from nexus.saga.definition import Ctx, Node, Reconciled, SagaDefinition, Wait
from nexus.sagas import disk_create
from nexus.sagas.disk_create import Params, Placed
from schemas.region import (
    Region,
    RegionChange,
    RegionEnsure,
    RegionGet,
    RegionInfo,
    RegionRef,
    RegionSpec,
)
from schemas.region import RegionState as WireRegionState

if TYPE_CHECKING:
    from nexus.app import NexusApp

Interval = Callable[[int], timedelta]


def omicron_backoff(attempt: int) -> timedelta:
    """The interval before poll ``attempt + 1``: 250 ms x 2^attempt, at most 180 s, ±50 %."""
    base = min(0.25 * 2**attempt, 180.0)
    return timedelta(seconds=base * random.uniform(0.5, 1.5))


def nova_fixed(attempt: int) -> timedelta:
    return timedelta(seconds=3)


def poll_key(ctx: Ctx[Params]) -> str:
    return f"poll:{ctx.saga_id}:{ctx.node}"


def _spec(ctx: Ctx[Params], index: int) -> tuple[str, RegionSpec]:
    placed = ctx.output("regions_place", Placed)
    placement = placed.regions[index]
    return placement.queue, RegionSpec(
        id=placement.region_id,
        block_size=ctx.params.block_size,
        extent_size=placed.extent_size,
        extent_count=placed.extent_count,
        encrypted=True,
    )


def polling_region_node(index: int, interval: Interval) -> Node[Params]:
    async def region_ensure(ctx: Ctx[Params]) -> Wait:
        queue, spec = _spec(ctx, index)
        await ctx.send(RegionEnsure(id=ctx.command_id(), payload=spec, **ctx.envelope()), queue)
        return Wait(keys=(poll_key(ctx),), deadline=interval(0), rearms=1_000_000)

    async def region_poll(ctx: Ctx[Params], keys: Sequence[str]) -> Reconciled:
        """One poll: re-request the region (idempotent ensure), as Omicron does."""
        queue, spec = _spec(ctx, index)
        assert ctx.transport is not None
        reply = await ctx.transport.request(
            RegionEnsure(payload=spec, **ctx.envelope()), routing_key=queue, timeout=10
        )
        if not isinstance(reply, RegionInfo) or reply.payload.region is None:
            return Reconciled.rearm("no answer yet", after=interval(ctx.attempt + 1))
        region = reply.payload.region
        if region.state is WireRegionState.CREATED:
            change = RegionChange(agent_id=reply.payload.agent_id, region=region)
            return Reconciled.resume(keys[0], change.model_dump(mode="json"), region.generation)
        if region.state is WireRegionState.REQUESTED:
            return Reconciled.rearm("still requested", after=interval(ctx.attempt + 1))
        return Reconciled.fail(f"region {region.id} is {region.state.value}")

    return Node(
        f"region_{index}",
        region_ensure,
        resume=disk_create.region_ensure_resume,
        reconcile=region_poll,
    )


@dataclass
class LongPolls:
    """This replica's long polls and what they need of it (set by bench.nexus_replica)."""

    nexus: NexusApp
    poller: LongPoller | None = None

    def start(self, ctx: Ctx[Params], index: int) -> None:
        """A loop asking the region's agent until the region is no longer requested."""
        nexus = self.nexus
        assert nexus.transport is not None
        if self.poller is None:
            self.poller = LongPoller(nexus.transport, f"nexus/{nexus.replica_id}")
        placement = ctx.output("regions_place", Placed).regions[index]
        key, saga_id, node = poll_key(ctx), ctx.saga_id, ctx.node

        async def news(region: Region, agent_id: uuid.UUID) -> bool:
            """At the rendezvous, as the region's event would be; runs the saga."""
            assert nexus.sessions is not None and nexus.executor is not None
            change = RegionChange(agent_id=agent_id, region=region)
            async with nexus.sessions() as session, session.begin():
                now = nexus.clock.now()
                session.add(_answered(saga_id, node, nexus.replica_id, now, region.state.value))
                woken = await rendezvous.record_event(
                    session,
                    key=key,
                    message_id=uuid.uuid4(),
                    payload=change.model_dump(mode="json"),
                    generation=region.generation,
                    now=now,
                )
            if woken is not None:
                nexus.executor.spawn(woken.saga_id)
            return True

        async def no_news(why: str) -> bool:
            """Logged as the pollers' polls are; go on while the wait is parked."""
            assert nexus.sessions is not None
            async with nexus.sessions() as session, session.begin():
                session.add(
                    SagaLogEntry(
                        saga_id=saga_id,
                        node_name=node,
                        event=SagaLogEvent.WAITING,
                        replica_id=nexus.replica_id,
                        at=nexus.clock.now(),
                        data={"rearmed": why},
                    )
                )
                state = await session.scalar(
                    select(WaitRendezvous.state).where(WaitRendezvous.wait_key == key)
                )
            return state is None or state == WaitState.PARKED

        self.poller.watch(key, placement.dataset_id, placement.region_id, news, no_news)


def _answered(saga_id: uuid.UUID, node: str, replica_id: str, now: Any, state: str) -> SagaLogEntry:
    return SagaLogEntry(
        saga_id=saga_id,
        node_name=node,
        event=SagaLogEvent.WAITING,
        replica_id=replica_id,
        at=now,
        data={"rearmed": f"long poll answered: {state}"},
    )


# Set by the benchmark's replica before it starts (bench/nexus_replica.py).
LONG_POLLS: LongPolls | None = None


def long_polls() -> LongPolls:
    assert LONG_POLLS is not None, "disk_create_longpoll runs only in bench.nexus_replica"
    return LONG_POLLS


def longpoll_region_node(index: int) -> Node[Params]:
    async def region_ensure(ctx: Ctx[Params]) -> Wait:
        queue, spec = _spec(ctx, index)
        await ctx.send(RegionEnsure(id=ctx.command_id(), payload=spec, **ctx.envelope()), queue)
        # Its first poll may reach the agent before the ensure: the agent holds it until
        # the region is recorded (a change), and Nexus asks again.
        long_polls().start(ctx, index)
        return Wait(
            keys=(poll_key(ctx),),
            deadline=timedelta(seconds=ctx.params.region_deadline_seconds),
            rearms=1_000_000,
        )

    async def region_reask(ctx: Ctx[Params], keys: Sequence[str]) -> Reconciled:
        """The deadline: nobody may be asking any more (the replica that was died).
        Ask once; if the region is still requested, start asking here."""
        placement = ctx.output("regions_place", Placed).regions[index]
        assert ctx.transport is not None
        reply = await ctx.transport.request(
            RegionGet(payload=RegionRef(id=placement.region_id), **ctx.envelope()),
            routing_key=placement.queue,
            timeout=10,
        )
        region = reply.payload.region if isinstance(reply, RegionInfo) else None
        if region is not None and region.state is WireRegionState.CREATED:
            change = RegionChange(agent_id=placement.dataset_id, region=region)
            return Reconciled.resume(keys[0], change.model_dump(mode="json"), region.generation)
        long_polls().start(ctx, index)
        return Reconciled.rearm("long poll asked again at the deadline")

    return Node(
        f"region_{index}",
        region_ensure,
        resume=disk_create.region_ensure_resume,
        reconcile=region_reask,
    )


def polling_variant(
    name: str, interval: Interval | None, longpoll: bool = False
) -> SagaDefinition[Params]:
    def node(index: int) -> Node[Params]:
        if longpoll:
            return longpoll_region_node(index)
        assert interval is not None
        return polling_region_node(index, interval)

    stages: list[Any] = []
    for stage in disk_create.DEFINITION.stages:
        if stage[0].name.startswith("region_"):
            stages.append(tuple(node(i) for i in range(len(stage))))
        else:
            stages.append(stage)
    return SagaDefinition(
        name=name,
        version=1,
        params=Params,
        stages=tuple(stages),
        on_stuck=disk_create.DEFINITION.on_stuck,
    )


DEFINITIONS = [
    polling_variant("disk_create_backoff", omicron_backoff),
    polling_variant("disk_create_fixed", nova_fixed),
    polling_variant("disk_create_longpoll", None, longpoll=True),
]
