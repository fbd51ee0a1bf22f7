"""The hypervisor's rules for VMMs: transitions, ended VMMs, conflicts, capacity, the
restart rule."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.instance import VmmSpec, VmmState
from sled_agent.hypervisor import (
    RESTART_REASON,
    Capacity,
    Cause,
    Change,
    Hypervisor,
    Rejected,
)

S = VmmState
CAUSE = Cause(uuid.uuid4(), uuid.uuid4())


def a_spec(*, ncpus: int = 2, memory_bytes: int = 1 << 30) -> VmmSpec:
    return VmmSpec(
        id=uuid.uuid4(),
        instance_id=uuid.uuid4(),
        name="web-1",
        ncpus=ncpus,
        memory_bytes=memory_bytes,
    )


def a_hypervisor(cpus: int = 16, memory_bytes: int = 64 << 30) -> Hypervisor:
    return Hypervisor(uuid.uuid4(), Capacity(cpus, memory_bytes))


def commit(hypervisor: Hypervisor, change: Change | None) -> Change:
    assert change is not None, "expected a change"
    hypervisor.apply(change)
    return change


def settle(hypervisor: Hypervisor, vmm_id: uuid.UUID) -> list[VmmState]:
    """Let every timed transition finish, as the service's timers would; the states passed."""
    passed = []
    while (vm := hypervisor.get(vmm_id)) is not None and vm.transitional:
        change = commit(hypervisor, hypervisor.advance(vmm_id, vm.generation))
        passed.append(change.after.state)
    return passed


def state_of(hypervisor: Hypervisor, vmm_id: uuid.UUID) -> tuple[VmmState, int]:
    vm = hypervisor.get(vmm_id)
    assert vm is not None
    return vm.state, vm.generation


def running(hypervisor: Hypervisor, spec: VmmSpec | None = None) -> uuid.UUID:
    spec = spec or a_spec()
    commit(hypervisor, hypervisor.ensure(spec, CAUSE))
    settle(hypervisor, spec.id)
    assert state_of(hypervisor, spec.id)[0] is S.RUNNING
    return spec.id


def test_ensure_starts_a_new_vmm_with_no_creating_state() -> None:
    hypervisor = a_hypervisor()
    spec = a_spec()
    change = commit(hypervisor, hypervisor.ensure(spec, CAUSE))
    assert (change.after.state, change.after.generation) == (S.STARTING, 1)
    assert change.after.vmm.sled_id == hypervisor.sled_id
    assert change.after.vmm.instance_id == spec.instance_id
    assert settle(hypervisor, spec.id) == [S.RUNNING]


def test_the_whole_life_of_a_vmm_moves_one_generation_at_a_time() -> None:
    hypervisor = a_hypervisor()
    vmm_id = running(hypervisor)
    commit(hypervisor, hypervisor.reboot(vmm_id, CAUSE))
    assert settle(hypervisor, vmm_id) == [S.RUNNING]
    commit(hypervisor, hypervisor.stop(vmm_id, CAUSE))
    assert settle(hypervisor, vmm_id) == [S.DESTROYED]
    # starting running | rebooting running | stopping destroyed
    assert state_of(hypervisor, vmm_id) == (S.DESTROYED, 6)


def test_ensure_of_the_same_spec_changes_nothing() -> None:
    hypervisor = a_hypervisor()
    spec = a_spec()
    vmm_id = running(hypervisor, spec)
    assert hypervisor.ensure(spec, CAUSE) is None
    assert state_of(hypervisor, vmm_id) == (S.RUNNING, 2)


def test_ensure_of_another_spec_is_a_conflict_and_changes_nothing() -> None:
    hypervisor = a_hypervisor()
    spec = a_spec()
    running(hypervisor, spec)
    other = spec.model_copy(update={"ncpus": spec.ncpus + 1})
    with pytest.raises(Rejected) as rejected:
        hypervisor.ensure(other, CAUSE)
    assert rejected.value.code == "conflict"
    vm = hypervisor.get(spec.id)
    assert vm is not None and vm.spec == spec and vm.generation == 2


@pytest.mark.parametrize("end", ["stop", "crash"])
def test_every_command_about_an_ended_vmm_changes_nothing(end: str) -> None:
    """A late or redelivered ensure never runs an ended VMM again (omicron#2315)."""
    hypervisor = a_hypervisor()
    spec = a_spec()
    vmm_id = running(hypervisor, spec)
    if end == "stop":
        commit(hypervisor, hypervisor.stop(vmm_id, CAUSE))
        settle(hypervisor, vmm_id)
    else:
        commit(hypervisor, hypervisor.crash(vmm_id, "boom", Cause()))
    ended = state_of(hypervisor, vmm_id)
    assert hypervisor.ensure(spec, CAUSE) is None
    assert hypervisor.stop(vmm_id, CAUSE) is None
    assert hypervisor.crash(vmm_id, "again", Cause()) is None
    with pytest.raises(Rejected) as rejected:
        hypervisor.reboot(vmm_id, CAUSE)
    assert rejected.value.code == "invalid_transition"
    assert state_of(hypervisor, vmm_id) == ended
    assert hypervisor.reserved() == Capacity(0, 0)


def test_asking_for_what_is_under_way_is_a_no_op() -> None:
    hypervisor = a_hypervisor()
    vmm_id = running(hypervisor)
    commit(hypervisor, hypervisor.reboot(vmm_id, CAUSE))
    assert hypervisor.reboot(vmm_id, CAUSE) is None
    commit(hypervisor, hypervisor.stop(vmm_id, CAUSE))
    assert hypervisor.stop(vmm_id, CAUSE) is None
    assert settle(hypervisor, vmm_id) == [S.DESTROYED]


@pytest.mark.parametrize("command", ["stop", "reboot", "crash"])
def test_commands_on_an_unknown_vmm_are_not_found(command: str) -> None:
    hypervisor = a_hypervisor()
    with pytest.raises(Rejected) as rejected:
        if command == "crash":
            hypervisor.crash(uuid.uuid4(), "boom", CAUSE)
        else:
            getattr(hypervisor, command)(uuid.uuid4(), CAUSE)
    assert rejected.value.code == "not_found"


def test_a_crash_fails_the_vmm_with_its_reason() -> None:
    hypervisor = a_hypervisor()
    vmm_id = running(hypervisor)
    change = commit(hypervisor, hypervisor.crash(vmm_id, "triple fault", Cause()))
    assert (change.after.state, change.after.generation) == (S.FAILED, 3)
    assert change.after.vmm.reason == "triple fault"


def test_a_timer_for_a_superseded_generation_does_nothing() -> None:
    hypervisor = a_hypervisor()
    vmm_id = running(hypervisor)
    commit(hypervisor, hypervisor.reboot(vmm_id, CAUSE))
    rebooting_generation = state_of(hypervisor, vmm_id)[1]
    commit(hypervisor, hypervisor.crash(vmm_id, "boom", Cause()))
    assert hypervisor.advance(vmm_id, rebooting_generation) is None


def test_capacity_refuses_a_vmm_that_does_not_fit() -> None:
    hypervisor = a_hypervisor(cpus=4, memory_bytes=4 << 30)
    running(hypervisor, a_spec(ncpus=3, memory_bytes=1 << 30))
    for spec in (a_spec(ncpus=2), a_spec(ncpus=1, memory_bytes=4 << 30)):
        with pytest.raises(Rejected) as rejected:
            hypervisor.ensure(spec, CAUSE)
        assert rejected.value.code == "insufficient_capacity"
    assert hypervisor.ensure(a_spec(ncpus=1, memory_bytes=3 << 30), CAUSE) is not None


def test_an_ended_vmm_gives_its_capacity_back() -> None:
    hypervisor = a_hypervisor(cpus=2)
    vmm_id = running(hypervisor, a_spec(ncpus=2))
    with pytest.raises(Rejected):
        hypervisor.ensure(a_spec(ncpus=1), CAUSE)
    commit(hypervisor, hypervisor.stop(vmm_id, CAUSE))
    assert hypervisor.reserved() == Capacity(2, 1 << 30)  # still stopping
    settle(hypervisor, vmm_id)
    assert hypervisor.reserved() == Capacity(0, 0)
    assert hypervisor.ensure(a_spec(ncpus=2), CAUSE) is not None


def test_after_a_restart_every_vmm_not_ended_has_failed() -> None:
    hypervisor = a_hypervisor()
    live = running(hypervisor)
    starting = a_spec()
    commit(hypervisor, hypervisor.ensure(starting, CAUSE))
    ended = running(hypervisor)
    commit(hypervisor, hypervisor.stop(ended, CAUSE))
    settle(hypervisor, ended)

    restarted = Hypervisor(hypervisor.sled_id, hypervisor.capacity, list(hypervisor))
    changes = {change.after.id: change.after for change in restarted.after_restart()}
    assert set(changes) == {live, starting.id}
    assert (changes[live].state, changes[live].generation, changes[live].vmm.reason) == (
        S.FAILED,
        3,
        RESTART_REASON,
    )
    assert state_of(restarted, ended) == (S.DESTROYED, 4)


COMMANDS = ("ensure", "stop", "reboot", "crash", "advance")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(COMMANDS), max_size=30))
def test_any_command_sequence_moves_generations_by_one_and_an_ended_vmm_stays_ended(
    commands: list[str],
) -> None:
    hypervisor = a_hypervisor()
    spec = a_spec()
    commit(hypervisor, hypervisor.ensure(spec, CAUSE))
    for command in commands:
        vm = hypervisor.get(spec.id)
        assert vm is not None
        try:
            if command == "advance":
                change = hypervisor.advance(spec.id, vm.generation)
            elif command == "crash":
                change = hypervisor.crash(spec.id, "boom", Cause())
            elif command == "ensure":
                change = hypervisor.ensure(spec, CAUSE)
            else:
                change = getattr(hypervisor, command)(spec.id, CAUSE)
        except Rejected:
            continue
        if change is None:
            continue
        assert not vm.ended, f"{command} changed an ended VMM"
        assert change.after.generation == vm.generation + 1
        hypervisor.apply(change)
