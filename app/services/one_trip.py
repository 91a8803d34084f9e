"""The attach cycle's three hot transitions on PostgreSQL, each one round trip (issue 17).

On this kind of machine a database round trip costs the server ~0.2-0.3 ms of CPU whatever it carries, so the
cycle (reserve-and-connect, os-complete, delete) is as fast as its round trips are few. Each transition here is
one statement that PostgreSQL runs atomically (no BEGIN, no COMMIT), with the same meaning as the multi-statement
transaction in transitions.py that SQLite (and every other path) runs:

- **claim and insert** (`POST /attachments` with a connector): the volume's compare-and-swap, the attachment
  inserted already connecting and its connector rows, as a writable CTE. Nothing in it reads another attachment,
  so the statement's snapshot cannot be stale; CHAP credentials are made on a volume's first connect
  (`COALESCE`), race-free.
- **complete** (`os-complete`): the volume's row lock first (the order every transition takes), then the
  attachment, then the volume `in-use` — which is what recomputing it gives once one attachment is attached.
- **remove** (`DELETE /attachments/{id}`): lock, delete, recompute from the *remaining* attachments, return them.
  A recompute must see what committed while it waited for the lock, which one statement's snapshot does not; the
  migration 0005's function `tether_remove_attachment` runs the three as separate statements (PL/pgSQL's volatile
  functions take a fresh snapshot per statement) in one round trip.

A claim that fails here (a busy or missing volume, Nova's second attachment of the same instance) changed
nothing; the caller runs the full transaction, which tells the cases apart.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy import (
    ARRAY,
    Boolean,
    String,
    bindparam,
    column,
    exists,
    func,
    insert,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Attachment, AttachStatus, Volume, VolumeStatus
from app.services.transitions import (
    ATTACH_DRIVEN,
    ATTACHMENT_COLUMNS,
    CONNECTED,
    A,
    S,
    V,
    claim_conditions,
    one_of,
    refresh,
)


def _claim_and_insert(*, scoped: bool) -> Any:
    claimed = (
        V.update()
        .where(*claim_conditions(legacy=False, scoped=scoped))
        .values(
            status=VolumeStatus.ATTACHING.value,
            attach_status=AttachStatus.ATTACHING.value,
            updated_at=bindparam("now"),
            provider_auth=func.coalesce(V.c.provider_auth, bindparam("auth")),
        )
        .returning(*V.c)
        .cte("claimed")
    )
    # the attachment's own values as parameters (prefixed: a parameter named like a column of the UPDATE would
    # join its SET clause); its volume and project from the claimed row
    own = [c for c in ATTACHMENT_COLUMNS if c not in ("volume_id", "project_id")]
    inserted = (
        insert(A)
        .from_select(
            [*own, "volume_id", "project_id"],
            select(*(bindparam(f"a_{c}", type_=A.c[c].type) for c in own), claimed.c.id, claimed.c.project_id),
        )
        .returning(A.c.id)
        .cte("inserted")
    )
    given = func.unnest(bindparam("keys", type_=ARRAY(String)), bindparam("values", type_=ARRAY(String)))
    rows = given.table_valued("key", "value").render_derived(name="given")
    specs = insert(S).from_select(
        ["attachment_id", "key", "value"],
        select(inserted.c.id, rows.c.key, rows.c.value).select_from(inserted).join(rows, true()),
    )
    statement = select(*(claimed.c[c.name] for c in V.c)).add_cte(specs.cte("specs"))
    return select(Volume).from_statement(statement)


_CLAIM_AND_INSERT = {scoped: _claim_and_insert(scoped=scoped) for scoped in (False, True)}


def _complete() -> Any:
    locked = (
        select(A.c.volume_id, A.c.project_id)
        .select_from(A.join(V, V.c.id == A.c.volume_id))
        .where(
            A.c.id == bindparam("attachment_id"),
            or_(bindparam("everyone", type_=Boolean), A.c.project_id == bindparam("caller")),
        )
        .with_for_update(of=V)
        .cte("locked")
    )
    done = (
        update(A)
        .where(
            A.c.id == bindparam("attachment_id"),
            one_of(A.c.attach_status, CONNECTED),
            exists(select(locked.c.volume_id)),
        )
        .values(attach_status=AttachStatus.ATTACHED.value, updated_at=bindparam("now"))
        .returning(A.c.volume_id)
        .cte("done")
    )
    moved = (
        update(V)
        .where(V.c.id.in_(select(done.c.volume_id)), one_of(V.c.status, ATTACH_DRIVEN))
        .values(
            status=VolumeStatus.IN_USE.value, attach_status=AttachStatus.ATTACHED.value, updated_at=bindparam("now")
        )
        .returning(V.c.id)
        .cte("moved")
    )
    counted = [select(func.count()).select_from(c).scalar_subquery().label(c.name) for c in (done, moved)]
    return select(*counted).select_from(locked)


_COMPLETE = _complete()

# the function returns the attachments' rows in the table's column order, which migrations made; name them
_REMAINING = func.tether_remove_attachment(
    bindparam("volume_id"), bindparam("attachment_id"), bindparam("now", type_=A.c.updated_at.type)
).table_valued(*(column(c, A.c[c].type) for c in ATTACHMENT_COLUMNS))
_REMOVE = select(*_REMAINING.c)


async def claim_and_insert(
    session: AsyncSession,
    *,
    scoped: bool,
    caller: str,
    attachment: Attachment,
    auth: str | None,
    connector: Mapping[str, Any],
) -> Volume | None:
    """Claim the volume for a connect and insert `attachment` (its volume_id set, project_id filled in here) with
    the connector's rows; the claimed volume (with its CHAP credentials: `auth` when it had none; None for a
    volume known to have them), or None when the claim did not apply."""
    values = {f"a_{c}": getattr(attachment, c) for c in ATTACHMENT_COLUMNS if c not in ("volume_id", "project_id")}
    keys = [str(k) for k in connector]
    result = await session.execute(
        _CLAIM_AND_INSERT[scoped],
        {
            **values,
            "volume_id": attachment.volume_id,
            "caller_project": caller,
            "now": attachment.updated_at,
            "auth": auth,
            "keys": keys,
            "values": [json.dumps(connector[k]) for k in connector],
        },
    )
    volume = result.scalars().first()
    if volume is not None:
        attachment.project_id = volume.project_id
    return volume


async def complete(session: AsyncSession, attachment_id: str, *, everyone: bool, caller: str, now: Any) -> bool | None:
    """None: no such attachment (for this caller); False: it is not in a state to complete; True: done."""
    row = (
        await session.execute(
            _COMPLETE, {"attachment_id": attachment_id, "everyone": everyone, "caller": caller, "now": now}
        )
    ).first()
    if row is None:
        return None
    return bool(row.done)


async def remove(session: AsyncSession, volume_id: str, attachment_id: str, now: Any) -> list[Attachment]:
    """Delete the attachment under its volume's row lock, recompute the volume; its remaining attachments."""
    rows = await session.execute(_REMOVE, {"volume_id": volume_id, "attachment_id": attachment_id, "now": now})
    return [refresh(Attachment(volume_id=row.volume_id, project_id=row.project_id), row) for row in rows.all()]
