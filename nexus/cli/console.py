"""What every nexusctl command shares: where output goes and what a failure looks like."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich.console import Console, RenderableType

from schemas.redact import describe

stdout = Console()
stderr = Console(stderr=True)


def say(message: str) -> None:
    # Plain text: URLs and revision ids must not be read as rich markup.
    stdout.print(message, markup=False, highlight=False, soft_wrap=True)


def fail(message: str) -> NoReturn:
    """One line on stderr, exit status 1."""
    stderr.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)


@contextmanager
def errors_reported(subject: str | None = None) -> Iterator[None]:
    """Turn any exception from the body into :func:`fail`, never a traceback.

    ``subject`` (what the command was working on) starts the message.
    """
    try:
        yield
    except (typer.Exit, typer.Abort, typer.TyperException):
        # Typer's own ways to end a command (usage errors included) stay its own.
        raise
    except Exception as error:
        fail(f"{subject}: {describe(error)}" if subject else describe(error))


def show(renderable: RenderableType) -> None:
    """A rich table or text for people."""
    stdout.print(renderable)


def emit_json(document: object) -> None:
    """The one JSON document a command with ``--output json`` writes to stdout."""
    # print(), not rich: rich would wrap long lines and colour the text.
    print(json.dumps(document, indent=2, default=str))
