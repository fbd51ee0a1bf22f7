"""``nexusctl``: the admin CLI. One sub-app per noun, each in its own module."""

from __future__ import annotations

import logging

import typer

from nexus.cli import db, dev, disk, doctor, events, instance, replacement, saga, sled, snapshot

app = typer.Typer(
    name="nexusctl",
    help=(
        "Administer the control plane: run a development stack, manage disks, "
        "snapshots, instances and sagas, see unclaimed events, check consistency, and migrate "
        "Nexus's database."
    ),
    no_args_is_help=True,
    # Commands report their own errors in one line; anything else is a bug, and
    # its plain traceback is the most useful thing to show.
    pretty_exceptions_enable=False,
)
app.add_typer(disk.app, name="disk")
app.add_typer(snapshot.app, name="snapshot")
app.add_typer(instance.app, name="instance")
app.add_typer(saga.app, name="saga")
app.add_typer(sled.app, name="sled")
app.add_typer(replacement.app, name="region-replacement")
app.add_typer(events.app, name="events")
app.command("doctor")(doctor.doctor)
app.add_typer(dev.app, name="dev")
app.add_typer(db.app, name="db")


@app.callback()
def main() -> None:
    # Library log records (aio-pika's reconnect attempts and the like) would break the
    # one-line error contract on stderr; the commands report failures themselves.
    logging.getLogger().addHandler(logging.NullHandler())
