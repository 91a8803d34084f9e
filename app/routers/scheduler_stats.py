"""Capacity as cinderclient's `get-pools` reads it: GET /scheduler-stats/get_pools (admin)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from app import policy
from app.routers import views
from app.routers.docs import faults, since
from app.routers.enforce import AuthorizeDep
from app.schemas.responses import PoolList
from app.services.listing import parse_bool
from app.services.status import capacity

router = APIRouter(prefix="/scheduler-stats", tags=["scheduler stats"])

GIB = 1024**3


@router.get(
    "/get_pools",
    operation_id="list_pools",
    summary="Capacity of this node's storage pool (admin; cinder get-pools)",
    response_model=PoolList,
    responses=faults(403),
    openapi_extra=since(),
)
async def list_pools(
    request: Request,
    auth: AuthorizeDep,
    detail: Annotated[str, Query(description="true: include capabilities")] = "false",
) -> JSONResponse:
    auth.caller(policy.GET_POOLS)
    state = request.app.state
    settings = state.settings
    pool: dict[str, Any] = {"name": settings.host}
    if parse_bool("detail", detail):
        free = await capacity(state.dispatcher, state.backends)
        pool["capabilities"] = {
            "pool_name": settings.host.rpartition("#")[2],
            "volume_backend_name": settings.volume_backend,
            "vendor_name": "Tether",
            "driver_version": request.app.version,
            "storage_protocol": "iSCSI",
            "total_capacity_gb": round(free.total_bytes / GIB, 2),
            "free_capacity_gb": round(free.free_bytes / GIB, 2),
            "reserved_percentage": 0,
            "thin_provisioning_support": settings.volume_backend == "lvm" and settings.lvm_type == "thin",
            "thick_provisioning_support": not (settings.volume_backend == "lvm" and settings.lvm_type == "thin"),
            "multiattach": True,
            "timestamp": views.when(datetime.now(UTC)),
        }
    return views.reply({"pools": [pool]})
