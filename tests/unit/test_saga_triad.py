"""Every saga through the same triad (tests/saga_triad.py), on SQLite and on PostgreSQL:
it succeeds; a failure at every node unwinds to a clean slate; every node run twice
still succeeds, each node returning what its first run decided; and a failure at every
node, with every undo run twice, unwinds too."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from pydantic import BaseModel

from nexus.db.states import SagaState
from nexus.saga.clock import ManualClock
from nexus.saga.definition import Ctx, Node, SagaDefinition
from nexus.saga.faults import Faults
from nexus.sagas import ALL_SAGAS
from tests import saga_triad
from tests.saga_scenarios import SCENARIOS
from tests.saga_support import Database, Replica
from tests.saga_triad import Scenario

# Undos that are not idempotent: run twice, their effect is applied twice. The cases
# that run one are expected to fail, strictly, so that the fix shows as a pass and the
# entry goes. Keyed by (saga, node whose undo it is).
NOT_IDEMPOTENT_UNDOS: dict[tuple[str, str], str] = {}


def failing_nodes(*, undos_twice: bool) -> list[object]:
    cases: list[object] = []
    for scenario in SCENARIOS:
        names = scenario.definition.node_names
        for node in names:
            marks = [
                pytest.mark.xfail(reason=reason, raises=AssertionError, strict=True)
                for (saga, undone), reason in NOT_IDEMPOTENT_UNDOS.items()
                # The node's failure unwinds through that undo.
                if undos_twice and saga == scenario.name and names.index(node) > names.index(undone)
            ]
            cases.append(pytest.param(scenario, node, id=f"{scenario.name}.{node}", marks=marks))
    return cases


every_saga = pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)


def test_every_saga_has_a_scenario() -> None:
    covered = sorted((s.definition.name, s.definition.version) for s in SCENARIOS)
    assert covered == sorted((d.name, d.version) for d in ALL_SAGAS)


@every_saga
async def test_it_succeeds(database: Database, scenario: Scenario[Any]) -> None:
    await saga_triad.succeeds(database, scenario)


@pytest.mark.parametrize(("scenario", "node"), failing_nodes(undos_twice=False))
async def test_a_failure_unwinds_to_a_clean_slate(
    database: Database, scenario: Scenario[Any], node: str
) -> None:
    await saga_triad.failure_can_unwind(database, scenario, node)


@every_saga
async def test_every_node_run_twice_still_succeeds(
    database: Database, scenario: Scenario[Any]
) -> None:
    await saga_triad.actions_succeed_idempotently(database, scenario)


@pytest.mark.parametrize(("scenario", "node"), failing_nodes(undos_twice=True))
async def test_a_failure_with_every_undo_run_twice_unwinds_to_a_clean_slate(
    database: Database, scenario: Scenario[Any], node: str
) -> None:
    await saga_triad.failure_can_unwind_idempotently(database, scenario, node)


class _Picked(BaseModel):
    value: uuid.UUID


async def _pick_anew(ctx: Ctx[_Picked]) -> _Picked:
    return _Picked(value=uuid.uuid4())


async def test_a_node_that_decides_differently_when_run_again_fails_the_triad(
    database: Database,
) -> None:
    """Run twice, a node must return what its first run decided, not only succeed."""
    definition = SagaDefinition(
        name="picks_anew", version=1, params=_Picked, stages=((Node("pick", _pick_anew),),)
    )
    replica = Replica(
        database,
        "triad",
        clock=ManualClock(),
        definitions=[definition],
        faults=Faults(repeat_actions=True),
    )
    saga_id = await replica.executor.start(definition, _Picked(value=uuid.uuid4()))
    saga = await database.saga(saga_id)
    assert saga.state == SagaState.UNDONE
    assert "pick decided differently when run again" in (saga.error or "")
