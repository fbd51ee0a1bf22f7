"""instance_stop, instance_reboot: one command to the instance's active VMM, one wait.

The two are one story with a different command and a different state to wait for, so
they share this module (one definition each, registered separately):

    vmm_check    the instance has an active VMM; note it, and the generation Nexus knows
    vmm_power    send the command, naming the VMM; wait for the target state newer than
                 that (or ``failed``, or a refusal)
    vmm_settle   record the state reached (``nexus/vmms.py``)

A stop ends the VMM (``destroyed``): its sled's room is free, and the instance, with no
VMM, is ``stopped``; a start after it is a new VMM (``nexus/sagas/instance_start.py``),
perhaps on another sled. Because the commands name the VMM, a stop or reboot that comes
late, after its VMM has ended, changes nothing on the sled (``sled_agent/hypervisor.py``).
Omicron's stop is a request to the sled agent followed by the instance-update saga
(``nexus/src/app/instance.rs``, ``instance_stop``); here the saga waits for the outcome.

When each may be asked, and when it has nothing to do, is the table ``POWER`` at the
end: the API answers from it, and ``vmm_check`` enforces it. ``start`` is in it too,
with its own saga.

There is nothing to undo: if the sled fails the VMM, its own event says so and Nexus
records it by generation.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import select

from nexus.db.models import Instance, Sled, Vmm
from nexus.db.states import InstanceState, VmmState
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
from nexus.sagas import instance_start
from nexus.sagas.vmm_common import announce_instance, ask_sled, outcome_generation
from nexus.vmms import record_vmm_state
from nexus.waitkeys import rejection_key, vmm_key
from schemas.api import InstanceAction
from schemas.base import Envelope
from schemas.instance import VmmReboot, VmmRef, VmmStop
from schemas.instance import VmmState as WireVmmState

POWER_DEADLINE = timedelta(minutes=2)


class Params(BaseModel):
    instance_id: uuid.UUID
    deadline_seconds: float = Field(default=POWER_DEADLINE.total_seconds(), gt=0)


class Checked(BaseModel):
    vmm_id: uuid.UUID
    sled_id: uuid.UUID
    queue: str
    generation: int


class Reached(BaseModel):
    generation: int


Command = type[VmmStop] | type[VmmReboot]


def _definition(
    name: str,
    command: Command,
    target: WireVmmState,
    allowed_from: frozenset[InstanceState],
) -> SagaDefinition[Params]:
    async def vmm_check(ctx: Ctx[Params]) -> Checked:
        instance = await ctx.session.get(Instance, ctx.params.instance_id)
        if instance is None:
            raise ActionFailed(f"no instance {ctx.params.instance_id}")
        found = None
        if instance.active_vmm_id is not None:
            found = (
                await ctx.session.execute(
                    select(Vmm, Sled.queue_name)
                    .join(Sled, Sled.id == Vmm.sled_id)
                    .where(Vmm.id == instance.active_vmm_id)
                )
            ).first()
        if found is None or instance.state not in allowed_from:
            raise ActionFailed(
                f"instance {instance.name} is {instance.state.value}; {name} needs one of "
                + ", ".join(sorted(state.value for state in allowed_from))
            )
        vmm, queue = found
        return Checked(vmm_id=vmm.id, sled_id=vmm.sled_id, queue=queue, generation=vmm.generation)

    async def vmm_power(ctx: Ctx[Params]) -> Wait:
        checked = ctx.output("vmm_check", Checked)
        message: Envelope = command(
            id=ctx.command_id(), payload=VmmRef(id=checked.vmm_id), **ctx.envelope()
        )
        await ctx.send(message, checked.queue)
        keys = [vmm_key(checked.vmm_id, target), rejection_key(message.id)]
        if target is not WireVmmState.FAILED:
            keys.append(vmm_key(checked.vmm_id, WireVmmState.FAILED))
        return Wait(
            keys=tuple(keys),
            deadline=timedelta(seconds=ctx.params.deadline_seconds),
            # ``running`` recurs in a VMM's life (a reboot): only a change newer than
            # what Nexus knew answers this command.
            min_generation=checked.generation,
        )

    async def vmm_power_resume(ctx: Ctx[Params], wake: WakeUp) -> Reached:
        return Reached(generation=outcome_generation(wake, target))

    async def vmm_power_reconcile(ctx: Ctx[Params], keys: Sequence[str]) -> Reconciled:
        checked = ctx.output("vmm_check", Checked)
        return await ask_sled(ctx, checked.vmm_id, checked.queue, checked.sled_id, target)

    async def vmm_settle(ctx: Ctx[Params]) -> None:
        checked = ctx.output("vmm_check", Checked)
        reached = ctx.output("vmm_power", Reached)
        state = VmmState(target.value)
        await record_vmm_state(ctx.session, checked.vmm_id, state, reached.generation, ctx.now)
        await announce_instance(ctx, "stopped" if state is VmmState.DESTROYED else state.value)

    return SagaDefinition(
        name=name,
        version=2,
        params=Params,
        stages=sequence(
            Node("vmm_check", vmm_check),
            Node(
                "vmm_power",
                vmm_power,
                resume=vmm_power_resume,
                reconcile=vmm_power_reconcile,
            ),
            Node("vmm_settle", vmm_settle),
        ),
    )


STOP: SagaDefinition[Params] = _definition(
    "instance_stop",
    VmmStop,
    WireVmmState.DESTROYED,
    frozenset({InstanceState.RUNNING, InstanceState.STARTING, InstanceState.REBOOTING}),
)
REBOOT: SagaDefinition[Params] = _definition(
    "instance_reboot", VmmReboot, WireVmmState.RUNNING, frozenset({InstanceState.RUNNING})
)


@dataclass(frozen=True)
class Power:
    """One power action: its saga, its parameters, and the instance states it applies to."""

    saga: SagaDefinition[Any]
    params: Callable[[uuid.UUID], BaseModel]
    allowed_from: frozenset[InstanceState]
    # Nothing to do in these: the target is reached or on its way (a failed instance
    # has no VMM to stop).
    already: frozenset[InstanceState]


POWER: dict[InstanceAction, Power] = {
    InstanceAction.START: Power(
        instance_start.DEFINITION,
        lambda instance_id: instance_start.Params(instance_id=instance_id),
        allowed_from=frozenset({InstanceState.STOPPED, InstanceState.FAILED}),
        already=frozenset({InstanceState.RUNNING, InstanceState.STARTING}),
    ),
    InstanceAction.STOP: Power(
        STOP,
        lambda instance_id: Params(instance_id=instance_id),
        allowed_from=frozenset(
            {InstanceState.RUNNING, InstanceState.STARTING, InstanceState.REBOOTING}
        ),
        already=frozenset({InstanceState.STOPPED, InstanceState.STOPPING, InstanceState.FAILED}),
    ),
    InstanceAction.REBOOT: Power(
        REBOOT,
        lambda instance_id: Params(instance_id=instance_id),
        allowed_from=frozenset({InstanceState.RUNNING}),
        already=frozenset({InstanceState.REBOOTING}),
    ),
}
