"""Hooks a test or a benchmark passes to the engine; production builds none.

Omicron's saga test triad needs them: fail a chosen node (or undo), run every action
or undo twice. A chaos harness passes ``before_action`` to kill its own process inside
a node's transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _never(saga: str, node: str) -> bool:
    return False


@dataclass(frozen=True)
class Faults:
    fail_node: Callable[[str, str], bool] = _never
    fail_undo: Callable[[str, str], bool] = _never
    repeat_actions: bool = False
    repeat_undos: bool = False
    # Called with (saga name, node name) inside the node's transaction, before its action.
    before_action: Callable[[str, str], None] | None = None
