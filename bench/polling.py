"""The baselines: disk_create waiting for regions by polling, as others do.

Same saga as ``nexus.sagas.disk_create`` except the region nodes: they send the same
ensure command, then instead of waiting for the agent's notification they ask the
agent again and again — with the same reconcile query, through the same broker:

- ``disk_create_backoff``: Omicron's disk-create saga, which re-requests each region on
  an exponential backoff: 250 ms initial interval, doubling, capped at 180 s, ±50 %
  jitter.
- ``disk_create_fixed``: OpenStack Nova waiting for a Cinder volume: every 3 s.

Each poll is a deadline of the engine's wait whose reconcile re-arms it with the next
interval, so the baselines run on the same executor; the wait's key is one no event
ever fills, so notifications are ignored. Run only by the benchmark's replica
(``python -m bench.nexus_replica --disk-create-saga disk_create_backoff``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from nexus.saga.definition import Ctx, Node, Reconciled, SagaDefinition, Wait
from nexus.sagas import disk_create
from nexus.sagas.disk_create import Params, Placed
from schemas.region import RegionChange, RegionEnsure, RegionInfo, RegionSpec
from schemas.region import RegionState as WireRegionState

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


def polling_variant(name: str, interval: Interval) -> SagaDefinition[Params]:
    stages: list[Any] = []
    for stage in disk_create.DEFINITION.stages:
        if stage[0].name.startswith("region_"):
            stages.append(tuple(polling_region_node(i, interval) for i in range(len(stage))))
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
]
