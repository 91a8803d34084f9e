"""attachments.terminated: the legacy face's os-terminate_connection, recorded

An attachment whose connection os-terminate_connection removed stays attached until os-detach, but no
initiator ACL is wanted for it any more: reconcile must not add it back.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 13:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("attachments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("terminated", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("attachments", schema=None) as batch_op:
        batch_op.drop_column("terminated")
