"""How long `nexusctl` takes to start and answer, as a whole process (issue #16 item 6).

    python -m bench.cli_startup [--runs 10]

Times ``nexusctl --help`` and, when ``NEXUS_AMQP_URL`` points at a running stack
(``nexusctl dev run-all``), ``nexusctl disk list``: each run a fresh process, one
warm-up first, the median and the range of the wall time printed. Compare runs on the
same machine as ratios; it is shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

NEXUSCTL = Path(sys.executable).with_name("nexusctl")


def wall_seconds(argv: list[str], runs: int) -> list[float]:
    """Each run's wall time, after one warm-up; fails loudly on a non-zero exit."""
    times: list[float] = []
    for run in range(runs + 1):
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, check=False)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()}")
        if run:
            times.append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    arguments = parser.parse_args()
    commands = [[str(NEXUSCTL), "--help"]]
    if os.environ.get("NEXUS_AMQP_URL"):
        commands.append([str(NEXUSCTL), "disk", "list"])
    else:
        print("NEXUS_AMQP_URL is not set: `disk list` not timed (start `nexusctl dev run-all`)")
    for argv in commands:
        times = wall_seconds(argv, arguments.runs)
        print(
            f"nexusctl {' '.join(argv[1:])}: median {statistics.median(times):.3f} s "
            f"(min {min(times):.3f}, max {max(times):.3f}; {len(times)} runs)"
        )


if __name__ == "__main__":
    main()
