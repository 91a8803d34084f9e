"""Volume metadata: GET, POST (merge) and PUT (replace) /volumes/{id}/metadata; GET, PUT, DELETE one key."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from app import policy
from app.errors import InvalidInput
from app.routers import views
from app.routers.deps import ApiDep
from app.routers.docs import faults, since
from app.schemas.requests import VolumeMetadataItemRequest, VolumeMetadataRequest
from app.schemas.responses import VolumeMetadataEnvelope, VolumeMetadataItemEnvelope

router = APIRouter(prefix="/volumes", tags=["volume metadata"])

# Cinder's policy rule for each operation (cinder/policies/volume_metadata.py), by operation id: enforced at
# each route on the volume's project, and a policy.yaml overrides them (SPEC 11)
GET_POLICY = policy.VOLUME_METADATA_GET
CREATE_POLICY = policy.VOLUME_METADATA_CREATE
UPDATE_POLICY = policy.VOLUME_METADATA_UPDATE
DELETE_POLICY = policy.VOLUME_METADATA_DELETE
POLICIES = {
    "show_volume_metadata": GET_POLICY,
    "create_volume_metadata": CREATE_POLICY,
    "update_volume_metadata": UPDATE_POLICY,
    "show_volume_metadata_item": GET_POLICY,
    "update_volume_metadata_item": UPDATE_POLICY,
    "delete_volume_metadata_item": DELETE_POLICY,
}


@router.get(
    "/{volume_id}/metadata",
    operation_id="show_volume_metadata",
    summary="Show a volume's metadata",
    response_model=VolumeMetadataEnvelope,
    responses=faults(404),
    openapi_extra=since(),
)
async def show_volume_metadata(volume_id: str, api: ApiDep) -> JSONResponse:
    await api.auth.volume(volume_id, GET_POLICY)
    return views.reply({"metadata": await api.volume_metadata.get(api.ctx, volume_id)})


@router.post(
    "/{volume_id}/metadata",
    operation_id="create_volume_metadata",
    summary="Set metadata keys, keeping the others; answers the whole metadata",
    response_model=VolumeMetadataEnvelope,
    responses=faults(404),
    openapi_extra=since(),
)
async def create_volume_metadata(volume_id: str, body: VolumeMetadataRequest, api: ApiDep) -> JSONResponse:
    await api.auth.volume(volume_id, CREATE_POLICY)
    return views.reply({"metadata": await api.volume_metadata.merge(api.ctx, volume_id, body.metadata)})


@router.put(
    "/{volume_id}/metadata",
    operation_id="update_volume_metadata",
    summary="Replace a volume's whole metadata",
    response_model=VolumeMetadataEnvelope,
    responses=faults(404),
    openapi_extra=since(),
)
async def update_volume_metadata(volume_id: str, body: VolumeMetadataRequest, api: ApiDep) -> JSONResponse:
    await api.auth.volume(volume_id, UPDATE_POLICY)
    return views.reply({"metadata": await api.volume_metadata.replace(api.ctx, volume_id, body.metadata)})


@router.get(
    "/{volume_id}/metadata/{key}",
    operation_id="show_volume_metadata_item",
    summary="Show one metadata key",
    response_model=VolumeMetadataItemEnvelope,
    responses=faults(404),
    openapi_extra=since(),
)
async def show_volume_metadata_item(volume_id: str, key: str, api: ApiDep) -> JSONResponse:
    await api.auth.volume(volume_id, GET_POLICY)
    return views.reply({"meta": {key: await api.volume_metadata.get_item(api.ctx, volume_id, key)}})


@router.put(
    "/{volume_id}/metadata/{key}",
    operation_id="update_volume_metadata_item",
    summary="Set one metadata key (the body's one key is the URL's)",
    response_model=VolumeMetadataItemEnvelope,
    responses=faults(404),
    openapi_extra=since(),
)
async def update_volume_metadata_item(
    volume_id: str, key: str, body: VolumeMetadataItemRequest, api: ApiDep
) -> JSONResponse:
    await api.auth.volume(volume_id, UPDATE_POLICY)
    # Cinder's messages; its body schema refuses a second item before the key is compared with the URL's
    if len(body.meta) > 1:
        raise InvalidInput("Request body contains too many items")
    if key not in body.meta:
        raise InvalidInput("Request body and URI mismatch")
    await api.volume_metadata.merge(api.ctx, volume_id, body.meta)
    return views.reply({"meta": body.meta})


@router.delete(
    "/{volume_id}/metadata/{key}",
    operation_id="delete_volume_metadata_item",
    summary="Delete one metadata key",
    response_class=Response,
    responses=faults(404),
    openapi_extra=since(),
)
async def delete_volume_metadata_item(volume_id: str, key: str, api: ApiDep) -> Response:
    await api.auth.volume(volume_id, DELETE_POLICY)
    await api.volume_metadata.delete_item(api.ctx, volume_id, key)
    return Response(status_code=200)
