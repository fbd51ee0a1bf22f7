"""What the noun modules share: running a command's async body with one-line errors,
and starting an operation (optionally following it to its end with ``--wait``)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from rich.text import Text

from nexus.cli.client import ApiFailure, NexusClient, Unreachable
from nexus.cli.console import emit_json, errors_reported, fail, say, stdout
from nexus.cli.options import Output
from nexus.cli.progress import ProgressLine, ProgressWatch, Target
from nexus.cli.timeline import abbreviate
from schemas import api
from schemas.base import Envelope

T = TypeVar("T")


def run(body: Coroutine[Any, Any, T]) -> T:
    """Run a command's async body; any failure is one line on stderr and exit status 1."""
    with errors_reported():
        try:
            return asyncio.run(body)
        except (ApiFailure, Unreachable) as error:
            # Already written for people; the exception's type name would add nothing.
            fail(str(error))


@dataclass(frozen=True)
class Outcome:
    saga_id: uuid.UUID | None
    resource_id: uuid.UUID
    # The saga's final state with --wait; "accepted" without; "unchanged" when
    # Nexus had nothing to do (an instance already in the asked-for state).
    state: str
    saga: api.SagaView | None = None

    @property
    def succeeded(self) -> bool:
        return self.state in {"done", "accepted", "unchanged"}

    def as_json(self) -> dict[str, object]:
        return {
            "saga_id": str(self.saga_id) if self.saga_id else None,
            "resource_id": str(self.resource_id),
            "state": self.state,
            "saga": self.saga.model_dump(mode="json") if self.saga else None,
        }


async def start_operation(
    client: NexusClient,
    request: Envelope,
    *,
    wait: bool,
    wait_timeout: float,
    output: Output,
) -> Outcome:
    """Send ``request``; with ``wait``, show its progress until its saga ends."""
    watch = ProgressWatch()
    if wait:
        await client.subscribe(watch.handle)
    reply = await client.call(request, api.AcceptedReply, api.InstanceReply)
    if isinstance(reply, api.InstanceReply):
        return Outcome(None, reply.payload.id, "unchanged")
    accepted = reply.payload
    if not wait:
        return Outcome(accepted.saga_id, accepted.resource_id, "accepted")
    if output is Output.TEXT:
        say(f"saga {accepted.saga_id} started; following its events")
    finished = await watch.follow(
        [Target(accepted.saga_id, accepted.resource_id)],
        show_progress if output is Output.TEXT else _ignore,
        wait_timeout,
    )
    saga = (
        await client.call(
            api.SagaGet(source=client.source, payload=api.SagaRef(saga_id=accepted.saga_id)),
            api.SagaReply,
        )
    ).payload
    if not finished and output is Output.TEXT:
        say(f"no end after {wait_timeout:g}s of watching; the saga is {saga.state}")
    return Outcome(accepted.saga_id, accepted.resource_id, saga.state, saga)


def show_progress(line: ProgressLine) -> None:
    text = Text(f"  {line.elapsed:7.3f}s  ")
    if line.label:
        text.append(f"{line.label:<14} ", style="blue")
    text.append(f"{line.what:<18}", style="bold")
    text.append(f" {line.step:<12}", style=_STEP_STYLES.get(line.step, ""))
    text.append(f" {line.replica}", style="cyan")
    if line.detail:
        text.append(f"  {abbreviate(line.detail)}", style="dim")
    stdout.print(text, soft_wrap=True)


def report(outcome: Outcome, output: Output, done_message: str) -> None:
    """Print the outcome; exit 1 unless it succeeded."""
    if output is Output.JSON:
        emit_json(outcome.as_json())
    elif outcome.state == "accepted":
        say(
            f"accepted: {outcome.resource_id}, saga {outcome.saga_id} "
            f"(follow it: nexusctl saga show {outcome.saga_id})"
        )
    elif outcome.succeeded:
        say(done_message)
    if not outcome.succeeded:
        detail = f": {outcome.saga.error}" if outcome.saga and outcome.saga.error else ""
        fail(f"saga {outcome.saga_id} ended {outcome.state}{detail}")


def _ignore(line: ProgressLine) -> None:
    """JSON output is one document at the end; live lines would break it."""


_STEP_STYLES = {
    "succeeded": "green",
    "done": "bold green",
    "resumed": "magenta",
    "waiting": "yellow",
    "failed": "red",
    "undone": "bold red",
    "stuck": "bold red",
}
