"""Start-up (and on-demand) reconcile: finish or roll back what a crash interrupted, and make the
target's exports and ACLs match the database exactly."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from sqlalchemy import delete, select, update

from app.backends.base import BackendError, Backends, VolumeRef
from app.backends.dispatch import Dispatcher
from app.db.engine import Database
from app.db.models import Attachment, AttachmentSpec, AttachStatus, Volume, VolumeStatus, utcnow
from app.secrets import SEALED, SecretBox
from app.services.attachments import CONNECTED, chap_of, provider_auth, recompute_volume

log = logging.getLogger("tether.reconcile")


@dataclass
class ReconcileReport:
    volumes_created: list[str] = field(default_factory=list)
    volumes_failed: list[str] = field(default_factory=list)
    volumes_deleted: list[str] = field(default_factory=list)
    attachments_rolled_back: list[str] = field(default_factory=list)
    exports_restored: list[str] = field(default_factory=list)
    exports_removed: list[str] = field(default_factory=list)
    acls_added: list[tuple[str, str]] = field(default_factory=list)
    acls_removed: list[tuple[str, str]] = field(default_factory=list)
    secrets_sealed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Reconciler:
    def __init__(
        self, db: Database, dispatcher: Dispatcher, backends: Backends, secrets: SecretBox | None = None
    ) -> None:
        self.db = db
        self.dispatcher = dispatcher
        self.backends = backends
        self.secrets = secrets or SecretBox(None)

    async def run(self) -> ReconcileReport:
        report = ReconcileReport()
        await self._seal_secrets(report)
        await self._volumes(report)
        await self._attachments(report)
        await self._target(report)
        if any(getattr(report, name) for name in report.__dataclass_fields__):
            log.info("reconcile: %s", report)
        return report

    async def _seal_secrets(self, report: ReconcileReport) -> None:
        """Once TETHER_SECRET_KEY is set, CHAP secrets stored before it are sealed too."""
        if not self.secrets.sealing:
            return
        async with self.db.write() as session:
            plain = (
                await session.execute(
                    select(Volume).where(
                        Volume.provider_auth.is_not(None),  # type: ignore[union-attr]
                        Volume.provider_auth.not_like(f"% {SEALED}%"),  # type: ignore[union-attr]
                    )
                )
            ).scalars()
            for volume in plain:
                chap = chap_of(volume, self.secrets)
                if chap is not None:
                    volume.provider_auth = provider_auth(chap, self.secrets)
                    report.secrets_sealed.append(volume.id)
            infos = (
                await session.execute(
                    select(Attachment).where(
                        Attachment.connection_info.is_not(None),  # type: ignore[union-attr]
                        Attachment.connection_info.not_like(f'%"auth_password": "{SEALED}%'),  # type: ignore[union-attr]
                    )
                )
            ).scalars()
            for attachment in infos:
                info = json.loads(attachment.connection_info or "{}")
                if isinstance(info.get("auth_password"), str):
                    info["auth_password"] = self.secrets.seal(info["auth_password"])
                    attachment.connection_info = json.dumps(info)

    async def _volumes(self, report: ReconcileReport) -> None:
        async with self.db.read() as session:
            stuck = (
                await session.execute(
                    select(Volume.id, Volume.size, Volume.status).where(
                        Volume.status.in_((VolumeStatus.CREATING, VolumeStatus.DELETING))  # type: ignore[attr-defined]
                    )
                )
            ).all()
        for volume_id, size, status in stuck:
            ref = VolumeRef(id=volume_id, size_gb=size)
            if status == VolumeStatus.CREATING:
                try:
                    await self.dispatcher.run(volume_id, self.backends.volumes.create, ref)
                    outcome, bucket = VolumeStatus.AVAILABLE, report.volumes_created
                except BackendError as error:
                    log.error("reconcile: creating volume %s failed: %s", volume_id, error)
                    outcome, bucket = VolumeStatus.ERROR, report.volumes_failed
                async with self.db.write() as session:
                    await session.execute(
                        update(Volume)
                        .where(Volume.id == volume_id, Volume.status == VolumeStatus.CREATING)  # type: ignore[arg-type]
                        .values(status=outcome, updated_at=utcnow())
                    )
                bucket.append(volume_id)
            else:
                try:
                    await self.dispatcher.run(volume_id, self.backends.volumes.delete, ref)
                except BackendError as error:
                    log.error("reconcile: deleting volume %s failed: %s", volume_id, error)
                    report.errors.append(f"delete {volume_id}")
                    continue
                async with self.db.write() as session:
                    await session.execute(
                        delete(Volume).where(Volume.id == volume_id, Volume.status == VolumeStatus.DELETING)  # type: ignore[arg-type]
                    )
                report.volumes_deleted.append(volume_id)

    async def _attachments(self, report: ReconcileReport) -> None:
        """A connect that never recorded its connection_info did not finish: back to reserved."""
        async with self.db.write() as session:
            rows = (
                await session.execute(
                    select(Attachment.id, Attachment.volume_id).where(
                        Attachment.attach_status == AttachStatus.ATTACHING,  # type: ignore[arg-type]
                        Attachment.connection_info.is_(None),  # type: ignore[union-attr]
                    )
                )
            ).all()
            for attachment_id, volume_id in rows:
                await session.execute(
                    update(Attachment)
                    .where(Attachment.id == attachment_id)  # type: ignore[arg-type]
                    .values(attach_status=AttachStatus.RESERVED, attach_time=None, updated_at=utcnow())
                )
                await recompute_volume(session, volume_id)
                report.attachments_rolled_back.append(attachment_id)

    async def _target(self, report: ReconcileReport) -> None:
        target = self.backends.target
        async with self.db.read() as session:
            rows = (
                await session.execute(
                    select(Volume, AttachmentSpec.value)
                    .join(Attachment, Attachment.volume_id == Volume.id)  # type: ignore[arg-type]
                    .join(AttachmentSpec, AttachmentSpec.attachment_id == Attachment.id)  # type: ignore[arg-type]
                    .where(
                        Attachment.attach_status.in_(CONNECTED),  # type: ignore[attr-defined]
                        AttachmentSpec.key == "initiator",
                    )
                )
            ).all()
        wanted: dict[str, tuple[Volume, set[str]]] = {}
        for volume, initiator in rows:
            wanted.setdefault(volume.id, (volume, set()))[1].add(json.loads(initiator))
        try:
            actual = await self.dispatcher.run("__target__", target.exports)
        except BackendError as error:
            log.error("reconcile: reading the target's exports failed: %s", error)
            report.errors.append("exports")
            return
        for volume_id, (volume, initiators) in wanted.items():
            ref = VolumeRef(id=volume.id, size_gb=volume.size)
            have = actual.get(volume_id)
            chap = chap_of(volume, self.secrets)
            try:
                async with self.dispatcher.exclusive(volume_id) as run:
                    # an export missing, or left half-made by a crash, is (re)made before any ACL opens it
                    if (have is None or not have.complete) and chap is not None:
                        await run(target.create_export, ref, self.backends.volumes.path(ref), chap)
                        report.exports_restored.append(volume_id)
                    elif chap is None:
                        report.errors.append(f"export {volume_id}: no CHAP credentials recorded")
                        continue
                    # iSCSI names compare case-insensitively (LIO keeps them in lower case)
                    present = {i.lower(): i for i in (have.initiators if have else ())}
                    expected = {i.lower(): i for i in initiators}
                    for key in sorted(expected.keys() - present.keys()):
                        await run(target.add_initiator, ref, expected[key])
                        report.acls_added.append((volume_id, expected[key]))
                    for key in sorted(present.keys() - expected.keys()):
                        await run(target.remove_initiator, ref, present[key])
                        report.acls_removed.append((volume_id, present[key]))
            except BackendError as error:
                log.error("reconcile: restoring the export of volume %s failed: %s", volume_id, error)
                report.errors.append(f"export {volume_id}")
        for volume_id in sorted(set(actual) - set(wanted)):
            ref = VolumeRef(id=volume_id, size_gb=0)
            try:
                async with self.dispatcher.exclusive(volume_id) as run:
                    for initiator in sorted(actual[volume_id].initiators):
                        await run(target.remove_initiator, ref, initiator)
                    await run(target.remove_export, ref)
                report.exports_removed.append(volume_id)
            except BackendError as error:
                log.error("reconcile: removing the orphan export of volume %s failed: %s", volume_id, error)
                report.errors.append(f"orphan {volume_id}")
