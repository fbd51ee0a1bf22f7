"""Drop two states nothing sets: a saga ``failed`` and a wait ``expired``.

A saga whose node fails unwinds (``undone``, or ``stuck`` when an undo fails), and a
wait whose deadline passes is reconciled while still ``parked``. The CHECK constraints
of ``sagas.state`` and ``wait_rendezvous.state`` stop allowing the two values.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SAGA_STATES = ("running", "waiting", "done", "unwinding", "undone", "stuck", "unrecoverable")
WAIT_STATES = ("parked", "event_arrived", "ready", "resumed")


def _allow(table: str, constraint: str, states: Sequence[str]) -> None:
    """Replace the table's state CHECK constraint by one allowing exactly ``states``.

    In batch mode: SQLite rebuilds the table (the named constraint is reflected, so it
    can be dropped); PostgreSQL drops and adds the constraint in place.
    """
    name = op.f(f"ck_{table}_{constraint}")
    with op.batch_alter_table(table, schema=None) as batch_op:
        batch_op.drop_constraint(name, type_="check")
        batch_op.create_check_constraint(name, sa.column("state").in_(states))


def upgrade() -> None:
    _allow("sagas", "saga_state", SAGA_STATES)
    _allow("wait_rendezvous", "wait_state", WAIT_STATES)


def downgrade() -> None:
    _allow("sagas", "saga_state", (*SAGA_STATES, "failed"))
    _allow("wait_rendezvous", "wait_state", (*WAIT_STATES, "expired"))
