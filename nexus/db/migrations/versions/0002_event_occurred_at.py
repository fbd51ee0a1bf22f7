"""When the event a wait received happened at its source (the agent's clock).

Lets a saga's timeline show "region ready at the agent" beside "saga resumed".

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("wait_rendezvous", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("event_occurred_at", sa.DateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("wait_rendezvous", schema=None) as batch_op:
        batch_op.drop_column("event_occurred_at")
