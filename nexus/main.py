"""``nexus``: run one Nexus replica (saga executor, event consumer, API, outbox relay)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Annotated

import typer

from nexus.app import NexusApp
from nexus.cli.console import errors_reported, say
from nexus.db import migrate
from nexus.settings import NexusSettings
from schemas import logs
from schemas.redact import redact_url

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
        str | None, typer.Option(help="RabbitMQ URL (NEXUS_AMQP_URL).", show_default=False)
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
    overrides = {
        key: value
        for key, value in {
            "replica_id": replica_id,
            "database_url": database_url,
            "amqp_url": amqp_url,
        }.items()
        if value is not None
    }
    with errors_reported("settings"):
        settings = NexusSettings(**overrides)  # type: ignore[arg-type]
    logs.configure("nexus", settings.log_level)
    with errors_reported("database"):
        if migrate_first:
            migrate.upgrade(settings.database_url)
        at = migrate.current(settings.database_url)
        head = migrate.head_revision()
        if at != head:
            raise RuntimeError(
                f"{redact_url(settings.database_url)} is at revision {at}, not {head}: "
                "run `nexusctl db upgrade` (or `nexus run --migrate`)"
            )
    with errors_reported("nexus"):
        asyncio.run(_serve(settings))
    say(f"nexus replica {settings.replica_id} stopped")


@app.command()
def health(
    max_age: Annotated[
        float, typer.Option(help="Seconds since the last good sweeper pass, at most.")
    ] = 15.0,
) -> None:
    """Exit 0 if this host's replica reached its database and broker recently (a health check).

    Reads NEXUS_HEALTH_FILE, which `nexus run` touches after every sweeper pass.
    """
    with errors_reported("health"):
        settings = NexusSettings()
        if settings.health_file is None:
            raise RuntimeError("NEXUS_HEALTH_FILE is not set")
        if not settings.health_file.exists():
            raise RuntimeError(f"{settings.health_file} does not exist: not up yet")
        age = time.time() - settings.health_file.stat().st_mtime
        if age > max_age:
            raise RuntimeError(f"last good pass {age:.0f}s ago (more than {max_age:g}s)")
    say(f"healthy: last good pass {age:.1f}s ago")


async def _serve(settings: NexusSettings) -> None:
    nexus = NexusApp(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await nexus.start()
    try:
        await stop.wait()
        log.info("stopping on signal")
    finally:
        with contextlib.suppress(Exception):
            await nexus.stop()
