"""What the engine tells about itself for metrics, behind a port of its own.

The engine calls these in memory and cheaply, after the step they describe has
committed (``Notices.after_commit``); ``nexus.metrics.NexusMetrics`` turns them into
Prometheus figures. The engine itself imports no metrics library, and an engine built
without metrics (tests, ``examples/``) gets :class:`NoMetrics`.
"""

from __future__ import annotations

from typing import Protocol


class EngineMetrics(Protocol):
    def node_succeeded(self, saga: str, node: str, seconds: float) -> None:
        """A forward node succeeded ``seconds`` after it started (its wait included)."""

    def resumed(self, saga: str, node: str, wake_seconds: float) -> None:
        """A node resumed by an agent's event, ``wake_seconds`` after the event's
        ``occurred_at`` (the wake overhead)."""

    def adopted(self, saga: str) -> None:
        """This replica claimed a saga whose lease another replica let expire."""

    def reconciled(self, saga: str, outcome: str) -> None:
        """A wait's deadline passed and its reconcile query answered ``outcome``."""


class NoMetrics:
    """Counts nothing."""

    def node_succeeded(self, saga: str, node: str, seconds: float) -> None:
        pass

    def resumed(self, saga: str, node: str, wake_seconds: float) -> None:
        pass

    def adopted(self, saga: str) -> None:
        pass

    def reconciled(self, saga: str, outcome: str) -> None:
        pass
