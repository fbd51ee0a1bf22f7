"""The triad's fault flags of ``python -m tests.crashing_nexus`` become the engine's hooks:
only the named node of the named saga fails; repeats are passed through."""

from __future__ import annotations

import pytest

from tests.crashing_nexus import saga_node, triad_faults


def test_saga_node_is_split_at_the_first_colon() -> None:
    assert saga_node("snapshot_create:snapshot_0") == ("snapshot_create", "snapshot_0")
    for bad in ("snapshot_create", ":node", "saga:"):
        with pytest.raises(ValueError, match="SAGA:NODE"):
            saga_node(bad)


def test_only_the_named_node_of_the_named_saga_fails() -> None:
    faults = triad_faults(
        [("snapshot_delete", "running_stop")],
        [("disk_create", "regions_cleanup")],
        repeat_actions=False,
        repeat_undos=True,
    )
    assert faults.fail_node("snapshot_delete", "running_stop")
    assert not faults.fail_node("snapshot_create", "running_stop")
    assert not faults.fail_node("snapshot_delete", "snapshots_delete")
    assert faults.fail_undo("disk_create", "regions_cleanup")
    assert not faults.fail_undo("snapshot_delete", "running_stop")
    assert (faults.repeat_actions, faults.repeat_undos) == (False, True)
