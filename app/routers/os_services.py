"""The services as `cinder service-list` reads them: GET /os-services (admin), one row per storage node and
per API host, up or down by their heartbeats (SPEC 10)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select

from app import policy
from app.db.models import Service
from app.routers import views
from app.routers.deps import ApiDep
from app.routers.docs import faults, since
from app.schemas.responses import ServiceList

router = APIRouter(prefix="/os-services", tags=["services"])


@router.get(
    "",
    operation_id="list_services",
    summary="Storage nodes (cinder-volume) and API hosts (cinder-scheduler), up or down (admin; cinder service-list)",
    response_model=ServiceList,
    responses=faults(403),
    openapi_extra=since(),
)
async def list_services(
    request: Request,
    api: ApiDep,
    host: Annotated[str | None, Query(description="only this host")] = None,
    binary: Annotated[str | None, Query(description="only this binary (cinder-volume, cinder-scheduler)")] = None,
) -> JSONResponse:
    api.auth.caller(policy.SERVICES_INDEX)
    nodes = request.app.state.nodes
    async with request.app.state.db.read() as session:
        rows = (await session.execute(select(Service).order_by(Service.binary, Service.name))).scalars().all()
    services = [
        {
            "binary": row.binary,
            "host": row.host,
            "zone": row.availability_zone,
            "status": "enabled",
            "state": "up" if nodes.is_up(row) else "down",
            "updated_at": views.when(row.heartbeat_at),
            "disabled_reason": None,
        }
        for row in rows
        if (host is None or row.host == host) and (binary is None or row.binary == binary)
    ]
    return views.reply({"services": services})
