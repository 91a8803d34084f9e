"""Volume types and their extra specs."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from app import policy
from app.routers import views
from app.routers.deps import ApiDep
from app.routers.docs import faults, since
from app.schemas.requests import ExtraSpecsRequest, VolumeTypeCreateRequest
from app.schemas.responses import ExtraSpecs, VolumeTypeEnvelope, VolumeTypeList
from app.services.types import DEFAULT_TYPE

router = APIRouter(prefix="/types", tags=["types"])


@router.post(
    "",
    operation_id="create_volume_type",
    summary="Create a volume type (admin)",
    response_model=VolumeTypeEnvelope,
    responses=faults(403, 409),
    openapi_extra=since(),
)
async def create_volume_type(body: VolumeTypeCreateRequest, api: ApiDep) -> JSONResponse:
    api.auth.caller(policy.TYPE_CREATE)
    spec = body.volume_type
    record = await api.types.create(
        api.ctx,
        name=spec.name,
        description=spec.description,
        extra_specs=spec.extra_specs or {},
        is_public=spec.is_public,
    )
    return views.reply({"volume_type": views.volume_type(record)})


@router.get(
    "",
    operation_id="list_volume_types",
    summary="List volume types",
    response_model=VolumeTypeList,
    responses=faults(),
    openapi_extra=since(),
)
async def list_volume_types(api: ApiDep) -> JSONResponse:
    api.auth.caller(policy.TYPE_GET_ALL)
    return views.reply({"volume_types": [views.volume_type(r) for r in await api.types.all(api.ctx)]})


@router.get(
    "/default",
    operation_id="show_default_volume_type",
    summary="Show the default volume type (cinder type-default)",
    response_model=VolumeTypeEnvelope,
    responses=faults(404),
    openapi_extra=since(),
)
async def show_default_volume_type(api: ApiDep) -> JSONResponse:
    api.auth.caller(policy.TYPE_GET)
    return views.reply({"volume_type": views.volume_type(await api.types.get(api.ctx, DEFAULT_TYPE))})


@router.get(
    "/{type_id}",
    operation_id="show_volume_type",
    summary="Show a volume type",
    response_model=VolumeTypeEnvelope,
    responses=faults(404),
    openapi_extra=since(),
)
async def show_volume_type(type_id: str, api: ApiDep) -> JSONResponse:
    api.auth.caller(policy.TYPE_GET)
    return views.reply({"volume_type": views.volume_type(await api.types.get(api.ctx, type_id))})


@router.delete(
    "/{type_id}",
    status_code=202,
    operation_id="delete_volume_type",
    summary="Delete a volume type (admin)",
    response_class=Response,
    responses=faults(403, 404),
    openapi_extra=since(),
)
async def delete_volume_type(type_id: str, api: ApiDep) -> Response:
    api.auth.caller(policy.TYPE_DELETE)
    await api.types.delete(api.ctx, type_id)
    return Response(status_code=202)


@router.post(
    "/{type_id}/extra_specs",
    operation_id="set_volume_type_extra_specs",
    summary="Set extra specs (admin)",
    response_model=ExtraSpecs,
    responses=faults(403, 404),
    openapi_extra=since(),
)
async def set_extra_specs(type_id: str, body: ExtraSpecsRequest, api: ApiDep) -> JSONResponse:
    api.auth.caller(policy.EXTRA_SPECS_CREATE)
    return views.reply({"extra_specs": await api.types.set_extra_specs(api.ctx, type_id, body.extra_specs)})


@router.get(
    "/{type_id}/extra_specs",
    operation_id="list_volume_type_extra_specs",
    summary="List extra specs",
    response_model=ExtraSpecs,
    responses=faults(404),
    openapi_extra=since(),
)
async def get_extra_specs(type_id: str, api: ApiDep) -> JSONResponse:
    api.auth.caller(policy.EXTRA_SPECS_INDEX)
    return views.reply({"extra_specs": await api.types.get_extra_specs(api.ctx, type_id)})


@router.delete(
    "/{type_id}/extra_specs/{key}",
    status_code=202,
    operation_id="delete_volume_type_extra_spec",
    summary="Delete one extra spec (admin)",
    response_class=Response,
    responses=faults(403, 404),
    openapi_extra=since(),
)
async def delete_extra_spec(type_id: str, key: str, api: ApiDep) -> Response:
    api.auth.caller(policy.EXTRA_SPECS_DELETE)
    await api.types.delete_extra_spec(api.ctx, type_id, key)
    return Response(status_code=202)
