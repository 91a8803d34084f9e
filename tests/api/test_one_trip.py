"""The attach cycle's one-round-trip transitions on PostgreSQL (app/services/one_trip.py) under concurrency.

The API suites run them on every request of the PostgreSQL parameter; these tests pin what one statement could
get wrong and a transaction would not: the order the row locks are taken in, and a recompute that must see what
committed while the delete waited for the volume's lock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select, text

from app.db.engine import Database
from app.db.models import Attachment, AttachmentSpec, AttachStatus, Volume, VolumeStatus, utcnow
from app.db.prepared import Prepared
from app.services import one_trip
from tests.api.attaching import connector, create_attachment, new_uuid
from tests.conftest import Api

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def db(postgres_url: str) -> AsyncIterator[Database]:
    database = Database(postgres_url)
    yield database
    await database.dispose()


async def new_volume(db: Database, project: str = "p1", status: str = VolumeStatus.AVAILABLE) -> str:
    volume = Volume(project_id=project, user_id="u1", size=1, status=status)
    async with db.write() as session:
        session.add(volume)
    return volume.id


async def new_attachment(db: Database, volume_id: str, status: str, project: str = "p1") -> str:
    attachment = Attachment(volume_id=volume_id, project_id=project, attach_status=status)
    async with db.write() as session:
        session.add(attachment)
    return attachment.id


async def volume_status(db: Database, volume_id: str) -> tuple[str, str]:
    async with db.read() as session:
        row = (await session.execute(select(Volume.status, Volume.attach_status).where(Volume.id == volume_id))).one()  # type: ignore[arg-type]
    return row[0], row[1]


def connecting(volume_id: str) -> Attachment:
    now = utcnow()
    return Attachment(
        volume_id=volume_id,
        project_id="",
        attach_status=AttachStatus.ATTACHING,
        attach_mode="rw",
        attach_time=now,
        updated_at=now,
        attached_host="h1",
    )


async def test_claim_and_insert_claims_an_available_volume_with_its_connector(db: Database) -> None:
    volume_id = await new_volume(db)
    attachment = connecting(volume_id)
    connector = {"initiator": "iqn.2004-10.org.test:h1", "host": "h1", "multipath": False}
    async with db.autocommit() as session:
        volume = await one_trip.claim_and_insert(
            session, scoped=True, caller="p1", attachment=attachment, auth="CHAP u s", connector=connector
        )
    assert volume is not None
    assert volume.status == VolumeStatus.ATTACHING
    assert volume.provider_auth == "CHAP u s"
    assert attachment.project_id == "p1"
    assert await volume_status(db, volume_id) == (VolumeStatus.ATTACHING, AttachStatus.ATTACHING)
    async with db.read() as session:
        specs = (
            (await session.execute(select(AttachmentSpec).where(AttachmentSpec.attachment_id == attachment.id)))
            .scalars()
            .all()
        )  # type: ignore[arg-type]
        stored = await session.get(Attachment, attachment.id)
    assert {s.key: s.value for s in specs} == {
        "initiator": '"iqn.2004-10.org.test:h1"',
        "host": '"h1"',
        "multipath": "false",
    }
    assert stored is not None
    assert stored.attach_status == AttachStatus.ATTACHING
    assert stored.project_id == "p1"


async def test_claim_and_insert_keeps_the_volumes_chap_and_changes_nothing_it_may_not_claim(db: Database) -> None:
    volume_id = await new_volume(db)
    async with db.autocommit() as session:
        first = await one_trip.claim_and_insert(
            session, scoped=True, caller="p1", attachment=connecting(volume_id), auth="CHAP first s", connector={}
        )
    assert first is not None
    # busy now (attaching, not multiattach), another project's, a missing one: None and no row
    for caller, target in (("p1", volume_id), ("p2", volume_id), ("p1", "no-such-volume")):
        refused = connecting(target)
        async with db.autocommit() as session:
            assert (
                await one_trip.claim_and_insert(
                    session, scoped=True, caller=caller, attachment=refused, auth="CHAP second s", connector={"a": 1}
                )
                is None
            )
        async with db.read() as session:
            assert await session.get(Attachment, refused.id) is None
    async with db.write() as session:
        await session.execute(text("UPDATE volumes SET status = 'available' WHERE id = :v"), {"v": volume_id})
    async with db.autocommit() as session:
        again = await one_trip.claim_and_insert(
            session, scoped=False, caller="admin", attachment=connecting(volume_id), auth="CHAP second s", connector={}
        )
    assert again is not None
    assert again.provider_auth == "CHAP first s"  # made once, on the first connect


async def test_complete_takes_the_volumes_lock_before_the_attachments_row(db: Database) -> None:
    """Another transaction holding the volume's row lock may still update the attachment: complete waits for the
    volume first (the order every transition takes), so the two never deadlock."""
    volume_id = await new_volume(db, status=VolumeStatus.ATTACHING)
    attachment_id = await new_attachment(db, volume_id, AttachStatus.ATTACHING)
    async with db.engine.connect() as other:
        await other.begin()
        await other.execute(text("SELECT 1 FROM volumes WHERE id = :v FOR UPDATE"), {"v": volume_id})

        async def complete() -> bool | None:
            async with db.autocommit() as session:
                return await one_trip.complete(session, attachment_id, everyone=False, caller="p1", now=utcnow())

        completing = asyncio.create_task(complete())
        await asyncio.sleep(0.3)
        assert not completing.done()  # waiting for the volume's lock
        await other.execute(text("SET LOCAL lock_timeout = '2s'"))
        # a lock on the attachment taken before the volume's would make this wait (and fail after 2 s)
        await other.execute(text("UPDATE attachments SET mountpoint = '/dev/vdb' WHERE id = :a"), {"a": attachment_id})
        await other.commit()
    assert await completing is True
    assert await volume_status(db, volume_id) == (VolumeStatus.IN_USE, AttachStatus.ATTACHED)


async def test_complete_tells_a_missing_attachment_from_one_it_cannot_complete(db: Database) -> None:
    volume_id = await new_volume(db, status=VolumeStatus.RESERVED)
    reserved = await new_attachment(db, volume_id, AttachStatus.RESERVED)
    async with db.autocommit() as session:
        assert await one_trip.complete(session, reserved, everyone=False, caller="p1", now=utcnow()) is False
        assert await one_trip.complete(session, reserved, everyone=False, caller="p2", now=utcnow()) is None
        assert await one_trip.complete(session, "no-such", everyone=True, caller="p1", now=utcnow()) is None
    assert await volume_status(db, volume_id) == (VolumeStatus.RESERVED, AttachStatus.DETACHED)


async def test_remove_recomputes_from_what_committed_while_it_waited_for_the_lock(db: Database) -> None:
    """A reservation that commits while the delete waits for the volume's lock keeps the volume reserved: the
    recompute runs after the lock, on a fresh snapshot (one statement's snapshot would still call it available)."""
    volume_id = await new_volume(db, status=VolumeStatus.IN_USE)
    attached = await new_attachment(db, volume_id, AttachStatus.ATTACHED)
    async with db.engine.connect() as other:
        await other.begin()
        await other.execute(text("SELECT 1 FROM volumes WHERE id = :v FOR UPDATE"), {"v": volume_id})

        async def remove() -> list[Attachment]:
            async with db.autocommit() as session:
                return await one_trip.remove(session, volume_id, attached, utcnow())

        removing = asyncio.create_task(remove())
        await asyncio.sleep(0.3)
        assert not removing.done()
        reservation = Attachment(volume_id=volume_id, project_id="p1", attach_status=AttachStatus.RESERVED)
        await other.execute(
            text(
                "INSERT INTO attachments (id, volume_id, project_id, attach_mode, attach_status, terminated,"
                " created_at) VALUES (:id, :v, 'p1', 'null', 'reserved', false, now())"
            ),
            {"id": reservation.id, "v": volume_id},
        )
        await other.commit()
    remaining = await removing
    assert [a.id for a in remaining] == [reservation.id]
    assert remaining[0].attach_status == AttachStatus.RESERVED
    assert remaining[0].project_id == "p1"
    assert await volume_status(db, volume_id) == (VolumeStatus.RESERVED, AttachStatus.RESERVED)


async def test_remove_of_the_last_attachment_makes_the_volume_available(db: Database) -> None:
    volume_id = await new_volume(db, status=VolumeStatus.IN_USE)
    attached = await new_attachment(db, volume_id, AttachStatus.ATTACHED)
    async with db.autocommit() as session:
        assert await one_trip.remove(session, volume_id, attached, utcnow()) == []
    assert await volume_status(db, volume_id) == (VolumeStatus.AVAILABLE, AttachStatus.DETACHED)


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_create_the_one_statement_claim_refuses_sends_that_statement_once(api: Api) -> None:
    """Embedded: the quick claim, refused (the volume is in use), falls back to the full transaction, which tells
    the caller why; it does not send the refused statement a second time first."""
    volume = await api.create_volume()
    first = await create_attachment(api, volume["id"], instance_uuid=new_uuid(), connector=connector("host1"))
    assert first.status_code == 200, first.text
    claims: list[str] = []
    rows = Prepared.rows

    async def count(self: Prepared, on: Any, values: Any) -> list[Any]:  # on a session or the driver's connection
        if self.sql.lstrip().startswith("WITH claimed AS"):
            claims.append(self.sql)
        return await rows(self, on, values)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Prepared, "rows", count)
        refused = await create_attachment(api, volume["id"], instance_uuid=new_uuid(), connector=connector("host2"))
    assert refused.status_code == 400, refused.text  # a volume in use that is not multiattach
    assert len(claims) == 1


async def test_a_volume_remembered_with_chap_whose_row_has_none_gets_credentials_on_its_next_connect(
    api: Api,
) -> None:
    """The server skips making credentials for a volume it has seen connected; a row restored from before its
    first connect has none, and the claim stores new ones on its own connection (both databases)."""
    volume = await api.create_volume()
    first = await create_attachment(api, volume["id"], instance_uuid=new_uuid(), connector=connector("host1"))
    assert first.status_code == 200, first.text
    assert (await api.delete(f"/attachments/{first.json()['attachment']['id']}")).status_code == 200
    async with api.app.state.db.write() as session:
        await session.execute(text("UPDATE volumes SET provider_auth = NULL WHERE id = :id"), {"id": volume["id"]})

    again = await create_attachment(api, volume["id"], instance_uuid=new_uuid(), connector=connector("host1"))

    assert again.status_code == 200, again.text
    info = again.json()["attachment"]["connection_info"]
    async with api.app.state.db.read() as session:
        stored = await session.scalar(select(Volume.provider_auth).where(Volume.id == volume["id"]))  # type: ignore[arg-type]
    assert stored is not None
    assert stored.split()[:2] == ["CHAP", info["auth_username"]]
