"""``crucible-agent``: the command line of one storage agent."""

from __future__ import annotations

import functools
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer

from crucible_agent.settings import CrucibleSettings
from schemas.service import check_health, run_service, settings_from

app = typer.Typer(
    help="A Crucible storage agent: creates and destroys regions (real files in its data "
    "directory), their snapshots and the read-only downstairs that serve them, on command "
    "from its queue crucible.<agent-id>, and publishes every change through an outbox.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Settings come from CRUCIBLE_* environment variables; flags of ``run`` override them."""


@app.command()
def run(
    agent_id: Annotated[
        uuid.UUID | None, typer.Option(help="This agent's id (env CRUCIBLE_AGENT_ID).")
    ] = None,
    sled_id: Annotated[
        uuid.UUID | None, typer.Option(help="The sled it runs on (env CRUCIBLE_SLED_ID).")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Regions and the state database live here (env CRUCIBLE_DATA_DIR)."),
    ] = None,
    capacity_bytes: Annotated[
        int | None,
        typer.Option(help="Total size of the regions it may hold (env CRUCIBLE_CAPACITY_BYTES)."),
    ] = None,
    amqp_url: Annotated[
        str | None,
        typer.Option(
            help="RabbitMQ URL, or a cluster's node URLs comma-separated (env CRUCIBLE_AMQP_URL)."
        ),
    ] = None,
    create_delay: Annotated[
        str | None,
        typer.Option(
            help="Extra time a create takes, seconds: fixed:S, uniform:LO,HI or "
            "lognormal:MEDIAN,SIGMA,MIN,MAX (env CRUCIBLE_CREATE_DELAY)."
        ),
    ] = None,
    clone_delay: Annotated[
        str | None,
        typer.Option(
            help="What a clone (a region with a source) takes on top of the create delay, "
            "in the same forms (env CRUCIBLE_CLONE_DELAY)."
        ),
    ] = None,
    clone_seconds_per_gib: Annotated[
        float | None,
        typer.Option(
            help="And further seconds per GiB of the clone (env CRUCIBLE_CLONE_SECONDS_PER_GIB)."
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the delay and fault draws (env CRUCIBLE_SEED).")
    ] = None,
    fail_fraction: Annotated[
        float | None,
        typer.Option(help="Fraction (0..1) of creates that fail (env CRUCIBLE_FAIL_FRACTION)."),
    ] = None,
    crash_mid_create_fraction: Annotated[
        float | None,
        typer.Option(
            help="Fraction (0..1) of creates during which the process SIGKILLs itself "
            "halfway through the extent files (env CRUCIBLE_CRASH_MID_CREATE_FRACTION)."
        ),
    ] = None,
    destroy_fail_fraction: Annotated[
        float | None,
        typer.Option(
            help="Fraction (0..1) of destroys that fail, leaving the region failed "
            "(env CRUCIBLE_DESTROY_FAIL_FRACTION)."
        ),
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            help="files (the default): regions are sparse extent files; trivial: no files "
            "are written, for the benchmark's peers phase only (env CRUCIBLE_BACKEND)."
        ),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR (env CRUCIBLE_LOG_LEVEL).")
    ] = None,
    announce_seconds: Annotated[
        float | None,
        typer.Option(
            help="How often it re-announces its capacity (env CRUCIBLE_ANNOUNCE_SECONDS)."
        ),
    ] = None,
    announce_coalesce_seconds: Annotated[
        float | None,
        typer.Option(
            help="How long after a change of free space it announces its capacity; one "
            "announcement covers every change made meanwhile "
            "(env CRUCIBLE_ANNOUNCE_COALESCE_SECONDS)."
        ),
    ] = None,
    space_reserve_bytes: Annotated[
        int | None,
        typer.Option(
            help="Bytes kept allocated in the data directory for the agent's own records "
            "when it fills; 0 keeps none (env CRUCIBLE_SPACE_RESERVE_BYTES)."
        ),
    ] = None,
) -> None:
    """Run the agent until SIGTERM or SIGINT."""
    flags: dict[str, Any] = {
        "agent_id": agent_id,
        "sled_id": sled_id,
        "data_dir": data_dir,
        "capacity_bytes": capacity_bytes,
        "amqp_url": amqp_url,
        "create_delay": create_delay,
        "clone_delay": clone_delay,
        "clone_seconds_per_gib": clone_seconds_per_gib,
        "seed": seed,
        "fail_fraction": fail_fraction,
        "crash_mid_create_fraction": crash_mid_create_fraction,
        "destroy_fail_fraction": destroy_fail_fraction,
        "backend": backend,
        "log_level": log_level,
        "announce_seconds": announce_seconds,
        "announce_coalesce_seconds": announce_coalesce_seconds,
        "space_reserve_bytes": space_reserve_bytes,
    }
    settings = settings_from("crucible-agent", CrucibleSettings, flags)
    # Imported here: `crucible-agent health`, a container's health check every few
    # seconds, needs none of the agent.
    from crucible_agent import app as agent_app

    run_service(
        "crucible-agent",
        settings.log_level,
        functools.partial(agent_app.run, settings),
        traced_as=f"crucible/{settings.agent_id}",
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
            envvar="CRUCIBLE_HEALTH_FILE",
            help="The file `crucible-agent run` touches every few seconds while it is healthy.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Exit 0 if this host's agent was healthy recently (a health check).

    `crucible-agent run` touches CRUCIBLE_HEALTH_FILE every few seconds while its outbox
    relay and its announcer complete their passes, its broker connection is up and
    nothing has been failing for long; its log says what is wrong otherwise.
    """
    check_health("crucible-agent", health_file, max_age, "CRUCIBLE_HEALTH_FILE", "all tasks well")
