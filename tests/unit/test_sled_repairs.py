"""The sled agent's live repair rules (sled_agent/repairs.py), no I/O: a repair of a
running VMM's disk goes started → progress → finished, one generation a step; it fails
when its VMM stops running; it is refused for a VMM that does not run or lacks the disk;
asked again, it changes nothing."""

from __future__ import annotations

import uuid

import pytest

from schemas.instance import RepairSpec, RepairState, VmmSpec
from sled_agent.hypervisor import Capacity, Cause, Hypervisor, Rejected
from sled_agent.repairs import STEPS, Repairs

DISK = uuid.uuid4()


def running_vm(hypervisor: Hypervisor) -> uuid.UUID:
    spec = VmmSpec(
        id=uuid.uuid4(),
        instance_id=uuid.uuid4(),
        name="web-1",
        ncpus=1,
        memory_bytes=1 << 30,
        disk_ids=(DISK,),
    )
    change = hypervisor.ensure(spec, Cause())
    assert change is not None
    hypervisor.apply(change)
    vm = hypervisor.get(spec.id)
    assert vm is not None
    moved = hypervisor.advance(spec.id, vm.generation)
    assert moved is not None
    hypervisor.apply(moved)
    return spec.id


def a_repair(vmm_id: uuid.UUID, disk_id: uuid.UUID = DISK) -> RepairSpec:
    return RepairSpec(
        id=uuid.uuid4(),
        vmm_id=vmm_id,
        disk_id=disk_id,
        old_region_id=uuid.uuid4(),
        new_region_id=uuid.uuid4(),
        new_dataset_id=uuid.uuid4(),
    )


def setup() -> tuple[Hypervisor, Repairs, uuid.UUID]:
    sled_id = uuid.uuid4()
    hypervisor = Hypervisor(sled_id, Capacity(4, 8 << 30))
    return hypervisor, Repairs(sled_id), running_vm(hypervisor)


def test_a_repair_goes_from_started_to_finished_one_generation_a_step() -> None:
    hypervisor, repairs, vmm_id = setup()
    spec = a_repair(vmm_id)
    started = repairs.start(spec, hypervisor.get(vmm_id))
    assert started is not None
    assert (started.state, started.progress, started.generation) == (RepairState.STARTED, 0, 1)
    repairs.apply(started)
    seen = [started]
    while seen[-1].state is not RepairState.FINISHED:
        step = repairs.step(spec.id, seen[-1].generation, hypervisor.get(vmm_id))
        assert step is not None
        repairs.apply(step)
        seen.append(step)
    assert [r.generation for r in seen] == list(range(1, STEPS + 2))
    assert seen[-1].progress == 100
    # Asked again: nothing new; a late step of an old generation: nothing.
    assert repairs.start(spec, hypervisor.get(vmm_id)) is None
    assert repairs.step(spec.id, 1, hypervisor.get(vmm_id)) is None


def test_a_repair_fails_when_its_vmm_stops_running() -> None:
    hypervisor, repairs, vmm_id = setup()
    spec = a_repair(vmm_id)
    started = repairs.start(spec, hypervisor.get(vmm_id))
    assert started is not None
    repairs.apply(started)
    crash = hypervisor.crash(vmm_id, "crashed", Cause())
    assert crash is not None
    hypervisor.apply(crash)
    failed = repairs.step(spec.id, started.generation, hypervisor.get(vmm_id))
    assert failed is not None and failed.state is RepairState.FAILED
    assert failed.reason is not None and "failed" in failed.reason


@pytest.mark.parametrize("case", ["no vmm", "no such disk"])
def test_a_repair_is_refused_for_a_vmm_that_cannot_do_it(case: str) -> None:
    hypervisor, repairs, vmm_id = setup()
    if case == "no vmm":
        spec, vm = a_repair(uuid.uuid4()), None
    else:
        spec, vm = a_repair(vmm_id, uuid.uuid4()), hypervisor.get(vmm_id)
    with pytest.raises(Rejected) as refused:
        repairs.start(spec, vm)
    assert refused.value.code == "not_found"
