"""The one attach state machine: reserve, connect, complete, remove. The legacy actions wrap it.

Every transition is a conditional UPDATE in a short transaction. Work that touches the storage
host holds the volume's dispatcher lock for the whole sequence (claim, backend calls, record), so
decisions about shared ACLs and exports never race, and runs as a shielded task so a dropped
client cannot strand a row half-way.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
import string
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    and_,
    bindparam,
    case,
    delete,
    exists,
    false,
    func,
    insert,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import Context
from app.backends.base import BackendError, Backends, Chap, ExportInfo, InvalidConnector, VolumeRef
from app.backends.connectors import wants_multipath
from app.backends.dispatch import Dispatcher, Runner
from app.db.engine import Database
from app.db.models import Attachment, AttachmentSpec, AttachStatus, Volume, VolumeStatus, utcnow
from app.errors import (
    AttachmentNotFound,
    BackendFailure,
    Conflict,
    InvalidAttachment,
    InvalidInput,
    InvalidVolume,
    TetherError,
)
from app.logs import bind
from app.secrets import SecretBox, SecretKeyError
from app.services.listing import ListParams, Page, apply_order, keyset_after
from app.services.volumes import load_volume, volume_ref

log = logging.getLogger("tether.attachments")
T = TypeVar("T")

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
ATTACHMENT_FILTERS = frozenset({"volume_id", "status", "instance_id"})
ATTACHMENT_SORT_KEYS = frozenset({"id", "created_at", "updated_at", "status", "volume_id", "instance_id"})
_CHAP_ALPHABET = string.ascii_letters + string.digits
_OWNERS_KEPT = 100_000
# The attach path's statements are built once, on the tables (Core): building a statement per call, and the
# ORM's bulk-update bookkeeping (synchronising the session with each UPDATE), cost more CPU than running it.
_A: Any = Attachment.__table__  # type: ignore[attr-defined]
_V: Any = Volume.__table__  # type: ignore[attr-defined]
_S: Any = AttachmentSpec.__table__  # type: ignore[attr-defined]
ATTACHMENT_COLUMNS: tuple[str, ...] = tuple(_A.c.keys())


@dataclass
class AttachmentRecord:
    attachment: Attachment
    shared_with: list[str] = field(default_factory=list)
    secrets: SecretBox = field(default_factory=lambda: SecretBox(None))

    @property
    def connection_info(self) -> dict[str, Any]:
        raw = self.attachment.connection_info
        info: dict[str, Any] = json.loads(raw) if raw else {}
        if isinstance(info.get("auth_password"), str):
            info["auth_password"] = self.secrets.open(info["auth_password"])
        return info


def new_chap() -> Chap:
    return Chap(
        username="".join(secrets.choice(_CHAP_ALPHABET) for _ in range(20)),
        secret="".join(secrets.choice(_CHAP_ALPHABET) for _ in range(16)),
    )


def chap_of(volume: Volume, box: SecretBox) -> Chap | None:
    """The volume's CHAP credentials from provider_auth ("CHAP <user> <secret, sealed or plain>")."""
    if not volume.provider_auth:
        return None
    _method, username, stored = volume.provider_auth.split(" ", 2)
    try:
        return Chap(username=username, secret=box.open(stored))
    except SecretKeyError as error:
        log.error("volume %s: %s", volume.id, error)
        raise TetherError("The volume's CHAP secret cannot be read; check TETHER_SECRET_KEY.") from None


def provider_auth(chap: Chap, box: SecretBox) -> str:
    return f"CHAP {chap.username} {box.seal(chap.secret)}"


def _one_of(column: Any, values: tuple[str, ...]) -> ColumnElement[bool]:
    """`column IN (values)` as plain equalities: an IN list is re-rendered on every execution (post-compile)."""
    return or_(*(column == value for value in values))


def _has(volume_id: Any, *statuses: str, other_than: Any = None) -> ColumnElement[bool]:
    """EXISTS an attachment of the volume (in one of `statuses`; not `other_than`); values or bindparams."""
    clauses: list[ColumnElement[bool]] = [_A.c.volume_id == volume_id]
    if statuses:
        clauses.append(_one_of(_A.c.attach_status, statuses))
    if other_than is not None:
        clauses.append(_A.c.id != other_than)
    return exists().where(*clauses)


def _recompute_statement() -> Any:
    """The volume's status from its remaining attachments, parameterised by volume and time."""
    volume_id: Any = bindparam("volume_id")
    attached, attaching, anything = (
        _has(volume_id, AttachStatus.ATTACHED),
        _has(volume_id, AttachStatus.ATTACHING),
        _has(volume_id),
    )
    return (
        update(_V)
        .where(_V.c.id == volume_id, _one_of(_V.c.status, ATTACH_DRIVEN))
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


@functools.cache
def _claim_volume(*, legacy: bool, scoped: bool) -> Any:
    """The reservation: load the volume and compare-and-swap its status in one statement (RETURNING the row).

    A multiattach volume may be reserved while in use (and, on the new face, while reserved); any other only
    when available. `scoped`: only the caller's project's volume (everyone but admins).
    """
    multiattach: tuple[str, ...] = (VolumeStatus.AVAILABLE, VolumeStatus.IN_USE)
    if not legacy:
        multiattach += (VolumeStatus.RESERVED,)
    conditions = [
        _V.c.id == bindparam("volume_id"),
        or_(
            and_(_V.c.multiattach == true(), _one_of(_V.c.status, multiattach)),
            and_(_V.c.multiattach == false(), _V.c.status == VolumeStatus.AVAILABLE.value),
        ),
    ]
    if scoped:
        conditions.append(_V.c.project_id == bindparam("caller_project"))
    claim = (
        update(_V)
        .where(*conditions)
        .values(status=bindparam("to_status"), attach_status=bindparam("to_attach_status"), updated_at=bindparam("now"))
        .returning(*_V.c)
    )
    return select(Volume).from_statement(claim)


_INSERT_ATTACHMENT = insert(_A)
# another connected attachment of the volume than this one
_BUSY = select(_has(bindparam("volume_id"), *CONNECTED, other_than=bindparam("attachment_id")))
_CLAIM_CONNECT = (
    update(_A)
    .where(_A.c.id == bindparam("attachment_id"), _one_of(_A.c.attach_status, CONNECTABLE))
    .values(
        attach_status=case(
            (_A.c.attach_status == AttachStatus.ATTACHED, AttachStatus.ATTACHED.value),
            else_=AttachStatus.ATTACHING.value,
        ),
        attach_time=bindparam("now"),
        attached_host=bindparam("host"),
        attach_mode=bindparam("mode"),
        updated_at=bindparam("now"),
    )
)
_SET_PROVIDER_AUTH = update(_V).where(_V.c.id == bindparam("volume_id")).values(provider_auth=bindparam("auth"))
_SET_PROVIDER_LOCATION = (
    update(_V).where(_V.c.id == bindparam("volume_id")).values(provider_location=bindparam("location"))
)
_RECORD_CONNECTION = (
    update(_A).where(_A.c.id == bindparam("attachment_id")).values(connection_info=bindparam("info")).returning(*_A.c)
)
_DELETE_SPECS = delete(_S).where(_S.c.attachment_id == bindparam("attachment_id"))
_INSERT_SPECS = insert(_S)
# os-complete: the attachment's volume row, locked first (the order every transition takes them in)
_LOCK_VOLUME_OF = (
    select(_A.c.volume_id, _A.c.project_id)
    .select_from(_A.join(_V, _V.c.id == _A.c.volume_id))
    .where(_A.c.id == bindparam("attachment_id"))
    .with_for_update(of=_V)
)
_COMPLETE = (
    update(_A)
    .where(_A.c.id == bindparam("attachment_id"), _one_of(_A.c.attach_status, CONNECTED))
    .values(attach_status=AttachStatus.ATTACHED.value, updated_at=bindparam("now"))
)
_STATUS_OF = select(_A.c.attach_status).where(_A.c.id == bindparam("attachment_id"))
_VOLUME_OF = select(_A.c.volume_id, _A.c.project_id).where(_A.c.id == bindparam("attachment_id"))
# every attachment of a volume with its initiator: what else uses an ACL and the export
_INITIATORS = (
    select(_A.c.id, _A.c.project_id, _A.c.attach_status, _S.c.value)
    .select_from(_A.outerjoin(_S, and_(_S.c.attachment_id == _A.c.id, _S.c.key == "initiator")))
    .where(_A.c.volume_id == bindparam("volume_id"))
)
_LOCK_VOLUME = select(_V.c.id).where(_V.c.id == bindparam("volume_id")).with_for_update()
_DELETE_ATTACHMENT = delete(_A).where(_A.c.id == bindparam("attachment_id"))
_ATTACHMENT_BY_ID = select(Attachment).where(Attachment.id == bindparam("attachment_id"))  # type: ignore[arg-type]
_ATTACHMENTS_OF = (
    select(Attachment).where(Attachment.volume_id == bindparam("volume_id")).order_by(Attachment.created_at)  # type: ignore[arg-type]
)


def _columns(attachment: Attachment) -> dict[str, Any]:
    return {key: getattr(attachment, key) for key in ATTACHMENT_COLUMNS}


def _refresh(attachment: Attachment, row: Any) -> Attachment:
    """Copy a RETURNING row of every column onto the (detached or new) object the caller holds."""
    for key, value in zip(ATTACHMENT_COLUMNS, row, strict=True):
        setattr(attachment, key, value)
    return attachment


async def lock_volume(session: AsyncSession, volume_id: str) -> None:
    """Take the volume's row lock: the first lock of every transition, so they never take them in another order."""
    await session.execute(_LOCK_VOLUME, {"volume_id": volume_id})


async def recompute_volume(session: AsyncSession, volume_id: str) -> None:
    """The volume's status follows its remaining attachments, in one UPDATE."""
    await session.execute(_RECOMPUTE, {"volume_id": volume_id, "now": utcnow()})


async def connector_of(session: AsyncSession, attachment_id: str) -> dict[str, Any]:
    rows = await session.execute(
        select(AttachmentSpec.key, AttachmentSpec.value).where(AttachmentSpec.attachment_id == attachment_id)
    )
    return {key: json.loads(value) for key, value in rows.all()}


async def store_connector(
    session: AsyncSession, attachment_id: str, connector: Mapping[str, Any], *, fresh: bool = False
) -> None:
    """One row per connector key; `fresh`: the attachment was created in this transaction and has none yet."""
    if not fresh:
        await session.execute(_DELETE_SPECS, {"attachment_id": attachment_id})
    rows = [{"attachment_id": attachment_id, "key": str(k), "value": json.dumps(v)} for k, v in connector.items()]
    if rows:
        await session.execute(_INSERT_SPECS, rows)


async def sharing(session: AsyncSession, volume_id: str, initiator: str, other_than: str) -> list[str]:
    """Ids of the volume's other connected attachments whose connector has the same initiator."""
    rows = await session.execute(
        select(Attachment.id)
        .join(AttachmentSpec, AttachmentSpec.attachment_id == Attachment.id)  # type: ignore[arg-type]
        .where(
            Attachment.volume_id == volume_id,
            Attachment.id != other_than,
            Attachment.attach_status.in_(CONNECTED),  # type: ignore[attr-defined]
            AttachmentSpec.key == "initiator",
            AttachmentSpec.value == json.dumps(initiator),
        )
        .order_by(Attachment.created_at)  # type: ignore[arg-type]
    )
    return list(rows.scalars().all())


async def shared_map(session: AsyncSession, attachments: list[Attachment]) -> dict[str, list[str]]:
    """For a page of attachments: the other connected attachments sharing each one's initiator."""
    volume_ids = {a.volume_id for a in attachments if a.attach_status in CONNECTED}
    if not volume_ids:
        return {}
    rows = await session.execute(
        select(Attachment.id, Attachment.volume_id, AttachmentSpec.value)
        .join(AttachmentSpec, AttachmentSpec.attachment_id == Attachment.id)  # type: ignore[arg-type]
        .where(
            Attachment.volume_id.in_(volume_ids),  # type: ignore[attr-defined]
            Attachment.attach_status.in_(CONNECTED),  # type: ignore[attr-defined]
            AttachmentSpec.key == "initiator",
        )
        .order_by(Attachment.created_at)  # type: ignore[arg-type]
    )
    groups: dict[tuple[str, str], list[str]] = {}
    owner: dict[str, tuple[str, str]] = {}
    for attachment_id, volume_id, initiator in rows.all():
        groups.setdefault((volume_id, initiator), []).append(attachment_id)
        owner[attachment_id] = (volume_id, initiator)
    return {a.id: [other for other in groups[owner[a.id]] if other != a.id] for a in attachments if a.id in owner}


def build_connection_info(
    *, volume: Volume, attachment: Attachment, export: ExportInfo, chap: Chap, connector: Mapping[str, Any], mode: str
) -> dict[str, Any]:
    info: dict[str, Any] = {
        "driver_volume_type": "iscsi",
        "target_discovered": False,
        "target_iqn": export.target_iqn,
        "target_portal": export.target_portal,
        "target_lun": export.target_lun,
        "volume_id": volume.id,
        "auth_method": "CHAP",
        "auth_username": chap.username,
        "auth_password": chap.secret,
        "access_mode": mode,
        "encrypted": False,
        "qos_specs": None,
        "discard": False,
        "attachment_id": attachment.id,
        "enforce_multipath": bool(connector.get("enforce_multipath", False)),
    }
    if wants_multipath(connector):
        info["target_iqns"] = [export.target_iqn]
        info["target_portals"] = [export.target_portal]
        info["target_luns"] = [export.target_lun]
    return info


async def _shielded(work: Callable[[], Awaitable[T]]) -> T:
    """Run a whole state change to its end even if the caller is cancelled."""
    return await asyncio.shield(asyncio.ensure_future(work()))


class AttachmentService:
    def __init__(
        self, db: Database, dispatcher: Dispatcher, backends: Backends, secrets: SecretBox | None = None
    ) -> None:
        self.db = db
        self.dispatcher = dispatcher
        self.backends = backends
        self.secrets = secrets or SecretBox(None)
        # attachment id -> (volume id, project id): both are fixed for an attachment's life, so the volume whose
        # lock a delete or an update needs is known without a query; a stale entry (deleted elsewhere) only
        # leads to the locked re-read finding nothing, which is the 404 it would have been anyway
        self._owners: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def _remember(self, attachment_id: str, volume_id: str, project_id: str) -> None:
        """Called once the attachment's row is committed: a rolled-back one is never remembered."""
        self._owners[attachment_id] = (volume_id, project_id)
        if len(self._owners) > _OWNERS_KEPT:
            self._owners.popitem(last=False)

    async def _volume_of(self, ctx: Context, attachment_id: str) -> str:
        """The attachment's volume id (404 for a missing attachment or another project's)."""
        owner = self._owners.get(attachment_id)
        if owner is None:
            async with self.db.read() as session:
                row = (await session.execute(_VOLUME_OF, {"attachment_id": attachment_id})).first()
            if row is None:
                raise AttachmentNotFound(attachment_id)
            owner = (row.volume_id, row.project_id)
            self._remember(attachment_id, *owner)
        if not ctx.sees(owner[1]):
            raise AttachmentNotFound(attachment_id)
        return owner[0]

    # -- reading --------------------------------------------------------------------------------

    async def _load(self, session: AsyncSession, ctx: Context, attachment_id: str) -> Attachment:
        attachment = (await session.execute(_ATTACHMENT_BY_ID, {"attachment_id": attachment_id})).scalars().first()
        if attachment is None or not ctx.sees(attachment.project_id):
            raise AttachmentNotFound(attachment_id)
        return attachment

    async def _record(self, session: AsyncSession, attachment: Attachment) -> AttachmentRecord:
        shared = (await shared_map(session, [attachment])).get(attachment.id, [])
        return AttachmentRecord(attachment, shared, self.secrets)

    async def get(self, ctx: Context, attachment_id: str) -> AttachmentRecord:
        async with self.db.read() as session:
            return await self._record(session, await self._load(session, ctx, attachment_id))

    async def page(self, ctx: Context, params: ListParams, *, detail: bool) -> Page[AttachmentRecord]:
        limit = min(params.limit if params.limit is not None else 1000, 1000)
        conditions: list[ColumnElement[bool]] = []
        if not (ctx.is_admin and params.all_tenants):
            conditions.append(Attachment.project_id == ctx.project_id)  # type: ignore[arg-type]
        columns_by_filter = {
            "volume_id": Attachment.volume_id,
            "status": Attachment.attach_status,
            "instance_id": Attachment.instance_uuid,
            "project_id": Attachment.project_id,
        }
        for key, value in params.filters.items():
            if key == "project_id" and not params.all_tenants:
                continue
            conditions.append(columns_by_filter[key] == value)  # type: ignore[arg-type]
        sort_columns = {
            "id": Attachment.id,
            "created_at": Attachment.created_at,
            "updated_at": func.coalesce(Attachment.updated_at, Attachment.created_at),
            "status": Attachment.attach_status,
            "volume_id": Attachment.volume_id,
            "instance_id": func.coalesce(Attachment.instance_uuid, ""),
        }
        columns: list[tuple[ColumnElement[Any], str]] = [(sort_columns[k], d) for k, d in params.sort]  # type: ignore[misc]
        columns.append((Attachment.id, params.sort[-1][1]))  # type: ignore[arg-type]
        async with self.db.read() as session:
            stmt = select(Attachment).where(*conditions)
            if params.marker:
                marker = await session.get(Attachment, params.marker)
                if marker is None or not ctx.sees(marker.project_id):
                    raise AttachmentNotFound(params.marker)
                values = (
                    await session.execute(select(*[c for c, _ in columns]).where(Attachment.id == marker.id))
                ).one()
                stmt = stmt.where(keyset_after(columns, list(values)))
            stmt = apply_order(stmt, columns).offset(params.offset).limit(limit)
            attachments = list((await session.execute(stmt)).scalars().all())
            shared = await shared_map(session, attachments) if detail else {}
        return Page(items=[AttachmentRecord(a, shared.get(a.id, []), self.secrets) for a in attachments], limit=limit)

    # -- validation -----------------------------------------------------------------------------

    def validate_connector(self, connector: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return self.backends.target.validate_connector(connector)
        except InvalidConnector as error:
            raise InvalidInput(f"Invalid input for field/attribute connector.{error.key}: {error.reason}.") from None

    # -- reserve --------------------------------------------------------------------------------

    async def _reserve(
        self,
        session: AsyncSession,
        ctx: Context,
        volume_id: str,
        instance_uuid: str | None,
        mode: str | None,
        *,
        legacy: bool = False,
        insert: bool = True,
    ) -> tuple[Attachment, Volume]:
        """insert=False: the caller inserts the new attachment itself, later in the same transaction."""
        # load and claim in one statement; the slow path below tells a missing volume from a busy one
        claimed = await session.execute(
            _claim_volume(legacy=legacy, scoped=not ctx.is_admin),
            {
                "volume_id": volume_id,
                "caller_project": ctx.project_id,
                "to_status": VolumeStatus.ATTACHING if legacy else VolumeStatus.RESERVED,
                "to_attach_status": AttachStatus.ATTACHING if legacy else AttachStatus.RESERVED,
                "now": utcnow(),
            },
        )
        volume = claimed.scalars().first()
        if volume is None:
            # Nova's migration path: the same instance may hold a second attachment of an attached volume
            volume = await load_volume(session, ctx, volume_id, lock=True)
            same_instance = instance_uuid is not None and await session.scalar(
                select(exists().where(_A.c.volume_id == volume.id, _A.c.instance_uuid == instance_uuid))
            )
            if legacy or not (same_instance and volume.status in (VolumeStatus.IN_USE, VolumeStatus.RESERVED)):
                raise InvalidVolume(
                    f"Volume {volume.id} status must be available to reserve, "
                    f"but the current status is {volume.status}."
                )
        attachment = Attachment(
            volume_id=volume.id,
            project_id=volume.project_id,
            instance_uuid=instance_uuid,
            attach_status=AttachStatus.RESERVED,
            attach_mode=mode or "null",
        )
        if insert:
            await session.execute(_INSERT_ATTACHMENT, _columns(attachment))
        return attachment, volume

    async def reserve(
        self,
        ctx: Context,
        *,
        volume_id: str,
        instance_uuid: str | None = None,
        mode: str | None = None,
        legacy: bool = False,
    ) -> AttachmentRecord:
        async with self.db.write() as session:
            attachment, _volume = await self._reserve(session, ctx, volume_id, instance_uuid, mode, legacy=legacy)
        self._remember(attachment.id, attachment.volume_id, attachment.project_id)
        return AttachmentRecord(attachment, secrets=self.secrets)

    async def create(
        self,
        ctx: Context,
        *,
        volume_id: str,
        instance_uuid: str | None = None,
        connector: Mapping[str, Any] | None = None,
        mode: str | None = None,
    ) -> AttachmentRecord:
        """Reserve; with a connector also connect in the same call (the bare-metal path)."""
        bind(volume_id=volume_id)
        if not connector:
            return await self.reserve(ctx, volume_id=volume_id, instance_uuid=instance_uuid, mode=mode)
        checked = self.validate_connector(connector)

        # The reservation and the connect claim share one transaction: a refusal (400, 409) rolls both back,
        # and a backend failure afterwards removes the attachment again (_undo_connect), so nothing is left.
        async def work() -> AttachmentRecord:
            async with self.dispatcher.exclusive(volume_id) as run:
                return await self._connect_locked(
                    ctx, None, checked, run, undo_reserve=True, reserve=(volume_id, instance_uuid, mode)
                )

        return await _shielded(work)

    # -- connect --------------------------------------------------------------------------------

    async def connect(self, ctx: Context, attachment_id: str, connector: Mapping[str, Any]) -> AttachmentRecord:
        checked = self.validate_connector(connector)
        volume_id = await self._volume_of(ctx, attachment_id)
        return await self._connect(ctx, attachment_id, checked, volume_id=volume_id, undo_reserve=False)

    async def _connect(
        self,
        ctx: Context,
        attachment_id: str,
        connector: dict[str, Any],
        *,
        volume_id: str,
        undo_reserve: bool,
        keep_status: bool = False,
    ) -> AttachmentRecord:
        async def work() -> AttachmentRecord:
            async with self.dispatcher.exclusive(volume_id) as run:
                return await self._connect_locked(
                    ctx, attachment_id, connector, run, undo_reserve=undo_reserve, keep_status=keep_status
                )

        return await _shielded(work)

    async def _connect_locked(
        self,
        ctx: Context,
        attachment_id: str | None,
        connector: dict[str, Any],
        run: Runner,
        *,
        undo_reserve: bool,
        keep_status: bool = False,
        reserve: tuple[str, str | None, str | None] | None = None,
    ) -> AttachmentRecord:
        """keep_status: os-initialize_connection changes no volume status (os-reserve set it, os-attach moves it).

        reserve: (volume_id, instance_uuid, mode) to reserve a new attachment in the same transaction.
        """
        initiator = str(connector["initiator"])
        async with self.db.write() as session:
            if reserve is not None:
                attachment, volume = await self._reserve(session, ctx, *reserve, insert=False)
            else:
                assert attachment_id is not None
                attachment = await self._load(session, ctx, attachment_id)
                volume = await load_volume(session, ctx, attachment.volume_id, lock=True)
            bind(attachment_id=attachment.id)
            if attachment.attach_status not in CONNECTABLE:
                raise InvalidAttachment(
                    f"Attachment {attachment.id} cannot be connected: its status is {attachment.attach_status}."
                )
            if not volume.multiattach:
                busy = await session.scalar(_BUSY, {"volume_id": volume.id, "attachment_id": attachment.id})
                if busy:
                    raise Conflict(
                        f"Volume {volume.id} is not multiattach and another of its attachments is already connected."
                    )
            chap = chap_of(volume, self.secrets)
            if chap is None:
                chap = new_chap()
                await session.execute(
                    _SET_PROVIDER_AUTH, {"volume_id": volume.id, "auth": provider_auth(chap, self.secrets)}
                )
            mode = attachment.attach_mode if attachment.attach_mode in ("rw", "ro") else "rw"
            # re-connected from another host: the old host loses its ACL, unless another attachment shares it;
            # on the legacy face (keep_status) only os-terminate_connection removes an ACL
            replaced: str | None = None
            if attachment.attach_status in CONNECTED and not keep_status:
                previous = (await connector_of(session, attachment.id)).get("initiator")
                if previous not in (None, initiator) and not await sharing(session, volume.id, previous, attachment.id):
                    replaced = str(previous)
            now = utcnow()
            if reserve is not None:
                # reserved in this transaction and not yet inserted: it is inserted already connecting
                attachment.attach_status = AttachStatus.ATTACHING
                attachment.attach_time = attachment.updated_at = now
                attachment.attached_host = connector.get("host")
                attachment.attach_mode = mode
                await session.execute(_INSERT_ATTACHMENT, _columns(attachment))
            else:
                claimed = await session.execute(
                    _CLAIM_CONNECT,
                    {"attachment_id": attachment.id, "now": now, "host": connector.get("host"), "mode": mode},
                )
                if claimed.rowcount != 1:  # type: ignore[attr-defined]
                    raise InvalidAttachment(f"Attachment {attachment.id} changed while being connected; try again.")
            await store_connector(session, attachment.id, connector, fresh=reserve is not None)
            if not keep_status:
                await recompute_volume(session, volume.id)
        self._remember(attachment.id, volume.id, volume.project_id)
        ref = volume_ref(volume)
        try:
            path = self.backends.volumes.path(ref)
            export = await run(self.backends.target.create_export, ref, path, chap)
            await run(self.backends.target.add_initiator, ref, initiator)
            if replaced:
                await run(self.backends.target.remove_initiator, ref, replaced)
        except BackendError as error:
            log.error("connecting attachment %s of volume %s failed: %s", attachment.id, volume.id, error)
            await self._undo_connect(
                attachment, initiator, run, remove=undo_reserve, recompute=undo_reserve or not keep_status
            )
            raise BackendFailure(f"Unable to connect volume {volume.id}: the storage backend failed.") from None

        info = build_connection_info(
            volume=volume, attachment=attachment, export=export, chap=chap, connector=connector, mode=mode
        )
        # usually one statement, which needs no transaction of its own; with a new location, the volume's row
        # before the attachment's, the order every transition takes them in: the other order deadlocks with an
        # os-complete of this attachment (which holds the volume's row)
        relocated = volume.provider_location != export.provider_location
        async with self.db.write() if relocated else self.db.autocommit() as session:
            if relocated:
                await session.execute(
                    _SET_PROVIDER_LOCATION, {"volume_id": volume.id, "location": export.provider_location}
                )
            # stored with the secret sealed like provider_auth; AttachmentRecord opens it for the caller
            sealed = json.dumps({**info, "auth_password": self.secrets.seal(chap.secret)})
            row = (await session.execute(_RECORD_CONNECTION, {"attachment_id": attachment.id, "info": sealed})).first()
            if row is None:
                raise AttachmentNotFound(attachment.id)  # deleted while the backend worked
            recorded = _refresh(attachment, row)
            if not volume.multiattach:
                return AttachmentRecord(recorded, [], self.secrets)
            return await self._record(session, recorded)

    async def _undo_connect(
        self, attachment: Attachment, initiator: str, run: Runner, *, remove: bool, recompute: bool = True
    ) -> None:
        """After a failed connect: no ACL or export that nothing else needs, and the volume status recomputed."""
        ref = VolumeRef(id=attachment.volume_id, size_gb=0)
        async with self.db.write() as session:
            # the volume's lock first, as every transition takes it: the recompute then sees what others committed
            await lock_volume(session, attachment.volume_id)
            if remove:
                await session.execute(_DELETE_ATTACHMENT, {"attachment_id": attachment.id})
                self._owners.pop(attachment.id, None)
            else:
                await session.execute(
                    update(Attachment)
                    .where(Attachment.id == attachment.id)  # type: ignore[arg-type]
                    .values(attach_status=AttachStatus.ERROR_ATTACHING, connection_info=None, updated_at=utcnow())
                )
            if recompute:
                await recompute_volume(session, attachment.volume_id)
            shared = await sharing(session, attachment.volume_id, initiator, attachment.id)
            others = await session.scalar(_BUSY, {"volume_id": attachment.volume_id, "attachment_id": attachment.id})
        try:
            if not shared:
                await run(self.backends.target.remove_initiator, ref, initiator)
            if not others:
                await run(self.backends.target.remove_export, ref)
        except BackendError as error:
            log.error("cleaning up after a failed connect of volume %s failed: %s", attachment.volume_id, error)

    # -- complete -------------------------------------------------------------------------------

    async def complete(self, ctx: Context, attachment_id: str) -> None:
        async with self.db.write() as session:
            owner = (await session.execute(_LOCK_VOLUME_OF, {"attachment_id": attachment_id})).first()
            if owner is None or not ctx.sees(owner.project_id):
                raise AttachmentNotFound(attachment_id)
            done = await session.execute(_COMPLETE, {"attachment_id": attachment_id, "now": utcnow()})
            if done.rowcount != 1:  # type: ignore[attr-defined]
                # read again: a delete may have committed while we waited for the volume's lock
                status = await session.scalar(_STATUS_OF, {"attachment_id": attachment_id})
                if status is None:
                    raise AttachmentNotFound(attachment_id)
                raise InvalidAttachment(
                    f"Attachment {attachment_id} status must be attaching or attached to complete, "
                    f"but the current status is {status}."
                )
            await recompute_volume(session, owner.volume_id)

    # -- remove ---------------------------------------------------------------------------------

    async def remove(self, ctx: Context, attachment_id: str) -> list[Attachment]:
        """Disconnect (shared-aware) and delete; returns the volume's remaining attachments."""
        volume_id = await self._volume_of(ctx, attachment_id)

        async def work() -> list[Attachment]:
            async with self.dispatcher.exclusive(volume_id) as run:
                return await self._remove_locked(ctx, attachment_id, volume_id, run)

        return await _shielded(work)

    async def _remove_locked(self, ctx: Context, attachment_id: str, volume_id: str, run: Runner) -> list[Attachment]:
        async with self.db.read() as session:
            # every attachment of the volume with its initiator, in one query: this one, and what else uses
            # the ACL and the export
            rows = (await session.execute(_INITIATORS, {"volume_id": volume_id})).all()
        this = next((row for row in rows if row.id == attachment_id), None)
        if this is None or not ctx.sees(this.project_id):
            self._owners.pop(attachment_id, None)
            raise AttachmentNotFound(attachment_id)
        initiator = json.loads(this.value) if this.value else None
        others = [
            json.loads(row.value) if row.value else None
            for row in rows
            if row.id != attachment_id and row.attach_status in CONNECTED
        ]
        connected = this.attach_status in (*CONNECTED, AttachStatus.ERROR_DETACHING)
        shared = initiator in others
        ref = VolumeRef(id=volume_id, size_gb=0)  # removal needs the name, never the size
        if connected:
            try:
                if initiator and not shared:
                    await run(self.backends.target.remove_initiator, ref, str(initiator))
                if not others:
                    await run(self.backends.target.remove_export, ref)
            except BackendError as error:
                log.error("disconnecting attachment %s of volume %s failed: %s", attachment_id, volume_id, error)
                async with self.db.write() as session:
                    await session.execute(
                        update(Attachment)
                        .where(Attachment.id == attachment_id)  # type: ignore[arg-type]
                        .values(attach_status=AttachStatus.ERROR_DETACHING, updated_at=utcnow())
                    )
                raise BackendFailure(f"Unable to disconnect volume {volume_id}: the storage backend failed.") from None
        async with self.db.write() as session:
            await lock_volume(session, volume_id)
            await session.execute(_DELETE_ATTACHMENT, {"attachment_id": attachment_id})
            await recompute_volume(session, volume_id)
            remaining = await session.execute(_ATTACHMENTS_OF, {"volume_id": volume_id})
            self._owners.pop(attachment_id, None)
            return list(remaining.scalars().all())

    # -- what the legacy face needs beyond the four verbs ----------------------------------------

    async def attachments_of(self, ctx: Context, volume_id: str) -> list[Attachment]:
        async with self.db.read() as session:
            await load_volume(session, ctx, volume_id)
            rows = await session.execute(_ATTACHMENTS_OF, {"volume_id": volume_id})
            return list(rows.scalars().all())

    async def connect_for_initiator(
        self, ctx: Context, volume_id: str, connector: Mapping[str, Any]
    ) -> AttachmentRecord:
        """os-initialize_connection: connect the pending reservation, else re-connect this host's attachment.

        The reservation os-reserve made comes first: a second instance on a host that already has a
        connection needs an attachment (and a connector row) of its own, or its shared ACL goes with
        the first one. Neither path changes the volume status: os-reserve set it and os-attach moves it.
        """
        checked = self.validate_connector(connector)
        initiator = json.dumps(checked["initiator"])
        async with self.db.read() as session:
            await load_volume(session, ctx, volume_id)
            pending = await session.scalar(
                select(Attachment.id)
                .where(
                    Attachment.volume_id == volume_id,
                    Attachment.attach_status.in_((AttachStatus.RESERVED, AttachStatus.ERROR_ATTACHING)),  # type: ignore[attr-defined]
                )
                .order_by(Attachment.instance_uuid.is_not(None), Attachment.created_at)  # type: ignore[union-attr, arg-type]
                .limit(1)
            )
            pending = pending or await session.scalar(
                select(Attachment.id)
                .join(AttachmentSpec, AttachmentSpec.attachment_id == Attachment.id)  # type: ignore[arg-type]
                .where(
                    Attachment.volume_id == volume_id,
                    Attachment.attach_status.in_(CONNECTED),  # type: ignore[attr-defined]
                    AttachmentSpec.key == "initiator",
                    AttachmentSpec.value == initiator,
                )
                .order_by(Attachment.created_at)  # type: ignore[arg-type]
                .limit(1)
            )
            migrating = pending or await session.scalar(
                select(Attachment.id)
                .join(Volume, Volume.id == Attachment.volume_id)  # type: ignore[arg-type]
                .where(
                    Attachment.volume_id == volume_id,
                    Volume.multiattach.is_(False),  # type: ignore[attr-defined]
                    Attachment.attach_status == AttachStatus.ATTACHED,
                )
                .limit(1)
            )
        if pending is None and migrating is not None:
            # Nova's legacy live migration: the destination host connects to the attached volume's attachment;
            # the source keeps its ACL until its own os-terminate_connection
            return await self._connect(
                ctx, migrating, checked, volume_id=volume_id, undo_reserve=False, keep_status=True
            )
        if pending is None:
            # Nova may initialize without reserving first; reserve on its behalf, as os-reserve would
            record = await self.reserve(ctx, volume_id=volume_id, legacy=True)
            return await self._connect(
                ctx, record.attachment.id, checked, volume_id=volume_id, undo_reserve=True, keep_status=True
            )
        return await self._connect(ctx, pending, checked, volume_id=volume_id, undo_reserve=False, keep_status=True)

    async def mark_attached(
        self,
        ctx: Context,
        volume_id: str,
        *,
        instance_uuid: str | None,
        host_name: str | None,
        mountpoint: str | None,
        mode: str,
    ) -> None:
        """os-attach: the instance's attachment (or the pending one, or a new one) becomes attached."""
        async with self.db.write() as session:
            volume = await load_volume(session, ctx, volume_id, lock=True)
            candidates = (
                (
                    await session.execute(
                        select(Attachment)
                        .where(Attachment.volume_id == volume.id)  # type: ignore[arg-type]
                        .order_by(Attachment.created_at)  # type: ignore[arg-type]
                    )
                )
                .scalars()
                .all()
            )
            chosen = next((a for a in candidates if instance_uuid and a.instance_uuid == instance_uuid), None)
            if chosen is None:
                chosen = next(
                    (a for a in candidates if a.instance_uuid is None and a.attach_status != AttachStatus.ATTACHED),
                    None,
                )
            if chosen is None:
                allowed: tuple[str, ...] = (VolumeStatus.AVAILABLE, VolumeStatus.ATTACHING, VolumeStatus.RESERVED)
                if volume.multiattach:
                    allowed += (VolumeStatus.IN_USE,)
                if volume.status not in allowed or (not volume.multiattach and candidates):
                    raise InvalidVolume(
                        f"Volume {volume.id} status must be available or attaching to attach, "
                        f"but the current status is {volume.status}."
                    )
                chosen = Attachment(volume_id=volume.id, project_id=volume.project_id)
                session.add(chosen)
            now = utcnow()
            chosen.instance_uuid = instance_uuid or chosen.instance_uuid
            chosen.attached_host = host_name or chosen.attached_host
            chosen.mountpoint = mountpoint
            chosen.attach_mode = mode
            chosen.attach_status = AttachStatus.ATTACHED
            chosen.attach_time = chosen.attach_time or now
            chosen.updated_at = now
            await session.flush()
            await recompute_volume(session, volume.id)

    async def move_volume_status(self, ctx: Context, volume_id: str, expected: tuple[str, ...], new: str) -> bool:
        """One compare-and-swap of a volume's status; False when it was not in `expected`."""
        async with self.db.write() as session:
            volume = await load_volume(session, ctx, volume_id)
            result = await session.execute(
                update(Volume)
                .where(Volume.id == volume.id, Volume.status.in_(expected))  # type: ignore[arg-type, attr-defined]
                .values(status=new, updated_at=utcnow())
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    async def unreserve(self, ctx: Context, volume_id: str) -> None:
        """os-unreserve: drop the never-attached attachments of an `attaching` volume.

        One that os-initialize_connection connected (Nova's failed attach: terminate, then unreserve)
        goes as a delete would, with the ACL and export nothing else needs.
        """

        async def work() -> None:
            async with self.dispatcher.exclusive(volume_id) as run:
                async with self.db.write() as session:
                    volume = await load_volume(session, ctx, volume_id, lock=True)
                    if volume.status != VolumeStatus.ATTACHING:
                        return
                    await session.execute(
                        delete(Attachment).where(
                            Attachment.volume_id == volume.id,  # type: ignore[arg-type]
                            Attachment.attach_status.in_((AttachStatus.RESERVED, AttachStatus.ERROR_ATTACHING)),  # type: ignore[attr-defined]
                        )
                    )
                    rows = await session.execute(
                        select(Attachment.id).where(
                            Attachment.volume_id == volume.id,  # type: ignore[arg-type]
                            Attachment.attach_status == AttachStatus.ATTACHING,  # type: ignore[arg-type]
                        )
                    )
                    connected = list(rows.scalars().all())
                    await recompute_volume(session, volume.id)
                for attachment_id in connected:
                    await self._remove_locked(ctx, attachment_id, volume_id, run)

        await _shielded(work)

    async def disconnect_initiator(self, ctx: Context, volume_id: str, connector: Mapping[str, Any]) -> None:
        """os-terminate_connection: drop the initiator's ACL unless another connected attachment still uses it."""
        checked = self.validate_connector(connector)
        initiator = str(checked["initiator"])
        async with self.db.read() as session:
            volume = await load_volume(session, ctx, volume_id)
        async with self.dispatcher.exclusive(volume.id) as run:
            async with self.db.read() as session:
                users = await sharing(session, volume.id, initiator, other_than="")
            if len(users) <= 1:
                try:
                    await run(self.backends.target.remove_initiator, volume_ref(volume), initiator)
                except BackendError as error:
                    log.error("terminating the connection of volume %s failed: %s", volume.id, error)
                    raise BackendFailure(f"Unable to terminate the connection of volume {volume.id}.") from None

    async def reset(self, ctx: Context, volume_id: str, *, status: str | None, attach_status: str | None) -> None:
        """os-reset_status: set the statuses; `detached` drops every attachment and the target's export."""
        async with self.db.write() as session:
            volume = await load_volume(session, ctx, volume_id, lock=True)
            values: dict[str, Any] = {"updated_at": utcnow()}
            if status is not None:
                values["status"] = status
            if attach_status is not None:
                values["attach_status"] = attach_status
            if attach_status == AttachStatus.DETACHED:
                await session.execute(delete(Attachment).where(Attachment.volume_id == volume.id))  # type: ignore[arg-type]
            await session.execute(update(Volume).where(Volume.id == volume.id).values(**values))  # type: ignore[arg-type]
        if attach_status == AttachStatus.DETACHED:
            ref = volume_ref(volume)
            async with self.dispatcher.exclusive(volume.id) as run:
                try:
                    exported = (await run(self.backends.target.exports)).get(volume.id)
                    for initiator in sorted(exported.initiators if exported else ()):
                        await run(self.backends.target.remove_initiator, ref, initiator)
                    await run(self.backends.target.remove_export, ref)
                except BackendError as error:
                    log.error("removing the export of reset volume %s failed: %s", volume.id, error)
