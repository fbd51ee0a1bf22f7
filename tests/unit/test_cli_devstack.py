"""nexusctl dev run-all: the processes it plans and the state directory it owns."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from nexus.cli.main import app
from nexus.devstack.stack import StackConfig, plan


def test_the_rack_has_its_crucible_agents_on_distinct_sleds(tmp_path: Path) -> None:
    stack = plan(StackConfig(state_dir=tmp_path, amqp_url="amqp://x/", database_url="sqlite://"))
    assert [spec.name for spec in stack.nexus] == ["nexus-1", "nexus-2"]
    crucible = [spec for spec in stack.agents if spec.name.startswith("crucible")]
    sleds = [spec for spec in stack.agents if spec.name.startswith("sled")]
    assert len(crucible) == 3 and len(sleds) == 2
    assert len({spec.env["CRUCIBLE_SLED_ID"] for spec in crucible}) == 3
    # The sled agents run on sleds that also hold storage.
    assert {spec.env["SLED_SLED_ID"] for spec in sleds} <= {
        spec.env["CRUCIBLE_SLED_ID"] for spec in crucible
    }
    assert len({spec.log_path for spec in [*stack.nexus, *stack.agents]}) == 7
    assert all(spec.env["NEXUS_HEALTH_FILE"].startswith(str(tmp_path)) for spec in stack.nexus)


def test_run_all_never_empties_a_directory_it_did_not_create(tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    result = CliRunner().invoke(app, ["dev", "run-all", "--state-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "refusing to empty" in result.stderr
    assert precious.read_text() == "keep me"
