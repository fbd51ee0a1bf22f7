"""instance_start, instance_stop, instance_reboot: one command to the sled, one wait.

The three are one story with a different command and a different state to wait for,
so they share this module (one definition each, registered separately):

    instance_check   the instance exists on a sled; note the generation Nexus knows
    instance_power   send the command; wait for the target state newer than that
    instance_settle  record the state reached

When each may be asked, and when it has nothing to do, is the table ``POWER`` at the
end: the API answers from it, and ``instance_check`` enforces it.

There is nothing to undo: if the sled fails the instance, its own event says so and
Nexus records it by generation.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from pydantic import BaseModel, Field
from sqlalchemy import select, update

from nexus.db.models import Instance, Sled
from nexus.db.states import InstanceState
from nexus.saga.definition import (
    ActionFailed,
    Ctx,
    Node,
    Reconciled,
    SagaDefinition,
    Wait,
    WakeUp,
    sequence,
)
from nexus.sagas.instance_create import announce_instance, ask_sled, outcome_generation
from nexus.waitkeys import instance_key, rejection_key
from schemas.api import InstanceAction
from schemas.base import Envelope
from schemas.instance import InstanceReboot, InstanceRef, InstanceStart, InstanceStop
from schemas.instance import InstanceState as WireInstanceState

POWER_DEADLINE = timedelta(minutes=2)


class Params(BaseModel):
    instance_id: uuid.UUID
    deadline_seconds: float = Field(default=POWER_DEADLINE.total_seconds(), gt=0)


class Checked(BaseModel):
    sled_id: uuid.UUID
    queue: str
    generation: int


class Reached(BaseModel):
    generation: int


Command = type[InstanceStart] | type[InstanceStop] | type[InstanceReboot]


def _definition(
    name: str,
    command: Command,
    target: WireInstanceState,
    allowed_from: frozenset[InstanceState],
) -> SagaDefinition[Params]:
    async def instance_check(ctx: Ctx[Params]) -> Checked:
        found = (
            await ctx.session.execute(
                select(Instance, Sled.queue_name)
                .join(Sled, Sled.id == Instance.sled_id)
                .where(Instance.id == ctx.params.instance_id)
            )
        ).first()
        if found is None:
            raise ActionFailed(f"instance {ctx.params.instance_id} is on no sled")
        instance, queue = found
        if instance.state not in allowed_from:
            raise ActionFailed(
                f"instance {instance.name} is {instance.state.value}; {name} needs one of "
                + ", ".join(sorted(state.value for state in allowed_from))
            )
        return Checked(sled_id=instance.sled_id, queue=queue, generation=instance.generation)

    async def instance_power(ctx: Ctx[Params]) -> Wait:
        checked = ctx.output("instance_check", Checked)
        message: Envelope = command(
            id=ctx.command_id(),
            payload=InstanceRef(id=ctx.params.instance_id),
            **ctx.envelope(),
        )
        await ctx.send(message, checked.queue)
        keys = [instance_key(ctx.params.instance_id, target), rejection_key(message.id)]
        if target is not WireInstanceState.FAILED:
            keys.append(instance_key(ctx.params.instance_id, WireInstanceState.FAILED))
        return Wait(
            keys=tuple(keys),
            deadline=timedelta(seconds=ctx.params.deadline_seconds),
            # Only a change newer than what Nexus knew answers this command.
            min_generation=checked.generation,
        )

    async def instance_power_resume(ctx: Ctx[Params], wake: WakeUp) -> Reached:
        return Reached(generation=outcome_generation(wake, target))

    async def instance_power_reconcile(ctx: Ctx[Params], keys: Sequence[str]) -> Reconciled:
        checked = ctx.output("instance_check", Checked)
        return await ask_sled(ctx, ctx.params.instance_id, checked.queue, target, checked.sled_id)

    async def instance_settle(ctx: Ctx[Params]) -> None:
        reached = ctx.output("instance_power", Reached)
        await ctx.session.execute(
            update(Instance)
            .where(Instance.id == ctx.params.instance_id, Instance.generation <= reached.generation)
            .values(
                state=InstanceState(target.value),
                generation=reached.generation,
                updated_at=ctx.now,
            )
        )
        await announce_instance(ctx, target.value)

    return SagaDefinition(
        name=name,
        version=1,
        params=Params,
        stages=sequence(
            Node("instance_check", instance_check),
            Node(
                "instance_power",
                instance_power,
                resume=instance_power_resume,
                reconcile=instance_power_reconcile,
            ),
            Node("instance_settle", instance_settle),
        ),
    )


@dataclass(frozen=True)
class Power:
    """One power action: its saga and the instance states it applies to."""

    saga: SagaDefinition[Params]
    allowed_from: frozenset[InstanceState]
    # Nothing to do in these: the target is reached or on its way.
    already: frozenset[InstanceState]


def _power(
    name: str,
    command: Command,
    target: WireInstanceState,
    *,
    allowed_from: frozenset[InstanceState],
    already: frozenset[InstanceState],
) -> Power:
    return Power(_definition(name, command, target, allowed_from), allowed_from, already)


POWER: dict[InstanceAction, Power] = {
    InstanceAction.START: _power(
        "instance_start",
        InstanceStart,
        WireInstanceState.RUNNING,
        allowed_from=frozenset({InstanceState.STOPPED, InstanceState.FAILED}),
        already=frozenset({InstanceState.RUNNING, InstanceState.STARTING}),
    ),
    InstanceAction.STOP: _power(
        "instance_stop",
        InstanceStop,
        WireInstanceState.STOPPED,
        allowed_from=frozenset(
            {InstanceState.RUNNING, InstanceState.STARTING, InstanceState.FAILED}
        ),
        already=frozenset({InstanceState.STOPPED, InstanceState.STOPPING}),
    ),
    InstanceAction.REBOOT: _power(
        "instance_reboot",
        InstanceReboot,
        WireInstanceState.RUNNING,
        allowed_from=frozenset({InstanceState.RUNNING}),
        already=frozenset({InstanceState.REBOOTING}),
    ),
}
START: SagaDefinition[Params] = POWER[InstanceAction.START].saga
STOP: SagaDefinition[Params] = POWER[InstanceAction.STOP].saga
REBOOT: SagaDefinition[Params] = POWER[InstanceAction.REBOOT].saga
