"""Attachments (3.27+): create, update, show, list, detail, complete (3.44+), delete."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app import microversions as mv
from app import policy
from app.errors import BadRequest, InvalidInput, NotFound
from app.routers import views
from app.routers.deps import Api, api_since
from app.routers.docs import faults, list_query, since
from app.routers.idempotency import IdempotencyDep
from app.schemas.requests import AttachmentActionRequest, AttachmentCreateRequest, AttachmentUpdateRequest
from app.schemas.responses import AttachmentDetailList, AttachmentEnvelope, AttachmentList
from app.services.attachment_reads import ATTACHMENT_FILTERS, ATTACHMENT_SORT_KEYS, AttachmentRecord
from app.services.listing import parse_list_params

# the attach cycle's routes come first (create, complete, delete), then the rest: FastAPI tries a router's routes
# in order, twice per request, and trying the other four first cost 7% of the cycle's instructions (issue 17);
# /detail stays before /{attachment_id}
router = APIRouter(prefix="/attachments", tags=["attachments"])
# every route of this router: none exists below 3.27
AttachmentsApi = Annotated[Api, api_since(mv.NEW_ATTACH)]


@router.post(
    "",
    operation_id="create_attachment",
    summary="Reserve a volume, and connect it when a connector is given",
    response_model=AttachmentEnvelope,
    responses=faults(404, 409, 422),
    openapi_extra=since(mv.NEW_ATTACH),
)
async def create_attachment(
    body: AttachmentCreateRequest,
    api: AttachmentsApi,
    key: IdempotencyDep,
) -> JSONResponse:
    spec = body.attachment
    await api.auth.volume(spec.volume_uuid, policy.ATTACHMENT_CREATE)
    if "mode" in spec.model_fields_set and api.version < mv.ATTACHMENT_CREATE_MODE_ARG:
        raise InvalidInput("Invalid input for field/attribute attachment.mode: it needs microversion 3.54 or later.")
    record = await api.attachments.create(
        api.ctx,
        volume_id=spec.volume_uuid,
        instance_uuid=spec.instance_uuid,
        connector=spec.connector,
        mode=spec.mode,
        idempotency=key.answer(200, _envelope) if key else None,
    )
    return views.reply(_envelope(record))


def _envelope(record: AttachmentRecord) -> dict[str, Any]:
    return {"attachment": views.attachment_detail(record)}


async def _list(request: Request, api: Api, detail: bool) -> JSONResponse:
    query = dict(request.query_params)
    params = parse_list_params(
        query,
        ctx=api.ctx,
        version=api.version,
        filters=ATTACHMENT_FILTERS,
        sort_keys=ATTACHMENT_SORT_KEYS,
        count_allowed=False,
    )
    page = await api.attachments.page(api.ctx, params, detail=detail)
    body: dict[str, Any] = {
        "attachments": [
            views.attachment_detail(r) if detail else views.attachment_summary(r.attachment) for r in page.items
        ]
    }
    if page.full and page.items:
        base = str(request.base_url).rstrip("/")
        body["attachments_links"] = [views.next_link(base, request.url.path, query, page.items[-1].attachment.id)]
    return views.reply(body)


@router.post(
    "/{attachment_id}/action",
    status_code=204,
    operation_id="complete_attachment",
    response_class=Response,
    responses=faults(404),
    openapi_extra=since(mv.NEW_ATTACH_COMPLETION),
    summary="Mark an attachment attached (os-complete, 3.44+)",
)
async def attachment_action(
    attachment_id: str,
    body: AttachmentActionRequest,
    api: AttachmentsApi,
) -> Response:
    actions = body.actions()
    if len(actions) != 1:
        raise BadRequest("Malformed request body")
    (action,) = actions
    if action != "os-complete":
        raise BadRequest(f"There is no such action: {action}")
    if api.version < mv.NEW_ATTACH_COMPLETION:
        raise NotFound()
    await api.auth.attachment(attachment_id, policy.ATTACHMENT_COMPLETE)
    await api.attachments.complete(api.ctx, attachment_id)
    return Response(status_code=204)


@router.delete(
    "/{attachment_id}",
    operation_id="delete_attachment",
    summary="Disconnect and delete an attachment",
    response_model=AttachmentList,
    responses=faults(404),
    openapi_extra=since(mv.NEW_ATTACH),
)
async def delete_attachment(attachment_id: str, api: AttachmentsApi) -> JSONResponse:
    await api.auth.attachment(attachment_id, policy.ATTACHMENT_DELETE)
    remaining = await api.attachments.remove(api.ctx, attachment_id)
    return views.reply({"attachments": [views.attachment_summary(a) for a in remaining]})


@router.get(
    "",
    operation_id="list_attachments",
    summary="List attachments (summaries)",
    response_model=AttachmentList,
    responses=faults(404),
    openapi_extra={**since(mv.NEW_ATTACH), **list_query(*sorted(ATTACHMENT_FILTERS))},
)
async def list_attachments(request: Request, api: AttachmentsApi) -> JSONResponse:
    api.auth.caller(policy.ATTACHMENT_GET_ALL)
    return await _list(request, api, detail=False)


@router.get(
    "/detail",
    operation_id="list_attachments_detail",
    summary="List attachments with details",
    response_model=AttachmentDetailList,
    responses=faults(404),
    openapi_extra={**since(mv.NEW_ATTACH), **list_query(*sorted(ATTACHMENT_FILTERS))},
)
async def list_attachments_detail(request: Request, api: AttachmentsApi) -> JSONResponse:
    api.auth.caller(policy.ATTACHMENT_GET_ALL)
    return await _list(request, api, detail=True)


@router.get(
    "/{attachment_id}",
    operation_id="show_attachment",
    summary="Show an attachment",
    response_model=AttachmentEnvelope,
    responses=faults(404),
    openapi_extra=since(mv.NEW_ATTACH),
)
async def show_attachment(attachment_id: str, api: AttachmentsApi) -> JSONResponse:
    await api.auth.attachment(attachment_id, policy.ATTACHMENT_GET)
    return views.reply({"attachment": views.attachment_detail(await api.attachments.get(api.ctx, attachment_id))})


@router.put(
    "/{attachment_id}",
    operation_id="update_attachment",
    summary="Connect an attachment with a connector",
    response_model=AttachmentEnvelope,
    responses=faults(404, 409),
    openapi_extra=since(mv.NEW_ATTACH),
)
async def update_attachment(attachment_id: str, body: AttachmentUpdateRequest, api: AttachmentsApi) -> JSONResponse:
    await api.auth.attachment(attachment_id, policy.ATTACHMENT_UPDATE)
    record = await api.attachments.connect(api.ctx, attachment_id, body.attachment.connector)
    return views.reply({"attachment": views.attachment_detail(record)})
