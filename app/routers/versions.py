"""Version discovery (GET / and GET /v3/) and the health check."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from app import microversions
from app.routers.deps import get_caller
from app.routers.docs import faults
from app.schemas.responses import Versions

router = APIRouter(tags=["versions"])


async def _discovery_caller(request: Request) -> None:
    """noauth: a caller is needed, since keystoneauth discovers without a token and retries with one after a
    401 (how the noauth clients get theirs through); keystone mode: the document needs no token (SPEC 11)."""
    if request.app.state.keystone is None:
        await get_caller(request)


def _versions(request: Request) -> dict[str, Any]:
    base = str(request.base_url).rstrip("/")
    return {
        "versions": [
            {
                "id": "v3.0",
                "status": "CURRENT",
                "version": str(microversions.MAX),
                "min_version": str(microversions.MIN),
                "updated": "2023-08-31T00:00:00Z",
                "links": [
                    {"rel": "describedby", "type": "text/html", "href": "https://docs.openstack.org/"},
                    {"rel": "self", "href": f"{base}/v3/"},
                ],
                "media-types": [
                    {"base": "application/json", "type": "application/vnd.openstack.volume+json;version=3"}
                ],
            }
        ]
    }


@router.get(
    "/",
    status_code=300,
    operation_id="list_versions",
    summary="List API versions (no auth)",
    response_model=Versions,
)
async def list_versions(request: Request) -> JSONResponse:
    return JSONResponse(_versions(request), status_code=300)


@router.get("/v3", include_in_schema=False)  # keystoneauth asks without the slash; Cinder answers both
@router.get(
    "/v3/",
    operation_id="show_version",
    summary="Show the v3 API version",
    response_model=Versions,
    responses=faults(),
)
async def show_version(request: Request, _caller: Annotated[None, Depends(_discovery_caller)]) -> JSONResponse:
    return JSONResponse(_versions(request))


@router.get("/healthcheck", operation_id="healthcheck", response_class=PlainTextResponse)
async def healthcheck() -> PlainTextResponse:
    return PlainTextResponse("OK")
