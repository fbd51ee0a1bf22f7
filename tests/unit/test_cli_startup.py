"""`nexusctl` starts without what only some commands need (issue #16 item 6): the
database layer (SQLAlchemy, alembic) and the broker client (aio-pika, the message
models) are imported by the commands that use them. Speed itself is measured by
bench/cli_startup.py, not here; this keeps the imports that cost it from coming back."""

from __future__ import annotations

import subprocess
import sys

HEAVY = (
    "sqlalchemy",
    "alembic",
    "aio_pika",
    "schemas.transport",
    "nexus.devstack.servers",
    "opentelemetry",
)


def test_the_cli_imports_nothing_heavy_until_a_command_needs_it() -> None:
    probe = f"import sys, nexus.cli.main; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", f"imported at start: {done.stdout.strip()}"
