"""Why a disk is faulted: the failure its saga could not clean up after.

A disk is faulted when an undo cannot finish (a region its agent will not destroy, say);
the reason was only in the saga's error. The disk now carries it, for ``nexusctl disk
show`` and the API.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("disks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fault_reason", sa.String(2000), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("disks", schema=None) as batch_op:
        batch_op.drop_column("fault_reason")
