"""Volume types and their extra specs (what makes a volume multiattach)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import Context
from app.db.engine import Database
from app.db.models import Volume, VolumeType, VolumeTypeExtraSpec, utcnow
from app.errors import Conflict, InvalidInput, NotFound, VolumeTypeNotFound

DEFAULT_TYPE = "__DEFAULT__"


def is_multiattach(extra_specs: dict[str, str]) -> bool:
    value = extra_specs.get("multiattach", "")
    return value.strip().lower() in ("<is> true", "true")


@dataclass
class TypeRecord:
    type: VolumeType
    extra_specs: dict[str, str]


async def find_type(session: AsyncSession, name_or_id: str) -> VolumeType | None:
    found = await session.get(VolumeType, name_or_id)
    if found is None:
        found = (await session.execute(select(VolumeType).where(VolumeType.name == name_or_id))).scalars().first()
    return found


async def extra_specs_of(session: AsyncSession, type_id: str) -> dict[str, str]:
    rows = await session.execute(
        select(VolumeTypeExtraSpec.key, VolumeTypeExtraSpec.value).where(VolumeTypeExtraSpec.volume_type_id == type_id)
    )
    return {k: v for k, v in rows.all()}


def _check_specs(extra_specs: dict[str, str]) -> None:
    for key, value in extra_specs.items():
        if not key or len(key) > 255 or len(value) > 255:
            raise InvalidInput("Extra spec keys and values must be 1 to 255 characters long.")


class VolumeTypeService:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(
        self, ctx: Context, *, name: str, description: str | None, extra_specs: dict[str, str], is_public: bool
    ) -> TypeRecord:
        _check_specs(extra_specs)
        if not name.strip():
            raise InvalidInput("Volume type name can not be empty.")
        try:
            async with self.db.write() as session:
                volume_type = VolumeType(name=name, description=description, is_public=is_public)
                session.add(volume_type)
                await session.flush()
                for key, value in extra_specs.items():
                    session.add(VolumeTypeExtraSpec(volume_type_id=volume_type.id, key=key, value=value))
        except IntegrityError:
            raise Conflict(f"Volume Type {name} already exists.") from None
        return TypeRecord(volume_type, dict(extra_specs))

    async def get(self, ctx: Context, type_id: str) -> TypeRecord:
        async with self.db.read() as session:
            volume_type = await find_type(session, type_id)
            if volume_type is None or (not volume_type.is_public and not ctx.all_projects):
                raise VolumeTypeNotFound(type_id)
            return TypeRecord(volume_type, await extra_specs_of(session, volume_type.id))

    async def all(self, ctx: Context) -> list[TypeRecord]:
        async with self.db.read() as session:
            stmt = select(VolumeType).order_by(VolumeType.name)
            if not ctx.all_projects:
                stmt = stmt.where(VolumeType.is_public.is_(True))  # type: ignore[attr-defined]
            types = list((await session.execute(stmt)).scalars().all())
            specs = await session.execute(select(VolumeTypeExtraSpec))
            by_type: dict[str, dict[str, str]] = {}
            for spec in specs.scalars().all():
                by_type.setdefault(spec.volume_type_id, {})[spec.key] = spec.value
        return [TypeRecord(t, by_type.get(t.id, {})) for t in types]

    async def delete(self, ctx: Context, type_id: str) -> None:
        async with self.db.write() as session:
            volume_type = await find_type(session, type_id)
            if volume_type is None:
                raise VolumeTypeNotFound(type_id)
            if volume_type.name == DEFAULT_TYPE:
                raise InvalidInput("The default volume type can not be deleted.")
            in_use = await session.scalar(
                select(func.count()).select_from(Volume).where(Volume.volume_type_id == volume_type.id)
            )
            if in_use:
                raise InvalidInput(f"Target volume type {type_id} is still in use.")
            await session.delete(volume_type)

    async def set_extra_specs(self, ctx: Context, type_id: str, extra_specs: dict[str, str]) -> dict[str, str]:
        _check_specs(extra_specs)
        async with self.db.write() as session:
            volume_type = await find_type(session, type_id)
            if volume_type is None:
                raise VolumeTypeNotFound(type_id)
            for key, value in extra_specs.items():
                await session.merge(VolumeTypeExtraSpec(volume_type_id=volume_type.id, key=key, value=value))
            volume_type.updated_at = utcnow()
        return dict(extra_specs)

    async def get_extra_specs(self, ctx: Context, type_id: str) -> dict[str, str]:
        return (await self.get(ctx, type_id)).extra_specs

    async def delete_extra_spec(self, ctx: Context, type_id: str, key: str) -> None:
        async with self.db.write() as session:
            volume_type = await find_type(session, type_id)
            if volume_type is None:
                raise VolumeTypeNotFound(type_id)
            result = await session.execute(
                delete(VolumeTypeExtraSpec).where(
                    VolumeTypeExtraSpec.volume_type_id == volume_type.id, VolumeTypeExtraSpec.key == key
                )
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise NotFound(f"Volume Type {type_id} has no extra specs with key {key}.")
