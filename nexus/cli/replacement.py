"""``nexusctl region-replacement``: the replacements of regions lost with their dataset,
their phase, since when, and what each waits for."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table

from nexus.cli.client import NexusClient
from nexus.cli.common import run, show_progress
from nexus.cli.console import emit_json, fail, say, show
from nexus.cli.options import (
    DEFAULT_AMQP_URL,
    AmqpUrlOption,
    Output,
    OutputOption,
    TimeoutOption,
    WaitOption,
    WaitTimeoutOption,
)
from nexus.cli.progress import ProgressLine, ProgressWatch, Target
from nexus.replacement_ids import saga_id_for
from schemas import api

app = typer.Typer(
    help="See region replacements: each lost region's phase and what it waits for.",
    no_args_is_help=True,
)


def since(at: datetime) -> str:
    seconds = max(0.0, (datetime.now(UTC) - at).total_seconds())
    return f"{seconds:.1f}s ago" if seconds < 120 else f"{seconds / 60:.1f} min ago"


@app.command("list")
def list_replacements(
    state: Annotated[str | None, typer.Option(help="Only in this phase (e.g. driving).")] = None,
    disk_id: Annotated[uuid.UUID | None, typer.Option(help="Only of this disk.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    output: OutputOption = Output.TEXT,
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
    timeout: TimeoutOption = 10.0,
) -> None:
    """List region replacement requests, newest first: phase, since when, what it waits for."""

    async def body() -> tuple[api.ReplacementView, ...]:
        async with NexusClient(amqp_url, timeout=timeout) as client:
            request = api.RegionReplacementList(
                source=client.source,
                payload=api.ReplacementFilter(state=state, disk_id=disk_id, limit=limit),
            )
            return (await client.call(request, api.RegionReplacementListReply)).payload

    found = run(body())
    if output is Output.JSON:
        emit_json([r.model_dump(mode="json") for r in found])
        return
    table = Table()
    for column in ("id", "disk", "phase", "since", "waiting for", "attempts"):
        table.add_column(column, overflow="fold")
    for r in found:
        table.add_row(
            str(r.id),
            str(r.disk_id),
            r.state,
            since(r.since),
            r.waiting_for or "",
            str(r.attempts),
        )
    show(table)


@app.command("show")
def show_replacement(
    request_id: Annotated[uuid.UUID, typer.Argument(help="The request's id (list shows it).")],
    wait: WaitOption = False,
    wait_timeout: WaitTimeoutOption = 300.0,
    output: OutputOption = Output.TEXT,
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
    timeout: TimeoutOption = 10.0,
) -> None:
    """One request: its phases with their times, the saga operating it, the repair's
    progress. With --wait, follow its saga's events until it ends."""

    async def body() -> api.ReplacementView:
        async with NexusClient(amqp_url, timeout=timeout) as client:
            watch = ProgressWatch()
            if wait:
                await client.subscribe(watch.handle)
            get = api.RegionReplacementGet(
                source=client.source, payload=api.ReplacementRef(id=request_id)
            )
            found = (await client.call(get, api.RegionReplacementReply)).payload
            if not wait or found.state == "complete":
                return found
            saga_id = saga_id_for(found.id, found.attempts)
            if output is Output.TEXT:
                say(f"{found.state} since {since(found.since)}; following saga {saga_id}")
            await watch.follow(
                [Target(saga_id, found.disk_id)],
                show_progress if output is Output.TEXT else _ignore,
                wait_timeout,
            )
            get = get.model_copy(update={"id": uuid.uuid4()})
            return (await client.call(get, api.RegionReplacementReply)).payload

    found = run(body())
    if output is Output.JSON:
        emit_json(found.model_dump(mode="json"))
    else:
        _describe(found)
    if wait and found.state != "complete":
        fail(f"region replacement {found.id} is {found.state}: {found.last_failure or ''}")


def _describe(r: api.ReplacementView) -> None:
    say(f"region replacement {r.id}: {r.state} since {since(r.since)}")
    say(f"  waiting for: {r.waiting_for or 'nothing'}")
    say(f"  disk {r.disk_id}: region {r.old_region_id} (dataset {r.old_dataset_id}) lost")
    if r.new_region_id is not None:
        say(f"  new region {r.new_region_id} on dataset {r.new_dataset_id}")
    if r.repair_mode is not None:
        say(f"  repair: {r.repair_mode}, {r.repair_progress or 0}%")
    say(f"  saga: {r.operating_saga_id or 'none'} (attempt {r.attempts})")
    if r.last_failure:
        say(f"  last failure: {r.last_failure}")
    for phase in r.history:
        say(f"  {phase.at.isoformat()}  {phase.state:<17} {phase.waiting_for or ''}")


def _ignore(line: ProgressLine) -> None:
    """JSON output is one document at the end; live lines would break it."""
