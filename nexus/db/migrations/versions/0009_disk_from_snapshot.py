"""Disks made from a snapshot: the disk's source snapshot, and clone regions.

A disk created from a snapshot (``disk_create_from_snapshot``) has three fresh regions
and three clones, each a read-only copy of one of the snapshot's running snapshots.
``disks.create_snapshot_id`` is Omicron's column of that name; ``regions.read_only`` and
``regions.source`` record what the crucible agent records of a clone (the address it
copies from), so the doctor can tell clones from a disk's writable regions.

Revision ID: 0009_disk_from_snapshot
Revises: 0007_snapshots
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_disk_from_snapshot"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("disks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("create_snapshot_id", sa.Uuid(), nullable=True))
    with op.batch_alter_table("regions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("read_only", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("source", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("regions", schema=None) as batch_op:
        batch_op.drop_column("source")
        batch_op.drop_column("read_only")
    with op.batch_alter_table("disks", schema=None) as batch_op:
        batch_op.drop_column("create_snapshot_id")
