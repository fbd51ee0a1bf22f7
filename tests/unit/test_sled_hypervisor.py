"""The hypervisor's rules: transitions, idempotency, conflicts, capacity, the restart rule."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.instance import InstanceSpec, InstanceState
from sled_agent.hypervisor import (
    RESTART_REASON,
    Capacity,
    Cause,
    Change,
    Hypervisor,
    Rejected,
)

S = InstanceState
CAUSE = Cause(uuid.uuid4(), uuid.uuid4())


def a_spec(*, ncpus: int = 2, memory_bytes: int = 1 << 30, start: bool = True) -> InstanceSpec:
    return InstanceSpec(
        id=uuid.uuid4(), name="web-1", ncpus=ncpus, memory_bytes=memory_bytes, start=start
    )


def a_hypervisor(cpus: int = 16, memory_bytes: int = 64 << 30) -> Hypervisor:
    return Hypervisor(uuid.uuid4(), Capacity(cpus, memory_bytes))


def commit(hypervisor: Hypervisor, change: Change | None) -> None:
    assert change is not None, "expected a change"
    hypervisor.apply(change)


def settle(hypervisor: Hypervisor, instance_id: uuid.UUID) -> list[InstanceState]:
    """Let every timed transition finish, as the service's timers would; the states passed."""
    passed = []
    while (vm := hypervisor.get(instance_id)) is not None and vm.transitional:
        change = hypervisor.advance(instance_id, vm.generation)
        commit(hypervisor, change)
        assert change is not None
        passed.append(change.after.state)
    return passed


def state_of(hypervisor: Hypervisor, instance_id: uuid.UUID) -> tuple[InstanceState, int]:
    vm = hypervisor.get(instance_id)
    assert vm is not None
    return vm.state, vm.generation


def running(hypervisor: Hypervisor, spec: InstanceSpec | None = None) -> uuid.UUID:
    spec = spec or a_spec()
    commit(hypervisor, hypervisor.ensure(spec, CAUSE))
    settle(hypervisor, spec.id)
    assert state_of(hypervisor, spec.id)[0] is S.RUNNING
    return spec.id


def test_ensure_creates_then_boots_to_running() -> None:
    hypervisor = a_hypervisor()
    spec = a_spec()
    change = hypervisor.ensure(spec, CAUSE)
    assert change is not None and change.state_changed
    assert (change.after.state, change.after.generation) == (S.CREATING, 1)
    assert change.after.instance.sled_id == hypervisor.sled_id
    commit(hypervisor, change)
    assert settle(hypervisor, spec.id) == [S.STARTING, S.RUNNING]
    assert state_of(hypervisor, spec.id) == (S.RUNNING, 3)


def test_ensure_without_start_stops_after_creating() -> None:
    hypervisor = a_hypervisor()
    spec = a_spec(start=False)
    commit(hypervisor, hypervisor.ensure(spec, CAUSE))
    assert settle(hypervisor, spec.id) == [S.STOPPED]


def test_the_whole_lifecycle_moves_one_generation_at_a_time() -> None:
    hypervisor = a_hypervisor()
    instance_id = running(hypervisor)
    commit(hypervisor, hypervisor.stop(instance_id, CAUSE))
    assert settle(hypervisor, instance_id) == [S.STOPPED]
    commit(hypervisor, hypervisor.start(instance_id, CAUSE))
    assert settle(hypervisor, instance_id) == [S.RUNNING]
    commit(hypervisor, hypervisor.reboot(instance_id, CAUSE))
    assert settle(hypervisor, instance_id) == [S.RUNNING]
    commit(hypervisor, hypervisor.destroy(instance_id, CAUSE))
    assert settle(hypervisor, instance_id) == [S.DESTROYED]
    # creating starting running | stopping stopped | starting running | rebooting running
    # | stopping destroyed
    assert state_of(hypervisor, instance_id) == (S.DESTROYED, 11)


def test_ensure_of_the_same_spec_changes_nothing() -> None:
    hypervisor = a_hypervisor()
    spec = a_spec()
    instance_id = running(hypervisor, spec)
    assert hypervisor.ensure(spec, CAUSE) is None
    assert state_of(hypervisor, instance_id) == (S.RUNNING, 3)


def test_ensure_of_another_spec_is_a_conflict_and_changes_nothing() -> None:
    hypervisor = a_hypervisor()
    spec = a_spec()
    running(hypervisor, spec)
    other = spec.model_copy(update={"ncpus": spec.ncpus + 1})
    with pytest.raises(Rejected) as rejected:
        hypervisor.ensure(other, CAUSE)
    assert rejected.value.code == "conflict"
    vm = hypervisor.get(spec.id)
    assert vm is not None and vm.spec == spec and vm.generation == 3


def test_ensure_of_a_destroyed_instance_with_its_spec_is_the_existing_record() -> None:
    hypervisor = a_hypervisor()
    spec = a_spec(start=False)
    commit(hypervisor, hypervisor.ensure(spec, CAUSE))
    settle(hypervisor, spec.id)
    commit(hypervisor, hypervisor.destroy(spec.id, CAUSE))
    assert hypervisor.ensure(spec, CAUSE) is None
    assert state_of(hypervisor, spec.id) == (S.DESTROYED, 3)


@pytest.mark.parametrize(
    ("command", "settled"),
    [("start", S.RUNNING), ("reboot", S.RUNNING)],
)
def test_asking_for_what_is_under_way_is_a_no_op(command: str, settled: InstanceState) -> None:
    hypervisor = a_hypervisor()
    instance_id = running(hypervisor)
    if command == "reboot":
        commit(hypervisor, hypervisor.reboot(instance_id, CAUSE))
    assert getattr(hypervisor, command)(instance_id, CAUSE) is None
    settle(hypervisor, instance_id)
    assert state_of(hypervisor, instance_id)[0] is settled


def test_start_of_a_running_and_stop_of_a_stopped_instance_are_no_ops() -> None:
    hypervisor = a_hypervisor()
    instance_id = running(hypervisor)
    assert hypervisor.start(instance_id, CAUSE) is None
    commit(hypervisor, hypervisor.stop(instance_id, CAUSE))
    assert hypervisor.stop(instance_id, CAUSE) is None  # while stopping
    settle(hypervisor, instance_id)
    assert hypervisor.stop(instance_id, CAUSE) is None
    assert hypervisor.destroy(instance_id, CAUSE) is not None


def test_commands_on_a_destroyed_instance_are_refused_except_destroy() -> None:
    hypervisor = a_hypervisor()
    instance_id = running(hypervisor)
    commit(hypervisor, hypervisor.destroy(instance_id, CAUSE))
    settle(hypervisor, instance_id)
    for command in (hypervisor.start, hypervisor.stop, hypervisor.reboot):
        with pytest.raises(Rejected) as rejected:
            command(instance_id, CAUSE)
        assert rejected.value.code == "destroyed"
    with pytest.raises(Rejected):
        hypervisor.crash(instance_id, "boom", CAUSE)
    assert hypervisor.destroy(instance_id, CAUSE) is None


@pytest.mark.parametrize("command", ["start", "stop", "reboot", "destroy"])
def test_commands_on_an_unknown_instance_are_not_found(command: str) -> None:
    with pytest.raises(Rejected) as rejected:
        getattr(a_hypervisor(), command)(uuid.uuid4(), CAUSE)
    assert rejected.value.code == "not_found"


def test_invalid_transitions_say_why() -> None:
    hypervisor = a_hypervisor()
    spec = a_spec(start=False)
    commit(hypervisor, hypervisor.ensure(spec, CAUSE))
    settle(hypervisor, spec.id)
    with pytest.raises(Rejected) as rejected:
        hypervisor.reboot(spec.id, CAUSE)
    assert rejected.value.code == "invalid_transition"
    assert "stopped" in rejected.value.message
    with pytest.raises(Rejected) as rejected:
        hypervisor.crash(spec.id, "boom", CAUSE)
    assert rejected.value.code == "invalid_transition"


def test_start_while_stopping_is_refused() -> None:
    hypervisor = a_hypervisor()
    instance_id = running(hypervisor)
    commit(hypervisor, hypervisor.stop(instance_id, CAUSE))
    with pytest.raises(Rejected) as rejected:
        hypervisor.start(instance_id, CAUSE)
    assert rejected.value.code == "invalid_transition"


def test_a_crash_fails_the_instance_with_its_reason_and_start_brings_it_back() -> None:
    hypervisor = a_hypervisor()
    instance_id = running(hypervisor)
    change = hypervisor.crash(instance_id, "triple fault", Cause())
    commit(hypervisor, change)
    assert (change.after.state, change.after.generation) == (S.FAILED, 4)
    assert change.after.instance.reason == "triple fault"
    commit(hypervisor, hypervisor.start(instance_id, CAUSE))
    assert settle(hypervisor, instance_id) == [S.RUNNING]
    vm = hypervisor.get(instance_id)
    assert vm is not None and vm.instance.reason is None and vm.generation == 6


def test_stop_or_destroy_while_creating_redirects_without_a_new_generation() -> None:
    hypervisor = a_hypervisor()
    spec = a_spec()
    commit(hypervisor, hypervisor.ensure(spec, CAUSE))
    change = hypervisor.stop(spec.id, CAUSE)
    assert change is not None and not change.state_changed
    commit(hypervisor, change)
    assert hypervisor.stop(spec.id, CAUSE) is None
    assert settle(hypervisor, spec.id) == [S.STOPPED]


def test_destroy_while_stopping_ends_destroyed() -> None:
    hypervisor = a_hypervisor()
    instance_id = running(hypervisor)
    commit(hypervisor, hypervisor.stop(instance_id, CAUSE))
    change = hypervisor.destroy(instance_id, CAUSE)
    assert change is not None and not change.state_changed
    commit(hypervisor, change)
    assert settle(hypervisor, instance_id) == [S.DESTROYED]


def test_a_timer_for_a_superseded_generation_does_nothing() -> None:
    hypervisor = a_hypervisor()
    instance_id = running(hypervisor)
    commit(hypervisor, hypervisor.reboot(instance_id, CAUSE))
    rebooting_generation = state_of(hypervisor, instance_id)[1]
    commit(hypervisor, hypervisor.crash(instance_id, "boom", Cause()))
    assert hypervisor.advance(instance_id, rebooting_generation) is None


def test_capacity_refuses_an_instance_that_does_not_fit() -> None:
    hypervisor = a_hypervisor(cpus=4, memory_bytes=4 << 30)
    running(hypervisor, a_spec(ncpus=3, memory_bytes=1 << 30))
    for spec in (a_spec(ncpus=2), a_spec(ncpus=1, memory_bytes=4 << 30)):
        with pytest.raises(Rejected) as rejected:
            hypervisor.ensure(spec, CAUSE)
        assert rejected.value.code == "insufficient_capacity"
    assert hypervisor.ensure(a_spec(ncpus=1, memory_bytes=3 << 30), CAUSE) is not None


def test_a_destroyed_instance_gives_its_capacity_back() -> None:
    hypervisor = a_hypervisor(cpus=2)
    instance_id = running(hypervisor, a_spec(ncpus=2))
    with pytest.raises(Rejected):
        hypervisor.ensure(a_spec(ncpus=1), CAUSE)
    commit(hypervisor, hypervisor.destroy(instance_id, CAUSE))
    settle(hypervisor, instance_id)
    assert hypervisor.reserved() == Capacity(0, 0)
    assert hypervisor.ensure(a_spec(ncpus=2), CAUSE) is not None


def test_after_a_restart_live_instances_have_failed_and_the_rest_are_kept() -> None:
    hypervisor = a_hypervisor()
    live = running(hypervisor)
    stopped = a_spec(start=False)
    commit(hypervisor, hypervisor.ensure(stopped, CAUSE))
    settle(hypervisor, stopped.id)
    creating = a_spec()
    commit(hypervisor, hypervisor.ensure(creating, CAUSE))

    restarted = Hypervisor(hypervisor.sled_id, hypervisor.capacity, list(hypervisor))
    changes = restarted.after_restart()
    assert [change.after.id for change in changes] == [live]
    after = changes[0].after
    assert (after.state, after.generation, after.instance.reason) == (S.FAILED, 4, RESTART_REASON)
    assert state_of(restarted, stopped.id) == (S.STOPPED, 2)
    assert state_of(restarted, creating.id) == (S.CREATING, 1)


COMMANDS = ("start", "stop", "reboot", "destroy", "crash", "advance")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(COMMANDS), max_size=30), st.booleans())
def test_any_command_sequence_moves_generations_by_one_and_keeps_states_valid(
    commands: list[str], start: bool
) -> None:
    hypervisor = a_hypervisor()
    spec = a_spec(start=start)
    commit(hypervisor, hypervisor.ensure(spec, CAUSE))
    for command in commands:
        vm = hypervisor.get(spec.id)
        assert vm is not None
        try:
            if command == "advance":
                change = hypervisor.advance(spec.id, vm.generation)
            elif command == "crash":
                change = hypervisor.crash(spec.id, "boom", Cause())
            else:
                change = getattr(hypervisor, command)(spec.id, CAUSE)
        except Rejected:
            continue
        if change is None:
            continue
        expected = vm.generation + 1 if change.state_changed else vm.generation
        assert change.after.generation == expected
        assert (change.after.next_state is not None) == (
            change.after.state in {S.CREATING, S.STOPPING}
        )
        hypervisor.apply(change)
