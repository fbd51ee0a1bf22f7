"""Snapshots: a disk's ``snapshots`` and each region's part of one, ``region_snapshots``
(Omicron's ``snapshot`` and ``region_snapshot``), with Nexus's record of what the
crucible agents said of each region's snapshot and running snapshot.

Revision ID: 0007_snapshots
Revises: 0006
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_snapshots"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SNAPSHOT_STATES = ("creating", "ready", "faulted", "deleting", "destroyed")
AGENT_SNAPSHOT_STATES = ("created", "destroyed")
RUNNING_SNAPSHOT_STATES = ("requested", "created", "tombstoned", "destroyed", "failed")


def _states(name: str, values: Sequence[str]) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=32)


def upgrade() -> None:
    op.create_table(
        "snapshots",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("disk_id", sa.Uuid(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("block_size", sa.Integer(), nullable=False),
        sa.Column("extent_size", sa.BigInteger(), nullable=False),
        sa.Column("extent_count", sa.Integer(), nullable=False),
        sa.Column("state", _states("snapshot_state", SNAPSHOT_STATES), nullable=False),
        sa.Column("fault_reason", sa.String(length=2000), nullable=True),
        sa.Column("saga_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["disk_id"], ["disks.id"], name=op.f("fk_snapshots_disk_id_disks")),
        sa.ForeignKeyConstraint(
            ["saga_id"],
            ["sagas.id"],
            name=op.f("fk_snapshots_saga_id_sagas"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_snapshots")),
    )
    op.create_index(op.f("ix_snapshots_disk_id"), "snapshots", ["disk_id"], unique=False)
    op.create_index(
        "uq_snapshots_project_name_live",
        "snapshots",
        ["project", "name"],
        unique=True,
        sqlite_where=sa.text("state != 'destroyed'"),
        postgresql_where=sa.text("state != 'destroyed'"),
    )
    op.create_table(
        "region_snapshots",
        sa.Column("dataset_id", sa.Uuid(), nullable=False),
        sa.Column("region_id", sa.Uuid(), nullable=False),
        sa.Column("snapshot_id", sa.Uuid(), nullable=False),
        sa.Column("snapshot_addr", sa.String(length=255), nullable=True),
        sa.Column("volume_references", sa.BigInteger(), nullable=False),
        sa.Column("deleting", sa.Boolean(), nullable=False),
        sa.Column(
            "snapshot_state",
            _states("agent_snapshot_state", AGENT_SNAPSHOT_STATES),
            nullable=True,
        ),
        sa.Column("snapshot_generation", sa.BigInteger(), nullable=False),
        sa.Column(
            "running_state",
            _states("running_snapshot_state", RUNNING_SNAPSHOT_STATES),
            nullable=True,
        ),
        sa.Column("running_generation", sa.BigInteger(), nullable=False),
        sa.Column("port_number", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_region_snapshots_dataset_id_datasets")
        ),
        sa.ForeignKeyConstraint(
            ["snapshot_id"],
            ["snapshots.id"],
            name=op.f("fk_region_snapshots_snapshot_id_snapshots"),
        ),
        sa.PrimaryKeyConstraint(
            "dataset_id", "region_id", "snapshot_id", name=op.f("pk_region_snapshots")
        ),
    )
    op.create_index(
        "ix_region_snapshots_region_id_snapshot_id",
        "region_snapshots",
        ["region_id", "snapshot_id"],
        unique=True,
    )
    op.create_index(
        op.f("ix_region_snapshots_snapshot_id"), "region_snapshots", ["snapshot_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_region_snapshots_snapshot_id"), table_name="region_snapshots")
    op.drop_index("ix_region_snapshots_region_id_snapshot_id", table_name="region_snapshots")
    op.drop_table("region_snapshots")
    op.drop_index("uq_snapshots_project_name_live", table_name="snapshots")
    op.drop_index(op.f("ix_snapshots_disk_id"), table_name="snapshots")
    op.drop_table("snapshots")
