"""The classic volume actions (os-reserve … os-detach, os-reset_status): the legacy face of the one state machine.

Every connect goes through the attachment service's one connect sequence; what this face adds is its own way
of finding the attachment a call means, and a record of what it did that the attachments API never does:
os-terminate_connection removes an ACL while the attachment stays attached (`terminated`), and Nova's legacy
live migration connects a second host to an attached volume (a second attachment row of the same instance,
the destination, until the side os-terminate_connection names goes). Reconcile reads both, so it restores
exactly the access this face granted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from sqlalchemy import delete, false, select, true, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import Context
from app.backends.base import BackendError
from app.db.engine import Database
from app.db.models import Attachment, AttachStatus, Volume, VolumeStatus, utcnow
from app.errors import BackendFailure, InUseByServer, InvalidAttachment, InvalidInput, InvalidVolume, ServiceUnavailable
from app.services.attachment_reads import AttachmentRecord
from app.services.attachments import AttachmentService, Claim, effective_mode, shielded
from app.services.connections import release, store_connector, users
from app.services.transitions import (
    ATTACHMENTS_OF,
    DELETE_ATTACHMENT,
    INITIATORS,
    INSERT_ATTACHMENT,
    columns_of,
    in_use_by_server,
    lock_volume,
    recompute_volume,
)
from app.services.volumes import load_volume, volume_ref

log = logging.getLogger("tether.legacy")

ATTACH_STATUSES = (AttachStatus.ATTACHED, AttachStatus.DETACHED)
_PENDING = (AttachStatus.RESERVED, AttachStatus.ERROR_ATTACHING)


class LegacyService:
    def __init__(self, db: Database, attachments: AttachmentService) -> None:
        self.db = db
        self.attachments = attachments
        self.nodes = attachments.nodes

    async def reserve(self, ctx: Context, volume_id: str) -> None:
        await self.attachments.reserve(ctx, volume_id=volume_id, legacy=True)

    async def unreserve(self, ctx: Context, volume_id: str) -> None:
        """os-unreserve: drop the never-attached attachments of an `attaching` volume.

        One that os-initialize_connection connected (Nova's failed attach: terminate, then unreserve)
        goes as a delete would, with the ACL and export nothing else needs.
        """

        async def work() -> None:
            async with self.nodes.exclusive(volume_id) as run:
                async with self.db.write() as session:
                    volume = await load_volume(session, ctx, volume_id, lock=True)
                    if volume.status != VolumeStatus.ATTACHING:
                        return
                    await session.execute(
                        delete(Attachment).where(
                            Attachment.volume_id == volume.id,  # type: ignore[arg-type]
                            Attachment.attach_status.in_(_PENDING),  # type: ignore[attr-defined]
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
                    await self.attachments.remove_locked(ctx, attachment_id, volume_id, run, guarded=False)

        await shielded(work)

    # -- os-initialize_connection ---------------------------------------------------------------

    async def initialize_connection(self, ctx: Context, volume_id: str, connector: Mapping[str, Any]) -> dict[str, Any]:
        record = await self._connect_for_initiator(ctx, volume_id, connector)
        data = record.connection_info
        return {"driver_volume_type": data.get("driver_volume_type", "iscsi"), "data": data, "enforce_multipath": False}

    async def _connect_for_initiator(
        self, ctx: Context, volume_id: str, connector: Mapping[str, Any]
    ) -> AttachmentRecord:
        """Connect the pending reservation, else re-connect this host's attachment, else (an attached volume)
        connect a migration destination; with none of them, reserve on the caller's behalf.

        The reservation os-reserve made comes first: a second instance on a host that already has a
        connection needs an attachment (and a connector row) of its own, or its shared ACL goes with
        the first one. No path changes the volume status: os-reserve set it and os-attach moves it.
        """
        checked = self.attachments.validate_connector(connector)
        initiator = str(checked["initiator"])
        async with self.db.read() as session:
            await load_volume(session, ctx, volume_id)
            pending = await session.scalar(
                select(Attachment.id)
                .where(
                    Attachment.volume_id == volume_id,
                    Attachment.attach_status.in_(_PENDING),  # type: ignore[attr-defined]
                )
                .order_by(Attachment.instance_uuid.is_not(None), Attachment.created_at)  # type: ignore[union-attr, arg-type]
                .limit(1)
            )
            pending = pending or next(
                (a for a, i in await users(session, volume_id, terminated=True) if i == initiator), None
            )
            source = pending or await session.scalar(
                select(Attachment.id)
                .join(Volume, Volume.id == Attachment.volume_id)  # type: ignore[arg-type]
                .where(
                    Attachment.volume_id == volume_id,
                    Volume.multiattach == false(),
                    Attachment.attach_status == AttachStatus.ATTACHED,
                )
                .order_by(Attachment.created_at)  # type: ignore[arg-type]
                .limit(1)
            )

        async def claim(session: AsyncSession) -> Claim:
            if pending is not None:
                return await self.attachments.claim_existing(session, ctx, pending, checked, legacy=True)
            if source is not None:
                return await self._claim_destination(session, ctx, source, checked)
            # Nova may initialize without reserving first: reserve on its behalf, as os-reserve would
            return await self.attachments.claim_new(session, ctx, volume_id, None, None, checked, legacy=True)

        return await self.attachments.connect_exclusive(volume_id, claim, checked)

    async def _claim_destination(
        self, session: AsyncSession, ctx: Context, source_id: str, connector: Mapping[str, Any]
    ) -> Claim:
        """Nova's legacy live migration: the destination host gets an attachment of its own beside the source's,
        of the same instance, attached as the source is; the source keeps its ACL until its own
        os-terminate_connection, and an os-terminate_connection of the destination (the rollback) removes it."""
        source = await self.attachments.load(session, ctx, source_id)
        volume = await load_volume(session, ctx, source.volume_id, lock=True)
        if source.attach_status != AttachStatus.ATTACHED:
            raise InvalidAttachment(f"Attachment {source.id} changed while being migrated; try again.")
        chap = await self.attachments.chap_for(session, volume)
        now = utcnow()
        destination = Attachment(
            volume_id=volume.id,
            project_id=volume.project_id,
            instance_uuid=source.instance_uuid,
            attached_host=connector.get("host"),
            mountpoint=source.mountpoint,
            attach_mode=source.attach_mode,
            attach_status=AttachStatus.ATTACHED,
            attach_time=now,
            updated_at=now,
        )
        await session.execute(INSERT_ATTACHMENT, columns_of(destination))
        await store_connector(session, destination.id, connector, fresh=True)

        async def undo(session: AsyncSession) -> None:
            await session.execute(DELETE_ATTACHMENT, {"attachment_id": destination.id})
            self.attachments.forget(destination.id)

        return Claim(destination, volume, chap, effective_mode(destination), undo)

    # -- os-attach, os-begin/roll_detaching -----------------------------------------------------

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
        """os-attach: the instance's attachment (or the pending one, or a new one) becomes attached."""
        if not instance_uuid and not host_name:
            raise InvalidInput("Invalid request to attach volume: one of instance_uuid or host_name is required.")
        async with self.db.write() as session:
            volume = await load_volume(session, ctx, volume_id, lock=True)
            candidates = list((await session.execute(ATTACHMENTS_OF, {"volume_id": volume.id})).scalars().all())
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

    async def _move_status(self, ctx: Context, volume_id: str, expected: tuple[str, ...], new: str) -> str | None:
        """One compare-and-swap of a volume's status; None when it moved, else the status it has."""
        async with self.db.write() as session:
            volume = await load_volume(session, ctx, volume_id, lock=True)
            if volume.status not in expected:
                return volume.status
            await session.execute(
                update(Volume).where(Volume.id == volume.id).values(status=new, updated_at=utcnow())  # type: ignore[arg-type]
            )
            return None

    async def begin_detaching(self, ctx: Context, volume_id: str) -> None:
        status = await self._move_status(ctx, volume_id, (VolumeStatus.IN_USE,), VolumeStatus.DETACHING)
        if status is not None:
            raise InvalidVolume(f"Volume {volume_id} status must be in-use to begin detaching, but it is {status}.")

    async def roll_detaching(self, ctx: Context, volume_id: str) -> None:
        await self._move_status(ctx, volume_id, (VolumeStatus.DETACHING,), VolumeStatus.IN_USE)

    # -- os-terminate_connection, os-detach, os-force_detach --------------------------------------

    async def terminate_connection(
        self, ctx: Context, volume_id: str, connector: Mapping[str, Any], *, guarded: bool = True
    ) -> None:
        """Drop the initiator's ACL unless another connected attachment still uses it, and record it.

        The one attachment using it is marked `terminated` (it stays attached until os-detach); when two
        instances on that host share the ACL, it stays and nothing is marked. On a non-multiattach volume with
        connected attachments on other hosts too (a legacy live migration), the side named here is done:
        its attachment goes (the source after the migration, the destination on a rollback).

        guarded: as a delete, refused (409, nothing changed) when a server uses an attachment of this initiator
        and the caller has no service token (OSSA-2023-003); os-force_detach's terminate is not guarded.
        """
        checked = self.attachments.validate_connector(connector)
        initiator = str(checked["initiator"])
        async with self.db.read() as session:
            volume = await load_volume(session, ctx, volume_id)

        async def work() -> None:
            async with self.nodes.exclusive(volume.id) as run:
                await run.require()  # a node that is down: 503 before the rows change
                async with self.db.write() as session:
                    await lock_volume(session, volume.id)
                    using = await users(session, volume.id)
                    mine = [a for a, i in using if i == initiator]
                    if guarded and ctx.guards_in_use and mine:
                        rows = (await session.execute(INITIATORS, {"volume_id": volume.id})).all()
                        busy = next((r for r in rows if r.id in mine and in_use_by_server(r)), None)
                        if busy is not None:
                            raise InUseByServer(busy.instance_uuid)
                    if mine and not volume.multiattach and len(mine) < len(using):
                        for attachment_id in mine:
                            await session.execute(DELETE_ATTACHMENT, {"attachment_id": attachment_id})
                            self.attachments.forget(attachment_id)
                        await recompute_volume(session, volume.id)
                    elif len(mine) == 1:
                        await session.execute(
                            update(Attachment)
                            .where(Attachment.id == mine[0])  # type: ignore[arg-type]
                            .values(terminated=true(), updated_at=utcnow())
                        )
                try:
                    await release(self.db, run, volume.id, [initiator])
                except BackendError as error:
                    log.error("terminating the connection of volume %s failed: %s", volume.id, error)
                    raise BackendFailure(f"Unable to terminate the connection of volume {volume.id}.") from None

        await shielded(work)

    async def detach(self, ctx: Context, volume_id: str, attachment_id: str | None) -> None:
        attachments = await self.attachments.attachments_of(ctx, volume_id)
        if attachment_id is None:
            if len(attachments) > 1:
                raise InvalidVolume(
                    f"Volume {volume_id} has {len(attachments)} attachments: name the one to detach (attachment_id)."
                )
            if not attachments:
                await self._move_status(ctx, volume_id, (VolumeStatus.DETACHING,), VolumeStatus.AVAILABLE)
                return
            attachment_id = attachments[0].id
        elif attachment_id not in {a.id for a in attachments}:
            raise InvalidVolume(f"Attachment {attachment_id} does not belong to volume {volume_id}.")
        await self.attachments.remove(ctx, attachment_id)

    async def force_detach(
        self, ctx: Context, volume_id: str, attachment_id: str | None, connector: Mapping[str, Any] | None
    ) -> None:
        if connector:
            await self.terminate_connection(ctx, volume_id, connector, guarded=False)
        attachments = await self.attachments.attachments_of(ctx, volume_id)
        if attachment_id is not None and attachment_id not in {a.id for a in attachments}:
            raise InvalidVolume(f"Attachment {attachment_id} does not belong to volume {volume_id}.")
        for attachment in attachments:
            if attachment_id is None or attachment.id == attachment_id:
                await self.attachments.remove(ctx, attachment.id, guarded=False)

    # -- os-reset_status --------------------------------------------------------------------------

    async def reset_status(
        self, ctx: Context, volume_id: str, *, status: str | None, attach_status: str | None
    ) -> None:
        """Set the statuses; `detached` drops every attachment and the target's export, under the volume's lock
        for both, so an attach from another worker cannot slip in between and be torn down after its 200."""
        if status is None and attach_status is None:
            raise InvalidInput("Must specify 'status' or 'attach_status'.")
        if status is not None and status not in {s.value for s in VolumeStatus}:
            raise InvalidInput(f"Invalid status '{status}'.")
        if attach_status is not None and attach_status not in ATTACH_STATUSES:
            raise InvalidInput(f"Invalid attach_status '{attach_status}': it must be attached or detached.")
        async with self.db.read() as session:
            volume = await load_volume(session, ctx, volume_id)

        async def work() -> None:
            async with self.nodes.exclusive(volume.id) as run:
                if attach_status == AttachStatus.DETACHED:
                    await run.require()  # the export must go too: a node that is down is a 503, nothing changed
                async with self.db.write() as session:
                    await load_volume(session, ctx, volume_id, lock=True)
                    values: dict[str, Any] = {"updated_at": utcnow()}
                    if status is not None:
                        values["status"] = status
                    if attach_status is not None:
                        values["attach_status"] = attach_status
                    if attach_status == AttachStatus.DETACHED:
                        gone = await session.execute(
                            delete(Attachment).where(Attachment.volume_id == volume.id).returning(Attachment.id)  # type: ignore[arg-type]
                        )
                        for attachment_id in gone.scalars().all():
                            self.attachments.forget(attachment_id)
                    await session.execute(update(Volume).where(Volume.id == volume.id).values(**values))  # type: ignore[arg-type]
                if attach_status == AttachStatus.DETACHED:
                    try:
                        await run("drop_export", volume_ref(volume))
                    except (
                        BackendError,
                        ServiceUnavailable,
                    ) as error:  # reconcile removes what the database no longer wants
                        log.error("removing the export of reset volume %s failed: %s", volume.id, error)

        await shielded(work)
