"""The classic volume actions (os-reserve … os-detach) as thin wrappers over the attachment service."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.auth import Context
from app.db.engine import Database
from app.db.models import AttachStatus, VolumeStatus
from app.errors import Forbidden, InvalidInput, InvalidVolume
from app.services.attachments import AttachmentService
from app.services.volumes import load_volume

ATTACH_STATUSES = (AttachStatus.ATTACHED, AttachStatus.DETACHED)


class LegacyService:
    def __init__(self, db: Database, attachments: AttachmentService) -> None:
        self.db = db
        self.attachments = attachments

    async def reserve(self, ctx: Context, volume_id: str) -> None:
        await self.attachments.reserve(ctx, volume_id=volume_id, legacy=True)

    async def unreserve(self, ctx: Context, volume_id: str) -> None:
        await self.attachments.unreserve(ctx, volume_id)

    async def initialize_connection(self, ctx: Context, volume_id: str, connector: Mapping[str, Any]) -> dict[str, Any]:
        record = await self.attachments.connect_for_initiator(ctx, volume_id, connector)
        data = record.connection_info
        return {"driver_volume_type": data.get("driver_volume_type", "iscsi"), "data": data, "enforce_multipath": False}

    async def attach(
        self,
        ctx: Context,
        volume_id: str,
        *,
        instance_uuid: str | None,
        host_name: str | None,
        mountpoint: str | None,
        mode: str,
    ) -> None:
        if not instance_uuid and not host_name:
            raise InvalidInput("Invalid request to attach volume: one of instance_uuid or host_name is required.")
        await self.attachments.mark_attached(
            ctx, volume_id, instance_uuid=instance_uuid, host_name=host_name, mountpoint=mountpoint, mode=mode
        )

    async def begin_detaching(self, ctx: Context, volume_id: str) -> None:
        moved = await self.attachments.move_volume_status(
            ctx, volume_id, (VolumeStatus.IN_USE,), VolumeStatus.DETACHING
        )
        if not moved:
            status = (await self._volume_status(ctx, volume_id)) or "unknown"
            raise InvalidVolume(f"Volume {volume_id} status must be in-use to begin detaching, but it is {status}.")

    async def roll_detaching(self, ctx: Context, volume_id: str) -> None:
        await self.attachments.move_volume_status(ctx, volume_id, (VolumeStatus.DETACHING,), VolumeStatus.IN_USE)

    async def terminate_connection(self, ctx: Context, volume_id: str, connector: Mapping[str, Any]) -> None:
        await self.attachments.disconnect_initiator(ctx, volume_id, connector)

    async def detach(self, ctx: Context, volume_id: str, attachment_id: str | None) -> None:
        attachments = await self.attachments.attachments_of(ctx, volume_id)
        if attachment_id is None:
            if len(attachments) > 1:
                raise InvalidVolume(
                    f"Volume {volume_id} has {len(attachments)} attachments: name the one to detach (attachment_id)."
                )
            if not attachments:
                await self.attachments.move_volume_status(
                    ctx, volume_id, (VolumeStatus.DETACHING,), VolumeStatus.AVAILABLE
                )
                return
            attachment_id = attachments[0].id
        elif attachment_id not in {a.id for a in attachments}:
            raise InvalidVolume(f"Attachment {attachment_id} does not belong to volume {volume_id}.")
        await self.attachments.remove(ctx, attachment_id)

    async def force_detach(
        self, ctx: Context, volume_id: str, attachment_id: str | None, connector: Mapping[str, Any] | None
    ) -> None:
        if not ctx.is_admin:
            raise Forbidden()
        if connector:
            await self.attachments.disconnect_initiator(ctx, volume_id, connector)
        attachments = await self.attachments.attachments_of(ctx, volume_id)
        if attachment_id is not None and attachment_id not in {a.id for a in attachments}:
            raise InvalidVolume(f"Attachment {attachment_id} does not belong to volume {volume_id}.")
        for attachment in attachments:
            if attachment_id is None or attachment.id == attachment_id:
                await self.attachments.remove(ctx, attachment.id)

    async def reset_status(
        self, ctx: Context, volume_id: str, *, status: str | None, attach_status: str | None
    ) -> None:
        if not ctx.is_admin:
            raise Forbidden()
        if status is None and attach_status is None:
            raise InvalidInput("Must specify 'status' or 'attach_status'.")
        if status is not None and status not in {s.value for s in VolumeStatus}:
            raise InvalidInput(f"Invalid status '{status}'.")
        if attach_status is not None and attach_status not in ATTACH_STATUSES:
            raise InvalidInput(f"Invalid attach_status '{attach_status}': it must be attached or detached.")
        await self.attachments.reset(ctx, volume_id, status=status, attach_status=attach_status)

    async def _volume_status(self, ctx: Context, volume_id: str) -> str | None:
        async with self.db.read() as session:
            return (await load_volume(session, ctx, volume_id)).status
