"""``sled-agent``: the command line of one sled's agent."""

from __future__ import annotations

import asyncio
import logging
import signal
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

from schemas.health import Unhealthy, health_file_age
from schemas.logs import configure
from sled_agent.app import serve
from sled_agent.settings import LogLevel, SledSettings

app = typer.Typer(
    help="A sled's agent: runs simulated VM instances with real timing and publishes "
    "every state change to RabbitMQ.",
    no_args_is_help=True,
    add_completion=False,
)
errors = Console(stderr=True)
log = logging.getLogger("sled_agent")


@app.callback()
def _group() -> None:
    """Keeps ``run`` a subcommand, so more commands can join it."""


@app.command()
def run(
    sled_id: Annotated[
        uuid.UUID | None, typer.Option(help="This sled's id; commands arrive on sled.<id>.")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Where the instance database lives.")
    ] = None,
    hostname: Annotated[str | None, typer.Option(help="Announced at registration.")] = None,
    cpus: Annotated[int | None, typer.Option(help="vCPUs instances may reserve.")] = None,
    memory_bytes: Annotated[int | None, typer.Option(help="Memory instances may reserve.")] = None,
    amqp_url: Annotated[str | None, typer.Option(help="RabbitMQ URL.")] = None,
    heartbeat_seconds: Annotated[float | None, typer.Option(help="Time between beats.")] = None,
    create_seconds: Annotated[float | None, typer.Option(help="Time in creating.")] = None,
    boot_seconds: Annotated[float | None, typer.Option(help="Time in starting.")] = None,
    stop_seconds: Annotated[float | None, typer.Option(help="Time in stopping.")] = None,
    reboot_seconds: Annotated[float | None, typer.Option(help="Time in rebooting.")] = None,
    crash_rate_per_hour: Annotated[
        float | None, typer.Option(help="Unrequested crashes per running instance per hour.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the random crashes.")] = None,
    log_level: Annotated[LogLevel | None, typer.Option(help="Log level.")] = None,
) -> None:
    """Run the agent until SIGTERM or SIGINT.

    Every option may also be set as an environment variable SLED_<OPTION>,
    for example SLED_SLED_ID or SLED_DATA_DIR; an option given here wins.

    --sled-id and --data-dir are required, as options or from the environment.
    """
    flags: dict[str, Any] = {
        name: value
        for name, value in {
            "sled_id": sled_id,
            "data_dir": data_dir,
            "hostname": hostname,
            "cpus": cpus,
            "memory_bytes": memory_bytes,
            "amqp_url": amqp_url,
            "heartbeat_seconds": heartbeat_seconds,
            "create_seconds": create_seconds,
            "boot_seconds": boot_seconds,
            "stop_seconds": stop_seconds,
            "reboot_seconds": reboot_seconds,
            "crash_rate_per_hour": crash_rate_per_hour,
            "seed": seed,
            "log_level": log_level,
        }.items()
        if value is not None
    }
    try:
        settings = SledSettings(**flags)
    except ValidationError as error:
        errors.print(f"[red]invalid settings:[/red] {error}")
        raise typer.Exit(2) from None
    configure("sled-agent", settings.log_level)
    try:
        asyncio.run(_serve_until_signalled(settings))
    except Exception:
        log.exception("sled agent failed")
        raise typer.Exit(1) from None


async def _serve_until_signalled(settings: SledSettings) -> None:
    shutdown = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, shutdown.set)
    await serve(settings, shutdown)


@app.command()
def health(
    max_age: Annotated[
        float,
        typer.Option(help="Seconds since the agent last touched its health file, at most."),
    ] = 15.0,
    health_file: Annotated[
        Path | None,
        typer.Option(
            envvar="SLED_HEALTH_FILE",
            help="The file `sled-agent run` touches while connected to the broker.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Exit 0 if this host's agent was connected to the broker recently (a health check).

    `sled-agent run` touches SLED_HEALTH_FILE every few seconds while connected.
    """
    try:
        age = health_file_age(health_file, max_age, "SLED_HEALTH_FILE")
    except Unhealthy as error:
        typer.echo(f"sled-agent: unhealthy: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"healthy: broker connection up {age:.1f}s ago")
