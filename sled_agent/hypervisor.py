"""The simulated hypervisor's rules: which command moves an instance where. No I/O, no clock.

States and how they change (``→`` is one change, each with the next generation)::

    ensure   (new)                 → creating → starting → running   (spec.start)
                                   → creating → stopped              (not spec.start)
    start    stopped | failed      → starting → running
    stop     running | starting | rebooting → stopping → stopped;  failed → stopped
    reboot   running               → rebooting → running
    destroy  running | starting | rebooting → stopping → destroyed;
             stopped | failed | creating → destroyed
    crash    running | starting | rebooting → failed (with a reason)

``creating``, ``starting``, ``stopping`` and ``rebooting`` are *transitional*: the service
layer leaves an instance in one for a configured time, then calls :meth:`Hypervisor.advance`.
Where a transitional state leads next is kept in :attr:`VM.next_state` when it depends on
what was asked (``creating`` → starting or stopped, ``stopping`` → stopped or destroyed), so
a command that arrives meanwhile (stop while creating, destroy while stopping) redirects it
without an extra state change.

Every command is idempotent: asking for the state an instance is in or heading to changes
nothing. A command that makes no sense in the current state raises :class:`Rejected`.

A restart of the sled agent is a host crash (:meth:`Hypervisor.after_restart`): the VMs
lived in the agent's process, so instances that were running, or starting, rebooting or
stopping, come back ``failed`` with :data:`RESTART_REASON` and the next generation, exactly
as a real sled's instances do after the host reboots. This is the honest answer (they are
not running any more), it is published like any unrequested change, and Nexus decides
whether to start them again. ``creating`` is resumed instead: no guest existed yet, only
the agent's own bookkeeping, so there is nothing to lose.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from schemas.instance import Instance, InstanceSpec, InstanceState

RESTART_REASON = "sled agent restarted: the host lost its VMs"

S = InstanceState
TRANSITIONAL = frozenset({S.CREATING, S.STARTING, S.STOPPING, S.REBOOTING})
# What a crash can hit: a guest that is (about to be) executing.
CRASHABLE = frozenset({S.RUNNING, S.STARTING, S.REBOOTING})


class Rejected(Exception):
    """A command that cannot be carried out; ``code`` is stable, for programs."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Capacity:
    cpus: int
    memory_bytes: int


@dataclass(frozen=True)
class Cause:
    """The message that set an instance moving, so the changes that follow carry its ids."""

    correlation_id: uuid.UUID | None = None
    causation_id: uuid.UUID | None = None


@dataclass(frozen=True)
class VM:
    """One instance as the hypervisor keeps it: what was asked for, and where it is."""

    spec: InstanceSpec
    instance: Instance
    next_state: InstanceState | None = None
    cause: Cause = Cause()

    @property
    def id(self) -> uuid.UUID:
        return self.spec.id

    @property
    def state(self) -> InstanceState:
        return self.instance.state

    @property
    def generation(self) -> int:
        return self.instance.generation

    @property
    def transitional(self) -> bool:
        return self.state in TRANSITIONAL

    def moved(self, state: InstanceState, cause: Cause, *, reason: str | None = None) -> VM:
        """The instance in ``state`` with the next generation."""
        instance = self.instance.model_copy(
            update={"state": state, "generation": self.generation + 1, "reason": reason}
        )
        return VM(self.spec, instance, None, cause)

    def heading_to(self, next_state: InstanceState, cause: Cause) -> VM:
        """Same state and generation, another destination for the transition under way."""
        return replace(self, next_state=next_state, cause=cause)


@dataclass(frozen=True)
class Change:
    """What a command or a timer did to one instance, to be committed before it is applied."""

    before: VM | None
    after: VM

    @property
    def state_changed(self) -> bool:
        """A new generation: an InstanceStateChanged event goes out with it."""
        return self.before is None or self.before.generation != self.after.generation


def new_vm(sled_id: uuid.UUID, spec: InstanceSpec, cause: Cause) -> VM:
    instance = Instance(
        id=spec.id,
        sled_id=sled_id,
        name=spec.name,
        ncpus=spec.ncpus,
        memory_bytes=spec.memory_bytes,
        disk_ids=spec.disk_ids,
        state=S.CREATING,
        generation=1,
    )
    return VM(spec, instance, S.STARTING if spec.start else S.STOPPED, cause)


class Hypervisor:
    """The instances of one sled. Methods decide; :meth:`apply` records what was committed.

    Deciding and applying are separate so that the in-memory view changes only after the
    database transaction that persists the change has committed.
    """

    def __init__(self, sled_id: uuid.UUID, capacity: Capacity, vms: Iterable[VM] = ()) -> None:
        self.sled_id = sled_id
        self.capacity = capacity
        self._vms = {vm.id: vm for vm in vms}

    def __iter__(self) -> Iterator[VM]:
        return iter(self._vms.values())

    def get(self, instance_id: uuid.UUID) -> VM | None:
        return self._vms.get(instance_id)

    def apply(self, change: Change) -> None:
        self._vms[change.after.id] = change.after

    def reserved(self) -> Capacity:
        """What the instances hold: every instance not destroyed keeps its reservation, so
        a stopped instance can always start again on this sled."""
        held = [vm.spec for vm in self._vms.values() if vm.state is not S.DESTROYED]
        return Capacity(sum(s.ncpus for s in held), sum(s.memory_bytes for s in held))

    def running(self) -> list[VM]:
        return [vm for vm in self._vms.values() if vm.state is S.RUNNING]

    # Commands.

    def ensure(self, spec: InstanceSpec, cause: Cause) -> Change | None:
        existing = self._vms.get(spec.id)
        if existing is not None:
            if existing.spec != spec:
                raise Rejected(
                    "conflict",
                    f"instance {spec.id} exists with another spec ({_describe(existing.spec)}); "
                    f"asked for {_describe(spec)}",
                )
            return None
        reserved = self.reserved()
        cpus = reserved.cpus + spec.ncpus
        memory = reserved.memory_bytes + spec.memory_bytes
        if cpus > self.capacity.cpus or memory > self.capacity.memory_bytes:
            raise Rejected(
                "insufficient_capacity",
                f"instance {spec.id} needs {spec.ncpus} cpus and {spec.memory_bytes} bytes; "
                f"sled {self.sled_id} has {self.capacity.cpus - reserved.cpus} cpus and "
                f"{self.capacity.memory_bytes - reserved.memory_bytes} bytes free",
            )
        return Change(None, new_vm(self.sled_id, spec, cause))

    def start(self, instance_id: uuid.UUID, cause: Cause) -> Change | None:
        vm = self._existing(instance_id, "start")
        match vm.state:
            case S.RUNNING | S.STARTING | S.REBOOTING:
                return None
            case S.CREATING:
                return _redirect(vm, S.STARTING, cause)
            case S.STOPPED | S.FAILED:
                return Change(vm, vm.moved(S.STARTING, cause))
            case _:
                raise _invalid(vm, "start", "wait until it has stopped")

    def stop(self, instance_id: uuid.UUID, cause: Cause) -> Change | None:
        vm = self._existing(instance_id, "stop")
        match vm.state:
            case S.STOPPED | S.STOPPING:
                return None
            case S.CREATING:
                return _redirect(vm, S.STOPPED, cause)
            case S.FAILED:
                return Change(vm, vm.moved(S.STOPPED, cause))
            case _:
                return Change(vm, vm.moved(S.STOPPING, cause).heading_to(S.STOPPED, cause))

    def reboot(self, instance_id: uuid.UUID, cause: Cause) -> Change | None:
        vm = self._existing(instance_id, "reboot")
        match vm.state:
            case S.REBOOTING | S.STARTING:
                return None
            case S.RUNNING:
                return Change(vm, vm.moved(S.REBOOTING, cause))
            case _:
                raise _invalid(vm, "reboot", "only a running instance can reboot")

    def destroy(self, instance_id: uuid.UUID, cause: Cause) -> Change | None:
        vm = self._get(instance_id)
        match vm.state:
            case S.DESTROYED:
                return None
            case S.STOPPING:
                return _redirect(vm, S.DESTROYED, cause)
            case S.RUNNING | S.STARTING | S.REBOOTING:
                return Change(vm, vm.moved(S.STOPPING, cause).heading_to(S.DESTROYED, cause))
            case _:
                return Change(vm, vm.moved(S.DESTROYED, cause))

    def crash(self, instance_id: uuid.UUID, reason: str, cause: Cause) -> Change:
        vm = self._existing(instance_id, "crash")
        if vm.state not in CRASHABLE:
            raise _invalid(vm, "crash", "only a running, starting or rebooting instance can")
        return Change(vm, vm.moved(S.FAILED, cause, reason=reason))

    # What happens without a command.

    def advance(self, instance_id: uuid.UUID, generation: int) -> Change | None:
        """A transitional state's time is up; None if the instance moved on meanwhile."""
        vm = self._vms.get(instance_id)
        if vm is None or vm.generation != generation or not vm.transitional:
            return None
        following = {S.STARTING: S.RUNNING, S.REBOOTING: S.RUNNING}.get(vm.state, vm.next_state)
        if following is None:
            raise AssertionError(f"{vm.state} of {vm.id} has nowhere to go")
        return Change(vm, vm.moved(following, vm.cause))

    def after_restart(self) -> list[Change]:
        """The host crashed (the agent restarted): see the module docstring."""
        return [
            Change(vm, vm.moved(S.FAILED, Cause(), reason=RESTART_REASON))
            for vm in self._vms.values()
            if vm.state in CRASHABLE | {S.STOPPING}
        ]

    # Helpers.

    def _get(self, instance_id: uuid.UUID) -> VM:
        vm = self._vms.get(instance_id)
        if vm is None:
            raise Rejected("not_found", f"no instance {instance_id} on sled {self.sled_id}")
        return vm

    def _existing(self, instance_id: uuid.UUID, action: str) -> VM:
        """An instance that is not destroyed: nothing but destroy applies to those."""
        vm = self._get(instance_id)
        if vm.state is S.DESTROYED:
            raise Rejected("destroyed", f"cannot {action} instance {instance_id}: it is destroyed")
        return vm


def _redirect(vm: VM, next_state: InstanceState, cause: Cause) -> Change | None:
    if vm.next_state is next_state:
        return None
    return Change(vm, vm.heading_to(next_state, cause))


def _invalid(vm: VM, action: str, hint: str) -> Rejected:
    return Rejected(
        "invalid_transition", f"cannot {action} instance {vm.id} while it is {vm.state}: {hint}"
    )


def _describe(spec: InstanceSpec) -> str:
    disks = ",".join(str(disk) for disk in spec.disk_ids) or "none"
    return (
        f"name={spec.name} ncpus={spec.ncpus} memory_bytes={spec.memory_bytes} "
        f"disks={disks} start={spec.start}"
    )
