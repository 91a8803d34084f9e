"""Small helpers the attachments tests share: connectors, the fake target, the rows behind the API."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import httpx
from sqlalchemy import select, update

from app.backends.targets.fake import FakeTarget
from app.db.models import Attachment, AttachmentSpec, Volume
from tests.conftest import Api

IQN_PREFIX = "iqn.2010-10.org.openstack:volume-"
PORTAL = "127.0.0.1:3260"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}$")
SUMMARY_KEYS = {"id", "status", "instance", "volume_id"}
DETAIL_KEYS = SUMMARY_KEYS | {
    "attached_at",
    "detached_at",
    "attach_mode",
    "connection_info",
    "shared_connections_by_attachment",
}
CONNECTION_INFO_KEYS = {
    "driver_volume_type",
    "target_discovered",
    "target_iqn",
    "target_portal",
    "target_lun",
    "volume_id",
    "auth_method",
    "auth_username",
    "auth_password",
    "access_mode",
    "encrypted",
    "qos_specs",
    "cacheable",
    "attachment_id",
    "enforce_multipath",
}
MULTIPATH_KEYS = {"target_iqns", "target_portals", "target_luns"}


def initiator(host: str = "host1") -> str:
    return f"iqn.1993-08.org.debian:01:{host}"


def connector(host: str = "host1", **extra: Any) -> dict[str, Any]:
    """What os-brick sends for an iSCSI host."""
    return {
        "initiator": initiator(host),
        "ip": "192.0.2.10",
        "host": host,
        "platform": "x86_64",
        "os_type": "linux",
        "multipath": False,
        "do_local_attach": False,
        **extra,
    }


def target(api: Api) -> FakeTarget:
    found = api.app.state.backends.target
    assert isinstance(found, FakeTarget)
    return found


def exported(api: Api, volume_id: str) -> bool:
    return volume_id in target(api).targets


def new_uuid() -> str:
    return str(uuid.uuid4())


async def create_attachment(
    api: Api,
    volume_id: str,
    *,
    instance_uuid: str | None = None,
    connector: dict[str, Any] | None = None,
    **fields: Any,
) -> httpx.Response:
    body: dict[str, Any] = {"volume_uuid": volume_id, **fields}
    if instance_uuid is not None:
        body["instance_uuid"] = instance_uuid
    if connector is not None:
        body["connector"] = connector
    return await api.post("/attachments", {"attachment": body})


async def reserve(api: Api, volume_id: str, **kwargs: Any) -> dict[str, Any]:
    response = await create_attachment(api, volume_id, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()["attachment"]  # type: ignore[no-any-return]


async def connect(api: Api, attachment_id: str, body_connector: dict[str, Any]) -> dict[str, Any]:
    response = await api.put(f"/attachments/{attachment_id}", {"attachment": {"connector": body_connector}})
    assert response.status_code == 200, response.text
    return response.json()["attachment"]  # type: ignore[no-any-return]


async def complete(api: Api, attachment_id: str) -> None:
    response = await api.post(f"/attachments/{attachment_id}/action", {"os-complete": None})
    assert response.status_code == 204, response.text
    assert response.content == b""


async def remove(api: Api, attachment_id: str) -> list[dict[str, Any]]:
    response = await api.delete(f"/attachments/{attachment_id}")
    assert response.status_code == 200, response.text
    return response.json()["attachments"]  # type: ignore[no-any-return]


async def show(api: Api, attachment_id: str) -> dict[str, Any]:
    response = await api.get(f"/attachments/{attachment_id}")
    assert response.status_code == 200, response.text
    return response.json()["attachment"]  # type: ignore[no-any-return]


async def listed(api: Api, query: str = "", *, detail: bool = False) -> list[dict[str, Any]]:
    response = await api.get(f"/attachments{'/detail' if detail else ''}{query}")
    assert response.status_code == 200, response.text
    return response.json()["attachments"]  # type: ignore[no-any-return]


async def volume_state(api: Api, volume_id: str) -> tuple[str, str]:
    """(status as GET shows it, attach_status as stored: the API does not show it)."""
    status = (await api.volume(volume_id))["status"]
    async with api.app.state.db.read() as session:
        attach_status = await session.scalar(select(Volume.attach_status).where(Volume.id == volume_id))
    return status, str(attach_status)


async def set_volume_status(api: Api, volume_id: str, status: str) -> None:
    async with api.app.state.db.write() as session:
        await session.execute(update(Volume).where(Volume.id == volume_id).values(status=status))  # type: ignore[arg-type]


async def specs(api: Api, attachment_id: str) -> dict[str, str]:
    """The raw attachment_specs rows of an attachment: key -> stored (JSON) text."""
    async with api.app.state.db.read() as session:
        rows = await session.execute(select(AttachmentSpec).where(AttachmentSpec.attachment_id == attachment_id))
        return {row.key: row.value for row in rows.scalars().all()}


def decoded(rows: dict[str, str]) -> dict[str, Any]:
    return {key: json.loads(value) for key, value in rows.items()}


async def attachment_rows(api: Api, volume_id: str) -> list[Attachment]:
    async with api.app.state.db.read() as session:
        rows = await session.execute(select(Attachment).where(Attachment.volume_id == volume_id))
        return list(rows.scalars().all())
