"""The attach state machine's transitions (SPEC 5): each one a conditional UPDATE, built once on the tables.

Building a statement per call, and the ORM's bulk-update bookkeeping (synchronising the session with each
UPDATE), cost more CPU than running it, so the attach path's statements are Core statements with bound
parameters. Every transition takes the volume's row lock first, so two never take their locks in another order.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, case, delete, exists, false, insert, or_, select, true, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from app.db.models import Attachment, AttachmentSpec, AttachStatus, Volume, VolumeStatus, utcnow

CONNECTED = (AttachStatus.ATTACHING, AttachStatus.ATTACHED)
CONNECTABLE = (AttachStatus.RESERVED, AttachStatus.ATTACHING, AttachStatus.ATTACHED, AttachStatus.ERROR_ATTACHING)
# volume statuses that follow the attachments; others (error, maintenance, deleting) are left alone
ATTACH_DRIVEN = (
    VolumeStatus.AVAILABLE,
    VolumeStatus.RESERVED,
    VolumeStatus.ATTACHING,
    VolumeStatus.IN_USE,
    VolumeStatus.DETACHING,
)
A: Any = Attachment.__table__  # type: ignore[attr-defined]
V: Any = Volume.__table__  # type: ignore[attr-defined]
S: Any = AttachmentSpec.__table__  # type: ignore[attr-defined]
ATTACHMENT_COLUMNS: tuple[str, ...] = tuple(A.c.keys())


def one_of(column: Any, values: tuple[str, ...]) -> ColumnElement[bool]:
    """`column IN (values)` as plain equalities: an IN list is re-rendered on every execution (post-compile)."""
    return or_(*(column == value for value in values))


def has(volume_id: Any, *statuses: str, other_than: Any = None) -> ColumnElement[bool]:
    """EXISTS an attachment of the volume (in one of `statuses`; not `other_than`); values or bindparams."""
    clauses: list[ColumnElement[bool]] = [A.c.volume_id == volume_id]
    if statuses:
        clauses.append(one_of(A.c.attach_status, statuses))
    if other_than is not None:
        clauses.append(A.c.id != other_than)
    return exists().where(*clauses)


def _recompute_statement() -> Any:
    """The volume's status from its remaining attachments, parameterised by volume and time."""
    volume_id: Any = bindparam("volume_id")
    attached, attaching, anything = (
        has(volume_id, AttachStatus.ATTACHED),
        has(volume_id, AttachStatus.ATTACHING),
        has(volume_id),
    )
    return (
        update(V)
        .where(V.c.id == volume_id, one_of(V.c.status, ATTACH_DRIVEN))
        .values(
            status=case(
                (attached, VolumeStatus.IN_USE.value),
                (attaching, VolumeStatus.ATTACHING.value),
                (anything, VolumeStatus.RESERVED.value),
                else_=VolumeStatus.AVAILABLE.value,
            ),
            attach_status=case(
                (attached, AttachStatus.ATTACHED.value),
                (attaching, AttachStatus.ATTACHING.value),
                (anything, AttachStatus.RESERVED.value),
                else_=AttachStatus.DETACHED.value,
            ),
            updated_at=bindparam("now"),
        )
    )


_RECOMPUTE = _recompute_statement()
# a connect of an attachment not yet attached: the volume is attaching until os-complete (SPEC 5)
_SET_ATTACHING = (
    update(V)
    .where(V.c.id == bindparam("volume_id"), one_of(V.c.status, ATTACH_DRIVEN))
    .values(
        status=VolumeStatus.ATTACHING.value, attach_status=AttachStatus.ATTACHING.value, updated_at=bindparam("now")
    )
)


def claim_conditions(*, legacy: bool, scoped: bool) -> list[ColumnElement[bool]]:
    """Which volume a reservation may claim: a multiattach volume while in use (and, on the new face, while
    reserved), any other only when available. `scoped`: only the caller's project's volume (everyone but admins)."""
    multiattach: tuple[str, ...] = (VolumeStatus.AVAILABLE, VolumeStatus.IN_USE)
    if not legacy:
        multiattach += (VolumeStatus.RESERVED,)
    conditions = [
        V.c.id == bindparam("volume_id"),
        or_(
            and_(V.c.multiattach == true(), one_of(V.c.status, multiattach)),
            and_(V.c.multiattach == false(), V.c.status == VolumeStatus.AVAILABLE.value),
        ),
    ]
    if scoped:
        conditions.append(V.c.project_id == bindparam("caller_project"))
    return conditions


@functools.cache
def claim_volume(*, legacy: bool, scoped: bool) -> Any:
    """The reservation: load the volume and compare-and-swap its status in one statement (RETURNING the row)."""
    claim = (
        update(V)
        .where(*claim_conditions(legacy=legacy, scoped=scoped))
        .values(status=bindparam("to_status"), attach_status=bindparam("to_attach_status"), updated_at=bindparam("now"))
        .returning(*V.c)
    )
    return select(Volume).from_statement(claim)


INSERT_ATTACHMENT = insert(A)
# another connected attachment of the volume than this one
BUSY = select(has(bindparam("volume_id"), *CONNECTED, other_than=bindparam("attachment_id")))
CLAIM_CONNECT = (
    update(A)
    .where(A.c.id == bindparam("attachment_id"), one_of(A.c.attach_status, CONNECTABLE))
    .values(
        attach_status=case(
            (A.c.attach_status == AttachStatus.ATTACHED, AttachStatus.ATTACHED.value),
            else_=AttachStatus.ATTACHING.value,
        ),
        attach_time=bindparam("now"),
        attached_host=bindparam("host"),
        attach_mode=bindparam("mode"),
        mountpoint=bindparam("mountpoint"),
        terminated=false(),
        updated_at=bindparam("now"),
    )
)
SET_PROVIDER_AUTH = update(V).where(V.c.id == bindparam("volume_id")).values(provider_auth=bindparam("auth"))
SET_PROVIDER_LOCATION = (
    update(V).where(V.c.id == bindparam("volume_id")).values(provider_location=bindparam("location"))
)
RECORD_CONNECTION = (
    update(A).where(A.c.id == bindparam("attachment_id")).values(connection_info=bindparam("info")).returning(*A.c)
)
# os-complete: the attachment's volume row, locked first (the order every transition takes them in)
LOCK_VOLUME_OF = (
    select(A.c.volume_id, A.c.project_id)
    .select_from(A.join(V, V.c.id == A.c.volume_id))
    .where(A.c.id == bindparam("attachment_id"))
    .with_for_update(of=V)
)
COMPLETE = (
    update(A)
    .where(A.c.id == bindparam("attachment_id"), one_of(A.c.attach_status, CONNECTED))
    .values(attach_status=AttachStatus.ATTACHED.value, updated_at=bindparam("now"))
)
STATUS_OF = select(A.c.attach_status).where(A.c.id == bindparam("attachment_id"))
VOLUME_OF = select(A.c.volume_id, A.c.project_id).where(A.c.id == bindparam("attachment_id"))
# every attachment of a volume with its initiator: what else uses an ACL and the export (and, for the
# OSSA-2023-003 guard, whether a server uses it: an instance and a connection_info)
INITIATORS = (
    select(
        A.c.id,
        A.c.project_id,
        A.c.attach_status,
        A.c.terminated,
        S.c.value,
        A.c.instance_uuid,
        A.c.connection_info.is_not(None).label("connected"),
    )
    .select_from(A.outerjoin(S, and_(S.c.attachment_id == A.c.id, S.c.key == "initiator")))
    .where(A.c.volume_id == bindparam("volume_id"))
)
_LOCK_VOLUME = select(V.c.id).where(V.c.id == bindparam("volume_id")).with_for_update()
DELETE_ATTACHMENT = delete(A).where(A.c.id == bindparam("attachment_id"))
ATTACHMENT_BY_ID = select(Attachment).where(Attachment.id == bindparam("attachment_id"))  # type: ignore[arg-type]
ATTACHMENTS_OF = (
    select(Attachment).where(Attachment.volume_id == bindparam("volume_id")).order_by(Attachment.created_at)  # type: ignore[arg-type]
)


def in_use_by_server(row: Any) -> bool:
    """An INITIATORS row a server uses (Cinder's attachment_deletion_allowed): an instance and a connection."""
    return bool(row.instance_uuid and row.connected)


def columns_of(attachment: Attachment) -> dict[str, Any]:
    return {key: getattr(attachment, key) for key in ATTACHMENT_COLUMNS}


def refresh(attachment: Attachment, row: Any) -> Attachment:
    """Copy a RETURNING row of every column onto the (detached or new) object the caller holds, as what the
    database holds (no change for a session to write back; half the cost of setting each)."""
    for key, value in zip(ATTACHMENT_COLUMNS, row, strict=True):
        set_committed_value(attachment, key, value)
    return attachment


async def lock_volume(session: AsyncSession, volume_id: str) -> bool:
    """Take the volume's row lock: the first lock of every transition. False when the volume is gone."""
    return (await session.execute(_LOCK_VOLUME, {"volume_id": volume_id})).first() is not None


async def recompute_volume(session: AsyncSession, volume_id: str) -> None:
    """The volume's status follows its remaining attachments, in one UPDATE."""
    await session.execute(_RECOMPUTE, {"volume_id": volume_id, "now": utcnow()})


async def set_attaching(session: AsyncSession, volume_id: str) -> None:
    await session.execute(_SET_ATTACHING, {"volume_id": volume_id, "now": utcnow()})
