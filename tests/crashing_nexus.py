"""A Nexus replica with fault hooks, for the fault tests and the saga triad on real
processes.

    python -m tests.crashing_nexus --crash-in-node NODE
    python -m tests.crashing_nexus --freeze-in-node NODE
    python -m tests.crashing_nexus --fail-node SAGA:NODE [--repeat-undos]
    python -m tests.crashing_nexus --fail-undo SAGA:NODE
    python -m tests.crashing_nexus --repeat-actions

``--crash-in-node``/``--freeze-in-node``: the signal comes inside the node's transaction,
before its action (``Faults.before_action``), in whichever saga reaches a node named NODE
first. A frozen replica stays stopped, its transaction open, until the test sends
SIGCONT; then it goes on as if nothing happened, and freezes no more.

``--fail-node SAGA:NODE``: that node of that saga fails instead of running its action,
every time, so the saga unwinds; ``--fail-undo SAGA:NODE``: that node's undo fails (the
saga is left stuck); ``--repeat-actions``/``--repeat-undos``: every action/undo of every
saga runs twice in its transaction, and an action that decides differently the second
time fails its node (Omicron's saga test triad, ``nexus/saga/faults.py``). These combine.

``--replacement-retry SECONDS``: a region replacement whose saga unwound is tried again
after SECONDS (every attempt), not ``nexus.replacements``' backoff from 5 s; a triad case
that fails a replacement on purpose sets it long, so that its replica does not start the
same failing attempt again under the next case's feet.

Otherwise it is ``nexus run``: the same NEXUS_* settings, start and stop.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from collections.abc import Callable, Sequence
from datetime import timedelta

from nexus import replacements
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


def saga_node(text: str) -> tuple[str, str]:
    """``SAGA:NODE`` as (saga, node); argparse reports a ValueError as a usage error."""
    saga, colon, node = text.partition(":")
    if not (saga and colon and node):
        raise ValueError(f"expected SAGA:NODE, got {text!r}")
    return saga, node


def at(targets: Sequence[tuple[str, str]], what: str) -> Callable[[str, str], bool]:
    chosen = frozenset(targets)

    def hit(saga: str, node: str) -> bool:
        if (saga, node) in chosen:
            log.warning("fault injection: %s fails at node %s of %s", what, node, saga)
            return True
        return False

    return hit


def triad_faults(
    fail_node: Sequence[tuple[str, str]],
    fail_undo: Sequence[tuple[str, str]],
    *,
    repeat_actions: bool,
    repeat_undos: bool,
) -> Faults:
    return Faults(
        fail_node=at(fail_node, "the action"),
        fail_undo=at(fail_undo, "the undo"),
        repeat_actions=repeat_actions,
        repeat_undos=repeat_undos,
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.crashing_nexus")
    signals = parser.add_mutually_exclusive_group()
    signals.add_argument("--crash-in-node", metavar="NODE")
    signals.add_argument("--freeze-in-node", metavar="NODE")
    parser.add_argument("--fail-node", metavar="SAGA:NODE", type=saga_node, action="append")
    parser.add_argument("--fail-undo", metavar="SAGA:NODE", type=saga_node, action="append")
    parser.add_argument("--repeat-actions", action="store_true")
    parser.add_argument("--repeat-undos", action="store_true")
    parser.add_argument("--replacement-retry", metavar="SECONDS", type=float)
    arguments = parser.parse_args()
    triad = bool(
        arguments.fail_node
        or arguments.fail_undo
        or arguments.repeat_actions
        or arguments.repeat_undos
        or arguments.replacement_retry is not None
    )
    if triad and (arguments.crash_in_node or arguments.freeze_in_node):
        parser.error("a signal fault and a triad fault do not combine")
    if arguments.crash_in_node is not None:
        faults = crash_in(arguments.crash_in_node)
    elif arguments.freeze_in_node is not None:
        faults = freeze_in(arguments.freeze_in_node)
    elif triad:
        faults = triad_faults(
            arguments.fail_node or (),
            arguments.fail_undo or (),
            repeat_actions=arguments.repeat_actions,
            repeat_undos=arguments.repeat_undos,
        )
    else:
        parser.error("no fault: give a signal (--crash-in-node, --freeze-in-node) or a triad fault")
    if arguments.replacement_retry is not None:
        # Read at each call of nexus.replacements.retry_delay.
        replacements.RETRY_FIRST = replacements.RETRY_MOST = timedelta(
            seconds=arguments.replacement_retry
        )
    settings = settings_from("nexus", NexusSettings, {})
    run_replica(NexusApp(settings, faults=faults))


if __name__ == "__main__":
    main()
