"""View builders: database records to the bodies each microversion promises."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from fastapi.responses import JSONResponse

from app import microversions as mv
from app.auth import Context
from app.db.models import Attachment
from app.microversions import APIVersion
from app.services.attachment_reads import AttachmentRecord
from app.services.types import TypeRecord
from app.services.volumes import VolumeRecord

SERVICE_UUID = str(uuid.uuid5(uuid.NAMESPACE_URL, "tether-volume-service"))


def reply(body: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status)


def when(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat(timespec="microseconds")


def _links(base: str, project: str, kind: str, item_id: str) -> list[dict[str, str]]:
    return [
        {"href": f"{base}/v3/{project}/{kind}/{item_id}", "rel": "self"},
        {"href": f"{base}/{project}/{kind}/{item_id}", "rel": "bookmark"},
    ]


def volume_summary(record: VolumeRecord, base: str) -> dict[str, Any]:
    v = record.volume
    return {"id": v.id, "name": v.name, "links": _links(base, v.project_id, "volumes", v.id)}


def volume_detail(record: VolumeRecord, version: APIVersion, ctx: Context, base: str) -> dict[str, Any]:
    v = record.volume
    body: dict[str, Any] = {
        "id": v.id,
        "name": v.name,
        "description": v.description,
        "status": v.status,
        "size": v.size,
        "availability_zone": v.availability_zone,
        "created_at": when(v.created_at),
        "updated_at": when(v.updated_at),
        "volume_type": record.volume_type.name if record.volume_type else None,
        "snapshot_id": None,
        "source_volid": None,
        "metadata": record.metadata,
        "links": _links(base, v.project_id, "volumes", v.id),
        "user_id": v.user_id,
        "bootable": "true" if v.bootable else "false",
        "encrypted": False,
        "replication_status": v.replication_status,
        "consistencygroup_id": None,
        "multiattach": v.multiattach,
        "attachments": [
            {
                "id": v.id,
                "attachment_id": a.id,
                "volume_id": v.id,
                "server_id": a.instance_uuid,
                # Cinder shows the host to admins and to a service (Glance's cinder store detaching a multiattach)
                "host_name": a.attached_host if ctx.shows_host or "service" in ctx.roles else None,
                "device": a.mountpoint,
                "attached_at": when(a.attach_time),
            }
            for a in record.attachments
        ],
        "os-vol-tenant-attr:tenant_id": v.project_id,
    }
    if ctx.shows_host:
        body["os-vol-host-attr:host"] = v.host
    if ctx.shows_migration:
        body["migration_status"] = v.migration_status
    if version >= mv.SHARED_TARGETS_AND_SERVICE_FIELDS:
        body["shared_targets"] = False
        body["service_uuid"] = SERVICE_UUID
    if version >= mv.VOLUME_TYPE_ID_IN_VOLUME_DETAIL:
        body["volume_type_id"] = v.volume_type_id
    if version >= mv.USE_QUOTA:
        body["consumes_quota"] = True
    return body


def volume_type(record: TypeRecord) -> dict[str, Any]:
    t = record.type
    return {
        "id": t.id,
        "name": t.name,
        "description": t.description,
        "is_public": t.is_public,
        "os-volume-type-access:is_public": t.is_public,
        "extra_specs": record.extra_specs,
        "qos_specs_id": None,
    }


def attachment_summary(a: Attachment) -> dict[str, Any]:
    return {"id": a.id, "status": a.attach_status, "instance": a.instance_uuid, "volume_id": a.volume_id}


def attachment_detail(record: AttachmentRecord) -> dict[str, Any]:
    a = record.attachment
    return {
        **attachment_summary(a),
        "attached_at": when(a.attach_time) or "",
        "detached_at": when(a.detach_time) or "",
        "attach_mode": a.attach_mode,
        "connection_info": record.connection_info,
        "shared_connections_by_attachment": record.shared_with,
    }


def next_link(base: str, path: str, query: dict[str, str], marker: str) -> dict[str, str]:
    params = {k: v for k, v in query.items() if k not in ("marker", "offset")}
    params["marker"] = marker
    return {"href": f"{base}{path}?{urlencode(params)}", "rel": "next"}
