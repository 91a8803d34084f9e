"""services (storage nodes and API hosts) and node_job_results

SPEC 10: each `tether node` (binary cinder-volume) and each API host (cinder-scheduler) keeps one row, its
heartbeat and, for a node, its pool's capacity; a job's outcome is written by the node that ran it, in the
transaction that also notifies the API process waiting for it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 16:55:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    text = sqlmodel.sql.sqltypes.AutoString
    op.create_table(
        "services",
        sa.Column("binary", text(length=64), nullable=False),
        sa.Column("name", text(length=64), nullable=False),
        sa.Column("backend_name", text(length=64), nullable=True),
        sa.Column("pool_name", text(length=64), nullable=True),
        sa.Column("availability_zone", text(length=255), nullable=False),
        sa.Column("portal", text(length=255), nullable=True),
        sa.Column("volume_backend", text(length=32), nullable=True),
        sa.Column("target", text(length=32), nullable=True),
        sa.Column("thin", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("total_bytes", sa.BigInteger(), nullable=True),
        sa.Column("free_bytes", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("heartbeat_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("binary", "name"),
    )
    op.create_table(
        "node_job_results",
        sa.Column("job_id", sa.BigInteger(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("job_id"),
    )
    with op.batch_alter_table("volumes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_volumes_host"), ["host"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("volumes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_volumes_host"))
    op.drop_table("node_job_results")
    op.drop_table("services")
