"""The attachments' reads: one attachment, a page of them, a volume's; and which volume and project each belongs to.

An attachment's volume and project are fixed for its life, so they are remembered per process once its row is
committed: the volume whose lock a delete or an update needs is known without a query.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import Context
from app.db.engine import Database
from app.db.models import Attachment
from app.errors import AttachmentNotFound, TetherError
from app.secrets import SecretBox, SecretKeyError
from app.services.connections import shared_map
from app.services.listing import ListParams, Page, apply_order, keyset_after
from app.services.transitions import ATTACHMENT_BY_ID, ATTACHMENTS_OF, VOLUME_OF
from app.services.volumes import load_volume

log = logging.getLogger("tether.attachments")

ATTACHMENT_FILTERS = frozenset({"volume_id", "status", "instance_id"})
ATTACHMENT_SORT_KEYS = frozenset({"id", "created_at", "updated_at", "status", "volume_id", "instance_id"})
KEPT_PER_PROCESS = 100_000


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
            try:
                info["auth_password"] = self.secrets.open(info["auth_password"])
            except SecretKeyError as error:  # a misconfigured key: say so, as chap_of does, not a bare 500
                log.error("attachment %s: %s", self.attachment.id, error)
                raise TetherError("The attachment's CHAP secret cannot be read; check TETHER_SECRET_KEY.") from None
        return info


class AttachmentReads:
    def __init__(self, db: Database, secrets: SecretBox | None = None) -> None:
        self.db = db
        self.secrets = secrets or SecretBox(None)
        # attachment id -> (volume id, project id); a stale entry (deleted elsewhere) only leads to the locked
        # re-read finding nothing, which is the 404 it would have been anyway
        self._owners: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def _remember(self, attachment_id: str, volume_id: str, project_id: str) -> None:
        """Called once the attachment's row is committed: a rolled-back one is never remembered."""
        self._owners[attachment_id] = (volume_id, project_id)
        if len(self._owners) > KEPT_PER_PROCESS:
            self._owners.popitem(last=False)

    def forget(self, attachment_id: str) -> None:
        self._owners.pop(attachment_id, None)

    async def _volume_of(self, ctx: Context, attachment_id: str) -> str:
        """The attachment's volume id (404 for a missing attachment or another project's)."""
        return (await self._owner(ctx, attachment_id))[0]

    async def project_of(self, ctx: Context, attachment_id: str) -> str:
        """The attachment's project, for the policy's target (404 as for _volume_of)."""
        return (await self._owner(ctx, attachment_id))[1]

    async def _owner(self, ctx: Context, attachment_id: str) -> tuple[str, str]:
        owner = self._owners.get(attachment_id)
        if owner is None:
            async with self.db.read() as session:
                row = (await session.execute(VOLUME_OF, {"attachment_id": attachment_id})).first()
            if row is None:
                raise AttachmentNotFound(attachment_id)
            owner = (row.volume_id, row.project_id)
            self._remember(attachment_id, *owner)
        if not ctx.sees(owner[1]):
            raise AttachmentNotFound(attachment_id)
        return owner

    # -- reading --------------------------------------------------------------------------------

    async def load(self, session: AsyncSession, ctx: Context, attachment_id: str) -> Attachment:
        attachment = (await session.execute(ATTACHMENT_BY_ID, {"attachment_id": attachment_id})).scalars().first()
        if attachment is None or not ctx.sees(attachment.project_id):
            raise AttachmentNotFound(attachment_id)
        return attachment

    async def _record(self, session: AsyncSession, attachment: Attachment) -> AttachmentRecord:
        shared = (await shared_map(session, [attachment])).get(attachment.id, [])
        return AttachmentRecord(attachment, shared, self.secrets)

    async def get(self, ctx: Context, attachment_id: str) -> AttachmentRecord:
        async with self.db.read() as session:
            return await self._record(session, await self.load(session, ctx, attachment_id))

    async def page(self, ctx: Context, params: ListParams, *, detail: bool) -> Page[AttachmentRecord]:
        limit = min(params.limit if params.limit is not None else 1000, 1000)
        conditions: list[ColumnElement[bool]] = []
        if not (ctx.all_projects and params.all_tenants):
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

    async def attachments_of(self, ctx: Context, volume_id: str) -> list[Attachment]:
        async with self.db.read() as session:
            await load_volume(session, ctx, volume_id)
            rows = await session.execute(ATTACHMENTS_OF, {"volume_id": volume_id})
            return list(rows.scalars().all())
