"""nexusctl dev run-all: the processes it plans and the state directory it owns."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from typer.testing import CliRunner

from nexus.cli.dev_stack import load_cli_url_hint
from nexus.cli.main import app
from nexus.devstack.access import Access
from nexus.devstack.stack import StackConfig, plan, save_cli_url, with_users
from schemas.brokers import broker_urls


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


def test_on_a_cluster_every_process_has_every_node_and_they_begin_at_different_ones(
    tmp_path: Path,
) -> None:
    nodes = ",".join(f"amqp://guest:guest@127.0.0.1:{port}/" for port in (5001, 5002, 5003))
    stack = plan(StackConfig(state_dir=tmp_path, amqp_url=nodes, database_url="sqlite://"))
    access = Access.generate(crucible_agents=stack.crucible_ids, sleds=stack.sled_ids)
    stack = with_users(stack, access, nodes)
    lists = [
        broker_urls(value)
        for spec in [*stack.nexus, *stack.agents]
        for key, value in spec.env.items()
        if key.endswith("_AMQP_URL")
    ]
    assert len(lists) == 7
    ports = [[urlsplit(url).port or 0 for url in urls] for urls in lists]
    assert all(sorted(each) == [5001, 5002, 5003] for each in ports)
    assert sorted({each[0] for each in ports}) == [5001, 5002, 5003]


def test_run_all_never_empties_a_directory_it_did_not_create(tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    result = CliRunner().invoke(app, ["dev", "run-all", "--state-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "refusing to empty" in result.stderr
    assert precious.read_text() == "keep me"


def test_the_cli_url_is_saved_for_its_owner_only_and_the_hint_does_not_show_it(
    tmp_path: Path,
) -> None:
    url = "amqp://nexusctl:s3cret-pw@127.0.0.1:5672/control-plane"
    directory = tmp_path / "state dir"
    directory.mkdir()
    path = save_cli_url(directory, url)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == url + "\n"
    hint = load_cli_url_hint(path)
    assert "s3cret-pw" not in hint
    # The hint is a shell line that loads the URL from the file.
    loaded = subprocess.run(
        ["bash", "-c", f'{hint}; printf %s "$NEXUS_AMQP_URL"'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout == url


def test_a_saved_cli_url_replaces_a_readable_one(tmp_path: Path) -> None:
    stale = tmp_path / "nexusctl.url"
    stale.write_text("amqp://old/\n")
    stale.chmod(0o644)

    path = save_cli_url(tmp_path, "amqp://new/")

    assert (path, path.read_text()) == (stale, "amqp://new/\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
