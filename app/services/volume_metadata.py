"""Volume metadata, Cinder's /volumes/{id}/metadata API: read it, merge into it, replace it, delete one key."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import bindparam, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import Context
from app.db.engine import Database
from app.db.models import Volume, VolumeMetadata, VolumeStatus
from app.errors import InvalidVolume, NotFound
from app.services.volumes import check_metadata, load_volume

# Cinder refuses metadata writes in these statuses (and in "uploading", which Tether never uses)
_FROZEN = frozenset({VolumeStatus.MAINTENANCE})

_M = VolumeMetadata.__table__  # type: ignore[attr-defined]
_METADATA_OF = select(_M.c.key, _M.c.value).where(_M.c.volume_id == bindparam("volume_id")).order_by(_M.c.key)
_DELETE_KEY = delete(_M).where(_M.c.volume_id == bindparam("volume_id"), _M.c.key == bindparam("key"))


def _upsert(dialect: Any) -> Any:
    # one statement whether or not the key exists: no read first, and no unique-key error if it appeared meanwhile
    stmt = dialect.insert(_M)
    return stmt.on_conflict_do_update(index_elements=[_M.c.volume_id, _M.c.key], set_={"value": stmt.excluded.value})


_UPSERT_SQLITE = _upsert(sqlite)
_UPSERT_POSTGRESQL = _upsert(postgresql)


class MetadataKeyNotFound(NotFound):
    def __init__(self, volume_id: str, key: str) -> None:
        super().__init__(f"Volume {volume_id} has no metadata with key {key}.")


async def metadata_of(session: AsyncSession, volume_id: str) -> dict[str, str]:
    rows = await session.execute(_METADATA_OF, {"volume_id": volume_id})
    return {key: value for key, value in rows.all()}


def _refuse_frozen(volume: Volume, doing: str) -> None:
    if volume.status in _FROZEN:
        raise InvalidVolume(
            f"Invalid volume: {doing} volume metadata is not allowed for volumes in {volume.status} status."
        )


class VolumeMetadataService:
    """Every write takes the volume's row lock first, as every transition does: concurrent writes to one
    volume's metadata apply one after another, so none loses another's keys."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, ctx: Context, volume_id: str) -> dict[str, str]:
        async with self.db.read() as session:
            volume = await load_volume(session, ctx, volume_id)
            return await metadata_of(session, volume.id)

    async def get_item(self, ctx: Context, volume_id: str, key: str) -> str:
        metadata = await self.get(ctx, volume_id)
        if key not in metadata:
            raise MetadataKeyNotFound(volume_id, key)
        return metadata[key]

    async def merge(self, ctx: Context, volume_id: str, metadata: Mapping[str, Any]) -> dict[str, str]:
        """Set the given keys, keep the others; the volume's whole metadata afterwards (as Cinder answers)."""
        return await self._write(ctx, volume_id, check_metadata(metadata), replace=False)

    async def replace(self, ctx: Context, volume_id: str, metadata: Mapping[str, Any]) -> dict[str, str]:
        """The given keys become the volume's whole metadata."""
        return await self._write(ctx, volume_id, check_metadata(metadata), replace=True)

    async def delete_item(self, ctx: Context, volume_id: str, key: str) -> None:
        async with self.db.write() as session:
            volume = await load_volume(session, ctx, volume_id, lock=True)
            result = await session.execute(_DELETE_KEY, {"volume_id": volume.id, "key": key})
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise MetadataKeyNotFound(volume_id, key)
            # after the key check, as Cinder orders them: a missing key is a 404 in any status (this rolls back)
            _refuse_frozen(volume, "Deleting")

    async def _write(self, ctx: Context, volume_id: str, metadata: dict[str, str], *, replace: bool) -> dict[str, str]:
        # the volume's updated_at stays: Cinder's metadata writes touch only the metadata rows
        async with self.db.write() as session:
            volume = await load_volume(session, ctx, volume_id, lock=True)
            _refuse_frozen(volume, "Updating")
            if replace:
                await session.execute(delete(_M).where(_M.c.volume_id == volume.id, _M.c.key.not_in(list(metadata))))
            if metadata:
                rows = [{"volume_id": volume.id, "key": key, "value": value} for key, value in metadata.items()]
                await session.execute(_UPSERT_SQLITE if self.db.is_sqlite else _UPSERT_POSTGRESQL, rows)
            return await metadata_of(session, volume.id)
