"""``nexusctl dev``: run the control plane locally for development.

Only the command and its options live here; the work (private servers, alembic, the
transport) is in :mod:`nexus.cli.dev_stack`, imported when the command runs, so that
``nexusctl --help`` and every other command start without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nexus.cli.options import DEFAULT_AMQP_URL, AmqpUrlOption

app = typer.Typer(help="Run the control plane locally for development.", no_args_is_help=True)


@app.command("run-all")
def run_all(
    amqp_url: AmqpUrlOption = DEFAULT_AMQP_URL,
    postgres: Annotated[
        bool,
        typer.Option("--postgres", help="A private PostgreSQL cluster instead of SQLite."),
    ] = False,
    ha_db: Annotated[
        bool,
        typer.Option(
            "--ha-db",
            help="A replicated PostgreSQL instead: 3 nodes under Patroni with etcd, a "
            "synchronous standby, Nexus on a multi-host address that finds the primary.",
        ),
    ] = False,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            help="Databases, agents' data and logs. Default ./var/dev (./var/demo with --demo).",
            show_default=False,
        ),
    ] = None,
    demo: Annotated[
        bool,
        typer.Option("--demo", help="Run the demo once the stack is up, then stop everything."),
    ] = False,
    create_delay: Annotated[
        str, typer.Option(help="How long a region takes at its agent (CRUCIBLE_CREATE_DELAY).")
    ] = "uniform:0.2,1.5",
) -> None:
    """Start RabbitMQ (a private node if none answers at --amqp-url), the database,
    2 Nexus replicas, 3 crucible agents and 2 sled agents; stop them all on Ctrl-C.

    Each run starts from an empty state directory; the previous run's files (logs
    included) stay there until then.
    """
    from nexus.cli import dev_stack

    dev_stack.run_all(amqp_url, postgres, state_dir, demo, create_delay, ha_db=ha_db)
