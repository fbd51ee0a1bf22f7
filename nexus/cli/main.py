"""``nexusctl``: the admin CLI. One sub-app per noun, each in its own module."""

from __future__ import annotations

import typer

from nexus.cli import db

app = typer.Typer(
    name="nexusctl",
    help=(
        "Administer the control plane: run a development stack, manage disks, "
        "instances and sagas, and migrate Nexus's database."
    ),
    no_args_is_help=True,
    # Commands report their own errors in one line; anything else is a bug, and
    # its plain traceback is the most useful thing to show.
    pretty_exceptions_enable=False,
)
app.add_typer(db.app, name="db")
