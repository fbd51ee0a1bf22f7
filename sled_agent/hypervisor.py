"""The simulated hypervisor's rules: which command moves a VMM where. No I/O, no clock.

A VMM is one run of an instance (``schemas.instance``). States and how they change
(``→`` is one change, each with the next generation)::

    ensure   (new)                          → starting → running
    stop     starting | running | rebooting → stopping → destroyed
    reboot   running                        → rebooting → running
    crash    starting | running | rebooting → failed (with a reason)

These are the states Omicron's sled agent reports for a VMM
(``sled-agent/src/instance.rs``): there is no ``creating`` on the sled, a VMM is
``starting`` from its first record. This agent has no ``stopped`` (Omicron's "the guest
stopped, the resources are not released yet"): it releases them at once.

``destroyed`` and ``failed`` are *ended*: an ended VMM never changes again, and every
command about it (ensure, stop, reboot, crash) changes nothing. Its record is kept, so
that a late or redelivered ``ensure`` is recognised as a run that has ended rather than
taken for a new one: this is the bug class Omicron removed with VMMs (omicron#2315,
#2209, PR #2765), where a stale start restarted an instance that had since stopped.

``starting``, ``stopping`` and ``rebooting`` are *transitional*: the service layer
leaves a VMM in one for a configured time, then calls :meth:`Hypervisor.advance`.

A command that makes no sense for the VMM raises :class:`Rejected`.

A restart of the sled agent is a host crash (:meth:`Hypervisor.after_restart`): the VMMs
lived in the agent's process, so every VMM not ended comes back ``failed`` with
:data:`RESTART_REASON` and the next generation, exactly as a real sled's VMMs do after
the host reboots. Nexus starts the instance again, if asked, as a new VMM.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from schemas.instance import ENDED_VMM_STATES, Vmm, VmmSpec, VmmState

RESTART_REASON = "sled agent restarted: the host lost its VMMs"

S = VmmState
TRANSITIONAL = frozenset({S.STARTING, S.STOPPING, S.REBOOTING})
# What a crash can hit: a guest that is (about to be) executing.
CRASHABLE = frozenset({S.RUNNING, S.STARTING, S.REBOOTING})
# Where a transitional state's time leads.
FOLLOWING = {S.STARTING: S.RUNNING, S.REBOOTING: S.RUNNING, S.STOPPING: S.DESTROYED}


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
    """The message that set a VMM moving, so the changes that follow carry its ids."""

    correlation_id: uuid.UUID | None = None
    causation_id: uuid.UUID | None = None


@dataclass(frozen=True)
class VM:
    """One VMM as the hypervisor keeps it: what was asked for, and where it is."""

    spec: VmmSpec
    vmm: Vmm
    cause: Cause = Cause()

    @property
    def id(self) -> uuid.UUID:
        return self.spec.id

    @property
    def state(self) -> VmmState:
        return self.vmm.state

    @property
    def generation(self) -> int:
        return self.vmm.generation

    @property
    def transitional(self) -> bool:
        return self.state in TRANSITIONAL

    @property
    def ended(self) -> bool:
        return self.state in ENDED_VMM_STATES

    def moved(self, state: VmmState, cause: Cause, *, reason: str | None = None) -> VM:
        """The VMM in ``state`` with the next generation."""
        vmm = self.vmm.model_copy(
            update={"state": state, "generation": self.generation + 1, "reason": reason}
        )
        return VM(self.spec, vmm, cause)


@dataclass(frozen=True)
class Change:
    """What a command or a timer did to one VMM, to be committed before it is applied.
    Every change is a new generation, with its event."""

    before: VM | None
    after: VM


def new_vm(sled_id: uuid.UUID, spec: VmmSpec, cause: Cause) -> VM:
    vmm = Vmm(
        id=spec.id,
        instance_id=spec.instance_id,
        sled_id=sled_id,
        name=spec.name,
        ncpus=spec.ncpus,
        memory_bytes=spec.memory_bytes,
        disk_ids=spec.disk_ids,
        state=S.STARTING,
        generation=1,
    )
    return VM(spec, vmm, cause)


class Hypervisor:
    """The VMMs of one sled. Methods decide; :meth:`apply` records what was committed.

    Deciding and applying are separate so that the in-memory view changes only after the
    database transaction that persists the change has committed.
    """

    def __init__(self, sled_id: uuid.UUID, capacity: Capacity, vms: Iterable[VM] = ()) -> None:
        self.sled_id = sled_id
        self.capacity = capacity
        self._vms = {vm.id: vm for vm in vms}

    def __iter__(self) -> Iterator[VM]:
        return iter(self._vms.values())

    def get(self, vmm_id: uuid.UUID) -> VM | None:
        return self._vms.get(vmm_id)

    def apply(self, change: Change) -> None:
        self._vms[change.after.id] = change.after

    def reserved(self) -> Capacity:
        """What the VMMs hold: every VMM until it has ended."""
        held = [vm.spec for vm in self._vms.values() if not vm.ended]
        return Capacity(sum(s.ncpus for s in held), sum(s.memory_bytes for s in held))

    def running(self) -> list[VM]:
        return [vm for vm in self._vms.values() if vm.state is S.RUNNING]

    # Commands.

    def ensure(self, spec: VmmSpec, cause: Cause) -> Change | None:
        existing = self._vms.get(spec.id)
        if existing is not None:
            if existing.spec != spec:
                raise Rejected(
                    "conflict",
                    f"VMM {spec.id} exists with another spec ({_describe(existing.spec)}); "
                    f"asked for {_describe(spec)}",
                )
            # Running, on its way, or ended: an ended VMM is never started again.
            return None
        reserved = self.reserved()
        cpus = reserved.cpus + spec.ncpus
        memory = reserved.memory_bytes + spec.memory_bytes
        if cpus > self.capacity.cpus or memory > self.capacity.memory_bytes:
            raise Rejected(
                "insufficient_capacity",
                f"VMM {spec.id} needs {spec.ncpus} cpus and {spec.memory_bytes} bytes; "
                f"sled {self.sled_id} has {self.capacity.cpus - reserved.cpus} cpus and "
                f"{self.capacity.memory_bytes - reserved.memory_bytes} bytes free",
            )
        return Change(None, new_vm(self.sled_id, spec, cause))

    def stop(self, vmm_id: uuid.UUID, cause: Cause) -> Change | None:
        vm = self._get(vmm_id)
        if vm.ended or vm.state is S.STOPPING:
            return None
        return Change(vm, vm.moved(S.STOPPING, cause))

    def reboot(self, vmm_id: uuid.UUID, cause: Cause) -> Change | None:
        vm = self._get(vmm_id)
        match vm.state:
            case S.REBOOTING | S.STARTING:
                return None
            case S.RUNNING:
                return Change(vm, vm.moved(S.REBOOTING, cause))
            case _:
                raise Rejected(
                    "invalid_transition",
                    f"cannot reboot VMM {vm.id} while it is {vm.state}: "
                    "only a running VMM can reboot",
                )

    def crash(self, vmm_id: uuid.UUID, reason: str, cause: Cause) -> Change | None:
        vm = self._get(vmm_id)
        if vm.state not in CRASHABLE:
            return None
        return Change(vm, vm.moved(S.FAILED, cause, reason=reason))

    # What happens without a command.

    def advance(self, vmm_id: uuid.UUID, generation: int) -> Change | None:
        """A transitional state's time is up; None if the VMM moved on meanwhile."""
        vm = self._vms.get(vmm_id)
        if vm is None or vm.generation != generation or not vm.transitional:
            return None
        return Change(vm, vm.moved(FOLLOWING[vm.state], vm.cause))

    def after_restart(self) -> list[Change]:
        """The host crashed (the agent restarted): see the module docstring."""
        return [
            Change(vm, vm.moved(S.FAILED, Cause(), reason=RESTART_REASON))
            for vm in self._vms.values()
            if not vm.ended
        ]

    # Helpers.

    def _get(self, vmm_id: uuid.UUID) -> VM:
        vm = self._vms.get(vmm_id)
        if vm is None:
            raise Rejected("not_found", f"no VMM {vmm_id} on sled {self.sled_id}")
        return vm


def _describe(spec: VmmSpec) -> str:
    disks = ",".join(str(disk) for disk in spec.disk_ids) or "none"
    return (
        f"instance={spec.instance_id} name={spec.name} ncpus={spec.ncpus} "
        f"memory_bytes={spec.memory_bytes} disks={disks}"
    )
