"""idempotency_keys, and the reservation lease's index

SPEC 12: the answer to each keyed POST of a project, kept for TETHER_IDEMPOTENCY_TTL; and a partial index of the
`reserved` attachments by age, so the lease's sweep never scans the connected ones.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 13:56:20
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

RESERVED = sa.text("attach_status = 'reserved'")


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("project_id", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.Column("key", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.Column("fingerprint", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("resource_id", sqlmodel.sql.sqltypes.AutoString(length=36), nullable=True),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("response_body", sa.Text(), nullable=True),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("expires_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("project_id", "key"),
    )
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_idempotency_keys_expires_at"), ["expires_at"], unique=False)
    with op.batch_alter_table("attachments", schema=None) as batch_op:
        batch_op.create_index(
            "ix_attachments_reserved_created",
            ["created_at"],
            unique=False,
            postgresql_where=RESERVED,
            sqlite_where=RESERVED,
        )


def downgrade() -> None:
    with op.batch_alter_table("attachments", schema=None) as batch_op:
        batch_op.drop_index("ix_attachments_reserved_created", postgresql_where=RESERVED, sqlite_where=RESERVED)
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_idempotency_keys_expires_at"))
    op.drop_table("idempotency_keys")
