"""Volumes: create (placed on a storage node) and delete as the node's work, show, list, update."""

from __future__ import annotations

import ast
import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, bindparam, delete, exists, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import Context
from app.backends.base import VolumeRef
from app.config import Settings
from app.db.engine import Database
from app.db.models import (
    Attachment,
    AttachStatus,
    Volume,
    VolumeMetadata,
    VolumeStatus,
    VolumeType,
    utcnow,
)
from app.errors import InvalidInput, InvalidVolume, NotFound, VolumeNotFound
from app.services.idempotency import Answer
from app.services.listing import ListParams, Page, apply_order, keyset_after, parse_bool
from app.services.nodes import Nodes
from app.services.types import DEFAULT_TYPE, extra_specs_of, find_type, is_multiattach
from app.services.work import BackgroundWork

log = logging.getLogger("tether.volumes")

DELETABLE = (
    VolumeStatus.AVAILABLE,
    VolumeStatus.ERROR,
    VolumeStatus.ERROR_RESTORING,
    VolumeStatus.ERROR_EXTENDING,
)
VOLUME_FILTERS = frozenset({"name", "status", "metadata", "bootable", "availability_zone"})
# python-cinderclient sends `name` as `display_name`, Cinder's column name
VOLUME_SORT_KEYS = frozenset(
    {
        "id",
        "name",
        "display_name",
        "status",
        "size",
        "created_at",
        "updated_at",
        "availability_zone",
        "bootable",
        "project_id",
    }
)


@dataclass
class VolumeRecord:
    volume: Volume
    metadata: dict[str, str] = field(default_factory=dict)
    volume_type: VolumeType | None = None
    attachments: list[Attachment] = field(default_factory=list)


def volume_ref(volume: Volume) -> VolumeRef:
    return VolumeRef(id=volume.id, size_gb=volume.size)


def scoped(ctx: Context, volume: Volume | None) -> Volume | None:
    """Another project's volume does not exist for a non-admin."""
    if volume is None or not ctx.sees(volume.project_id):
        return None
    return volume


# built once: every state change loads its volume, and building the statement cost more CPU than running it
_VOLUME_BY_ID = select(Volume).where(Volume.id == bindparam("volume_id"))
_VOLUME_BY_ID_LOCKED = _VOLUME_BY_ID.with_for_update()
_PROJECT_OF = select(Volume.project_id).where(Volume.id == bindparam("volume_id"))
_PROJECTS_KEPT = 10000


async def load_volume(session: AsyncSession, ctx: Context, volume_id: str, *, lock: bool = False) -> Volume:
    stmt = _VOLUME_BY_ID_LOCKED if lock else _VOLUME_BY_ID
    volume = scoped(ctx, (await session.execute(stmt, {"volume_id": volume_id})).scalars().first())
    if volume is None:
        raise VolumeNotFound(volume_id)
    return volume


async def load_records(session: AsyncSession, volumes: list[Volume]) -> list[VolumeRecord]:
    """Metadata, type and attached attachments for a page of volumes, in three queries at most."""
    if not volumes:
        return []
    ids = [v.id for v in volumes]
    metadata: dict[str, dict[str, str]] = {}
    for row in (await session.execute(select(VolumeMetadata).where(VolumeMetadata.volume_id.in_(ids)))).scalars():  # type: ignore[attr-defined]
        metadata.setdefault(row.volume_id, {})[row.key] = row.value
    type_ids = {v.volume_type_id for v in volumes if v.volume_type_id}
    types: dict[str, VolumeType] = {}
    if type_ids:
        for t in (await session.execute(select(VolumeType).where(VolumeType.id.in_(type_ids)))).scalars():  # type: ignore[attr-defined]
            types[t.id] = t
    attached: dict[str, list[Attachment]] = {}
    in_use = [v.id for v in volumes if v.attach_status != AttachStatus.DETACHED]
    if in_use:
        stmt = select(Attachment).where(
            Attachment.volume_id.in_(in_use),  # type: ignore[attr-defined]
            Attachment.attach_status == AttachStatus.ATTACHED,
        )
        for a in (await session.execute(stmt.order_by(Attachment.created_at))).scalars():  # type: ignore[arg-type]
            attached.setdefault(a.volume_id, []).append(a)
    return [
        VolumeRecord(
            volume=v,
            metadata=metadata.get(v.id, {}),
            volume_type=types.get(v.volume_type_id) if v.volume_type_id else None,
            attachments=attached.get(v.id, []),
        )
        for v in volumes
    ]


def _parse_metadata_filter(value: str) -> dict[str, str]:
    try:
        parsed = json.loads(value)
    except ValueError:
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise InvalidInput(f"Invalid metadata filter '{value}'.") from None
    if not isinstance(parsed, dict):
        raise InvalidInput(f"Invalid metadata filter '{value}': it must be an object.")
    return {str(k): str(v) for k, v in parsed.items()}


def _sort_column(key: str) -> ColumnElement[Any]:
    if key in ("name", "display_name"):
        return func.coalesce(Volume.name, "")
    if key == "updated_at":
        return func.coalesce(Volume.updated_at, Volume.created_at)
    return getattr(Volume, key)  # type: ignore[no-any-return]


def check_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise InvalidInput(f"Invalid input for field/attribute metadata.{key}: values must be strings.")
        if not key or len(key) > 255 or len(value) > 255:
            raise InvalidInput("Metadata keys and values must be 1 to 255 characters long.")
    return dict(metadata)


class VolumeService:
    def __init__(self, db: Database, nodes: Nodes, settings: Settings, work: BackgroundWork) -> None:
        self.db = db
        self.nodes = nodes
        self.settings = settings
        self.work = work
        # volume id -> project: a volume never changes project, so the door's lookup is asked once per volume
        self._projects: OrderedDict[str, str] = OrderedDict()

    async def project_of(self, ctx: Context, volume_id: str) -> str:
        """The volume's project, for the policy's target (404 for a missing volume or one the caller cannot see)."""
        project = self._projects.get(volume_id)
        if project is None:
            async with self.db.read() as session:
                project = await session.scalar(_PROJECT_OF, {"volume_id": volume_id})
            if project is None:
                raise VolumeNotFound(volume_id)
            self._projects[volume_id] = project
            if len(self._projects) > _PROJECTS_KEPT:
                self._projects.popitem(last=False)
        if not ctx.sees(project):
            raise VolumeNotFound(volume_id)
        return project

    async def create(
        self,
        ctx: Context,
        *,
        size: int,
        name: str | None = None,
        description: str | None = None,
        volume_type: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        availability_zone: str | None = None,
        idempotency: Answer[VolumeRecord] | None = None,
    ) -> VolumeRecord:
        """`idempotency`: the request's key, claimed first and answered last in the create's transaction."""
        if idempotency is not None:
            await idempotency.check()  # a retry of an answered request is answered before any write
        meta = check_metadata(metadata or {})
        if availability_zone and availability_zone not in await self._zones():
            raise InvalidInput(f"Availability zone '{availability_zone}' is invalid.")
        async with self.db.write() as session:
            if idempotency is not None:
                await idempotency.claim(session)
            vtype = await find_type(session, volume_type or DEFAULT_TYPE)
            if vtype is None:
                if volume_type is None:
                    raise NotFound("The default volume type is missing; run `tether db upgrade`.")
                raise NotFound(f"Volume type with name or id {volume_type} could not be found.")
            if not vtype.is_public and not ctx.all_projects:
                raise NotFound(f"Volume type with name or id {volume_type} could not be found.")
            specs = await extra_specs_of(session, vtype.id)
            host, zone, why = await self._place(session, size, availability_zone, specs.get("volume_backend_name"))
            volume = Volume(
                project_id=ctx.project_id,
                user_id=ctx.user_id,
                name=name,
                description=description,
                size=size,
                status=VolumeStatus.CREATING if host else VolumeStatus.ERROR,
                availability_zone=zone,
                volume_type_id=vtype.id,
                multiattach=is_multiattach(specs),
                host=host,
            )
            session.add(volume)
            await session.flush()
            for key, value in meta.items():
                session.add(VolumeMetadata(volume_id=volume.id, key=key, value=value))
            record = VolumeRecord(volume=volume, metadata=meta, volume_type=vtype)
            if idempotency is not None:
                await idempotency.complete(session, record, volume.id)
            pending = None
            if host:
                self.nodes.remember(volume.id, host)
                # the node's create job commits with the row: no `creating` volume without the work that ends it
                ref = VolumeRef(id=volume.id, size_gb=size)
                pending = await self.nodes.runner(volume.id).defer(session, "finish_create", ref, wait=False)
        if pending is None:
            log.error("volume %s could not be placed: %s", volume.id, why)
        else:  # embedded: the create runs now, in the background; remote: the node has it already
            self.work.spawn(pending.result(), name=f"create-{volume.id}")
        return record

    async def _zones(self) -> set[str]:
        if self.nodes.embedded:
            return {self.settings.availability_zone}
        return await self.nodes.zones()

    async def _place(
        self, session: AsyncSession, size: int, zone: str | None, backend_name: str | None
    ) -> tuple[str | None, str, str]:
        """(host, availability zone, why not) for a new volume: the embedded node, or the scheduler's pick."""
        if self.nodes.embedded:
            return self.settings.pool_host, self.settings.availability_zone, ""
        service, why = await self.nodes.place(session, size, zone, backend_name)
        if service is None:
            return None, zone or self.settings.availability_zone, why
        return service.pool_host, service.availability_zone, ""

    async def get(self, ctx: Context, volume_id: str) -> VolumeRecord:
        async with self.db.read() as session:
            volume = await load_volume(session, ctx, volume_id)
            return (await load_records(session, [volume]))[0]

    async def page(self, ctx: Context, params: ListParams) -> Page[VolumeRecord]:
        limit = min(params.limit if params.limit is not None else 1000, 1000)
        conditions: list[ColumnElement[bool]] = []
        if not (ctx.all_projects and params.all_tenants):
            conditions.append(Volume.project_id == ctx.project_id)  # type: ignore[arg-type]
        if ctx.all_projects and params.all_tenants and "project_id" in params.filters:
            conditions.append(Volume.project_id == params.filters["project_id"])  # type: ignore[arg-type]
        for key, value in params.filters.items():
            if key in ("name", "status", "availability_zone"):
                conditions.append(getattr(Volume, key) == value)
            elif key == "bootable":
                conditions.append(Volume.bootable.is_(parse_bool("bootable", value)))  # type: ignore[attr-defined]
            elif key == "metadata":
                for mkey, mvalue in _parse_metadata_filter(value).items():
                    conditions.append(
                        exists().where(
                            VolumeMetadata.volume_id == Volume.id,
                            VolumeMetadata.key == mkey,
                            VolumeMetadata.value == mvalue,
                        )
                    )
        columns = [(_sort_column(k), d) for k, d in params.sort]
        columns.append((Volume.id, params.sort[-1][1]))  # type: ignore[arg-type]

        async with self.db.read() as session:
            count = None
            if params.with_count:
                count = await session.scalar(select(func.count()).select_from(Volume).where(*conditions))
            stmt = select(Volume).where(*conditions)
            if params.marker:
                marker = scoped(ctx, await session.get(Volume, params.marker))
                if marker is None:
                    raise NotFound(f"Marker {params.marker} could not be found.")
                marker_values = list(
                    (await session.execute(select(*[col for col, _ in columns]).where(Volume.id == marker.id))).one()
                )
                stmt = stmt.where(keyset_after(columns, marker_values))
            stmt = apply_order(stmt, columns).offset(params.offset).limit(limit)
            volumes = list((await session.execute(stmt)).scalars().all())
            records = await load_records(session, volumes)
        return Page(items=records, limit=limit, count=count)

    async def update(
        self,
        ctx: Context,
        volume_id: str,
        *,
        name: str | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        fields: frozenset[str] = frozenset(),
    ) -> VolumeRecord:
        values: dict[str, Any] = {"updated_at": utcnow()}
        if "name" in fields:
            values["name"] = name
        if "description" in fields:
            values["description"] = description
        meta = check_metadata(metadata) if metadata is not None else None
        async with self.db.write() as session:
            volume = await load_volume(session, ctx, volume_id, lock=True)
            await session.execute(update(Volume).where(Volume.id == volume.id).values(**values))  # type: ignore[arg-type]
            if meta is not None:
                await session.execute(delete(VolumeMetadata).where(VolumeMetadata.volume_id == volume.id))  # type: ignore[arg-type]
                for key, value in meta.items():
                    session.add(VolumeMetadata(volume_id=volume.id, key=key, value=value))
                await session.flush()
            await session.refresh(volume)
            return (await load_records(session, [volume]))[0]

    async def delete(self, ctx: Context, volume_id: str, *, force: bool = False) -> None:
        run = self.nodes.runner(volume_id)
        async with self.db.write() as session:
            # the row lock first, as every reservation takes it: the NOT EXISTS below then sees every attachment
            # committed before it (in READ COMMITTED a waiting UPDATE re-checks only its own row, not a subquery),
            # so even a forced delete never deletes a volume that has attachments
            volume = await load_volume(session, ctx, volume_id, lock=True)
            await run.require()  # its node is down: 503, and the transaction changed nothing
            condition: list[ColumnElement[bool]] = [
                Volume.id == volume.id,  # type: ignore[list-item]
                ~exists().where(Attachment.volume_id == Volume.id),
            ]
            if not force:
                condition.append(Volume.status.in_(DELETABLE))  # type: ignore[attr-defined]
            result = await session.execute(
                update(Volume).where(*condition).values(status=VolumeStatus.DELETING, updated_at=utcnow())
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                attached = await session.scalar(select(func.count()).where(Attachment.volume_id == volume.id))
                if attached:
                    raise InvalidVolume(
                        f"Volume {volume.id} cannot be deleted: it has {attached} attachment(s); "
                        "detach it first. Its status is " + volume.status + "."
                    )
                raise InvalidVolume(
                    f"Invalid volume: Volume status must be available or error or error_restoring or "
                    f"error_extending or error_managing and must not be migrating, attached, belong to a group, "
                    f"have snapshots, awaiting a transfer, or be disassociated from snapshots after volume "
                    f"transfer. The current status is {volume.status}."
                )
            if volume.host is None:  # never placed (no node had room): nothing on any storage host
                await session.execute(remove_deleted(volume.id))
                return
            ref = VolumeRef(id=volume.id, size_gb=volume.size)
            pending = await run.defer(session, "finish_delete", ref, wait=False)
        self.work.spawn(pending.result(), name=f"delete-{volume.id}")


def remove_deleted(volume_id: str) -> Any:
    """The row of a volume whose storage is gone: only while still `deleting` and without attachments."""
    return delete(Volume).where(
        Volume.id == volume_id,  # type: ignore[arg-type]
        Volume.status == VolumeStatus.DELETING,  # type: ignore[arg-type]
        ~exists().where(Attachment.volume_id == Volume.id),
    )
