"""tether_remove_attachment(): an attachment's delete and its volume's recompute in one round trip (PostgreSQL)

Issue 17: the attach cycle's DELETE was six round trips (BEGIN, the volume's row lock, the delete, the recompute,
the remaining attachments, COMMIT). The recompute must see what committed while the delete waited for the volume's
lock, so the steps cannot share one statement's snapshot; a volatile PL/pgSQL function runs them as separate
statements (a fresh snapshot each) in one call. Its recompute is app/services/transitions.py's `_RECOMPUTE`, written
in SQL; SQLite has no functions and runs the Python transaction.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 21:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# The recompute: any attached -> in-use/attached; else attaching -> attaching/attaching; else any -> reserved/reserved;
# none -> available/detached; only for the statuses that follow the attachments (transitions.ATTACH_DRIVEN).
FUNCTION = """
CREATE OR REPLACE FUNCTION tether_remove_attachment(p_volume_id varchar, p_attachment_id varchar, p_now timestamptz)
RETURNS SETOF attachments LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_attached boolean;
    v_attaching boolean;
    v_any boolean;
BEGIN
    PERFORM 1 FROM volumes WHERE id = p_volume_id FOR UPDATE;
    DELETE FROM attachments WHERE id = p_attachment_id;
    SELECT coalesce(bool_or(attach_status = 'attached'), false),
           coalesce(bool_or(attach_status = 'attaching'), false),
           count(*) > 0
      INTO v_attached, v_attaching, v_any
      FROM attachments WHERE volume_id = p_volume_id;
    UPDATE volumes SET
        status = CASE WHEN v_attached THEN 'in-use' WHEN v_attaching THEN 'attaching'
                      WHEN v_any THEN 'reserved' ELSE 'available' END,
        attach_status = CASE WHEN v_attached THEN 'attached' WHEN v_attaching THEN 'attaching'
                             WHEN v_any THEN 'reserved' ELSE 'detached' END,
        updated_at = p_now
    WHERE id = p_volume_id AND status IN ('available', 'reserved', 'attaching', 'in-use', 'detaching');
    RETURN QUERY SELECT * FROM attachments WHERE volume_id = p_volume_id ORDER BY created_at;
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS tether_remove_attachment(varchar, varchar, timestamptz)")
