"""``nexusctl instance``: create instances with disks attached, power them, delete them."""

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

app = typer.Typer(
    help="Create instances with disks attached, start, stop, reboot and delete them.",
    no_args_is_help=True,
)

InstanceArgument = Annotated[
    str, typer.Argument(help="The instance's name or id.", show_default=False)
]


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="Name, unique in the project.", show_default=False)],
    ncpus: Annotated[int, typer.Option("--ncpus", help="Virtual CPUs.")] = 1,
    memory: Annotated[str, typer.Option("--memory", help="Memory: 1GiB, 512MiB, or bytes.")] = (
        "1GiB"
    ),
    disks: Annotated[
        list[str] | None,
        typer.Option("--disk", "-d", help="A disk to attach (name or id); repeatable."),
    ] = None,
    project: ProjectOption = DEFAULT_PROJECT,
    wait: WaitOption = False,
    wait_timeout: WaitTimeoutOption = 300.0,
    output: OutputOption = Output.TEXT,
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Create an instance, attach its disks, and start it as a VMM on a sled with room."""
    try:
        memory_bytes = parse_size(memory)
    except ValueError as error:
        fail(str(error))
    payload = validated(
        api.InstanceCreateRequest,
        project=project_name(project),
        name=resource_name(name, "instance"),
        ncpus=ncpus,
        memory_bytes=memory_bytes,
        disks=tuple(name_or_id(disk) for disk in disks or ()),
    )

    async def body() -> Outcome:
        async with NexusClient(amqp_url, timeout=timeout) as client:
            return await start_operation(
                client,
                api.InstanceCreate(source=client.source, payload=payload),
                wait=wait,
                wait_timeout=wait_timeout,
                output=output,
            )

    report(run(body()), output, f"instance {name} is running")


def _act(
    action: api.InstanceAction,
    instance: str,
    project: str,
    wait: bool,
    wait_timeout: float,
    output: Output,
    amqp_url: str,
    timeout: float,
    done_message: str,
) -> None:
    payload = api.InstanceActionRequest(
        project=project_name(project), resource=name_or_id(instance), action=action
    )

    async def body() -> Outcome:
        async with NexusClient(amqp_url, timeout=timeout) as client:
            return await start_operation(
                client,
                api.InstanceAct(source=client.source, payload=payload),
                wait=wait,
                wait_timeout=wait_timeout,
                output=output,
            )

    outcome = run(body())
    if outcome.state == "unchanged" and output is Output.TEXT:
        done_message = f"instance {instance}: nothing to do, it already is as asked"
    report(outcome, output, done_message)


@app.command()
def start(
    instance: InstanceArgument,
    project: ProjectOption = DEFAULT_PROJECT,
    wait: WaitOption = False,
    wait_timeout: WaitTimeoutOption = 300.0,
    output: OutputOption = Output.TEXT,
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Boot a stopped instance."""
    _act(
        api.InstanceAction.START,
        instance,
        project,
        wait,
        wait_timeout,
        output,
        amqp_url,
        timeout,
        f"instance {instance} is running",
    )


@app.command()
def stop(
    instance: InstanceArgument,
    project: ProjectOption = DEFAULT_PROJECT,
    wait: WaitOption = False,
    wait_timeout: WaitTimeoutOption = 300.0,
    output: OutputOption = Output.TEXT,
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Stop a running instance."""
    _act(
        api.InstanceAction.STOP,
        instance,
        project,
        wait,
        wait_timeout,
        output,
        amqp_url,
        timeout,
        f"instance {instance} is stopped",
    )


@app.command()
def reboot(
    instance: InstanceArgument,
    project: ProjectOption = DEFAULT_PROJECT,
    wait: WaitOption = False,
    wait_timeout: WaitTimeoutOption = 300.0,
    output: OutputOption = Output.TEXT,
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Reboot a running instance."""
    _act(
        api.InstanceAction.REBOOT,
        instance,
        project,
        wait,
        wait_timeout,
        output,
        amqp_url,
        timeout,
        f"instance {instance} rebooted and is running",
    )


@app.command()
def delete(
    instance: InstanceArgument,
    project: ProjectOption = DEFAULT_PROJECT,
    wait: WaitOption = False,
    wait_timeout: WaitTimeoutOption = 300.0,
    output: OutputOption = Output.TEXT,
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Delete a stopped or failed instance (its disks are detached, not deleted)."""
    _act(
        api.InstanceAction.DELETE,
        instance,
        project,
        wait,
        wait_timeout,
        output,
        amqp_url,
        timeout,
        f"instance {instance} is deleted",
    )


@app.command("list")
def list_instances(
    project: ProjectOption = DEFAULT_PROJECT,
    all_projects: Annotated[bool, typer.Option("--all-projects", help="Every project.")] = False,
    output: OutputOption = Output.TEXT,
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
    timeout: TimeoutOption = 10.0,
) -> None:
    """List the instances of a project."""
    scope = None if all_projects else project_name(project)

    async def body() -> tuple[api.InstanceView, ...]:
        async with NexusClient(amqp_url, timeout=timeout) as client:
            request = api.InstanceList(
                source=client.source, payload=api.ProjectFilter(project=scope)
            )
            return (await client.call(request, api.InstanceListReply)).payload

    instances = run(body())
    if output is Output.JSON:
        emit_json([instance.model_dump(mode="json") for instance in instances])
        return
    table = Table()
    for column in ("name", "id", "cpus", "memory", "state", "sled", "vmm", "disks", "project"):
        table.add_column(column, overflow="fold")
    for instance in instances:
        sled = str(instance.sled_id or "")
        if instance.sled_id is not None and not instance.sled_reachable:
            sled += " (unreachable)"
        table.add_row(
            instance.name,
            str(instance.id),
            str(instance.ncpus),
            format_size(instance.memory_bytes),
            instance.state,
            sled,
            str(instance.vmm_id or ""),
            "\n".join(str(disk) for disk in instance.disk_ids),
            instance.project,
        )
    show(table)
