"""The connection plan: who shares an initiator's ACL, what a connect exports, what a teardown may remove.

One volume has one export (target) while it has a connected attachment, and one ACL per connected
initiator. Attachments whose connectors name the same initiator share that ACL. Both faces (the attachments
API, the legacy actions) tear down through `teardown()`: an ACL goes only when no connected attachment still
uses it, the export only when no connected attachment is left (os-terminate_connection ends an attachment's
ACL, os-detach its export). Reconcile compares the target itself with what the database wants.
"""

from __future__ import annotations

import json
import logging
import secrets
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, bindparam, delete, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.backends.base import Chap, ExportInfo, VolumeRef
from app.backends.connectors import wants_multipath
from app.db.engine import Database
from app.db.models import Attachment, Volume
from app.errors import TetherError
from app.secrets import SecretBox, SecretKeyError
from app.services.transitions import CONNECTED, INITIATORS, A, S, one_of

if TYPE_CHECKING:
    from app.services.nodes import NodeRunner

log = logging.getLogger("tether.connections")

_CHAP_ALPHABET = string.ascii_letters + string.digits
_DELETE_SPECS = delete(S).where(S.c.attachment_id == bindparam("attachment_id"))
_INSERT_SPECS = insert(S)
_SPECS_OF = select(S.c.key, S.c.value).where(S.c.attachment_id == bindparam("attachment_id"))
# the volume's connected attachments by initiator, oldest first (with `terminated`: whether the ACL is still theirs)
_CONNECTED_INITIATORS = (
    select(A.c.id, S.c.value, A.c.terminated)
    .select_from(A.join(S, and_(S.c.attachment_id == A.c.id, S.c.key == "initiator")))
    .where(A.c.volume_id == bindparam("volume_id"), one_of(A.c.attach_status, CONNECTED))
    .order_by(A.c.created_at)
)


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


async def connector_of(session: AsyncSession, attachment_id: str) -> dict[str, Any]:
    rows = await session.execute(_SPECS_OF, {"attachment_id": attachment_id})
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


async def users(session: AsyncSession, volume_id: str, *, terminated: bool = False) -> list[tuple[str, str]]:
    """(attachment id, initiator) of each connected attachment of the volume that uses an ACL, oldest first;
    `terminated`: also those whose ACL os-terminate_connection ended (they stay attached until os-detach)."""
    rows = await session.execute(_CONNECTED_INITIATORS, {"volume_id": volume_id})
    return [(a, json.loads(value)) for a, value, ended in rows.all() if terminated or not ended]


async def shared_map(session: AsyncSession, attachments: list[Attachment]) -> dict[str, list[str]]:
    """For a page of attachments: the other connected attachments sharing each one's initiator."""
    volume_ids = {a.volume_id for a in attachments if a.attach_status in CONNECTED}
    if not volume_ids:
        return {}
    rows = await session.execute(
        select(Attachment.id, Attachment.volume_id, S.c.value)
        .join(S, S.c.attachment_id == Attachment.id)  # type: ignore[arg-type]
        .where(
            Attachment.volume_id.in_(volume_ids),  # type: ignore[attr-defined]
            Attachment.attach_status.in_(CONNECTED),  # type: ignore[attr-defined]
            S.c.key == "initiator",
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
        # as Cinder's: os-brick and Nova must not cache this connection's details across attachments
        "cacheable": False,
        "attachment_id": attachment.id,
        "enforce_multipath": bool(connector.get("enforce_multipath", False)),
    }
    if wants_multipath(connector):
        info["target_iqns"] = [export.target_iqn]
        info["target_portals"] = [export.target_portal]
        info["target_luns"] = [export.target_lun]
    return info


@dataclass(frozen=True)
class Teardown:
    """What the target may lose: the ACLs no connected attachment uses any more, and the export if none is left."""

    volume_id: str
    initiators: tuple[str, ...]
    export: bool

    async def apply(self, run: NodeRunner) -> None:
        """One operation on the volume's node: the ACLs, then the export."""
        if self.initiators or self.export:
            ref = VolumeRef(id=self.volume_id, size_gb=0)  # removal needs the name, never the size
            await run("disconnect", ref, list(self.initiators), self.export)


def teardown(volume_id: str, rows: Sequence[Any], initiators: Iterable[str], *, other_than: str | None) -> Teardown:
    """The plan from the volume's attachments as INITIATORS lists them, ignoring `other_than` (one going away).

    A `terminated` attachment uses no ACL any more, but it keeps the export until os-detach removes it.
    """
    connected = [row for row in rows if row.id != other_than and row.attach_status in CONNECTED]
    using = {json.loads(row.value) for row in connected if row.value and not row.terminated}
    dropped = tuple(sorted({i for i in initiators if i and i not in using}))
    return Teardown(volume_id, dropped, export=not connected)


async def release(db: Database, run: NodeRunner, volume_id: str, initiators: Iterable[str]) -> None:
    """Make the target lose what the database, as committed, no longer needs of `initiators` (call under the
    volume's lock)."""
    async with db.read() as session:
        rows = (await session.execute(INITIATORS, {"volume_id": volume_id})).all()
    await teardown(volume_id, rows, initiators, other_than=None).apply(run)
