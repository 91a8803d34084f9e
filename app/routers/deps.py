"""The one dependency a route declares: `api: ApiDep` (or its router's `Annotated[Api, api_since(...)]`), which checks
the request's input and microversion and carries the caller, the microversion, the services and the door."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Header, Path, Request

from app import microversions
from app.auth import Context, context_from_headers
from app.errors import BadRequest, InvalidInput, NotFound
from app.logs import bind
from app.microversions import APIVersion
from app.policy import Policy
from app.routers.enforce import Authorizer
from app.services.attachments import AttachmentService
from app.services.legacy import LegacyService
from app.services.types import VolumeTypeService
from app.services.volume_metadata import VolumeMetadataService
from app.services.volumes import VolumeService


def version_of(request: Request) -> APIVersion:
    return request.scope.get("state", {}).get("api_version", microversions.MIN)  # type: ignore[no-any-return]


_CALLER = "tether.caller"


async def get_caller(request: Request) -> Context:
    """The caller, from a Keystone token (keystone mode) or the noauth headers, with the policy's view of it;
    worked out once per request (Api, the idempotency key and the endpoints outside the API all ask)."""
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


class Api:
    """What a route needs of its request: the caller, the microversion, the services, the door (`auth`).

    One dependency, not one each: FastAPI 0.165 resolves every dependency of a route on every request, and each
    cost ~220,000 instructions, ~6.5% of an attach cycle's request (benchmarks/instructions.sh, issue 17)."""

    __slots__ = ("_auth", "ctx", "request", "version")

    def __init__(self, request: Request, ctx: Context, version: APIVersion) -> None:
        self.request = request
        self.ctx = ctx
        self.version = version
        self._auth: Authorizer | None = None

    @property
    def auth(self) -> Authorizer:
        """The route's one policy decision (app/routers/enforce.py)."""
        if self._auth is None:
            self._auth = Authorizer(self.request.app.state.policy, self.ctx, self.volumes, self.attachments)
        return self._auth

    @property
    def volumes(self) -> VolumeService:
        return self.request.app.state.volumes  # type: ignore[no-any-return]

    @property
    def attachments(self) -> AttachmentService:
        return self.request.app.state.attachments  # type: ignore[no-any-return]

    @property
    def legacy(self) -> LegacyService:
        return self.request.app.state.legacy  # type: ignore[no-any-return]

    @property
    def types(self) -> VolumeTypeService:
        return self.request.app.state.types  # type: ignore[no-any-return]

    @property
    def volume_metadata(self) -> VolumeMetadataService:
        return self.request.app.state.volume_metadata  # type: ignore[no-any-return]


# the dependencies that make an Api: every route of the API declares one (tests/security/test_hostile_input.py),
# since the input check is theirs
RESOLVERS: list[Any] = []


def api_since(since: APIVersion | None = None) -> Any:
    """The Api dependency of routes that do not exist below `since` (404). In this order: the input refused
    when it cannot be stored (400), the microversion, the caller (401 in keystone mode); it is async, since a
    sync dependency costs a thread-pool hop per request."""

    async def api(request: Request) -> Api:
        await storable_input(request)
        version = version_of(request)
        if since is not None and version < since:
            raise NotFound()
        return Api(request, await get_caller(request), version)

    if since is not None:
        api.__name__ = f"api_since_{since.major}_{since.minor}"
    RESOLVERS.append(api)
    return Depends(api)


ApiDep = Annotated[Api, api_since()]
