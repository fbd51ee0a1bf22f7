"""Instances as VMMs: a ``vmms`` table, the instance's active VMM, expunged sleds.

An instance no longer keeps a sled: while it runs, its active VMM (``vmms``, one row per
run, with its own id) is on a sled. The sled agents of this version know nothing of the
instances the earlier agents ran in place (they start with an empty VMM table), so an
instance that was live (creating, starting, running, stopping, rebooting) or being
deleted is recorded ``failed``, from which it can be started again as a new VMM or
deleted; a stopped one stays stopped. ``deleting`` is no longer a state: a delete is one
transaction now. The downgrade cannot give an instance its sled back: it leaves
``sled_id`` empty.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SLED_STATES = ("active", "unreachable")
VMM_STATES = (
    "creating",
    "starting",
    "running",
    "stopping",
    "rebooting",
    "destroyed",
    "failed",
    "saga_unwound",
)
INSTANCE_STATES = (
    "creating",
    "starting",
    "running",
    "stopping",
    "stopped",
    "rebooting",
    "failed",
    "deleted",
)
LIVE_INSTANCE_STATES = ("creating", "starting", "running", "stopping", "rebooting", "deleting")


def _allow_sled_states(states: Sequence[str]) -> None:
    name = op.f("ck_sleds_sled_state")
    with op.batch_alter_table("sleds", schema=None) as batch_op:
        batch_op.drop_constraint(name, type_="check")
        batch_op.create_check_constraint(name, sa.column("state").in_(states))


def upgrade() -> None:
    _allow_sled_states((*SLED_STATES, "expunged"))
    op.create_table(
        "vmms",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("instance_id", sa.Uuid(), nullable=False),
        sa.Column("sled_id", sa.Uuid(), nullable=False),
        sa.Column("ncpus", sa.Integer(), nullable=False),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                *VMM_STATES,
                name="vmm_state",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instances.id"], name=op.f("fk_vmms_instance_id_instances")
        ),
        sa.ForeignKeyConstraint(["sled_id"], ["sleds.id"], name=op.f("fk_vmms_sled_id_sleds")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vmms")),
    )
    op.create_index(op.f("ix_vmms_instance_id"), "vmms", ["instance_id"], unique=False)
    op.create_index("ix_vmms_sled_id_state", "vmms", ["sled_id", "state"], unique=False)
    op.execute(
        sa.text("UPDATE instances SET state = 'failed' WHERE state IN :live").bindparams(
            sa.bindparam("live", LIVE_INSTANCE_STATES, expanding=True)
        )
    )
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("active_vmm_id", sa.Uuid(), nullable=True))
        batch_op.drop_index(batch_op.f("ix_instances_sled_id"))
        batch_op.drop_constraint(batch_op.f("fk_instances_sled_id_sleds"), type_="foreignkey")
        batch_op.drop_column("sled_id")
        batch_op.drop_constraint(batch_op.f("ck_instances_instance_state"), type_="check")
        batch_op.create_check_constraint(
            batch_op.f("ck_instances_instance_state"), sa.column("state").in_(INSTANCE_STATES)
        )


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("ck_instances_instance_state"), type_="check")
        batch_op.create_check_constraint(
            batch_op.f("ck_instances_instance_state"),
            sa.column("state").in_((*INSTANCE_STATES, "deleting")),
        )
        batch_op.add_column(sa.Column("sled_id", sa.Uuid(), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_instances_sled_id_sleds"), "sleds", ["sled_id"], ["id"]
        )
        batch_op.create_index(batch_op.f("ix_instances_sled_id"), ["sled_id"], unique=False)
        batch_op.drop_column("active_vmm_id")
    op.drop_index("ix_vmms_sled_id_state", table_name="vmms")
    op.drop_index(op.f("ix_vmms_instance_id"), table_name="vmms")
    op.drop_table("vmms")
    op.execute(sa.text("UPDATE sleds SET state = 'unreachable' WHERE state = 'expunged'"))
    _allow_sled_states(SLED_STATES)
