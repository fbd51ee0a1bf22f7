"""``nexusctl events``: what agents said that no saga took up."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer
from rich.table import Table

from nexus.cli.client import NexusClient
from nexus.cli.common import run
from nexus.cli.console import emit_json, say, show
from nexus.cli.options import DEFAULT_AMQP_URL, AmqpUrlOption, Output, OutputOption, TimeoutOption
from schemas import api

app = typer.Typer(help="See agents' events that no saga claimed.", no_args_is_help=True)

GroupsOption = Annotated[
    int, typer.Option("--groups", min=1, max=100, help="Show at most this many groups.")
]
ExamplesOption = Annotated[
    int, typer.Option("--examples", min=0, max=5, help="Newest events shown per group.")
]


@app.command("unclaimed")
def unclaimed(
    groups: GroupsOption = 20,
    examples: ExamplesOption = 3,
    output: OutputOption = Output.TEXT,
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Events no saga claimed within the retention (NEXUS_UNCLAIMED_RETENTION_SECONDS),
    grouped by type and source, largest groups first, with the newest of each.

    Events in a state no saga ever waits for (a region tombstoned on its way to
    destroyed) are not kept, so each one here is worth a look.
    """

    async def body() -> api.UnclaimedSummary:
        async with NexusClient(amqp_url, timeout=timeout) as client:
            return await fetch_unclaimed(client, groups=groups, examples=examples)

    summary = run(body())
    if output is Output.JSON:
        emit_json(summary.model_dump(mode="json"))
        return
    render_unclaimed(summary, with_examples=examples > 0)


async def fetch_unclaimed(
    client: NexusClient, *, groups: int, examples: int
) -> api.UnclaimedSummary:
    request = api.UnclaimedEventsList(
        source=client.source, payload=api.UnclaimedFilter(groups=groups, examples=examples)
    )
    return (await client.call(request, api.UnclaimedEventsReply)).payload


def render_unclaimed(summary: api.UnclaimedSummary, *, with_examples: bool) -> None:
    if not summary.total:
        say("no unclaimed events")
        return
    say(describe_totals(summary))
    table = Table(title="unclaimed events", title_justify="left")
    for column in ("type", "source", "count", "oldest", "newest"):
        table.add_column(column, overflow="fold")
    for group in summary.groups:
        table.add_row(
            group.type,
            group.source,
            str(group.count),
            _when(group.oldest_at),
            _when(group.newest_at),
        )
    show(table)
    if not with_examples:
        return
    for group in summary.groups:
        if group.examples:
            say(f"newest {group.type} from {group.source}:")
        for example in group.examples:
            say(f"  {_when(example.arrived_at)}  {example.summary}  (message {example.message_id})")


def describe_totals(summary: api.UnclaimedSummary) -> str:
    line = f"{summary.total} unclaimed events in {summary.group_count} groups"
    if summary.scanned < summary.total:
        line += f" (grouped: the newest {summary.scanned})"
    if len(summary.groups) < summary.group_count:
        line += f"; the {len(summary.groups)} largest groups shown"
    return line


def _when(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")
