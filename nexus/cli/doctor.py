"""``nexusctl doctor``: Nexus's records against every agent's; exit 1 if anything is off."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from nexus.cli.client import NexusClient
from nexus.cli.common import run
from nexus.cli.console import emit_json, say, show
from nexus.cli.options import DEFAULT_AMQP_URL, AmqpUrlOption, Output, OutputOption
from schemas import api


def doctor(
    agent_timeout: Annotated[
        float,
        typer.Option("--timeout", min=0.1, max=120, help="Seconds each agent has to answer Nexus."),
    ] = 5.0,
    output: OutputOption = Output.TEXT,
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
) -> None:
    """Compare Nexus's records with every agent's: orphan regions, disks missing regions,
    instances on the wrong sled, sagas stuck. Run it on a quiet system.
    """

    async def body() -> api.DoctorReport:
        # Nexus asks the agents in parallel, each with agent_timeout; leave it room.
        async with NexusClient(amqp_url, timeout=agent_timeout + 10) as client:
            request = api.Doctor(
                source=client.source, payload=api.DoctorRequest(timeout_seconds=agent_timeout)
            )
            return (await client.call(request, api.DoctorReply)).payload

    report = run(body())
    healthy = not report.findings and not report.unreachable_agents
    if output is Output.JSON:
        emit_json(report.model_dump(mode="json") | {"healthy": healthy})
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
        say("all consistent" if healthy else "problems found")
    if not healthy:
        raise typer.Exit(code=1)
