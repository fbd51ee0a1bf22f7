"""Options every command that talks to Nexus shares, and parsing of what people type.

Values whose mistakes are the user's (sizes, names, ids) are parsed in the command body,
not by typer, so that a mistake is the one-line error of :func:`nexus.cli.console.fail`
rather than a usage box.
"""

from __future__ import annotations

import re
from enum import StrEnum
from fractions import Fraction
from typing import Annotated

import typer

from nexus.settings import NexusSettings

DEFAULT_PROJECT = "default"
DEFAULT_AMQP_URL: str = NexusSettings.model_fields["amqp_url"].default


class Output(StrEnum):
    TEXT = "text"
    JSON = "json"


AmqpUrlOption = Annotated[
    str,
    typer.Option(
        "--amqp-url",
        envvar="NEXUS_AMQP_URL",
        help="RabbitMQ that Nexus listens on: a URL, or a cluster's node URLs "
        "comma-separated (env NEXUS_AMQP_URL).",
        show_default=False,
    ),
]
ProjectOption = Annotated[
    str, typer.Option("--project", "-p", envvar="NEXUSCTL_PROJECT", help="Project of the resource.")
]
TimeoutOption = Annotated[
    float, typer.Option("--timeout", min=0.1, help="Seconds to wait for each reply from Nexus.")
]
OutputOption = Annotated[
    Output, typer.Option("--output", "-o", help="text for people, json for programs.")
]
WaitOption = Annotated[
    bool,
    typer.Option(
        "--wait/--no-wait",
        help="Follow the operation's progress events until its saga finishes; "
        "exit 1 unless it succeeded.",
    ),
]
WaitTimeoutOption = Annotated[
    float,
    typer.Option("--wait-timeout", min=1, help="With --wait: give up watching after this long."),
]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
_SIZE = re.compile(r"^\s*(?P<number>[+-]?\d+(?:\.\d+)?)\s*(?P<unit>[a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``10GiB``, ``512MiB``, ``1.5G`` or plain ``4096``; ValueError otherwise.

    A bare K/M/G/T is binary, as ``ls -h`` and Oxide's API mean it; KB/MB/GB/TB are decimal.
    """
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"invalid size {text!r}: expected a number and a unit like 10GiB")
    unit = match["unit"].lower()
    if unit not in _UNITS:
        raise ValueError(
            f"invalid size {text!r}: unknown unit {match['unit']!r} (use B, KiB, MiB, GiB or TiB)"
        )
    # Exact arithmetic: a float would round large byte counts.
    size = Fraction(match["number"]) * _UNITS[unit]
    if size <= 0:
        raise ValueError(f"invalid size {text!r}: must be more than zero")
    if size.denominator != 1:
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    return int(size)


def format_size(size: int) -> str:
    """The largest binary unit that shows ``size`` exactly, e.g. ``10 GiB``, ``1536 MiB``."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"
