"""Volumes: create, show, list, detail, update, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app import microversions as mv
from app import policy
from app.errors import InvalidInput
from app.routers import views
from app.routers.deps import Api, ApiDep
from app.routers.docs import faults, list_query, since
from app.routers.idempotency import IdempotencyDep
from app.schemas.requests import VolumeCreate, VolumeCreateRequest, VolumeUpdateRequest
from app.schemas.responses import VolumeDetailList, VolumeEnvelope, VolumeList
from app.services.listing import parse_bool, parse_list_params
from app.services.volumes import VOLUME_FILTERS, VOLUME_SORT_KEYS, VolumeRecord

router = APIRouter(prefix="/volumes", tags=["volumes"])


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


# why each of these create keys cannot be honoured: Tether makes empty volumes in no group
_UNSUPPORTED = {
    "snapshot_id": "creating a volume from a snapshot is not supported",
    "source_volid": "cloning a volume is not supported",
    "imageRef": "creating a volume from an image is not supported",
    "image_id": "creating a volume from an image is not supported",
    "backup_id": "restoring a backup to a new volume is not supported",
    "consistencygroup_id": "consistency groups are not supported",
    "group_id": "volume groups are not supported",
}


def _refuse_unsupported(spec: VolumeCreate) -> None:
    # a blank disk where the caller asked for its snapshot or image would look like success; null and "" are unset
    for field, why in _UNSUPPORTED.items():
        if getattr(spec, field):
            raise InvalidInput(f"Invalid input for field/attribute volume.{field}: {why}; leave it out or send null.")


def _refuse_extra(version: mv.APIVersion, *models: object) -> None:
    if version < mv.SUPPORT_VOLUME_SCHEMA_CHANGES:
        return
    for model in models:
        extra = getattr(model, "model_extra", None) or {}
        if extra:
            raise InvalidInput(f"Additional properties are not allowed ({', '.join(sorted(extra))} were unexpected)")


@router.post(
    "",
    status_code=202,
    operation_id="create_volume",
    summary="Create a volume",
    response_model=VolumeEnvelope,
    responses=faults(404, 409, 422),
    openapi_extra=since(),
)
async def create_volume(
    request: Request,
    body: VolumeCreateRequest,
    api: ApiDep,
    key: IdempotencyDep,
) -> JSONResponse:
    api.auth.caller(policy.VOLUME_CREATE)
    spec = body.volume
    _refuse_extra(api.version, body, spec)
    if "multiattach" in (spec.model_extra or {}):
        raise InvalidInput("multiattach is set by the volume type, not in the request body.")
    _refuse_unsupported(spec)
    base = _base(request)

    def render(record: VolumeRecord) -> dict[str, Any]:
        return {"volume": views.volume_detail(record, api.version, api.ctx, base)}

    record = await api.volumes.create(
        api.ctx,
        size=spec.size,
        name=spec.name if spec.name is not None else spec.display_name,
        description=spec.description if spec.description is not None else spec.display_description,
        volume_type=spec.volume_type,
        metadata=spec.metadata,
        availability_zone=spec.availability_zone,
        idempotency=key.answer(202, render) if key else None,
    )
    return views.reply(render(record), 202)


async def _list(request: Request, api: Api, detail: bool) -> JSONResponse:
    query = dict(request.query_params)
    params = parse_list_params(
        query,
        ctx=api.ctx,
        version=api.version,
        filters=VOLUME_FILTERS,
        sort_keys=VOLUME_SORT_KEYS,
        count_allowed=api.version >= mv.SUPPORT_COUNT_INFO,
    )
    page = await api.volumes.page(api.ctx, params)
    base = _base(request)
    body: dict[str, object] = {
        "volumes": [
            views.volume_detail(r, api.version, api.ctx, base) if detail else views.volume_summary(r, base)
            for r in page.items
        ]
    }
    if page.full and page.items:
        body["volumes_links"] = [views.next_link(base, request.url.path, query, page.items[-1].volume.id)]
    if page.count is not None:
        body["count"] = page.count
    return views.reply(body)


@router.get(
    "",
    operation_id="list_volumes",
    summary="List volumes (summaries)",
    response_model=VolumeList,
    responses=faults(404),
    openapi_extra={**since(), **list_query(*sorted(VOLUME_FILTERS), count=True)},
)
async def list_volumes(request: Request, api: ApiDep) -> JSONResponse:
    api.auth.caller(policy.VOLUME_GET_ALL)
    return await _list(request, api, detail=False)


@router.get(
    "/detail",
    operation_id="list_volumes_detail",
    summary="List volumes with details",
    response_model=VolumeDetailList,
    responses=faults(404),
    openapi_extra={**since(), **list_query(*sorted(VOLUME_FILTERS), count=True)},
)
async def list_volumes_detail(request: Request, api: ApiDep) -> JSONResponse:
    api.auth.caller(policy.VOLUME_GET_ALL)
    return await _list(request, api, detail=True)


@router.get(
    "/{volume_id}",
    operation_id="show_volume",
    summary="Show a volume",
    response_model=VolumeEnvelope,
    responses=faults(404),
    openapi_extra=since(),
)
async def show_volume(request: Request, volume_id: str, api: ApiDep) -> JSONResponse:
    await api.auth.volume(volume_id, policy.VOLUME_GET)
    record = await api.volumes.get(api.ctx, volume_id)
    return views.reply({"volume": views.volume_detail(record, api.version, api.ctx, _base(request))})


@router.put(
    "/{volume_id}",
    operation_id="update_volume",
    summary="Update a volume's name, description or metadata",
    response_model=VolumeEnvelope,
    responses=faults(404),
    openapi_extra=since(),
)
async def update_volume(
    request: Request,
    volume_id: str,
    body: VolumeUpdateRequest,
    api: ApiDep,
) -> JSONResponse:
    await api.auth.volume(volume_id, policy.VOLUME_UPDATE)
    spec = body.volume
    _refuse_extra(api.version, body, spec)
    given = spec.model_fields_set
    fields = set()
    name = spec.name if "name" in given else spec.display_name
    if given & {"name", "display_name"}:
        fields.add("name")
    description = spec.description if "description" in given else spec.display_description
    if given & {"description", "display_description"}:
        fields.add("description")
    if not fields and spec.metadata is None:
        raise InvalidInput("Invalid input for field/attribute volume: it must update name, description or metadata.")
    record = await api.volumes.update(
        api.ctx, volume_id, name=name, description=description, metadata=spec.metadata, fields=frozenset(fields)
    )
    return views.reply({"volume": views.volume_detail(record, api.version, api.ctx, _base(request))})


@router.delete(
    "/{volume_id}",
    status_code=202,
    operation_id="delete_volume",
    summary="Delete a volume",
    response_class=Response,
    responses=faults(403, 404),
    openapi_extra=since(),
)
async def delete_volume(request: Request, volume_id: str, api: ApiDep) -> Response:
    force = parse_bool("force", request.query_params.get("force", "false"))
    parse_bool("cascade", request.query_params.get("cascade", "false"))
    await api.auth.volume(volume_id, policy.VOLUME_DELETE, *([policy.VOLUME_FORCE_DELETE] if force else []))
    await api.volumes.delete(api.ctx, volume_id, force=force)
    return Response(status_code=202)
