"""The benchmark's ``peers`` phase in a tiny configuration, as a real process: both
engines run their disks to the end and real figures come out (not only exit 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LEVELS = ((1, 3), (4, 8))


def test_the_peers_phase_measures_both_engines(tmp_path: Path) -> None:
    levels = ",".join(f"{in_flight}:{disks}" for in_flight, disks in LEVELS)
    completed = subprocess.run(
        [
            *(sys.executable, "-m", "bench.run", "--quick", "--only", "peers"),
            *("--peers-levels", levels, "--out", str(tmp_path)),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    peers = json.loads((tmp_path / "results.json").read_text())["peers"]

    for in_flight, disks in LEVELS:
        ours, dbos = peers["ours"][str(in_flight)], peers["dbos"][str(in_flight)]
        # Every disk of this engine ran its saga to the end; DBOS's app fails otherwise.
        assert ours["states"] == {"done": disks}, ours
        assert ours["disks"] == dbos["disks"] == disks
        for engine in (ours, dbos):
            assert 0 < engine["per_second"] < 1000, engine
            assert engine["seconds"] > 0
            wake = engine["wake_ms"]
            # A wake per region of this engine; DBOS counts the recvs that waited.
            assert 0 < wake["n"] <= 3 * disks, wake
            assert 0 < wake["p50"] <= wake["p99"] < 60_000, wake
        assert ours["wake_ms"]["n"] == 3 * disks
        # The trivial agents did their part and the engine its own.
        assert ours["cpu_ms_per_disk"]["crucible"] > 0
        assert ours["cpu_ms_per_disk"]["nexus"] > 0
        assert dbos["app_cpu_ms_per_disk"] > 0
        assert ours["commits_per_disk"] > 0 and dbos["commits_per_disk"] > 0
    assert peers["dbos"]["dbos_version"].startswith("3.")
