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

Each statement is `Prepared` (app/db/prepared.py): outside a transaction it runs on the driver's own connection,
without SQLAlchemy's execution layer around it, which cost as much CPU as the round trip.
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

from app.db.models import Attachment, AttachStatus, Volume, VolumeStatus, made
from app.db.prepared import Prepared
from app.services.transitions import (
    ATTACH_DRIVEN,
    ATTACHMENT_COLUMNS,
    CONNECTED,
    INITIATORS,
    RECORD_CONNECTION,
    SET_PROVIDER_AUTH,
    A,
    S,
    V,
    claim_conditions,
    one_of,
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
    return select(*(claimed.c[c.name] for c in V.c)).add_cte(specs.cte("specs"))


_CLAIM_AND_INSERT = {scoped: Prepared(_claim_and_insert(scoped=scoped)) for scoped in (False, True)}
_VOLUME_COLUMNS = tuple(V.c.keys())


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


_COMPLETE = Prepared(_complete())

# the function returns the attachments' rows in the table's column order, which migrations made; name them
_REMAINING = func.tether_remove_attachment(
    bindparam("volume_id"), bindparam("attachment_id"), bindparam("now", type_=A.c.updated_at.type)
).table_valued(*(column(c, A.c[c].type) for c in ATTACHMENT_COLUMNS))
_REMOVE = Prepared(select(*_REMAINING.c))
# the cycle's other statements, as transitions.py writes them: a connect's record, a delete's look at the volume's
# attachments and initiators
RECORD = Prepared(RECORD_CONNECTION)
VOLUME_INITIATORS = Prepared(INITIATORS)
# a volume's CHAP credentials stored, on whatever the claim runs on (a session, or the driver's connection inside
# or outside a transaction); its id returned, so that a session's result has rows to read
SET_AUTH = Prepared(SET_PROVIDER_AUTH.returning(V.c.id))


async def claim_and_insert(
    on: AsyncSession | Any,
    *,
    scoped: bool,
    caller: str,
    attachment: Attachment,
    auth: str | None,
    connector: Mapping[str, Any],
) -> Volume | None:
    """Claim the volume for a connect and insert `attachment` (its volume_id set, project_id filled in here) with
    the connector's rows; the claimed volume (with its CHAP credentials: `auth` when it had none; None for a
    volume known to have them), or None when the claim did not apply. `on`: a session (inside its transaction) or
    Database.statements()'s connection (the statement commits by itself). The volume is a detached copy of the row,
    to read: nothing adds it to a session."""
    values = {f"a_{c}": getattr(attachment, c) for c in ATTACHMENT_COLUMNS if c not in ("volume_id", "project_id")}
    keys = [str(k) for k in connector]
    rows = await _CLAIM_AND_INSERT[scoped].rows(
        on,
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
    if not rows:
        return None
    volume = Volume.model_construct(**dict(zip(_VOLUME_COLUMNS, rows[0], strict=True)))
    attachment.project_id = volume.project_id
    return volume


async def complete(connection: Any, attachment_id: str, *, everyone: bool, caller: str, now: Any) -> bool | None:
    """`connection`: Database.statements()'s (or a session). None: no such attachment (for this caller); False: it
    is not in a state to complete; True: done."""
    rows = await _COMPLETE.rows(
        connection, {"attachment_id": attachment_id, "everyone": everyone, "caller": caller, "now": now}
    )
    if not rows:
        return None
    return bool(rows[0].done)


async def remove(connection: Any, volume_id: str, attachment_id: str, now: Any) -> list[Attachment]:
    """`connection`: Database.statements()'s (or a session). Delete the attachment under its volume's row lock,
    recompute the volume; its remaining attachments."""
    rows = await _REMOVE.rows(connection, {"volume_id": volume_id, "attachment_id": attachment_id, "now": now})
    return [made(Attachment, **dict(zip(ATTACHMENT_COLUMNS, row, strict=True))) for row in rows]
