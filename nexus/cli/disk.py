"""``nexusctl disk``: create, list, show and delete disks."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from nexus.cli.client import NexusClient
from nexus.cli.common import Outcome, report, run, start_operation
from nexus.cli.console import emit_json, fail, show
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
    parse_size,
)
from nexus.cli.refs import name_or_id, project_name, resource_name, validated
from schemas import api

app = typer.Typer(help="Create, list, show and delete disks.", no_args_is_help=True)

DiskArgument = Annotated[str, typer.Argument(help="The disk's name or id.", show_default=False)]


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="Name, unique in the project.", show_default=False)],
    size: Annotated[
        str | None,
        typer.Option(
            "--size",
            "-s",
            help="Size: 10GiB, 512MiB, or bytes. From a snapshot: at least its size, "
            "which is the default.",
            show_default=False,
        ),
    ] = None,
    block_size: Annotated[
        int | None,
        typer.Option(
            help="Bytes per block: 512, 2048 or 4096 (default 512; from a snapshot, its own).",
            show_default=False,
        ),
    ] = None,
    from_snapshot: Annotated[
        str | None,
        typer.Option(
            "--from-snapshot",
            help="Start as this snapshot's data (its name in the project, or its id): "
            "three regions and three read-only clones of the snapshot.",
            show_default=False,
        ),
    ] = None,
    project: ProjectOption = DEFAULT_PROJECT,
    wait: WaitOption = False,
    wait_timeout: WaitTimeoutOption = 300.0,
    output: OutputOption = Output.TEXT,
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Create a disk: three regions on three sleds, and with --from-snapshot three
    clones of the snapshot beside them. With --wait, watch it become ready."""
    if size is None and from_snapshot is None:
        fail("--size is required for a disk not made from a snapshot")
    try:
        size_bytes = None if size is None else parse_size(size)
    except ValueError as error:
        fail(str(error))
    payload = validated(
        api.DiskCreateRequest,
        project=project_name(project),
        name=resource_name(name, "disk"),
        size_bytes=size_bytes,
        **({} if block_size is None else {"block_size": block_size}),
        **({} if from_snapshot is None else {"snapshot": name_or_id(from_snapshot)}),
    )

    async def body() -> Outcome:
        async with NexusClient(amqp_url, timeout=timeout) as client:
            return await start_operation(
                client,
                api.DiskCreate(source=client.source, payload=payload),
                wait=wait,
                wait_timeout=wait_timeout,
                output=output,
            )

    outcome = run(body())
    made = f"disk {name}" + ("" if size_bytes is None else f" ({format_size(size_bytes)})")
    source = "" if from_snapshot is None else f" from snapshot {from_snapshot}"
    report(outcome, output, f"{made}{source} is ready: {outcome.resource_id}")


@app.command("list")
def list_disks(
    project: ProjectOption = DEFAULT_PROJECT,
    all_projects: Annotated[bool, typer.Option("--all-projects", help="Every project.")] = False,
    output: OutputOption = Output.TEXT,
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
    timeout: TimeoutOption = 10.0,
) -> None:
    """List the disks of a project (deleted ones are gone)."""
    scope = None if all_projects else project_name(project)

    async def body() -> tuple[api.DiskView, ...]:
        async with NexusClient(amqp_url, timeout=timeout) as client:
            request = api.DiskList(source=client.source, payload=api.ProjectFilter(project=scope))
            return (await client.call(request, api.DiskListReply)).payload

    disks = run(body())
    if output is Output.JSON:
        emit_json([disk.model_dump(mode="json") for disk in disks])
        return
    table = Table()
    for column in ("name", "id", "size", "state", "instance", "project", "created"):
        table.add_column(column, overflow="fold")
    for disk in disks:
        table.add_row(
            disk.name,
            str(disk.id),
            format_size(disk.size_bytes),
            disk.state.value,
            str(disk.instance_id or ""),
            disk.project,
            disk.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
        )
    show(table)


@app.command("show")
def show_disk(
    disk: DiskArgument,
    project: ProjectOption = DEFAULT_PROJECT,
    output: OutputOption = Output.TEXT,
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Show one disk."""
    ref = _ref(project, disk)

    async def body() -> api.DiskView:
        async with NexusClient(amqp_url, timeout=timeout) as client:
            request = api.DiskGet(source=client.source, payload=ref)
            return (await client.call(request, api.DiskReply)).payload

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
        ("size", f"{format_size(view.size_bytes)} ({view.size_bytes} bytes)"),
        ("block size", str(view.block_size)),
        ("state", view.state.value),
        ("instance", str(view.instance_id or "")),
        ("saga", str(view.saga_id or "")),
        *((("fault", view.fault_reason),) if view.fault_reason else ()),
        *((("snapshot", str(view.snapshot_id)),) if view.snapshot_id else ()),
        ("created", view.created_at.isoformat()),
        ("updated", view.updated_at.isoformat()),
    ):
        table.add_row(field, value)
    show(table)


@app.command()
def delete(
    disk: DiskArgument,
    project: ProjectOption = DEFAULT_PROJECT,
    wait: WaitOption = False,
    wait_timeout: WaitTimeoutOption = 300.0,
    output: OutputOption = Output.TEXT,
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Delete a detached disk and its regions."""
    ref = _ref(project, disk)

    async def body() -> Outcome:
        async with NexusClient(amqp_url, timeout=timeout) as client:
            return await start_operation(
                client,
                api.DiskDelete(source=client.source, payload=ref),
                wait=wait,
                wait_timeout=wait_timeout,
                output=output,
            )

    outcome = run(body())
    report(outcome, output, f"disk {disk} is deleted")


def _ref(project: str, resource: str) -> api.ResourceRef:
    return api.ResourceRef(project=project_name(project), resource=name_or_id(resource))
