"""Typed dependencies routes declare: the caller, the microversion, the services."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Header, Path, Request

from app import microversions
from app.auth import Context, context_from_headers
from app.errors import NotFound
from app.logs import bind
from app.microversions import APIVersion
from app.services.attachments import AttachmentService
from app.services.legacy import LegacyService
from app.services.types import VolumeTypeService
from app.services.volumes import VolumeService


def version_of(request: Request) -> APIVersion:
    return request.scope.get("state", {}).get("api_version", microversions.MIN)  # type: ignore[no-any-return]


# every dependency is async: a sync one would cost a thread-pool hop per request
async def get_version(request: Request) -> APIVersion:
    return version_of(request)


async def get_caller(request: Request) -> Context:
    ctx = context_from_headers(
        request.headers, request.app.state.settings.admin_user_set, request.path_params.get("project_id")
    )
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
