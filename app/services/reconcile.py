"""A node's reconcile (at start, every TETHER_RECONCILE_INTERVAL, and on demand): finish or roll back what a
crash interrupted, and make its target's exports and ACLs match the database exactly, for its own volumes only.

The reconciler is also the node's side of the volume jobs: `finish_create` and `finish_delete` are the same
steps that settle a `creating` or `deleting` volume after a crash.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import delete, func, select, update

from app.backends.base import BackendError, ExportState, VolumeRef
from app.backends.dispatch import LockTimeout
from app.db.engine import Database
from app.db.models import Attachment, AttachmentSpec, AttachStatus, Volume, VolumeStatus, utcnow
from app.secrets import SEALED, SecretBox
from app.services import idempotency
from app.services.connections import chap_of, provider_auth
from app.services.nodes import NodeRunner, Nodes, Unwanted
from app.services.transitions import CONNECTED, lock_volume, recompute_volume
from app.services.volumes import remove_deleted

log = logging.getLogger("tether.reconcile")


@dataclass
class ReconcileReport:
    volumes_created: list[str] = field(default_factory=list)
    volumes_failed: list[str] = field(default_factory=list)
    volumes_deleted: list[str] = field(default_factory=list)
    attachments_rolled_back: list[str] = field(default_factory=list)
    # keyed creates with a connector that a crash interrupted: removed with their key, so a retry runs again
    attachments_removed: list[str] = field(default_factory=list)
    exports_restored: list[str] = field(default_factory=list)
    exports_removed: list[str] = field(default_factory=list)
    acls_added: list[tuple[str, str]] = field(default_factory=list)
    acls_removed: list[tuple[str, str]] = field(default_factory=list)
    secrets_sealed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def failed(self, what: str, error: Exception) -> None:
        """One row that could not be settled: in the errors, and logged; a volume busy past lock_timeout or a node
        told to stop (LockTimeout: the next reconcile settles it) without a traceback, anything else with one."""
        if isinstance(error, LockTimeout):
            log.warning("reconcile: %s: %s", what, error)
        else:
            log.exception("reconcile: %s: %s", what, error)
        self.errors.append(what)


class Reconciler:
    def __init__(
        self, db: Database, nodes: Nodes, secrets: SecretBox | None = None, *, own_node: str | None = None
    ) -> None:
        """`nodes`: this process's own storage (nodes.local); `own_node`: the node whose volumes it reconciles
        (hosts `<node>@…`, whatever their backend and pool names), or None for every volume in the database
        (embedded: this process is the only node)."""
        assert nodes.local is not None
        self.db = db
        self.nodes = nodes
        self.local = nodes.local
        self.secrets = secrets or SecretBox(None)
        self.own_node = own_node
        # told when a volume was created or deleted here: the node's heartbeat then reports the new capacity
        self.on_change: Callable[[], None] | None = None
        nodes.local.side = self

    def _mine(self) -> list[Any]:
        return [] if self.own_node is None else [self._on_this_node()]

    def _on_this_node(self) -> Any:
        return Volume.host.startswith(f"{self.own_node}@", autoescape=True)  # type: ignore[union-attr, call-arg]

    async def sequence(self, op: str, args: tuple[Any, ...]) -> Any:
        """A node-side job: a volume's create or delete with its status change, or a whole reconcile."""
        if op == "reconcile":
            return asdict(await self.run())
        (ref,) = args
        report = ReconcileReport()
        waiting_for = VolumeStatus.CREATING if op == "finish_create" else VolumeStatus.DELETING

        async def unsettled() -> bool:
            """Whether the volume still waits for this job. One settled already (this node's reconcile finished it
            while the job waited in the queue, or an admin moved it) needs nothing, and no lock waited for: whoever
            holds its lock may be waiting for its own next job of this volume (an admin's os-reset_status that
            moved it, then drops its export), which the queue runs only after this one (one volume's jobs run in
            order), and waiting on for the lock stopped both until that caller's TETHER_NODE_TIMEOUT. So it is
            asked again while the job waits."""
            async with self.db.read() as session:
                return await session.scalar(select(Volume.status).where(Volume.id == ref.id)) == waiting_for  # type: ignore[arg-type]

        try:
            async with self.nodes.exclusive(ref.id, unsettled) as run:
                if op == "finish_create":
                    await self._finish_create(run, ref, report)
                else:
                    await self._finish_delete(run, ref, report, final=True)
        except Unwanted:
            return None
        if self.on_change is not None and (report.volumes_created or report.volumes_deleted):
            self.on_change()
        return None

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
                        Volume.status.in_((VolumeStatus.CREATING, VolumeStatus.DELETING)),  # type: ignore[attr-defined]
                        *self._mine(),
                    )
                )
            ).all()
        for volume_id, size, status in stuck:
            try:
                async with self.nodes.exclusive(volume_id) as run:
                    if status == VolumeStatus.CREATING:
                        await self._finish_create(run, VolumeRef(id=volume_id, size_gb=size), report)
                    else:
                        await self._finish_delete(run, VolumeRef(id=volume_id, size_gb=size), report)
            except Exception as error:  # one bad row never stops the rest (nor a worker's start)
                report.failed(f"volume {volume_id}", error)

    async def _finish_create(self, run: NodeRunner, ref: VolumeRef, report: ReconcileReport) -> None:
        async with self.db.read() as session:
            status = await session.scalar(select(Volume.status).where(Volume.id == ref.id))  # type: ignore[arg-type]
        if status != VolumeStatus.CREATING:  # a job run again after its first run settled it (or an admin did)
            return
        try:
            await run("create_volume", ref)
            outcome, bucket = VolumeStatus.AVAILABLE, report.volumes_created
        except BackendError as error:
            log.error("creating volume %s failed: %s", ref.id, error)
            outcome, bucket = VolumeStatus.ERROR, report.volumes_failed
        await self._set_status(ref.id, VolumeStatus.CREATING, outcome)
        bucket.append(ref.id)

    async def _set_status(self, volume_id: str, expected: VolumeStatus, new: VolumeStatus) -> None:
        async with self.db.write() as session:
            await session.execute(
                update(Volume)
                .where(Volume.id == volume_id, Volume.status == expected)  # type: ignore[arg-type]
                .values(status=new, updated_at=utcnow())
            )

    async def _finish_delete(
        self, run: NodeRunner, ref: VolumeRef, report: ReconcileReport, *, final: bool = False
    ) -> None:
        """A volume left `deleting`: its storage goes, then its row; never a volume that has attachments (an
        admin's os-reset_status to `deleting` on an attached one): that one becomes error_deleting, storage kept."""
        async with self.db.write() as session:
            await lock_volume(session, ref.id)
            status = await session.scalar(select(Volume.status).where(Volume.id == ref.id))  # type: ignore[arg-type]
            if status != VolumeStatus.DELETING:  # gone already (a job run twice), or an admin moved it
                return
            attached = await session.scalar(select(func.count()).where(Attachment.volume_id == ref.id))  # type: ignore[arg-type]
            if attached:
                await session.execute(
                    update(Volume)
                    .where(Volume.id == ref.id, Volume.status == VolumeStatus.DELETING)  # type: ignore[arg-type]
                    .values(status=VolumeStatus.ERROR_DELETING, updated_at=utcnow())
                )
        if attached:
            log.error("volume %s is deleting but has %d attachment(s): its storage is kept", ref.id, attached)
            report.errors.append(f"delete {ref.id}: it has attachments")
            return
        try:
            await run("delete_volume", ref)
        except BackendError as error:
            log.error("deleting volume %s failed: %s", ref.id, error)
            report.errors.append(f"delete {ref.id}")
            if final:  # the delete job itself: error_deleting, as Cinder (a reconcile retries instead)
                await self._set_status(ref.id, VolumeStatus.DELETING, VolumeStatus.ERROR_DELETING)
            return
        async with self.db.write() as session:
            await session.execute(remove_deleted(ref.id))
        report.volumes_deleted.append(ref.id)

    async def _attachments(self, report: ReconcileReport) -> None:
        """A connect that never recorded its connection_info did not finish: back to reserved.

        Another process may be in the middle of that very connect (a worker that starts while its siblings
        serve, or `tether reconcile` on a live system): every connect holds the volume's lock from claim to
        record, so under that lock an attachment still `attaching` without connection_info is abandoned.
        """
        async with self.db.read() as session:
            rows = (
                await session.execute(
                    select(Attachment.id, Attachment.volume_id)
                    .join(Volume, Volume.id == Attachment.volume_id)  # type: ignore[arg-type]
                    .where(
                        Attachment.attach_status == AttachStatus.ATTACHING,  # type: ignore[arg-type]
                        Attachment.connection_info.is_(None),  # type: ignore[union-attr]
                        *self._mine(),
                    )
                )
            ).all()
        for attachment_id, volume_id in rows:
            try:
                await self._roll_back(attachment_id, volume_id, report)
            except Exception as error:  # one bad row never stops the rest
                report.failed(f"attachment {attachment_id}", error)

    async def _roll_back(self, attachment_id: str, volume_id: str, report: ReconcileReport) -> None:
        """Back to reserved; but a keyed create with a connector (its Idempotency-Key still in flight) leaves no
        trace, as when its backend call fails (SPEC 9): its client never got an answer and retries with the key."""
        async with self.nodes.exclusive(volume_id), self.db.write() as session:
            # the volume's row first, as every transition takes it
            await lock_volume(session, volume_id)
            removed = await session.execute(
                delete(Attachment).where(
                    Attachment.id == attachment_id,  # type: ignore[arg-type]
                    Attachment.attach_status == AttachStatus.ATTACHING,  # type: ignore[arg-type]
                    Attachment.connection_info.is_(None),  # type: ignore[union-attr]
                    idempotency.in_flight_for(Attachment.id),
                )
            )
            if removed.rowcount == 1:  # type: ignore[attr-defined]
                await idempotency.abandon(session, attachment_id)
                await recompute_volume(session, volume_id)
                report.attachments_removed.append(attachment_id)
                return
            undone = await session.execute(
                update(Attachment)
                .where(
                    Attachment.id == attachment_id,  # type: ignore[arg-type]
                    Attachment.attach_status == AttachStatus.ATTACHING,  # type: ignore[arg-type]
                    Attachment.connection_info.is_(None),  # type: ignore[union-attr]
                )
                .values(attach_status=AttachStatus.RESERVED, attach_time=None, updated_at=utcnow())
            )
            if undone.rowcount != 1:  # type: ignore[attr-defined]
                return  # the connect finished (or was undone) while we waited for the lock
            await recompute_volume(session, volume_id)
        report.attachments_rolled_back.append(attachment_id)

    async def _wanted(self, volume_id: str | None = None) -> dict[str, tuple[Volume, set[str]]]:
        """Each volume with a connected attachment (its export), and the initiators those attachments use.

        The legacy face's record counts: os-terminate_connection ended a `terminated` attachment's ACL, but it
        keeps the export until os-detach; a legacy live migration's two attachments (source and destination)
        each keep their own ACL until os-terminate_connection names one.
        """
        conditions = [
            Attachment.attach_status.in_(CONNECTED),  # type: ignore[attr-defined]
            AttachmentSpec.key == "initiator",
        ]
        if volume_id is not None:
            conditions.append(Volume.id == volume_id)  # type: ignore[arg-type]
        conditions.extend(self._mine())
        async with self.db.read() as session:
            rows = (
                await session.execute(
                    select(Volume, AttachmentSpec.value, Attachment.terminated)
                    .join(Attachment, Attachment.volume_id == Volume.id)  # type: ignore[arg-type]
                    .join(AttachmentSpec, AttachmentSpec.attachment_id == Attachment.id)  # type: ignore[arg-type]
                    .where(*conditions)
                )
            ).all()
        wanted: dict[str, tuple[Volume, set[str]]] = {}
        for volume, initiator, terminated in rows:
            initiators = wanted.setdefault(volume.id, (volume, set()))[1]
            if not terminated:
                initiators.add(json.loads(initiator))
        return wanted

    async def _target(self, report: ReconcileReport) -> None:
        """Make each export match the database; only the volumes that differ are touched.

        The first look (database, then target) is taken without locks, so other processes may change a
        volume right after it: each volume that differs is looked at again under its lock before anything
        is changed, and a volume that another process has just exported or detached is left alone.
        """
        wanted = await self._wanted()
        try:
            actual = await self.local.call(None, "exports", ())
        except BackendError as error:
            log.error("reconcile: reading the target's exports failed: %s", error)
            report.errors.append("exports")
            return
        others = await self._others(actual.keys() - wanted.keys())
        differ = [
            v
            for v in sorted(wanted.keys() | actual.keys())
            if v not in others and _differs(wanted.get(v), actual.get(v))
        ]
        for volume_id in differ:
            try:
                async with self.nodes.exclusive(volume_id) as run:
                    want = (await self._wanted(volume_id)).get(volume_id)
                    have = (await run("exports")).get(volume_id)
                    if want is not None:
                        await self._restore(run, want, have, report)
                    elif have is not None:
                        await self._remove(run, have, report)
            except (BackendError, LockTimeout) as error:
                log.error("reconcile: making the export of volume %s match failed: %s", volume_id, error)
                report.errors.append(f"export {volume_id}")
            except Exception as error:  # one bad row (a CHAP secret that cannot be read, …) never stops the rest
                log.exception("reconcile: volume %s: %s", volume_id, error)
                report.errors.append(f"export {volume_id}")

    async def _others(self, volume_ids: Iterable[str]) -> set[str]:
        """Of exports no volume of ours wants, those of another node's volumes: never ours to remove."""
        ids = list(volume_ids)
        if self.own_node is None or not ids:
            return set()
        async with self.db.read() as session:
            rows = await session.execute(
                select(Volume.id).where(Volume.id.in_(ids), ~self._on_this_node())  # type: ignore[attr-defined]
            )
            return set(rows.scalars().all())

    async def _restore(
        self, run: NodeRunner, want: tuple[Volume, set[str]], have: ExportState | None, report: ReconcileReport
    ) -> None:
        volume, initiators = want
        ref = VolumeRef(id=volume.id, size_gb=volume.size)
        chap = chap_of(volume, self.secrets)
        if chap is None:
            report.errors.append(f"export {volume.id}: no CHAP credentials recorded")
            return
        # an export missing, or left half-made by a crash, is (re)made before any ACL opens it
        if have is None or not have.complete:
            await run("create_export", ref, chap)
            report.exports_restored.append(volume.id)
        present = {i.lower(): i for i in (have.initiators if have else ())}
        expected = {i.lower(): i for i in initiators}
        for key in sorted(expected.keys() - present.keys()):
            await run("add_initiator", ref, expected[key])
            report.acls_added.append((volume.id, expected[key]))
        for key in sorted(present.keys() - expected.keys()):
            await run("remove_initiator", ref, present[key])
            report.acls_removed.append((volume.id, present[key]))

    async def _remove(self, run: NodeRunner, have: ExportState, report: ReconcileReport) -> None:
        """An export no connected attachment wants: its ACLs go first, then the export."""
        await run("disconnect", VolumeRef(id=have.volume_id, size_gb=0), sorted(have.initiators), True)
        report.exports_removed.append(have.volume_id)


def _differs(want: tuple[Volume, set[str]] | None, have: ExportState | None) -> bool:
    """Whether a volume's export differs from what the database wants (iSCSI names compare case-insensitively:
    LIO keeps them in lower case)."""
    if want is None:
        return have is not None
    if have is None or not have.complete:
        return True
    return {i.lower() for i in want[1]} != {i.lower() for i in have.initiators}
