"""Live repairs of a running VMM's disk volume: the rules, no I/O, no clock.

When Nexus replaces a lost region of a disk attached to a running VMM, the VMM's
Crucible upstairs repairs the volume while the guest keeps running (Crucible's *live
repair*, which Omicron's ``region_replacement_drive`` saga asks Propolis for): the new
target is filled from the surviving two, then takes the old one's place. Here a
repair is a timed sequence of steps, each a new generation with its event::

    start    (new)       → started (0 %)
    step     started     → progress (25, 50, 75 %) → finished (100 %)
    any step, the VMM not running any more          → failed (with a reason)

A repair lives in the VMM's process, as the real one does in Propolis: it is kept in
memory, and an agent restart (which fails every VMM, ``hypervisor.after_restart``)
loses it with the VMM; Nexus's reconcile then finds no repair and sends it again, and
the sled refuses it (the VMM has ended), so the saga unwinds and is tried again.
"""

from __future__ import annotations

import uuid

from schemas.instance import ENDED_REPAIR_STATES, Repair, RepairSpec, RepairState, VmmState
from sled_agent.hypervisor import VM, Rejected

# Progress reports between started and finished (each a quarter of the repair's time).
STEPS = 4


class Repairs:
    """The repairs of one sled. Methods decide; :meth:`apply` records what was committed."""

    def __init__(self, sled_id: uuid.UUID) -> None:
        self.sled_id = sled_id
        self._repairs: dict[uuid.UUID, Repair] = {}

    def get(self, repair_id: uuid.UUID) -> Repair | None:
        return self._repairs.get(repair_id)

    def apply(self, repair: Repair) -> None:
        self._repairs[repair.id] = repair

    def start(self, spec: RepairSpec, vm: VM | None) -> Repair | None:
        """A new repair, ``started``; None when it exists (a repeated command)."""
        existing = self._repairs.get(spec.id)
        if existing is not None:
            if (existing.vmm_id, existing.disk_id, existing.new_region_id) != (
                spec.vmm_id,
                spec.disk_id,
                spec.new_region_id,
            ):
                raise Rejected("conflict", f"repair {spec.id} exists for another target")
            return None
        if vm is None:
            raise Rejected("not_found", f"no VMM {spec.vmm_id} on sled {self.sled_id}")
        if vm.state is not VmmState.RUNNING:
            raise Rejected(
                "invalid_transition",
                f"VMM {vm.id} is {vm.state.value}: only a running VMM repairs live",
            )
        if spec.disk_id not in vm.spec.disk_ids:
            raise Rejected("not_found", f"VMM {vm.id} has no disk {spec.disk_id}")
        return Repair(
            id=spec.id,
            sled_id=self.sled_id,
            vmm_id=spec.vmm_id,
            disk_id=spec.disk_id,
            old_region_id=spec.old_region_id,
            new_region_id=spec.new_region_id,
            state=RepairState.STARTED,
            progress=0,
            generation=1,
        )

    def step(self, repair_id: uuid.UUID, generation: int, vm: VM | None) -> Repair | None:
        """A step's time is up: the next step; None if the repair moved on meanwhile."""
        repair = self._repairs.get(repair_id)
        if repair is None or repair.generation != generation or repair.state in ENDED_REPAIR_STATES:
            return None
        if vm is None or vm.state is not VmmState.RUNNING:
            state = vm.state.value if vm is not None else "gone"
            return repair.model_copy(
                update={
                    "state": RepairState.FAILED,
                    "generation": generation + 1,
                    "reason": f"VMM {repair.vmm_id} is {state}: the repair stopped",
                }
            )
        progress = min(100, repair.progress + 100 // STEPS)
        state = RepairState.FINISHED if progress >= 100 else RepairState.PROGRESS
        return repair.model_copy(
            update={
                "state": state,
                "progress": 100 if state is RepairState.FINISHED else progress,
                "generation": generation + 1,
            }
        )
