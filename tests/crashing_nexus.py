"""A Nexus replica that SIGKILLs or SIGSTOPs itself inside a saga node, for the fault tests.

    python -m tests.crashing_nexus --crash-in-node NODE
    python -m tests.crashing_nexus --freeze-in-node NODE

The signal comes inside the node's transaction, before its action
(``Faults.before_action``), in whichever saga reaches a node named NODE first. A frozen
replica stays stopped, its transaction open, until the test sends SIGCONT; then it goes
on as if nothing happened, and freezes no more. Otherwise it is ``nexus run``: the same
NEXUS_* settings, start and stop.
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


def freeze_in(node: str) -> Faults:
    frozen = False

    def freeze(saga: str, name: str) -> None:
        nonlocal frozen
        if name == node and not frozen:
            frozen = True
            log.warning("fault injection: SIGSTOP inside node %s of %s", name, saga)
            os.kill(os.getpid(), signal.SIGSTOP)
            log.warning("fault injection: continued inside node %s of %s", name, saga)

    return Faults(before_action=freeze)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.crashing_nexus")
    fault = parser.add_mutually_exclusive_group(required=True)
    fault.add_argument("--crash-in-node", metavar="NODE")
    fault.add_argument("--freeze-in-node", metavar="NODE")
    arguments = parser.parse_args()
    settings = settings_from("nexus", NexusSettings, {})
    if arguments.crash_in_node is not None:
        faults = crash_in(arguments.crash_in_node)
    else:
        faults = freeze_in(arguments.freeze_in_node)
    run_replica(NexusApp(settings, faults=faults))


if __name__ == "__main__":
    main()
