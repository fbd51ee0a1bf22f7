"""``nexusctl saga``: list sagas, show one as a timeline, or its trace as a span tree."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from nexus.cli.client import NexusClient
from nexus.cli.common import run
from nexus.cli.console import emit_json, fail, say, show
from nexus.cli.options import DEFAULT_AMQP_URL, AmqpUrlOption, Output, OutputOption, TimeoutOption
from nexus.cli.timeline import timeline_table, waiting_table, wakes, wakes_table
from schemas import api

app = typer.Typer(help="See sagas: what ran, where, how long, what waits.", no_args_is_help=True)


@app.command("list")
def list_sagas(
    state: Annotated[
        str | None,
        typer.Option(
            "--state", help="Only sagas in this state, e.g. stuck (those need an operator)."
        ),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000)] = 100,
    output: OutputOption = Output.TEXT,
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
    timeout: TimeoutOption = 10.0,
) -> None:
    """List the latest sagas, newest first."""

    async def body() -> tuple[api.SagaView, ...]:
        async with NexusClient(amqp_url, timeout=timeout) as client:
            request = api.SagaList(
                source=client.source, payload=api.SagaFilter(state=state, limit=limit)
            )
            return (await client.call(request, api.SagaListReply)).payload

    sagas = run(body())
    if output is Output.JSON:
        emit_json([saga.model_dump(mode="json") for saga in sagas])
        return
    table = Table()
    for column in ("id", "name", "state", "created", "took", "owner", "error"):
        table.add_column(column, overflow="fold")
    for saga in sagas:
        took = (saga.updated_at - saga.created_at).total_seconds()
        table.add_row(
            str(saga.id),
            saga.name,
            saga.state,
            saga.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            f"{took:.2f} s",
            saga.lease_owner or "",
            saga.error or "",
        )
    show(table)


@app.command("show")
def show_saga(
    saga_id: Annotated[str, typer.Argument(help="The saga's id.", show_default=False)],
    output: OutputOption = Output.TEXT,
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
    timeout: TimeoutOption = 10.0,
) -> None:
    """A saga's timeline: node, event, replica, start time, duration; what it waits for;
    and for sagas that waited on agents, when each object was ready at its agent versus
    when the saga resumed (the wake overhead)."""
    try:
        parsed = uuid.UUID(saga_id)
    except ValueError:
        fail(f"invalid saga id {saga_id!r}: expected a UUID")

    async def body() -> api.SagaView:
        async with NexusClient(amqp_url, timeout=timeout) as client:
            request = api.SagaGet(source=client.source, payload=api.SagaRef(saga_id=parsed))
            return (await client.call(request, api.SagaReply)).payload

    saga = run(body())
    if output is Output.JSON:
        emit_json(
            saga.model_dump(mode="json") | {"wakes": [wake.as_json() for wake in wakes(saga)]}
        )
        return
    render_saga(saga)


def render_saga(saga: api.SagaView) -> None:
    show(timeline_table(saga))
    if saga.error:
        say(f"error: {saga.error}")
    if saga.waiting_for:
        show(waiting_table(saga, datetime.now(UTC)))
    if wakes(saga):
        show(wakes_table(saga, "woken by agents' notifications"))


@app.command("trace")
def trace_saga(
    saga_id: Annotated[str, typer.Argument(help="The saga's id.", show_default=False)],
    files: Annotated[
        list[Path],
        typer.Option(
            "--file",
            help="A trace file (NEXUS_TRACE_FILE, CRUCIBLE_TRACE_FILE, SLED_TRACE_FILE), or a "
            "directory of *.jsonl; repeat for each process's.",
            show_default=False,
        ),
    ],
    output: OutputOption = Output.TEXT,
) -> None:
    """The saga's trace as a span tree, from the processes' trace files: the API request,
    each node on the replica that ran it, each agent's handling and work, each event."""
    from nexus.cli.trace_view import load, saga_trace, tree_lines

    missing = [str(path) for path in files if not path.exists()]
    if missing:
        fail(f"no such trace file: {', '.join(missing)}")
    spans = saga_trace(load(files), saga_id)
    if not spans:
        fail(f"no span of saga {saga_id} in {', '.join(str(path) for path in files)}")
    if output is Output.JSON:
        emit_json([vars(span) for span in spans])
        return
    for line in tree_lines(spans):
        say(line)
