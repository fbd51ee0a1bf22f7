"""Region replacement requests: one per region whose dataset was lost.

Omicron's ``region_replacement`` table (``nexus/db-model/src/region_replacement.rs``):
the phase of each replacement (the same seven states), the saga working on it, since
when, and what it waits for (``nexusctl region-replacement list|show``).

Revision ID: 0008
Revises: 0006
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007_snapshots"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "region_replacement",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("request_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("old_region_id", sa.Uuid(), nullable=False),
        sa.Column("old_dataset_id", sa.Uuid(), nullable=False),
        sa.Column("disk_id", sa.Uuid(), nullable=False),
        sa.Column("new_region_id", sa.Uuid(), nullable=True),
        sa.Column("new_dataset_id", sa.Uuid(), nullable=True),
        sa.Column(
            "state",
            sa.Enum(
                "requested",
                "allocating",
                "running",
                "driving",
                "replacement_done",
                "completing",
                "complete",
                name="replacement_state",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("operating_saga_id", sa.Uuid(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("state_changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("waiting_for", sa.String(length=500), nullable=True),
        sa.Column("repair_mode", sa.String(length=32), nullable=True),
        sa.Column("repair_progress", sa.Integer(), nullable=True),
        sa.Column("last_failure", sa.String(length=2000), nullable=True),
        sa.Column("history", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["old_region_id"],
            ["regions.id"],
            name=op.f("fk_region_replacement_old_region_id_regions"),
        ),
        sa.ForeignKeyConstraint(
            ["old_dataset_id"],
            ["datasets.id"],
            name=op.f("fk_region_replacement_old_dataset_id_datasets"),
        ),
        sa.ForeignKeyConstraint(
            ["disk_id"], ["disks.id"], name=op.f("fk_region_replacement_disk_id_disks")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_region_replacement")),
        sa.UniqueConstraint("old_region_id", name=op.f("uq_region_replacement_old_region_id")),
    )
    with op.batch_alter_table("region_replacement", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_region_replacement_disk_id"), ["disk_id"], unique=False
        )
        batch_op.create_index("ix_region_replacement_state", ["state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("region_replacement", schema=None) as batch_op:
        batch_op.drop_index("ix_region_replacement_state")
        batch_op.drop_index(batch_op.f("ix_region_replacement_disk_id"))
    op.drop_table("region_replacement")
