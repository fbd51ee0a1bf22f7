"""The benchmark's ``replacement`` phase in a tiny configuration, as a real process: a
sled's regions are replaced by the event-driven saga and by the model of Omicron's
tasks, and real figures come out of both (not only exit 0)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
REGIONS = 3
# --quick attaches 2 disks to a running instance: the rest are repaired by Nexus.
ATTACHED = 2
MILESTONES = ("requested", "running", "replacement_done", "complete")


def test_the_replacement_phase_measures_both_strategies(tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            *(sys.executable, "-m", "bench.run", "--quick", "--only", "replacement"),
            *("--replacement-disks", str(REGIONS), "--out", str(tmp_path)),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    # The quick run's periods are not Omicron's, and it says so.
    assert "scaled down: Omicron's are 30 s / 10 s" in completed.stdout
    found = json.loads((tmp_path / "results.json").read_text())["replacement"]
    assert found["regions"] == REGIONS
    assert found["periods_scaled_down"] is True
    ours, model = found["event-driven"], found["task-driven (Omicron model)"]

    for strategy in (ours, model):
        times = strategy["seconds_from_expunge"]
        for milestone in MILESTONES:
            assert times[milestone]["n"] == REGIONS, (milestone, times)
        # Each region's phases in order, every one after the expunge.
        for earlier, later in itertools.pairwise(MILESTONES):
            assert 0 <= times[earlier]["p50"] <= times[later]["p50"], (earlier, times)
            assert times[earlier]["max"] <= times[later]["max"], (earlier, times)
        assert strategy["every_region_replaced_s"] == times["complete"]["max"]
        assert strategy["every_region_replaced_s"] < 300

    # Event-driven: the requests were filed by the expunge itself, and each disk was
    # repaired the way its attachment calls for.
    assert ours["seconds_from_expunge"]["requested"]["max"] < 5
    assert ours["repair_modes"] == {"live": ATTACHED, "nexus": REGIONS - ATTACHED}
    # The model: nothing before its start task's first tick, and a new region created
    # by the spare agent, asked at least once per region.
    first_tick = model["start_task_first_tick_s"]
    assert model["seconds_from_expunge"]["requested"]["p50"] >= first_tick
    assert model["activations"]["start"] >= 1 and model["activations"]["driver"] >= 2
    assert model["ensures_per_region"]["n"] == REGIONS
    assert model["ensures_per_region"]["mean"] >= 1
