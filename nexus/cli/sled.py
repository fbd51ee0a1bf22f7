"""``nexusctl sled``: list sleds with their storage, and expunge a lost one."""

from __future__ import annotations

import uuid
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
    format_size,
)
from nexus.cli.progress import ProgressLine, ProgressWatch, Target
from schemas import api

app = typer.Typer(help="See sleds and their datasets; expunge a lost sled.", no_args_is_help=True)


@app.command("list")
def list_sleds(
    output: OutputOption = Output.TEXT,
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
    timeout: TimeoutOption = 10.0,
) -> None:
    """List every sled: its state, live VMMs, and the datasets its crucible agents serve."""

    async def body() -> tuple[api.SledView, ...]:
        async with NexusClient(amqp_url, timeout=timeout) as client:
            request = api.SledList(source=client.source)
            return (await client.call(request, api.SledListReply)).payload

    sleds = run(body())
    if output is Output.JSON:
        emit_json([sled.model_dump(mode="json") for sled in sleds])
        return
    table = Table()
    for column in ("id", "hostname", "state", "vmms", "datasets"):
        table.add_column(column, overflow="fold")
    for sled in sleds:
        table.add_row(
            str(sled.id),
            sled.hostname or "(no sled agent)",
            sled.state or "",
            str(sled.live_vmms),
            "\n".join(f"{d.id} {d.state} {format_size(d.free_bytes)} free" for d in sled.datasets),
        )
    show(table)


@app.command("expunge")
def expunge(
    sled_id: Annotated[uuid.UUID, typer.Argument(help="The sled's id (nexusctl sled list).")],
    yes: Annotated[
        bool, typer.Option("--yes", help="Do not ask: expunging cannot be undone.")
    ] = False,
    wait: WaitOption = False,
    wait_timeout: WaitTimeoutOption = 300.0,
    output: OutputOption = Output.TEXT,
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Declare a sled gone for good, with its storage: its VMMs fail, its datasets take no
    new regions, and each region they held is replaced elsewhere (one saga each, started
    at once). It never becomes active again, even if it comes back. With --wait, follow
    the replacements until every one has ended."""
    if not yes:
        typer.confirm(f"Expunge sled {sled_id}? This cannot be undone", abort=True)

    async def body() -> tuple[api.SledExpunged, dict[uuid.UUID, str]]:
        async with NexusClient(amqp_url, timeout=timeout) as client:
            watch = ProgressWatch()
            if wait:
                await client.subscribe(watch.handle)
            request = api.SledExpunge(source=client.source, payload=api.SledRef(sled_id=sled_id))
            expunged = (await client.call(request, api.SledExpungeReply)).payload
            if not wait or not expunged.replacement_sagas:
                return expunged, {}
            if output is Output.TEXT:
                say(f"following {len(expunged.replacement_sagas)} region replacements")
            targets = [
                Target(saga_id, saga_id, f"replace-{index}")
                for index, saga_id in enumerate(expunged.replacement_sagas)
            ]
            ended = await watch.follow(
                targets, show_progress if output is Output.TEXT else _ignore, wait_timeout
            )
            return expunged, ended

    expunged, ended = run(body())
    if output is Output.JSON:
        emit_json(
            {**expunged.model_dump(mode="json"), "ended": {str(k): v for k, v in ended.items()}}
        )
    elif expunged.changed:
        say(
            f"sled {sled_id} expunged: {expunged.datasets_expunged} datasets expunged, "
            f"{expunged.vmms_failed} VMMs failed, "
            f"{expunged.replacements_requested} region replacements started"
        )
    else:
        say(f"sled {sled_id} was already expunged: nothing changed")
    if wait and expunged.replacement_sagas:
        unfinished = [s for s in expunged.replacement_sagas if ended.get(s) != "done"]
        if unfinished:
            fail(
                f"{len(unfinished)} of {len(expunged.replacement_sagas)} replacements did not "
                "end done (nexusctl region-replacement list)"
            )
        if output is Output.TEXT:
            say("every region of the sled is replaced")


def _ignore(line: ProgressLine) -> None:
    """JSON output is one document at the end; live lines would break it."""
