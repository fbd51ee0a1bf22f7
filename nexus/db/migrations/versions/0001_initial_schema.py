"""Initial schema: sleds, datasets, disks, regions, instances, sagas and messaging.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("sled_id", sa.Uuid(), nullable=False),
        sa.Column("queue_name", sa.String(length=255), nullable=False),
        sa.Column("capacity_bytes", sa.BigInteger(), nullable=False),
        sa.Column("free_bytes", sa.BigInteger(), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
    )
    op.create_index(op.f("ix_datasets_sled_id"), "datasets", ["sled_id"], unique=False)
    op.create_table(
        "inbox",
        sa.Column("message_id", sa.Uuid(), nullable=False),
        sa.Column("consumer", sa.String(length=200), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("message_id", "consumer", name=op.f("pk_inbox")),
    )
    op.create_table(
        "outbox",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("message_id", sa.Uuid(), nullable=False),
        sa.Column("exchange", sa.String(length=255), nullable=False),
        sa.Column("routing_key", sa.String(length=255), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("headers", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        sa.UniqueConstraint("message_id", name=op.f("uq_outbox_message_id")),
    )
    op.create_index(
        "ix_outbox_unsent",
        "outbox",
        ["id"],
        unique=False,
        sqlite_where=sa.text("sent_at IS NULL"),
        postgresql_where=sa.text("sent_at IS NULL"),
    )
    op.create_table(
        "sagas",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("definition_version", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "running",
                "waiting",
                "done",
                "unwinding",
                "undone",
                "stuck",
                "failed",
                "unrecoverable",
                name="saga_state",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("node_outputs", sa.JSON(), nullable=False),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sagas")),
    )
    op.create_index(
        "ix_sagas_state_lease_expires_at", "sagas", ["state", "lease_expires_at"], unique=False
    )
    op.create_table(
        "sleds",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("queue_name", sa.String(length=255), nullable=False),
        sa.Column("cpus", sa.Integer(), nullable=False),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "active",
                "unreachable",
                name="sled_state",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sleds")),
    )
    op.create_table(
        "unclaimed_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("wait_key", sa.String(length=255), nullable=False),
        sa.Column("message_id", sa.Uuid(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=True),
        sa.Column("arrived_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("moved_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_unclaimed_events")),
    )
    op.create_index(
        op.f("ix_unclaimed_events_wait_key"), "unclaimed_events", ["wait_key"], unique=False
    )
    op.create_table(
        "instances",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("ncpus", sa.Integer(), nullable=False),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sled_id", sa.Uuid(), nullable=True),
        sa.Column(
            "state",
            sa.Enum(
                "creating",
                "starting",
                "running",
                "stopping",
                "stopped",
                "rebooting",
                "failed",
                "deleting",
                "deleted",
                name="instance_state",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["sled_id"], ["sleds.id"], name=op.f("fk_instances_sled_id_sleds")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
    )
    op.create_index(op.f("ix_instances_sled_id"), "instances", ["sled_id"], unique=False)
    op.create_index(
        "uq_instances_project_name_live",
        "instances",
        ["project", "name"],
        unique=True,
        sqlite_where=sa.text("state != 'deleted'"),
        postgresql_where=sa.text("state != 'deleted'"),
    )
    op.create_table(
        "saga_log",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("saga_id", sa.Uuid(), nullable=False),
        sa.Column("node_name", sa.String(length=200), nullable=False),
        sa.Column(
            "event",
            sa.Enum(
                "started",
                "succeeded",
                "failed",
                "waiting",
                "resumed",
                "undo_started",
                "undo_finished",
                "undo_failed",
                name="saga_log_event",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("replica_id", sa.String(length=200), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["saga_id"], ["sagas.id"], name=op.f("fk_saga_log_saga_id_sagas")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_saga_log")),
    )
    op.create_index("ix_saga_log_saga_id_id", "saga_log", ["saga_id", "id"], unique=False)
    op.create_table(
        "wait_rendezvous",
        sa.Column("wait_key", sa.String(length=255), nullable=False),
        sa.Column("saga_id", sa.Uuid(), nullable=True),
        sa.Column("node_name", sa.String(length=200), nullable=True),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=True),
        sa.Column("min_generation", sa.BigInteger(), nullable=True),
        sa.Column("event_message_id", sa.Uuid(), nullable=True),
        sa.Column("event_payload", sa.JSON(), nullable=True),
        sa.Column("event_generation", sa.BigInteger(), nullable=True),
        sa.Column("event_arrived_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("parked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resumed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "state",
            sa.Enum(
                "parked",
                "event_arrived",
                "ready",
                "resumed",
                "expired",
                name="wait_state",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["saga_id"], ["sagas.id"], name=op.f("fk_wait_rendezvous_saga_id_sagas")
        ),
        sa.PrimaryKeyConstraint("wait_key", name=op.f("pk_wait_rendezvous")),
    )
    op.create_index(
        op.f("ix_wait_rendezvous_saga_id"), "wait_rendezvous", ["saga_id"], unique=False
    )
    op.create_index(
        "ix_wait_rendezvous_state_deadline", "wait_rendezvous", ["state", "deadline"], unique=False
    )
    op.create_index(
        "ix_wait_rendezvous_state_event_arrived_at",
        "wait_rendezvous",
        ["state", "event_arrived_at"],
        unique=False,
    )
    op.create_table(
        "disks",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("block_size", sa.Integer(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "creating",
                "detached",
                "attached",
                "deleting",
                "deleted",
                "faulted",
                name="disk_state",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("attached_instance_id", sa.Uuid(), nullable=True),
        sa.Column("saga_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["attached_instance_id"],
            ["instances.id"],
            name=op.f("fk_disks_attached_instance_id_instances"),
        ),
        sa.ForeignKeyConstraint(
            ["saga_id"], ["sagas.id"], name=op.f("fk_disks_saga_id_sagas"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_disks")),
    )
    op.create_index(
        op.f("ix_disks_attached_instance_id"), "disks", ["attached_instance_id"], unique=False
    )
    op.create_index(
        "uq_disks_project_name_live",
        "disks",
        ["project", "name"],
        unique=True,
        sqlite_where=sa.text("state != 'deleted'"),
        postgresql_where=sa.text("state != 'deleted'"),
    )
    op.create_table(
        "regions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("disk_id", sa.Uuid(), nullable=False),
        sa.Column("dataset_id", sa.Uuid(), nullable=False),
        sa.Column("block_size", sa.Integer(), nullable=False),
        sa.Column("extent_size", sa.BigInteger(), nullable=False),
        sa.Column("extent_count", sa.Integer(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "requested",
                "created",
                "tombstoned",
                "destroyed",
                "failed",
                name="region_state",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("port_number", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_regions_dataset_id_datasets")
        ),
        sa.ForeignKeyConstraint(["disk_id"], ["disks.id"], name=op.f("fk_regions_disk_id_disks")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_regions")),
    )
    op.create_index(op.f("ix_regions_dataset_id"), "regions", ["dataset_id"], unique=False)
    op.create_index(op.f("ix_regions_disk_id"), "regions", ["disk_id"], unique=False)


def downgrade() -> None:
    op.drop_table("regions")
    op.drop_table("disks")
    op.drop_table("wait_rendezvous")
    op.drop_table("saga_log")
    op.drop_table("instances")
    op.drop_table("unclaimed_events")
    op.drop_table("sleds")
    op.drop_table("sagas")
    op.drop_table("outbox")
    op.drop_table("inbox")
    op.drop_table("datasets")
