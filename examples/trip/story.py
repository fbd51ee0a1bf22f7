"""How the example tells what happens: one line each, with the time since the story began.

Saga actions call :func:`tell` as they run (as steno's ``trip.rs`` would log), so the
story shows the order in which the engine ran them. A node that runs again after a
crash would tell its line again; that is what happened.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta


class _Clock:
    started = time.monotonic()


def begin() -> None:
    _Clock.started = time.monotonic()


def tell(who: str, what: str) -> None:
    elapsed = (time.monotonic() - _Clock.started) * 1000
    print(f"  {elapsed:7.0f} ms  {who:<10} {what}", file=sys.stdout, flush=True)


def heading(text: str) -> None:
    print(f"\n{text}", file=sys.stdout, flush=True)


def milliseconds(span: timedelta) -> int:
    return round(span.total_seconds() * 1000)


def money(cents: int) -> str:
    return f"EUR {cents / 100:,.2f}"
