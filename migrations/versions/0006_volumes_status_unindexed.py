"""volumes.status without an index, so a volume's status change is a HOT update

Issue 17: every attach cycle changes its volume's status three times (the claim, the complete, the delete's
recompute), and an index on a column that changes makes each of those updates write a new entry in every one of
the table's six indexes (PostgreSQL's heap-only tuple update applies only when no indexed column changed). What
reads by status reads more than one status's rows or has a better index: the reconcile's look for `creating` and
`deleting` volumes, once per TETHER_RECONCILE_INTERVAL, reads the table (a node: its own volumes' rows, by host
prefix), the lists filtered by status are per project (`ix_volumes_project_created`), `tether status` counts
every row.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 11:45:00
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("volumes", schema=None) as batch_op:
        batch_op.drop_index("ix_volumes_status")


def downgrade() -> None:
    with op.batch_alter_table("volumes", schema=None) as batch_op:
        batch_op.create_index("ix_volumes_status", ["status"], unique=False)
