"""A Nexus replica that SIGKILLs itself inside a saga node, for the crash tests.

    python -m tests.crashing_nexus --crash-in-node NODE

The kill comes inside the node's transaction, before its action (``Faults.before_action``),
in whichever saga reaches a node named NODE first. Otherwise it is ``nexus run``: the
same NEXUS_* settings, start and stop.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal

from nexus.app import NexusApp
from nexus.main import run_replica
from nexus.saga.faults import Faults
from nexus.settings import NexusSettings
from schemas.service import settings_from

log = logging.getLogger(__name__)


def crash_in(node: str) -> Faults:
    def crash(saga: str, name: str) -> None:
        if name == node:
            log.warning("fault injection: SIGKILL inside node %s of %s", name, saga)
            os.kill(os.getpid(), signal.SIGKILL)

    return Faults(before_action=crash)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.crashing_nexus")
    parser.add_argument("--crash-in-node", required=True, metavar="NODE")
    arguments = parser.parse_args()
    settings = settings_from("nexus", NexusSettings, {})
    run_replica(NexusApp(settings, faults=crash_in(arguments.crash_in_node)))


if __name__ == "__main__":
    main()
