"""``sled-agent``: the command line of one sled's agent."""

from __future__ import annotations

import functools
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer

from schemas.service import check_health, run_service, settings_from
from sled_agent.settings import LogLevel, SledSettings

app = typer.Typer(
    help="A sled's agent: runs simulated VMMs (one run of a VM instance each) with real "
    "timing and publishes every state change to RabbitMQ.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _group() -> None:
    """Keeps ``run`` a subcommand, so more commands can join it."""


@app.command()
def run(
    sled_id: Annotated[
        uuid.UUID | None, typer.Option(help="This sled's id; commands arrive on sled.<id>.")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where the VMM database lives.")] = None,
    hostname: Annotated[str | None, typer.Option(help="Announced at registration.")] = None,
    cpus: Annotated[int | None, typer.Option(help="vCPUs VMMs may reserve.")] = None,
    memory_bytes: Annotated[int | None, typer.Option(help="Memory VMMs may reserve.")] = None,
    amqp_url: Annotated[
        str | None, typer.Option(help="RabbitMQ URL, or a cluster's node URLs comma-separated.")
    ] = None,
    heartbeat_seconds: Annotated[float | None, typer.Option(help="Time between beats.")] = None,
    boot_seconds: Annotated[float | None, typer.Option(help="Time in starting.")] = None,
    stop_seconds: Annotated[float | None, typer.Option(help="Time in stopping.")] = None,
    reboot_seconds: Annotated[float | None, typer.Option(help="Time in rebooting.")] = None,
    repair_seconds: Annotated[
        float | None, typer.Option(help="How long a live repair of a disk's volume takes.")
    ] = None,
    crash_rate_per_hour: Annotated[
        float | None, typer.Option(help="Unrequested crashes per running VMM per hour.")
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
        "sled_id": sled_id,
        "data_dir": data_dir,
        "hostname": hostname,
        "cpus": cpus,
        "memory_bytes": memory_bytes,
        "amqp_url": amqp_url,
        "heartbeat_seconds": heartbeat_seconds,
        "boot_seconds": boot_seconds,
        "stop_seconds": stop_seconds,
        "reboot_seconds": reboot_seconds,
        "repair_seconds": repair_seconds,
        "crash_rate_per_hour": crash_rate_per_hour,
        "seed": seed,
        "log_level": log_level,
    }
    settings = settings_from("sled-agent", SledSettings, flags)
    # Imported here: `sled-agent health`, a container's health check every few seconds,
    # needs none of the agent.
    from sled_agent.app import serve

    run_service(
        "sled-agent",
        settings.log_level,
        functools.partial(serve, settings),
        traced_as=f"sled/{settings.sled_id}",
        trace_file=settings.trace_file,
    )


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
            help="The file `sled-agent run` touches every few seconds while it is healthy.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Exit 0 if this host's agent was healthy recently (a health check).

    `sled-agent run` touches SLED_HEALTH_FILE every few seconds while its outbox relay and its
    heartbeats complete their passes, its broker connection is up and nothing has been
    failing for long; its log says what is wrong otherwise.
    """
    check_health("sled-agent", health_file, max_age, "SLED_HEALTH_FILE", "all tasks well")
