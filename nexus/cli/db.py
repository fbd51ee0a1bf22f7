"""``nexusctl db``: migrate Nexus's database schema and see where it stands."""

from __future__ import annotations

from typing import Annotated

import typer

from nexus.cli.console import errors_reported, say
from schemas.redact import redact_url

# nexus.db.migrate (alembic, SQLAlchemy) and nexus.settings are imported by the commands
# that use them, so that `nexusctl --help` and every other command start without them.

app = typer.Typer(
    help="Migrate Nexus's database schema and see where it stands.", no_args_is_help=True
)

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="Database URL. Default: NEXUS_DATABASE_URL, else ./var/nexus.sqlite3.",
        show_default=False,
    ),
]


def _database_url(url: str | None) -> str:
    from nexus.settings import NexusSettings

    with errors_reported():
        return url if url is not None else NexusSettings().database_url


def _say_revision(database_url: str) -> None:
    from nexus.db import migrate

    revision = migrate.current(database_url)
    head = migrate.head_revision()
    if revision is None:
        where = f"no revision (empty schema; head is {head})"
    elif revision == head:
        where = f"revision {revision} (head)"
    else:
        where = f"revision {revision} (head is {head})"
    say(f"{redact_url(database_url)}: {where}")


@app.command()
def upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    url: UrlOption = None,
) -> None:
    """Migrate the schema up to REVISION (the latest by default)."""
    from nexus.db import migrate

    database_url = _database_url(url)
    with errors_reported(redact_url(database_url)):
        migrate.upgrade(database_url, revision)
        _say_revision(database_url)


@app.command()
def downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision; 'base' empties it.")],
    url: UrlOption = None,
) -> None:
    """Migrate the schema down to REVISION."""
    from nexus.db import migrate

    database_url = _database_url(url)
    with errors_reported(redact_url(database_url)):
        migrate.downgrade(database_url, revision)
        _say_revision(database_url)


@app.command()
def current(url: UrlOption = None) -> None:
    """Show the schema revision the database is at."""
    database_url = _database_url(url)
    with errors_reported(redact_url(database_url)):
        _say_revision(database_url)


@app.command()
def check(url: UrlOption = None) -> None:
    """Fail if the database schema differs from what this version of Nexus expects."""
    from nexus.db import migrate

    database_url = _database_url(url)
    with errors_reported(redact_url(database_url)):
        migrate.check(database_url)
        say(f"{redact_url(database_url)}: schema matches the models")
