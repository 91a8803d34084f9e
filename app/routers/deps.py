"""Typed dependencies routes declare: the caller, the microversion, the services."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Header, Path, Request

from app import microversions
from app.auth import Context, context_from_headers
from app.errors import BadRequest, InvalidInput, NotFound
from app.logs import bind
from app.microversions import APIVersion
from app.policy import Policy
from app.services.attachments import AttachmentService
from app.services.legacy import LegacyService
from app.services.types import VolumeTypeService
from app.services.volumes import VolumeService


def version_of(request: Request) -> APIVersion:
    return request.scope.get("state", {}).get("api_version", microversions.MIN)  # type: ignore[no-any-return]


# every dependency is async: a sync one would cost a thread-pool hop per request
async def get_version(request: Request) -> APIVersion:
    return version_of(request)


_CALLER = "tether.caller"


async def get_caller(request: Request) -> Context:
    """The caller, from a Keystone token (keystone mode) or the noauth headers, with the policy's view of it;
    worked out once per request. A dependency that needs it besides the route's CallerDep (the authorizer, the
    idempotency key) calls this instead of naming CallerDep, which FastAPI would resolve again at every dependency
    that names it before looking in its cache (~3% of a request's CPU each time)."""
    ctx: Context | None = request.scope.get(_CALLER)
    if ctx is None:
        ctx = request.scope[_CALLER] = await _caller(request)
    return ctx


async def _caller(request: Request) -> Context:
    state = request.app.state
    path_project = request.path_params.get("project_id")
    ctx: Context
    if state.keystone is not None:
        ctx = await state.keystone.context(request.headers, path_project)
    else:
        settings = state.settings
        ctx = context_from_headers(request.headers, settings.admin_user_set, path_project, settings.reader_user_set)
    policy: Policy = state.policy
    ctx = policy.decide(ctx)
    bind(project_id=ctx.project_id, volume_id=request.path_params.get("volume_id"))
    bind(attachment_id=request.path_params.get("attachment_id"))
    return ctx


CallerDep = Annotated[Context, Depends(get_caller)]
VersionDep = Annotated[APIVersion, Depends(get_version)]


async def version_header(
    openstack_api_version: Annotated[
        str | None,
        Header(
            alias="OpenStack-API-Version",
            description="`volume X.Y` (3.0 to 3.71, or `latest`); no header means 3.0.",
        ),
    ] = None,
) -> None:
    """Documents the header; the middleware has already parsed it."""


async def project_path(
    project_id: Annotated[str, Path(description="The caller's project (any string without '/').")],
) -> None:
    """Documents the project segment; get_caller compares it with the token's project."""


def _unstorable(text: str) -> bool:
    """NUL and unpaired surrogates: no database stores them and no JSON response can carry them."""
    if "\x00" in text:
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def _shown(text: str) -> str:
    return text.encode(errors="backslashreplace").decode().replace("\x00", "\\x00")


def _find_unstorable(body: Any) -> str | None:
    """The dotted path of the first string (key or value) that cannot be stored, if any.

    A loop, not recursion: a body may nest as deep as the JSON parser allows.
    """
    pending: list[tuple[Any, str]] = [(body, "")]
    while pending:
        value, where = pending.pop()
        if isinstance(value, str) and _unstorable(value):
            return where
        if isinstance(value, dict):
            for key, item in value.items():
                inner = f"{where}.{_shown(key)}" if where else _shown(key)
                if _unstorable(key):
                    return inner
                pending.append((item, inner))
        elif isinstance(value, list):
            pending.extend((item, where) for item in value)
    return None


async def storable_input(request: Request) -> None:
    """Refuse NUL characters and unpaired surrogates anywhere in the path, the query or a JSON body.

    Every one of these strings may reach a query or a column; PostgreSQL refuses them (a 500 otherwise)
    and SQLite would store what PostgreSQL cannot, so both refuse them here, once, before any service runs.
    """
    if any("\x00" in value for value in request.path_params.values()):
        raise BadRequest("Malformed request url")
    for key, value in request.query_params.multi_items():
        if "\x00" in key or "\x00" in value:
            raise InvalidInput(f"Invalid input for query parameter {_shown(key)}: NUL characters are not allowed.")
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    try:
        body = await request.json()
    except ValueError:
        return  # not JSON: the route's own validation says so
    field = _find_unstorable(body)
    if field is not None:
        raise InvalidInput(
            f"Invalid input for field/attribute {field or 'body'}: "
            "text must not contain NUL characters or unpaired surrogates."
        )


def min_version(version: APIVersion) -> Any:
    """A dependency that makes a route (or action) not exist below `version`."""

    async def check(request: Request) -> None:
        if version_of(request) < version:
            raise NotFound()

    check.__name__ = f"min_version_{version.major}_{version.minor}"
    return Depends(check)


async def _volumes(request: Request) -> VolumeService:
    return request.app.state.volumes  # type: ignore[no-any-return]


async def _types(request: Request) -> VolumeTypeService:
    return request.app.state.types  # type: ignore[no-any-return]


async def _attachments(request: Request) -> AttachmentService:
    return request.app.state.attachments  # type: ignore[no-any-return]


async def _legacy(request: Request) -> LegacyService:
    return request.app.state.legacy  # type: ignore[no-any-return]


VolumesDep = Annotated[VolumeService, Depends(_volumes)]
TypesDep = Annotated[VolumeTypeService, Depends(_types)]
AttachmentsDep = Annotated[AttachmentService, Depends(_attachments)]
LegacyDep = Annotated[LegacyService, Depends(_legacy)]
