"""The crucible agent's domain rules and settings, without I/O."""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from crucible_agent import regions
from crucible_agent.delay import Fixed, InvalidDelay, LogNormal, Uniform, parse_delay
from crucible_agent.settings import CrucibleSettings
from schemas.region import Region, RegionSpec, RegionState

MIB = 1 << 20


def spec(size_mib: int = 1, **fields: object) -> RegionSpec:
    """A region of ``size_mib`` MiB: 512-byte blocks, 2048 blocks per extent."""
    values: dict[str, object] = {
        "id": uuid.uuid4(),
        "block_size": 512,
        "extent_size": 2048,
        "extent_count": size_mib,
    }
    return RegionSpec(**(values | fields))


NOTHING_HELD = regions.Holdings(used_bytes=0, regions=0, free_port=regions.FIRST_PORT)


def holding(*held: Region, reserved: Mapping[uuid.UUID, int] | None = None) -> regions.Holdings:
    """What the store's SQL sums up, computed the obvious way (the store's tests compare
    the two); ``reserved``: the space each region reserved, none if not given."""
    live = [region for region in held if regions.holds_port(region)]
    taken = {region.port_number for region in live}
    ports = range(regions.FIRST_PORT, regions.LAST_PORT + 1)
    return regions.Holdings(
        used_bytes=sum((reserved or {}).get(region.id, 0) for region in live),
        regions=len(live),
        free_port=next((port for port in ports if port not in taken), None),
    )


def created(requested: RegionSpec, **fields: object) -> Region:
    outcome = regions.ensure(None, requested, holdings=NOTHING_HELD)
    assert isinstance(outcome, regions.Changed)
    return outcome.region.model_copy(update=fields)


# ensure


def test_a_new_region_is_requested_at_generation_one_on_the_first_port() -> None:
    outcome = regions.ensure(None, spec(), holdings=NOTHING_HELD)
    assert isinstance(outcome, regions.Changed)
    assert outcome.previous_state is None
    assert outcome.region.state is RegionState.REQUESTED
    assert outcome.region.generation == 1
    assert outcome.region.port_number == regions.FIRST_PORT
    assert not outcome.region.read_only
    assert outcome.capacity_changed


def test_a_region_with_a_source_is_read_only() -> None:
    outcome = regions.ensure(None, spec(source="[fd00::1]:19001"), holdings=NOTHING_HELD)
    assert isinstance(outcome, regions.Changed)
    assert outcome.region.read_only


def test_the_port_range_is_the_real_agents() -> None:
    assert (regions.FIRST_PORT, regions.LAST_PORT) == (19000, 19999)


@pytest.mark.parametrize("state", list(RegionState))
def test_ensure_with_the_same_parameters_returns_the_record_whatever_its_state(
    state: RegionState,
) -> None:
    asked = spec()
    existing = created(asked, state=state, generation=3)
    outcome = regions.ensure(existing, asked, holdings=holding(existing))
    assert outcome == regions.Unchanged(existing)


def test_a_repeated_ensure_needs_no_holdings_but_a_new_region_does() -> None:
    asked = spec()
    existing = created(asked)
    assert regions.ensure(existing, asked, holdings=None) == regions.Unchanged(existing)
    with pytest.raises(ValueError, match="needs the agent's holdings"):
        regions.ensure(None, asked, holdings=None)


@pytest.mark.parametrize(
    "change", [{"extent_count": 2}, {"block_size": 4096}, {"encrypted": False}, {"source": "x"}]
)
def test_ensure_with_other_parameters_is_a_conflict_naming_the_difference(
    change: dict[str, object],
) -> None:
    asked = spec()
    existing = created(asked)
    outcome = regions.ensure(existing, asked.model_copy(update=change), holdings=holding(existing))
    assert isinstance(outcome, regions.Conflict)
    assert outcome.existing == existing
    (field,) = change
    assert field in outcome.message


def test_the_reservation_is_a_quarter_more_than_the_size_rounded_half_up() -> None:
    assert regions.reservation_bytes(4 * MIB) == 5 * MIB
    assert [regions.reservation_bytes(n) for n in (1, 2, 3)] == [1, 3, 4]


def test_a_region_that_cannot_reserve_its_space_is_failed_with_the_reason() -> None:
    region = created(spec(size_mib=4))
    others = regions.Holdings(used_bytes=6 * MIB, regions=1, free_port=None)
    outcome = regions.reserve(region, others=others, total_bytes=10 * MIB, shortage=None)
    assert isinstance(outcome, regions.Changed)
    assert (outcome.region.state, outcome.region.generation) == (RegionState.FAILED, 2)
    assert outcome.region.failure == (
        f"cannot reserve {5 * MIB} bytes (1.25 x {4 * MIB}): {4 * MIB} of {10 * MIB} free"
    )
    assert outcome.region.port_number == region.port_number


def test_a_reservation_that_fills_capacity_exactly_fits() -> None:
    region = created(spec(size_mib=4))
    others = regions.Holdings(used_bytes=5 * MIB, regions=1, free_port=None)
    outcome = regions.reserve(region, others=others, total_bytes=10 * MIB, shortage=None)
    assert outcome == regions.Reserve(5 * MIB)


def test_a_full_data_directory_fails_the_region_out_of_space() -> None:
    region = created(spec())
    outcome = regions.reserve(region, others=NOTHING_HELD, total_bytes=10 * MIB, shortage="full")
    assert isinstance(outcome, regions.Changed)
    assert outcome.region.failure == "out of space: full"
    assert regions.failed_out_of_space(outcome.region.failure)


@pytest.mark.parametrize(
    ("state", "holds"),
    [
        (RegionState.REQUESTED, True),
        (RegionState.CREATED, True),
        (RegionState.TOMBSTONED, True),
        (RegionState.FAILED, True),
        (RegionState.DESTROYED, False),
    ],
)
def test_every_region_but_a_destroyed_one_keeps_its_port(state: RegionState, holds: bool) -> None:
    held = created(spec(size_mib=3), state=state)
    assert regions.holds_port(held) is holds
    outcome = regions.ensure(None, spec(), holdings=holding(held))
    assert isinstance(outcome, regions.Changed)
    assert outcome.region.port_number == regions.FIRST_PORT + holds


def test_a_new_region_takes_the_free_port_it_is_given() -> None:
    held = regions.Holdings(used_bytes=MIB, regions=1, free_port=regions.FIRST_PORT + 7)
    outcome = regions.ensure(None, spec(), holdings=held)
    assert isinstance(outcome, regions.Changed)
    assert outcome.region.port_number == regions.FIRST_PORT + 7


def test_with_no_free_port_a_create_is_refused_and_nothing_recorded() -> None:
    held = regions.Holdings(used_bytes=MIB, regions=1000, free_port=None)
    outcome = regions.ensure(None, spec(), holdings=held)
    assert outcome == regions.Refused("no_free_port", "no free port in 19000-19999")


# delete and the end of background work


@pytest.mark.parametrize("state", [RegionState.REQUESTED, RegionState.CREATED, RegionState.FAILED])
def test_delete_tombstones_a_live_or_failed_region(state: RegionState) -> None:
    failure = "injected" if state is RegionState.FAILED else None
    region = created(spec(), state=state, generation=2, failure=failure)
    outcome = regions.delete(region)
    assert isinstance(outcome, regions.Changed)
    assert outcome.region.state is RegionState.TOMBSTONED
    assert outcome.region.generation == 3
    assert outcome.previous_state is state
    assert not outcome.capacity_changed, "a tombstoned region holds its space until destroyed"


@pytest.mark.parametrize("state", [RegionState.TOMBSTONED, RegionState.DESTROYED])
def test_delete_again_changes_nothing(state: RegionState) -> None:
    region = created(spec(), state=state, generation=4)
    assert regions.delete(region) == regions.Unchanged(region)


def test_delete_of_an_unknown_region_is_not_found() -> None:
    assert isinstance(regions.delete(None), regions.NotFound)


def test_a_finished_create_makes_a_requested_region_created() -> None:
    outcome = regions.create_finished(created(spec()), failure=None)
    assert isinstance(outcome, regions.Changed)
    assert (outcome.region.state, outcome.region.generation) == (RegionState.CREATED, 2)
    assert not outcome.capacity_changed


def test_a_failed_create_records_why_and_keeps_its_space_until_destroyed() -> None:
    outcome = regions.create_finished(created(spec()), failure="disk on fire")
    assert isinstance(outcome, regions.Changed)
    assert outcome.region.state is RegionState.FAILED
    assert outcome.region.failure == "disk on fire"
    assert not outcome.capacity_changed


def test_a_create_that_finishes_after_a_delete_stays_tombstoned() -> None:
    tombstoned = created(spec(), state=RegionState.TOMBSTONED, generation=2)
    assert regions.create_finished(tombstoned, failure=None) == regions.Unchanged(tombstoned)


def test_destroy_finishes_a_tombstoned_region_only() -> None:
    tombstoned = created(spec(), state=RegionState.TOMBSTONED, generation=2)
    outcome = regions.destroy_finished(tombstoned, failure=None)
    assert isinstance(outcome, regions.Changed)
    assert (outcome.region.state, outcome.region.generation) == (RegionState.DESTROYED, 3)
    assert outcome.capacity_changed
    destroyed = outcome.region
    assert regions.destroy_finished(destroyed, failure=None) == regions.Unchanged(destroyed)


def test_a_failed_destroy_makes_the_region_failed_and_a_new_delete_tombstones_it() -> None:
    tombstoned = created(spec(), state=RegionState.TOMBSTONED, generation=3)
    outcome = regions.destroy_finished(tombstoned, failure="dataset busy")
    assert isinstance(outcome, regions.Changed)
    failed = outcome.region
    assert (failed.state, failed.generation) == (RegionState.FAILED, 4)
    assert failed.failure == "destroy failed: dataset busy"
    assert regions.holds_port(failed)
    again = regions.delete(failed)
    assert isinstance(again, regions.Changed)
    assert (again.region.state, again.region.generation) == (RegionState.TOMBSTONED, 5)


Operation = tuple[str, int, int]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                ["ensure", "delete", "create_ok", "create_fail", "destroyed", "destroy_fail"]
            ),
            st.integers(0, 4),
            st.integers(1, 4),
        ),
        max_size=40,
    )
)
def test_any_sequence_keeps_ports_apart_and_steps_generations_by_one(
    operations: list[Operation],
) -> None:
    ids = [uuid.UUID(int=n + 1) for n in range(5)]
    records: dict[uuid.UUID, Region] = {}
    for name, which, size in operations:
        region_id = ids[which]
        existing = records.get(region_id)
        outcome: regions.EnsureOutcome | regions.DeleteOutcome
        if name == "ensure":
            others = [region for key, region in records.items() if key != region_id]
            outcome = regions.ensure(
                existing, spec(size_mib=size, id=region_id), holdings=holding(*others)
            )
        elif existing is None:
            continue
        elif name == "delete":
            outcome = regions.delete(existing)
        elif name in {"destroyed", "destroy_fail"}:
            failure = "busy" if name == "destroy_fail" else None
            outcome = regions.destroy_finished(existing, failure)
        else:
            outcome = regions.create_finished(existing, None if name == "create_ok" else "injected")
        if isinstance(outcome, regions.Changed):
            before = existing.generation if existing else 0
            assert outcome.region.generation == before + 1
            records[region_id] = outcome.region
        elif existing is not None:
            assert records[region_id] == existing
        ports = [r.port_number for r in records.values() if regions.holds_port(r)]
        assert len(ports) == len(set(ports))
        if existing is not None and existing.state is RegionState.DESTROYED:
            assert records[region_id].state is RegionState.DESTROYED


# the create delay


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("fixed:0", Fixed(0.0)),
        ("fixed:0.5", Fixed(0.5)),
        ("uniform:0.1,2", Uniform(0.1, 2.0)),
        ("lognormal:30,0.8,5,300", LogNormal(30.0, 0.8, 5.0, 300.0)),
        (" fixed:1 ", Fixed(1.0)),
    ],
)
def test_delay_specs_parse(text: str, parsed: object) -> None:
    assert parse_delay(text) == parsed


@pytest.mark.parametrize(
    "text",
    [
        "",
        "fixed",
        "fixed:",
        "fixed:-1",
        "fixed:nan",
        "fixed:1,2",
        "uniform:2,1",
        "uniform:1",
        "lognormal:0,1,0,1",
        "lognormal:1,1,5,2",
        "gamma:1,2",
        "fixed:one",
    ],
)
def test_bad_delay_specs_are_refused_with_a_reason(text: str) -> None:
    with pytest.raises(InvalidDelay, match="delay"):
        parse_delay(text)


def test_delays_are_reproducible_from_a_seed_and_stay_in_bounds() -> None:
    delay = parse_delay("lognormal:1,2,0.5,3")
    first = [delay.sample(random.Random(7)) for _ in range(3)]
    again = [delay.sample(random.Random(7)) for _ in range(3)]
    assert first == again
    draws = [delay.sample(random.Random(seed)) for seed in range(500)]
    assert min(draws) == 0.5
    assert max(draws) == 3.0
    uniform = parse_delay("uniform:0.1,0.2")
    assert all(0.1 <= uniform.sample(random.Random(seed)) <= 0.2 for seed in range(100))


# settings


def test_settings_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    agent_id, sled_id = uuid.uuid4(), uuid.uuid4()
    monkeypatch.setenv("CRUCIBLE_AGENT_ID", str(agent_id))
    monkeypatch.setenv("CRUCIBLE_SLED_ID", str(sled_id))
    monkeypatch.setenv("CRUCIBLE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CRUCIBLE_CREATE_DELAY", "uniform:1,2")
    monkeypatch.setenv("CRUCIBLE_FAIL_FRACTION", "0.25")
    loaded = CrucibleSettings()
    assert (loaded.agent_id, loaded.sled_id, loaded.data_dir) == (agent_id, sled_id, tmp_path)
    assert loaded.delay == Uniform(1.0, 2.0)
    assert loaded.fail_fraction == 0.25
    assert loaded.database_path.parent == tmp_path


@pytest.mark.parametrize(
    "bad",
    [
        {"create_delay": "sometimes"},
        {"fail_fraction": 1.5},
        {"crash_mid_create_fraction": -0.1},
        {"capacity_bytes": 0},
        {"log_level": "chatty"},
    ],
)
def test_bad_settings_are_refused(bad: dict[str, object], tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        CrucibleSettings.model_validate(
            {"agent_id": uuid.uuid4(), "sled_id": uuid.uuid4(), "data_dir": tmp_path, **bad}
        )
