"""Kill the Nexus replica that runs a disk create's saga; the other replica must finish it.

Run by scripts/compose_check.sh against its compose stack, with the system's python3
(standard library only):

    python3 scripts/docker/failover.py -- docker compose -p ... -f ...

A disk create is started through the nexusctl service with ``--wait``, whose progress
lines say, as it happens, which replica ran each step. At the first ``waiting`` line (the
saga sent its region commands and parked: in flight) the replica named on it is killed
with ``docker kill``, its restart policy switched off first so that it stays dead. Nothing
polls: the kill follows the event. The check passes only if the ``--wait`` exits 0 and
the saga's own record (``nexusctl saga show``) says: ``done``, steps by the killed
replica before the kill, and every step after it by the other replica.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
from datetime import datetime
from typing import IO, Any

DISK = "ci-failover"
FINISH_TIMEOUT = 240
REPLICAS = ("nexus-1", "nexus-2")
# nexusctl's --wait lines: "saga <id> started; ..." and "  0.477s  region_0  waiting  nexus-1 ..."
STARTED = re.compile(r"^saga (?P<saga>[0-9a-f-]{36}) started")
STEP = re.compile(r"^\s*(?P<elapsed>[\d.]+)s\s+(?P<node>\S+)\s+(?P<step>\S+)\s+(?P<replica>\S+)")


def run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise SystemExit(
            f"failover: {' '.join(argv)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )
    return done.stdout


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def first_wait(lines: IO[str], seen: list[str]) -> tuple[str, str]:
    """Read --wait's lines up to the first ``waiting`` one: the saga id and its replica."""
    saga = None
    for line in lines:
        print(line, end="", flush=True)
        seen.append(line)
        if started := STARTED.match(line):
            saga = started["saga"]
        elif (step := STEP.match(line)) and step["step"] == "waiting" and saga is not None:
            return saga, step["replica"]
    output = "".join(seen)
    raise SystemExit(f"failover: `disk create --wait` ended before its saga waited:\n{output}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("compose", nargs="+", help="the compose command line, after --")
    compose: list[str] = parser.parse_args().compose
    nexusctl = [*compose, "run", "--rm", "--no-TTY", "nexusctl"]

    create = subprocess.Popen(
        [*nexusctl, "disk", "create", DISK, "--size", "1GiB", "--wait",
         "--wait-timeout", str(FINISH_TIMEOUT)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
    )  # fmt: skip
    assert create.stdout is not None
    seen: list[str] = []
    saga, victim = first_wait(create.stdout, seen)
    if victim not in REPLICAS:
        raise SystemExit(f"failover: saga {saga} waited on {victim!r}, not a replica")
    survivor = next(r for r in REPLICAS if r != victim)
    container = run([*compose, "ps", "--quiet", victim]).strip()
    if not container:
        raise SystemExit(f"failover: no container for service {victim}")
    # Left to its restart policy, the killed replica would come back and might finish the
    # saga itself.
    run(["docker", "update", "--restart=no", container])
    run(["docker", "kill", container])
    # After the kill returned: the replica is gone, so whatever was logged later was not
    # logged by it.
    killed_at = datetime.now().astimezone()
    print(f"failover: killed {victim} ({container[:12]}) while saga {saga} waited", flush=True)

    # The rest of --wait's lines, shown as they come; a --wait that hangs is killed.
    timer = threading.Timer(FINISH_TIMEOUT + 30, create.kill)
    timer.start()
    try:
        for line in create.stdout:
            print(line, end="", flush=True)
        returncode = create.wait()
    finally:
        timer.cancel()
    if returncode != 0:
        raise SystemExit(f"failover: `disk create --wait` exited {returncode}")

    final: dict[str, Any] = json.loads(run([*nexusctl, "saga", "show", saga, "--output", "json"]))
    before = [e for e in final["log"] if parse_time(e["at"]) < killed_at]
    after = [e for e in final["log"] if parse_time(e["at"]) >= killed_at]
    by_victim = [e for e in before if e["replica"] == victim]
    elsewhere = sorted({e["replica"] for e in after} - {survivor})
    problems = []
    if final["state"] != "done":
        problems.append(f"it ended {final['state']!r}, not done")
    if not by_victim:
        problems.append(f"{victim} ran none of its steps before the kill")
    if not after:
        problems.append("no step after the kill")
    if elsewhere:
        problems.append(f"steps after the kill ran on {elsewhere}, not only {survivor}")
    if problems:
        print(json.dumps(final["log"], indent=1))
        raise SystemExit(f"failover: saga {saga}: " + "; ".join(problems))
    last = after[-1]
    print(
        f"failover: saga {saga} {final['state']}: {len(by_victim)} log entries by {victim} "
        f"before the kill, {len(after)} by {survivor} after it (last: {last['event']} "
        f"{last['node'] or ''})"
    )


if __name__ == "__main__":
    try:
        main()
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            sys.exit(1)
        raise
