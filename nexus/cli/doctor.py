"""``nexusctl doctor``: Nexus's records against every agent's; exit 1 if anything is off.

It also shows the events no saga claimed (``nexusctl events unclaimed`` in short): worth
a look, but not an inconsistency, so they do not change the exit status.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from nexus.cli.client import NexusClient
from nexus.cli.common import run
from nexus.cli.console import emit_json, say, show
from nexus.cli.events import fetch_unclaimed, render_unclaimed
from nexus.cli.options import DEFAULT_AMQP_URL, AmqpUrlOption, Output, OutputOption
from schemas import api

# The doctor's section of unclaimed events: the largest groups, the newest of each.
UNCLAIMED_GROUPS = 10
UNCLAIMED_EXAMPLES = 1


def doctor(
    agent_timeout: Annotated[
        float,
        typer.Option("--timeout", min=0.1, max=120, help="Seconds each agent has to answer Nexus."),
    ] = 5.0,
    output: OutputOption = Output.TEXT,
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
) -> None:
    """Check Nexus's records against the agents themselves: each live disk has exactly
    its regions, on distinct sleds, each on the dataset Nexus chose and in the state
    Nexus records; no agent holds a region Nexus never asked for; instances are on their
    sleds; no saga is stuck. Also lists the events no saga claimed. Run it on a quiet
    system; exit 1 on any finding or an agent that does not answer.
    """

    async def body() -> tuple[api.DoctorReport, api.UnclaimedSummary]:
        # Nexus asks the agents in parallel, each with agent_timeout; leave it room.
        async with NexusClient(amqp_url, timeout=agent_timeout + 10) as client:
            request = api.Doctor(
                source=client.source, payload=api.DoctorRequest(timeout_seconds=agent_timeout)
            )
            report = (await client.call(request, api.DoctorReply)).payload
            unclaimed = await fetch_unclaimed(
                client, groups=UNCLAIMED_GROUPS, examples=UNCLAIMED_EXAMPLES
            )
            return report, unclaimed

    report, unclaimed = run(body())
    healthy = not report.findings and not report.unreachable_agents
    if output is Output.JSON:
        emit_json(
            report.model_dump(mode="json")
            | {"unclaimed": unclaimed.model_dump(mode="json"), "healthy": healthy}
        )
    else:
        say(f"checked {report.checked_agents} agents")
        for agent in report.unreachable_agents:
            say(f"unreachable: {agent}")
        if report.findings:
            table = Table(title="findings", title_justify="left")
            for column in ("kind", "object", "detail"):
                table.add_column(column, overflow="fold")
            for finding in report.findings:
                table.add_row(finding.kind, finding.object_id, finding.detail)
            show(table)
        render_unclaimed(unclaimed, with_examples=True)
        say("all consistent" if healthy else "problems found")
    if not healthy:
        raise typer.Exit(code=1)
