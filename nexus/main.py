"""``nexus``: run one Nexus replica (saga executor, event consumer, API, outbox relay)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from nexus.settings import NexusSettings
from schemas.redact import redact_url
from schemas.service import check_health, run_service, serve, settings_from
from schemas.tasks import until_up

# The replica itself (saga engine, database layer, transport) is imported by the commands
# that run it: `nexus health`, a container's health check every few seconds, then costs a
# fraction of the CPU.
if TYPE_CHECKING:
    from nexus.app import NexusApp

app = typer.Typer(
    name="nexus",
    help="Run a Nexus replica: sagas that park on agent notifications instead of polling.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("nexus")


@app.callback()
def main() -> None:
    """Nexus, the control plane's brain. Settings come from NEXUS_* variables and flags."""


@app.command()
def run(
    replica_id: Annotated[
        str | None, typer.Option(help="This replica's id (NEXUS_REPLICA_ID).")
    ] = None,
    database_url: Annotated[
        str | None, typer.Option(help="Database URL (NEXUS_DATABASE_URL).", show_default=False)
    ] = None,
    amqp_url: Annotated[
        str | None,
        typer.Option(
            help="RabbitMQ URL, or a cluster's node URLs comma-separated (NEXUS_AMQP_URL).",
            show_default=False,
        ),
    ] = None,
    migrate_first: Annotated[
        bool,
        typer.Option(
            "--migrate/--no-migrate",
            help="Upgrade the database schema before starting (one replica at a time).",
        ),
    ] = False,
) -> None:
    """Run until SIGTERM or SIGINT; then stop consuming, finish the step at hand, exit."""
    flags = {"replica_id": replica_id, "database_url": database_url, "amqp_url": amqp_url}
    settings = settings_from("nexus", NexusSettings, flags)
    from nexus.app import NexusApp

    run_replica(NexusApp(settings), migrate_first=migrate_first)


def run_replica(nexus: NexusApp, *, migrate_first: bool = False) -> None:
    """Serve ``nexus`` as ``nexus run`` does, until SIGTERM or SIGINT.

    The benchmark's replica and the crash tests' run this too, with the definitions and
    faults they built their ``NexusApp`` with.
    """
    from nexus.db import migrate

    settings = nexus.settings

    async def replica(stop: asyncio.Event) -> None:
        # A replica starting while its database restarts waits for it (a supervisor
        # restarting it meanwhile would gain nothing).
        database = redact_url(settings.database_url)
        if migrate_first:
            await until_up(database, lambda: migrate.upgrade_async(settings.database_url))
        at = await until_up(
            database, lambda: migrate.current_async(settings.database_url), stop=stop
        )
        if stop.is_set():
            return
        head = migrate.head_revision()
        if at != head:
            raise RuntimeError(
                f"{redact_url(settings.database_url)} is at revision {at}, not {head}: "
                "run `nexusctl db upgrade` (or `nexus run --migrate`)"
            )
        await serve(nexus, stop)

    run_service(
        "nexus",
        settings.log_level,
        replica,
        traced_as=f"nexus/{settings.replica_id}",
        trace_file=settings.trace_file,
    )
    log.info("nexus replica %s stopped", settings.replica_id)


@app.command()
def health(
    max_age: Annotated[
        float, typer.Option(help="Seconds since the replica was last seen healthy, at most.")
    ] = 15.0,
    health_file: Annotated[
        Path | None,
        typer.Option(
            envvar="NEXUS_HEALTH_FILE",
            help="The file `nexus run` touches every second while it is healthy.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Exit 0 if this host's replica was healthy recently (a health check).

    `nexus run` touches NEXUS_HEALTH_FILE every second while its outbox relay and sweeper
    complete their passes (which reach the database and the broker), its broker
    connection is up and no consumed message has been failing for long; its log says
    what is wrong otherwise.
    """
    check_health("nexus", health_file, max_age, "NEXUS_HEALTH_FILE", "all tasks well")
