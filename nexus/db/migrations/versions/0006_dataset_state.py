"""A dataset's state: ``expunged`` with its sled.

An operator's ``nexusctl sled expunge`` (or a sled silent past
``NEXUS_SLED_EXPUNGE_SECONDS``) loses the sled's storage with it: its datasets take no
new regions, and the regions they hold are lost.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "state",
                sa.Enum(
                    "active",
                    "expunged",
                    name="dataset_state",
                    native_enum=False,
                    create_constraint=True,
                    length=32,
                ),
                nullable=False,
                server_default="active",
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        # The CHECK constraint goes first: SQLite's table copy would keep it otherwise.
        batch_op.drop_constraint(op.f("ck_datasets_dataset_state"), type_="check")
        batch_op.drop_column("state")
