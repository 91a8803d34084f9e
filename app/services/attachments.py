"""The attachments API's verbs on the one state machine: reserve, connect, complete, remove (reads: attachment_reads).

Work that touches the storage host holds the volume's dispatcher lock for the whole sequence (claim, backend
calls, record), so decisions about shared ACLs and exports never race, and runs as a shielded task so a dropped
client cannot strand a row half-way. Every connect, from either face, is `connect_claimed()`: a claim (the first
transaction, which says how to undo itself), the export and the ACL, then the record; a failed backend call
undoes the claim and tears down only what the database no longer needs.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import exists, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import Context
from app.backends.base import BackendError, Chap, InvalidConnector
from app.db.engine import Database
from app.db.models import Attachment, AttachStatus, Volume, VolumeStatus, made, utcnow
from app.errors import (
    AttachmentNotFound,
    BackendFailure,
    Conflict,
    InUseByServer,
    InvalidAttachment,
    InvalidInput,
    InvalidVolume,
)
from app.logs import bind
from app.secrets import SecretBox
from app.services import one_trip
from app.services.attachment_reads import KEPT_PER_PROCESS, AttachmentReads, AttachmentRecord
from app.services.connections import (
    build_connection_info,
    chap_of,
    connector_of,
    new_chap,
    provider_auth,
    release,
    store_connector,
    teardown,
)
from app.services.idempotency import Answer
from app.services.nodes import NodeRunner, Nodes
from app.services.transitions import (
    ATTACHMENTS_OF,
    BUSY,
    CLAIM_CONNECT,
    COMPLETE,
    CONNECTABLE,
    CONNECTED,
    DELETE_ATTACHMENT,
    INSERT_ATTACHMENT,
    LOCK_VOLUME_OF,
    SET_PROVIDER_LOCATION,
    STATUS_OF,
    A,
    claim_volume,
    columns_of,
    in_use_by_server,
    lock_volume,
    recompute_volume,
    refresh,
    set_attaching,
)
from app.services.volumes import load_volume, volume_ref

log = logging.getLogger("tether.attachments")
T = TypeVar("T")

# what a re-connect changes on the attachment's row, and a failed one puts back
_RECONNECTED = ("attach_status", "attach_time", "attached_host", "attach_mode", "mountpoint", "terminated")


Undo = Callable[[AsyncSession], Awaitable[None]]
# the target's connector check (Target.validate_connector): pure, so the API tier runs it without a node
ConnectorValidator = Callable[[Mapping[str, Any]], dict[str, Any]]


@dataclass
class Claim:
    """A connect's first transaction claimed the attachment; what the backend calls and the record need."""

    attachment: Attachment
    volume: Volume
    chap: Chap
    mode: str
    # puts the rows back as they were before the claim (in a transaction holding the volume's row lock)
    undo: Undo
    # the initiator a re-connect from another host replaces: its ACL goes once the new one works
    replaced: str | None = None


Claimer = Callable[[AsyncSession], Awaitable[Claim]]
# a quick claim runs on Database.statements(): one statement that commits by itself
QuickClaimer = Callable[[Any], Awaitable[Claim | None]]


async def shielded(work: Callable[[], Awaitable[T]]) -> T:
    """Run a whole state change to its end even if the caller is cancelled."""
    return await asyncio.shield(asyncio.ensure_future(work()))


def effective_mode(attachment: Attachment) -> str:
    return attachment.attach_mode if attachment.attach_mode in ("rw", "ro") else "rw"


def connecting(attachment: Attachment, connector: Mapping[str, Any]) -> None:
    """A new attachment as it is inserted by a create with a connector: connecting from the connector's host."""
    attachment.attach_status = AttachStatus.ATTACHING
    attachment.attach_time = attachment.updated_at = utcnow()
    attachment.attached_host = connector.get("host")
    attachment.attach_mode = effective_mode(attachment)
    attachment.mountpoint = connector.get("mountpoint")


class AttachmentService(AttachmentReads):
    """The attachments' state changes (reserve, connect, complete, remove); the reads are AttachmentReads'."""

    def __init__(
        self, db: Database, nodes: Nodes, validator: ConnectorValidator, secrets: SecretBox | None = None
    ) -> None:
        super().__init__(db, secrets)
        self.nodes = nodes
        self.validator = validator
        # PostgreSQL runs the attach cycle's hot transitions as single statements (app/services/one_trip.py)
        self.one_trip = not db.is_sqlite
        # volumes seen with CHAP credentials (kept for a volume's life): their connects make none to offer
        self._chapped: OrderedDict[str, None] = OrderedDict()

    # -- validation -----------------------------------------------------------------------------

    def validate_connector(self, connector: Mapping[str, Any]) -> dict[str, Any]:
        try:
            checked = self.validator(connector)
        except InvalidConnector as error:
            raise InvalidInput(f"Invalid input for field/attribute connector.{error.key}: {error.reason}.") from None
        mountpoint = checked.get("mountpoint")
        if mountpoint is not None and not (isinstance(mountpoint, str) and 0 < len(mountpoint) <= 255):
            raise InvalidInput(
                "Invalid input for field/attribute connector.mountpoint: a device path of 1 to 255 characters."
            )
        return checked

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
        connecting: bool = False,
    ) -> tuple[Attachment, Volume]:
        """insert=False: the caller inserts the new attachment itself, later in the same transaction.

        connecting: a connect follows in this transaction, so the volume goes straight to attaching.
        """
        attaching = legacy or connecting
        # load and claim in one statement; the slow path below tells a missing volume from a busy one
        claimed = await session.execute(
            claim_volume(legacy=legacy, scoped=not ctx.all_projects),
            {
                "volume_id": volume_id,
                "caller_project": ctx.project_id,
                "to_status": VolumeStatus.ATTACHING if attaching else VolumeStatus.RESERVED,
                "to_attach_status": AttachStatus.ATTACHING if attaching else AttachStatus.RESERVED,
                "now": utcnow(),
            },
        )
        volume = claimed.scalars().first()
        if volume is None:
            # Nova's migration path: the same instance may hold a second attachment of an attached volume
            volume = await load_volume(session, ctx, volume_id, lock=True)
            same_instance = instance_uuid is not None and await session.scalar(
                select(exists().where(A.c.volume_id == volume.id, A.c.instance_uuid == instance_uuid))
            )
            if legacy or not (same_instance and volume.status in (VolumeStatus.IN_USE, VolumeStatus.RESERVED)):
                raise InvalidVolume(
                    f"Volume {volume.id} status must be available to reserve, "
                    f"but the current status is {volume.status}."
                )
            if connecting:
                await set_attaching(session, volume.id)
        attachment = made(
            Attachment,
            volume_id=volume.id,
            project_id=volume.project_id,
            instance_uuid=instance_uuid,
            attach_status=AttachStatus.RESERVED,
            attach_mode=mode or "null",
        )
        if insert:
            await session.execute(INSERT_ATTACHMENT, columns_of(attachment))
        return attachment, volume

    async def reserve(
        self,
        ctx: Context,
        *,
        volume_id: str,
        instance_uuid: str | None = None,
        mode: str | None = None,
        legacy: bool = False,
        idempotency: Answer[AttachmentRecord] | None = None,
    ) -> AttachmentRecord:
        async with self.db.write() as session:
            if idempotency is not None:
                await idempotency.claim(session)
            attachment, _volume = await self._reserve(session, ctx, volume_id, instance_uuid, mode, legacy=legacy)
            record = AttachmentRecord(attachment, secrets=self.secrets)
            if idempotency is not None:
                await idempotency.complete(session, record, attachment.id)
        self._remember(attachment.id, attachment.volume_id, attachment.project_id)
        return record

    async def create(
        self,
        ctx: Context,
        *,
        volume_id: str,
        instance_uuid: str | None = None,
        connector: Mapping[str, Any] | None = None,
        mode: str | None = None,
        idempotency: Answer[AttachmentRecord] | None = None,
    ) -> AttachmentRecord:
        """Reserve; with a connector also connect in the same call (the bare-metal path, and Nova's live
        migration: the destination host's attachment of the same instance connects beside the source's).

        `idempotency`: the request's key. Claimed in the reservation's transaction and answered in it; with a
        connector it commits in flight with the claim, is answered with the record, and an undo removes it.
        """
        bind(volume_id=volume_id)
        if idempotency is not None:
            await idempotency.check()  # a retry of an answered request is answered before any write
        if not connector:
            return await self.reserve(
                ctx, volume_id=volume_id, instance_uuid=instance_uuid, mode=mode, idempotency=idempotency
            )
        checked = self.validate_connector(connector)
        # one statement, tried first: autocommitted (the embedded node's job needs no transaction to ride in), or
        # in a transaction on the driver's connection with the remote node's job
        quickly = idempotency is None and self.one_trip

        async def claim(session: AsyncSession) -> Claim:
            if idempotency is None:  # after a quick claim that did not apply, not the same statement again
                return await self.claim_new(session, ctx, volume_id, instance_uuid, mode, checked, at_once=not quickly)
            await idempotency.claim(session)
            claimed = await self.claim_new(session, ctx, volume_id, instance_uuid, mode, checked)
            await idempotency.link(session, claimed.attachment.id)
            undo = claimed.undo

            async def undo_with_key(session: AsyncSession) -> None:
                await undo(session)
                await idempotency.release(session)

            claimed.undo = undo_with_key
            return claimed

        quick: QuickClaimer | None = None
        if quickly:

            async def quick(connection: Any) -> Claim | None:
                return await self.claim_at_once(connection, ctx, volume_id, instance_uuid, mode, checked)

        return await self.connect_exclusive(volume_id, claim, checked, idempotency=idempotency, quick=quick)

    # -- connect --------------------------------------------------------------------------------

    async def connect(self, ctx: Context, attachment_id: str, connector: Mapping[str, Any]) -> AttachmentRecord:
        checked = self.validate_connector(connector)
        volume_id = await self._volume_of(ctx, attachment_id)

        async def claim(session: AsyncSession) -> Claim:
            return await self.claim_existing(session, ctx, attachment_id, checked, legacy=False)

        return await self.connect_exclusive(volume_id, claim, checked)

    async def connect_exclusive(
        self,
        volume_id: str,
        claim: Claimer,
        connector: dict[str, Any],
        *,
        idempotency: Answer[AttachmentRecord] | None = None,
        quick: QuickClaimer | None = None,
    ) -> AttachmentRecord:
        async def work() -> AttachmentRecord:
            async with self.nodes.exclusive(volume_id) as run:
                return await self.connect_claimed(claim, connector, run, idempotency=idempotency, quick=quick)

        return await shielded(work)

    async def chap_for(self, on: AsyncSession | Any, volume: Volume) -> Chap:
        """The volume's CHAP credentials, made and stored on its first connect. `on`: a session, or a
        Database.statements() connection (in the caller's transaction when it opened one)."""
        chap = chap_of(volume, self.secrets)
        if chap is None:
            chap = new_chap()
            await one_trip.SET_AUTH.rows(on, {"volume_id": volume.id, "auth": provider_auth(chap, self.secrets)})
        return chap

    async def claim_new(
        self,
        session: AsyncSession,
        ctx: Context,
        volume_id: str,
        instance_uuid: str | None,
        mode: str | None,
        connector: Mapping[str, Any],
        *,
        legacy: bool = False,
        at_once: bool = True,
    ) -> Claim:
        """Reserve and connect in one transaction: a refusal (400, 409) rolls both back; the undo removes it.
        `at_once`: try claim_at_once first (PostgreSQL), unless the caller just did."""
        if self.one_trip and at_once and not legacy:
            claimed = await self.claim_at_once(session, ctx, volume_id, instance_uuid, mode, connector)
            if claimed is not None:
                return claimed
        attachment, volume = await self._reserve(
            session, ctx, volume_id, instance_uuid, mode, insert=False, legacy=legacy, connecting=True
        )
        chap = await self.chap_for(session, volume)
        # reserved in this transaction and not yet inserted: it is inserted already connecting
        connecting(attachment, connector)
        await session.execute(INSERT_ATTACHMENT, columns_of(attachment))
        await store_connector(session, attachment.id, connector, fresh=True)

        return Claim(attachment, volume, chap, attachment.attach_mode, self._remover(attachment.id, volume.id))

    def _remover(self, attachment_id: str, volume_id: str) -> Undo:
        """The undo of a new attachment's claim."""

        async def undo(session: AsyncSession) -> None:
            await session.execute(DELETE_ATTACHMENT, {"attachment_id": attachment_id})
            self.forget(attachment_id)
            await recompute_volume(session, volume_id)

        return undo

    async def claim_at_once(
        self,
        on: AsyncSession | Any,
        ctx: Context,
        volume_id: str,
        instance_uuid: str | None,
        mode: str | None,
        connector: Mapping[str, Any],
    ) -> Claim | None:
        """claim_new's common case as one statement (PostgreSQL): an available volume (or a multiattach one that
        may take another attachment) claimed, the attachment inserted connecting, its connector stored. None: the
        claim did not apply and nothing changed; claim_new's transaction tells a busy volume from a missing one.
        `on`: the claim's session, or a Database.statements() connection (the statement commits by itself, unless
        the caller opened a transaction on it)."""
        attachment = made(
            Attachment,
            volume_id=volume_id,
            project_id="",  # the volume's, filled in by the statement
            instance_uuid=instance_uuid,
            attach_mode=mode or "null",
        )
        connecting(attachment, connector)
        volume = await one_trip.claim_and_insert(
            on,
            scoped=not ctx.all_projects,
            caller=ctx.project_id,
            attachment=attachment,
            # kept only on the volume's first connect
            auth=None if volume_id in self._chapped else provider_auth(new_chap(), self.secrets),
            connector=connector,
        )
        if volume is None:
            return None
        self._chapped[volume.id] = None
        if len(self._chapped) > KEPT_PER_PROCESS:
            self._chapped.popitem(last=False)
        # the statement stored one when the volume had none and we offered it; a volume remembered with CHAP
        # that has none (its row restored from before its first connect) gets one now, on the claim's own
        # connection: a transaction open on it holds the volume's row
        chap = await self.chap_for(on, volume)
        return Claim(attachment, volume, chap, attachment.attach_mode, self._remover(attachment.id, volume.id))

    async def claim_existing(
        self, session: AsyncSession, ctx: Context, attachment_id: str, connector: Mapping[str, Any], *, legacy: bool
    ) -> Claim:
        """Connect an attachment that exists (PUT, os-initialize_connection); `legacy` changes no volume status.

        A re-connect of a connected attachment is undone to exactly what it was, so a failed attempt from a
        new host never costs the host that uses the volume its access (and its ACL goes only after success).
        """
        initiator = str(connector["initiator"])
        attachment = await self.load(session, ctx, attachment_id)
        volume = await load_volume(session, ctx, attachment.volume_id, lock=True)
        # read again under the volume's lock: an os-complete (which takes no other lock) may have committed while
        # we waited for it, and a status read before would make an attached attachment's volume `attaching`
        await session.refresh(attachment)
        if attachment.attach_status not in CONNECTABLE:
            raise InvalidAttachment(
                f"Attachment {attachment.id} cannot be connected: its status is {attachment.attach_status}."
            )
        if not volume.multiattach and await session.scalar(
            BUSY, {"volume_id": volume.id, "attachment_id": attachment.id}
        ):
            raise Conflict(
                f"Volume {volume.id} is not multiattach and another of its attachments is already connected "
                "(duplicate connectors detected)."
            )
        chap = await self.chap_for(session, volume)
        mode = effective_mode(attachment)
        was = attachment.attach_status
        before = {key: getattr(attachment, key) for key in (*_RECONNECTED, "connection_info")}
        previous = await connector_of(session, attachment.id) if was in CONNECTED else {}
        replaced: str | None = None
        if not legacy and previous.get("initiator") not in (None, initiator):
            replaced = str(previous["initiator"])
        now = utcnow()
        claimed = await session.execute(
            CLAIM_CONNECT,
            {
                "attachment_id": attachment.id,
                "now": now,
                "host": connector.get("host"),
                "mode": mode,
                "mountpoint": connector.get("mountpoint", attachment.mountpoint),
            },
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            raise InvalidAttachment(f"Attachment {attachment.id} changed while being connected; try again.")
        await store_connector(session, attachment.id, connector)
        if not legacy:
            if was == AttachStatus.ATTACHED:
                await recompute_volume(session, volume.id)  # a re-export: it stays attached
            else:
                await set_attaching(session, volume.id)

        async def undo(session: AsyncSession) -> None:
            values = {**before, "updated_at": utcnow()}
            if was not in CONNECTED:  # a first connect that failed is marked, as SPEC 9 says
                values.update(attach_status=AttachStatus.ERROR_ATTACHING, connection_info=None)
            await session.execute(update(A).where(A.c.id == attachment.id).values(**values))
            if was in CONNECTED:
                await store_connector(session, attachment.id, previous)
            if not legacy:
                await recompute_volume(session, volume.id)

        return Claim(attachment, volume, chap, mode, undo, replaced)

    async def connect_claimed(
        self,
        claim: Claimer,
        connector: dict[str, Any],
        run: NodeRunner,
        *,
        idempotency: Answer[AttachmentRecord] | None = None,
        quick: QuickClaimer | None = None,
    ) -> AttachmentRecord:
        """The one connect sequence (call under the volume's lock): claim, export and ACL, record.

        The node's connect job is part of the claim's transaction (no claim without its job); a node that is
        down is a 503 that rolls the claim back. `idempotency`: the claim took the request's key; the record
        stores its answer, in one transaction. `quick`: a claim that is one statement, tried first (autocommitted
        with the embedded node, in a transaction with the remote node's job); when it does not apply (None) the
        full claim runs.
        """
        initiator = str(connector["initiator"])
        claimed: Claim | None = None
        if quick is not None and self.nodes.embedded:
            async with self.db.statements(write=True) as connection:
                claimed = await quick(connection)
            if claimed is not None:
                try:
                    pending = run.when_awaited("connect", volume_ref(claimed.volume), claimed.chap, initiator)
                except BaseException:  # committed already: no claim is left without its connect
                    await self._unclaim(claimed)
                    raise
        elif quick is not None:
            # the claim and its job in one transaction on the driver's connection, without the session's execution
            # layer around the two statements (~0.5 ms of the API's CPU, issue 17); a claim that did not apply
            # commits nothing, and the full claim below tells why
            async with self.db.statements(write=True) as connection:
                driver: Any = connection  # PostgreSQL's (quick claims are one_trip's): asyncpg's transaction
                async with driver.transaction():
                    claimed = await quick(driver)
                    if claimed is not None:
                        ref = volume_ref(claimed.volume)
                        pending = await run.defer(driver, "connect", ref, claimed.chap, initiator)
        if claimed is None:
            async with self.db.write() as session:
                claimed = await claim(session)
                pending = await run.defer(session, "connect", volume_ref(claimed.volume), claimed.chap, initiator)
        attachment, volume, chap = claimed.attachment, claimed.volume, claimed.chap
        bind(attachment_id=attachment.id)
        self._remember(attachment.id, volume.id, volume.project_id)
        try:
            export = await pending.result()
        except BackendError as error:
            log.error("connecting attachment %s of volume %s failed: %s", attachment.id, volume.id, error)
            await self._undo(claimed, initiator, run)
            raise BackendFailure(f"Unable to connect volume {volume.id}: the storage backend failed.") from None
        # the volume's lock lost while the node worked (its connection dropped: a database restart) means another
        # process may have taken the volume since, and rolled this claim back (a node's reconcile does): 503, and
        # nothing recorded onto what is no longer this claim
        run.check()

        info = build_connection_info(
            volume=volume, attachment=attachment, export=export, chap=chap, connector=connector, mode=claimed.mode
        )
        # usually one statement, which needs no transaction of its own; with a new location, the volume's row
        # before the attachment's, the order every transition takes them in: the other order deadlocks with an
        # os-complete of this attachment (which holds the volume's row)
        relocated = volume.provider_location != export.provider_location
        # stored with the secret sealed like provider_auth; AttachmentRecord opens it for the caller
        sealed = json.dumps({**info, "auth_password": self.secrets.seal(chap.secret)})
        # the common case is one statement by itself, run on the driver's connection (app/db/prepared.py)
        alone = not (relocated or idempotency or volume.multiattach)
        async with (
            self.db.statements(write=True)
            if alone
            else self.db.write()
            if relocated or idempotency
            else self.db.autocommit()
        ) as on:
            if relocated:
                await on.execute(SET_PROVIDER_LOCATION, {"volume_id": volume.id, "location": export.provider_location})
            rows = await one_trip.RECORD.rows(on, {"attachment_id": attachment.id, "info": sealed})
            if not rows:
                raise AttachmentNotFound(attachment.id)  # deleted while the backend worked
            recorded = refresh(attachment, rows[0])
            result = (
                AttachmentRecord(recorded, [], self.secrets)
                if not volume.multiattach
                else await self._record(on, recorded)
            )
            if idempotency is not None:
                await idempotency.complete(on, result, attachment.id)
        if claimed.replaced:
            try:
                await release(self.db, run, volume.id, [claimed.replaced])
            except BackendError as error:  # reconcile removes it later: the database no longer wants it
                log.error("removing the replaced ACL of volume %s failed: %s", volume.id, error)
        return result

    async def _undo(self, claimed: Claim, initiator: str, run: NodeRunner) -> None:
        """After a failed connect: the claim undone, and no ACL or export left that nothing else needs."""
        volume_id = claimed.volume.id
        await self._unclaim(claimed)
        try:
            await release(self.db, run, volume_id, [initiator])
        except BackendError as error:
            log.error("cleaning up after a failed connect of volume %s failed: %s", volume_id, error)

    async def _unclaim(self, claimed: Claim) -> None:
        async with self.db.write() as session:
            # the volume's lock first, as every transition takes it: the recompute then sees what others committed
            await lock_volume(session, claimed.volume.id)
            await claimed.undo(session)

    # -- complete -------------------------------------------------------------------------------

    async def complete(self, ctx: Context, attachment_id: str) -> None:
        if self.one_trip:
            async with self.db.statements(write=True) as connection:
                completed = await one_trip.complete(
                    connection, attachment_id, everyone=ctx.all_projects, caller=ctx.project_id, now=utcnow()
                )
            if completed is None:
                raise AttachmentNotFound(attachment_id)
            if not completed:
                async with self.db.read() as session:
                    self._not_completed(
                        attachment_id, await session.scalar(STATUS_OF, {"attachment_id": attachment_id})
                    )
            return
        async with self.db.write() as session:
            owner = (await session.execute(LOCK_VOLUME_OF, {"attachment_id": attachment_id})).first()
            if owner is None or not ctx.sees(owner.project_id):
                raise AttachmentNotFound(attachment_id)
            done = await session.execute(COMPLETE, {"attachment_id": attachment_id, "now": utcnow()})
            if done.rowcount != 1:  # type: ignore[attr-defined]
                # read again: a delete may have committed while we waited for the volume's lock
                self._not_completed(attachment_id, await session.scalar(STATUS_OF, {"attachment_id": attachment_id}))
            await recompute_volume(session, owner.volume_id)

    @staticmethod
    def _not_completed(attachment_id: str, status: str | None) -> None:
        if status is None:
            raise AttachmentNotFound(attachment_id)
        raise InvalidAttachment(
            f"Attachment {attachment_id} status must be attaching or attached to complete, "
            f"but the current status is {status}."
        )

    # -- remove ---------------------------------------------------------------------------------

    async def remove(self, ctx: Context, attachment_id: str, *, guarded: bool = True) -> list[Attachment]:
        """Disconnect (shared-aware) and delete; returns the volume's remaining attachments.

        guarded: refuse (409) when a server uses it and the caller has no service token (OSSA-2023-003);
        os-force_detach is the one face that is not guarded.
        """
        volume_id = await self._volume_of(ctx, attachment_id)

        async def work() -> list[Attachment]:
            async with self.nodes.exclusive(volume_id) as run:
                return await self.remove_locked(ctx, attachment_id, volume_id, run, guarded=guarded)

        return await shielded(work)

    async def remove_locked(
        self, ctx: Context, attachment_id: str, volume_id: str, run: NodeRunner, *, guarded: bool
    ) -> list[Attachment]:
        async with self.db.statements(write=False) as on:
            # every attachment of the volume with its initiator, in one query: this one, and what else uses
            # the ACL and the export
            rows = await one_trip.VOLUME_INITIATORS.rows(on, {"volume_id": volume_id})
        this = next((row for row in rows if row.id == attachment_id), None)
        if this is None or not ctx.sees(this.project_id):
            self.forget(attachment_id)
            raise AttachmentNotFound(attachment_id)
        if guarded and ctx.guards_in_use and in_use_by_server(this):
            raise InUseByServer(this.instance_uuid)
        if this.attach_status in (*CONNECTED, AttachStatus.ERROR_DETACHING):
            initiator = json.loads(this.value) if this.value else None
            plan = teardown(volume_id, rows, [initiator] if initiator else [], other_than=attachment_id)
            try:
                await plan.apply(run)
            except BackendError as error:
                log.error("disconnecting attachment %s of volume %s failed: %s", attachment_id, volume_id, error)
                async with self.db.write() as session:
                    await session.execute(
                        update(A)
                        .where(A.c.id == attachment_id)
                        .values(attach_status=AttachStatus.ERROR_DETACHING, updated_at=utcnow())
                    )
                raise BackendFailure(f"Unable to disconnect volume {volume_id}: the storage backend failed.") from None
        if self.one_trip:
            async with self.db.statements(write=True) as connection:
                left = await one_trip.remove(connection, volume_id, attachment_id, utcnow())
            self.forget(attachment_id)
            return left
        async with self.db.write() as session:
            await lock_volume(session, volume_id)
            await session.execute(DELETE_ATTACHMENT, {"attachment_id": attachment_id})
            await recompute_volume(session, volume_id)
            remaining = await session.execute(ATTACHMENTS_OF, {"volume_id": volume_id})
            self.forget(attachment_id)
            return list(remaining.scalars().all())
