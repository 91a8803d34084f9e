"""POST /volumes/{id}/action: the classic attach and detach actions and the admin ones."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body
from fastapi.responses import JSONResponse, Response

from app import policy
from app.auth import Context
from app.errors import BadRequest, InvalidInput
from app.routers import views
from app.routers.deps import ApiDep
from app.routers.docs import faults, since
from app.schemas.responses import LegacyConnectionEnvelope
from app.services.legacy import LegacyService

router = APIRouter(prefix="/volumes", tags=["volume actions"])

Handler = Callable[[LegacyService, Context, str, Any], Awaitable[Response]]


def _object(action: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"Invalid input for field/attribute {action}: it must be an object.")
    return value


def _connector(action: str, value: Any) -> dict[str, Any]:
    connector = _object(action, value).get("connector")
    if not isinstance(connector, dict) or not connector:
        raise InvalidInput(f"Invalid input for field/attribute {action}.connector: a connector object is required.")
    return connector


def _optional_str(action: str, body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidInput(f"Invalid input for field/attribute {action}.{key}: it must be a string.")
    return value


def _optional_text(action: str, body: dict[str, Any], key: str, max_length: int = 255) -> str | None:
    value = _optional_str(action, body, key)
    if value is not None and len(value) > max_length:
        raise InvalidInput(f"Invalid input for field/attribute {action}.{key}: at most {max_length} characters.")
    return value


def _optional_uuid(action: str, body: dict[str, Any], key: str) -> str | None:
    value = _optional_str(action, body, key)
    if value is None:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidInput(f"Invalid input for field/attribute {action}.{key}: it must be a UUID.") from None


def _accepted() -> Response:
    return Response(status_code=202)


async def _reserve(svc: LegacyService, ctx: Context, volume_id: str, _value: Any) -> Response:
    await svc.reserve(ctx, volume_id)
    return _accepted()


async def _unreserve(svc: LegacyService, ctx: Context, volume_id: str, _value: Any) -> Response:
    await svc.unreserve(ctx, volume_id)
    return _accepted()


async def _initialize(svc: LegacyService, ctx: Context, volume_id: str, value: Any) -> Response:
    info = await svc.initialize_connection(ctx, volume_id, _connector("os-initialize_connection", value))
    return views.reply({"connection_info": info})


async def _attach(svc: LegacyService, ctx: Context, volume_id: str, value: Any) -> Response:
    body = _object("os-attach", value)
    mode = body.get("mode") or "rw"
    if mode not in ("rw", "ro"):
        raise InvalidInput("Invalid input for field/attribute os-attach.mode: it must be 'rw' or 'ro'.")
    await svc.attach(
        ctx,
        volume_id,
        instance_uuid=_optional_uuid("os-attach", body, "instance_uuid"),
        host_name=_optional_text("os-attach", body, "host_name"),
        mountpoint=_optional_text("os-attach", body, "mountpoint"),
        mode=mode,
    )
    return _accepted()


async def _begin_detaching(svc: LegacyService, ctx: Context, volume_id: str, _value: Any) -> Response:
    await svc.begin_detaching(ctx, volume_id)
    return _accepted()


async def _roll_detaching(svc: LegacyService, ctx: Context, volume_id: str, _value: Any) -> Response:
    await svc.roll_detaching(ctx, volume_id)
    return _accepted()


async def _terminate(svc: LegacyService, ctx: Context, volume_id: str, value: Any) -> Response:
    await svc.terminate_connection(ctx, volume_id, _connector("os-terminate_connection", value))
    return _accepted()


async def _detach(svc: LegacyService, ctx: Context, volume_id: str, value: Any) -> Response:
    body = _object("os-detach", value)
    await svc.detach(ctx, volume_id, _optional_str("os-detach", body, "attachment_id"))
    return _accepted()


async def _force_detach(svc: LegacyService, ctx: Context, volume_id: str, value: Any) -> Response:
    body = _object("os-force_detach", value)
    connector = body.get("connector")
    if connector is not None and not isinstance(connector, dict):
        raise InvalidInput("Invalid input for field/attribute os-force_detach.connector: it must be an object.")
    await svc.force_detach(ctx, volume_id, _optional_str("os-force_detach", body, "attachment_id"), connector)
    return _accepted()


async def _reset_status(svc: LegacyService, ctx: Context, volume_id: str, value: Any) -> Response:
    body = _object("os-reset_status", value)
    await svc.reset_status(
        ctx,
        volume_id,
        status=_optional_str("os-reset_status", body, "status"),
        attach_status=_optional_str("os-reset_status", body, "attach_status"),
    )
    return _accepted()


# Cinder's policy rule of each action (cinder/policies/volume_actions.py), enforced on the volume's project
ACTION_POLICIES: dict[str, str] = {
    "os-reserve": policy.RESERVE,
    "os-unreserve": policy.UNRESERVE,
    "os-initialize_connection": policy.INITIALIZE_CONNECTION,
    "os-attach": policy.ATTACH,
    "os-begin_detaching": policy.BEGIN_DETACHING,
    "os-roll_detaching": policy.ROLL_DETACHING,
    "os-terminate_connection": policy.TERMINATE_CONNECTION,
    "os-detach": policy.DETACH,
    "os-force_detach": policy.FORCE_DETACH,
    "os-reset_status": policy.RESET_STATUS,
}

# every action exists from 3.0; a later one would carry its minimum version here
ACTIONS: dict[str, Handler] = {
    "os-reserve": _reserve,
    "os-unreserve": _unreserve,
    "os-initialize_connection": _initialize,
    "os-attach": _attach,
    "os-begin_detaching": _begin_detaching,
    "os-roll_detaching": _roll_detaching,
    "os-terminate_connection": _terminate,
    "os-detach": _detach,
    "os-force_detach": _force_detach,
    "os-reset_status": _reset_status,
}


@router.post(
    "/{volume_id}/action",
    status_code=202,
    operation_id="volume_action",
    summary="Run one classic volume action (os-reserve, os-initialize_connection, os-attach, …)",
    response_model=None,
    response_class=Response,
    responses={
        **faults(403, 404, 409),
        200: {"model": LegacyConnectionEnvelope, "description": "os-initialize_connection"},
        202: {"description": "Every other action: accepted, no body"},
    },
    openapi_extra=since(),
)
async def volume_action(
    volume_id: str,
    body: Annotated[Any, Body(examples=[{"os-reserve": None}, {"os-initialize_connection": {"connector": {}}}])],
    api: ApiDep,
) -> Response | JSONResponse:
    if not isinstance(body, dict) or len(body) != 1:
        raise BadRequest("Malformed request body")
    ((action, value),) = body.items()
    handler = ACTIONS.get(action)
    if handler is None:
        raise BadRequest(f"There is no such action: {action}")
    await api.auth.volume(volume_id, ACTION_POLICIES[action])
    return await handler(api.legacy, api.ctx, volume_id, value)
