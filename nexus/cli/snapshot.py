"""``nexusctl snapshot``: create, list, show and delete snapshots of disks."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from nexus.cli.client import NexusClient
from nexus.cli.common import Outcome, report, run, start_operation
from nexus.cli.console import emit_json, show
from nexus.cli.options import (
    DEFAULT_AMQP_URL,
    DEFAULT_PROJECT,
    AmqpUrlOption,
    Output,
    OutputOption,
    ProjectOption,
    TimeoutOption,
    WaitOption,
    WaitTimeoutOption,
    format_size,
)
from nexus.cli.refs import name_or_id, project_name, resource_name, validated
from schemas import api

app = typer.Typer(help="Create, list, show and delete snapshots of disks.", no_args_is_help=True)

SnapshotArgument = Annotated[
    str, typer.Argument(help="The snapshot's name or id.", show_default=False)
]


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="Name, unique in the project.", show_default=False)],
    disk: Annotated[
        str, typer.Option("--disk", "-d", help="The disk's name or id.", show_default=False)
    ],
    project: ProjectOption = DEFAULT_PROJECT,
    wait: WaitOption = False,
    wait_timeout: WaitTimeoutOption = 300.0,
    output: OutputOption = Output.TEXT,
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Snapshot a disk: each of its three regions, each served read-only. A disk attached
    to a running instance is flushed first. With --wait, watch it become ready."""
    payload = validated(
        api.SnapshotCreateRequest,
        project=project_name(project),
        name=resource_name(name, "snapshot"),
        disk=name_or_id(disk),
    )

    async def body() -> Outcome:
        async with NexusClient(amqp_url, timeout=timeout) as client:
            return await start_operation(
                client,
                api.SnapshotCreate(source=client.source, payload=payload),
                wait=wait,
                wait_timeout=wait_timeout,
                output=output,
            )

    outcome = run(body())
    report(outcome, output, f"snapshot {name} of disk {disk} is ready: {outcome.resource_id}")


@app.command("list")
def list_snapshots(
    project: ProjectOption = DEFAULT_PROJECT,
    all_projects: Annotated[bool, typer.Option("--all-projects", help="Every project.")] = False,
    output: OutputOption = Output.TEXT,
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
    timeout: TimeoutOption = 10.0,
) -> None:
    """List the snapshots of a project (destroyed ones are gone)."""
    scope = None if all_projects else project_name(project)

    async def body() -> tuple[api.SnapshotView, ...]:
        async with NexusClient(amqp_url, timeout=timeout) as client:
            request = api.SnapshotList(
                source=client.source, payload=api.ProjectFilter(project=scope)
            )
            return (await client.call(request, api.SnapshotListReply)).payload

    snapshots = run(body())
    if output is Output.JSON:
        emit_json([snapshot.model_dump(mode="json") for snapshot in snapshots])
        return
    table = Table()
    for column in ("name", "id", "disk", "size", "state", "project", "created"):
        table.add_column(column, overflow="fold")
    for snapshot in snapshots:
        table.add_row(
            snapshot.name,
            str(snapshot.id),
            str(snapshot.disk_id),
            format_size(snapshot.size_bytes),
            snapshot.state,
            snapshot.project,
            snapshot.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
        )
    show(table)


@app.command("show")
def show_snapshot(
    snapshot: SnapshotArgument,
    project: ProjectOption = DEFAULT_PROJECT,
    output: OutputOption = Output.TEXT,
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Show one snapshot and its parts (each region's snapshot and running snapshot)."""
    ref = _ref(project, snapshot)

    async def body() -> api.SnapshotView:
        async with NexusClient(amqp_url, timeout=timeout) as client:
            request = api.SnapshotGet(source=client.source, payload=ref)
            return (await client.call(request, api.SnapshotReply)).payload

    view = run(body())
    if output is Output.JSON:
        emit_json(view.model_dump(mode="json"))
        return
    table = Table(show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for field, value in (
        ("name", view.name),
        ("id", str(view.id)),
        ("project", view.project),
        ("disk", str(view.disk_id)),
        ("size", f"{format_size(view.size_bytes)} ({view.size_bytes} bytes)"),
        ("block size", str(view.block_size)),
        ("state", view.state),
        ("saga", str(view.saga_id or "")),
        *((("fault", view.fault_reason),) if view.fault_reason else ()),
        ("created", view.created_at.isoformat()),
        ("updated", view.updated_at.isoformat()),
    ):
        table.add_row(field, value)
    show(table)
    parts = Table(title="parts")
    for column in ("region", "dataset", "snapshot", "running", "address"):
        parts.add_column(column, overflow="fold")
    for part in view.parts:
        parts.add_row(
            str(part.region_id),
            str(part.dataset_id),
            part.snapshot_state or "asked",
            part.running_state or "",
            part.snapshot_addr or "",
        )
    show(parts)


@app.command()
def delete(
    snapshot: SnapshotArgument,
    project: ProjectOption = DEFAULT_PROJECT,
    wait: WaitOption = False,
    wait_timeout: WaitTimeoutOption = 300.0,
    output: OutputOption = Output.TEXT,
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Delete a snapshot: its running snapshots stopped, then its region snapshots."""
    ref = _ref(project, snapshot)

    async def body() -> Outcome:
        async with NexusClient(amqp_url, timeout=timeout) as client:
            return await start_operation(
                client,
                api.SnapshotDelete(source=client.source, payload=ref),
                wait=wait,
                wait_timeout=wait_timeout,
                output=output,
            )

    outcome = run(body())
    report(outcome, output, f"snapshot {snapshot} is deleted")


def _ref(project: str, resource: str) -> api.ResourceRef:
    return api.ResourceRef(project=project_name(project), resource=name_or_id(resource))
