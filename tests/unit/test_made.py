"""app.db.models.made: a table model's instance without SQLModel's constructor (issue 17), which must be the same
object a constructor makes: every field's default, its own id, and attributes the ORM tracks, flushes and reloads."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect, select

from app.db.engine import Database
from app.db.models import Attachment, AttachStatus, Volume, made

_MADE_DIFFERENTLY = ("id", "created_at")  # a new uuid and the time of making, on each


def test_made_has_the_constructors_fields_and_defaults() -> None:
    given = {"volume_id": "v1", "project_id": "p1", "instance_uuid": None, "attach_mode": "rw"}
    built, constructed = made(Attachment, **given), Attachment(**given)
    fields = [name for name in Attachment.model_fields if name not in _MADE_DIFFERENTLY]
    assert {name: getattr(built, name) for name in fields} == {name: getattr(constructed, name) for name in fields}
    assert built.attach_status == AttachStatus.RESERVED
    assert built.terminated is False
    assert built.id != made(Attachment, **given).id
    assert built.created_at is not None
    assert inspect(built).transient


def test_a_made_objects_changes_are_tracked() -> None:
    attachment = made(Attachment, volume_id="v1", project_id="p1")
    attachment.attach_status = AttachStatus.ATTACHING
    assert attachment.attach_status == AttachStatus.ATTACHING
    assert inspect(attachment).attrs.attach_status.history.added == [AttachStatus.ATTACHING]


@pytest.mark.asyncio
async def test_a_made_object_is_inserted_and_read_back(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/made.db")
    try:
        async with db.engine.begin() as connection:
            await connection.run_sync(Volume.metadata.create_all)
        volume = made(Volume, project_id="p1", user_id="u1", size=1)
        attachment = made(Attachment, volume_id=volume.id, project_id="p1", attached_host="h1")
        async with db.write() as session:
            session.add(volume)
            await session.flush()
            session.add(attachment)
        async with db.read() as session:
            stored = (await session.execute(select(Attachment).where(Attachment.id == attachment.id))).scalar_one()
        assert (stored.volume_id, stored.attached_host, stored.attach_status) == (volume.id, "h1", "reserved")
    finally:
        await db.dispose()


def test_a_required_field_not_given_is_left_unset_as_the_constructor_does() -> None:
    assert made(Attachment, project_id="p1").volume_id is None
    assert "volume_id" not in made(Attachment, project_id="p1").__dict__
