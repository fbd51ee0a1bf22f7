"""``nexus health``, ``crucible-agent health`` and ``sled-agent health``: container health
checks on a file's age.

Each service touches the file while nothing is wrong with it (``schemas.tasks.Tasks``:
its loops complete their passes, its broker connection is up); the command passes
while it is fresh and fails in one line when it is stale, missing or not configured.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from crucible_agent import app as crucible_app
from crucible_agent import main as crucible_main
from crucible_agent.settings import CrucibleSettings
from nexus import main as nexus_main
from nexus.settings import NexusSettings
from schemas.tasks import Tasks
from sled_agent import app as sled_app
from sled_agent import main as sled_main
from sled_agent.settings import SledSettings

SERVICES: list[tuple[str, typer.Typer, str]] = [
    ("nexus", nexus_main.app, "NEXUS_HEALTH_FILE"),
    ("crucible-agent", crucible_main.app, "CRUCIBLE_HEALTH_FILE"),
    ("sled-agent", sled_main.app, "SLED_HEALTH_FILE"),
]
IDS = [name for name, _, _ in SERVICES]
AGENT_IDS = IDS[1:]


def _invoke(app: typer.Typer, *args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, ["health", *args], env=env)


@pytest.mark.parametrize(("name", "app", "env_name"), SERVICES, ids=IDS)
def test_fresh_file_is_healthy(name: str, app: typer.Typer, env_name: str, tmp_path: Path) -> None:
    health_file = tmp_path / "agent.health"
    health_file.touch()
    result = _invoke(app, "--max-age", "15", env={env_name: str(health_file)})
    assert result.exit_code == 0, result.output
    assert "healthy" in result.output


@pytest.mark.parametrize(("name", "app", "env_name"), SERVICES, ids=IDS)
def test_stale_file_is_unhealthy(
    name: str, app: typer.Typer, env_name: str, tmp_path: Path
) -> None:
    health_file = tmp_path / "agent.health"
    health_file.touch()
    an_hour_ago = time.time() - 3600
    os.utime(health_file, (an_hour_ago, an_hour_ago))
    result = _invoke(app, "--max-age", "15", env={env_name: str(health_file)})
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"{name}: unhealthy: ")
    assert "more than 15s" in lines[0]


@pytest.mark.parametrize(("name", "app", "env_name"), SERVICES, ids=IDS)
def test_missing_file_is_unhealthy(
    name: str, app: typer.Typer, env_name: str, tmp_path: Path
) -> None:
    result = _invoke(app, env={env_name: str(tmp_path / "never-touched")})
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"{name}: unhealthy: {tmp_path / 'never-touched'} does not exist: not healthy yet"
    )


@pytest.mark.parametrize(("name", "app", "env_name"), SERVICES, ids=IDS)
def test_unset_file_is_unhealthy(
    name: str, app: typer.Typer, env_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(env_name, raising=False)
    result = _invoke(app)
    assert result.exit_code == 1
    assert result.output.strip() == f"{name}: unhealthy: {env_name} is not set"


@pytest.mark.parametrize(("name", "app", "env_name"), SERVICES, ids=IDS)
def test_option_overrides_environment(
    name: str, app: typer.Typer, env_name: str, tmp_path: Path
) -> None:
    fresh = tmp_path / "fresh.health"
    fresh.touch()
    result = _invoke(
        app, "--health-file", str(fresh), env={env_name: str(tmp_path / "never-touched")}
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("settings_class", "env_name"),
    [
        (NexusSettings, "NEXUS_HEALTH_FILE"),
        (CrucibleSettings, "CRUCIBLE_HEALTH_FILE"),
        (SledSettings, "SLED_HEALTH_FILE"),
    ],
)
def test_environment_variable_is_the_settings_field(
    settings_class: type[NexusSettings] | type[CrucibleSettings] | type[SledSettings],
    env_name: str,
) -> None:
    """``run`` (through the settings) and ``health`` (through typer) read the same variable."""
    assert "health_file" in settings_class.model_fields
    assert env_name == f"{settings_class.model_config.get('env_prefix')}HEALTH_FILE"


@pytest.mark.parametrize("module", [crucible_app, sled_app], ids=AGENT_IDS)
async def test_file_is_touched_only_while_the_agent_has_no_problem(
    module: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(module, "HEALTH_SECONDS", 0.01)
    up = tmp_path / "up" / "agent.health"
    down = tmp_path / "down" / "agent.health"
    well, unwell = Tasks(), Tasks()
    unwell.watch("broker", lambda: "not connected to the broker")
    tasks = [
        asyncio.create_task(module._report_health(up, well)),
        asyncio.create_task(module._report_health(down, unwell)),
    ]
    try:
        async with asyncio.timeout(5):
            while not up.exists():
                await asyncio.sleep(0.01)
        # Aged by hand, it is touched again: the loop keeps going.
        an_hour_ago = time.time() - 3600
        os.utime(up, (an_hour_ago, an_hour_ago))
        async with asyncio.timeout(5):
            while up.stat().st_mtime < time.time() - 60:
                await asyncio.sleep(0.01)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert not down.exists()
