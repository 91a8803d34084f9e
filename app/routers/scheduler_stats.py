"""Capacity as cinderclient's `get-pools` reads it: GET /scheduler-stats/get_pools (admin)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from app import policy
from app.routers import views
from app.routers.deps import ApiDep
from app.routers.docs import faults, since
from app.schemas.responses import PoolList
from app.services.listing import parse_bool
from app.services.nodes import free_bytes

router = APIRouter(prefix="/scheduler-stats", tags=["scheduler stats"])

GIB = 1024**3


@router.get(
    "/get_pools",
    operation_id="list_pools",
    summary="Every storage node's pool and its capacity (admin; cinder get-pools)",
    response_model=PoolList,
    responses=faults(403),
    openapi_extra=since(),
)
async def list_pools(
    request: Request,
    api: ApiDep,
    detail: Annotated[str, Query(description="true: include capabilities")] = "false",
) -> JSONResponse:
    api.auth.caller(policy.GET_POOLS)
    state = request.app.state
    pools: list[dict[str, Any]] = []
    # every node's pool, down ones too, with the capacities of its last heartbeat; free is what the scheduler
    # may still promise (as Cinder's get_pools shows its scheduler's view): a sparse file pool's volumes use
    # no disk until written, so the node's own figure would not shrink as volumes land
    for service, allocated in await state.nodes.pools():
        pool: dict[str, Any] = {"name": service.pool_host}
        if parse_bool("detail", detail):
            pool["capabilities"] = {
                "pool_name": service.pool_name,
                "volume_backend_name": service.backend_name,
                "vendor_name": "Tether",
                "driver_version": request.app.version,
                "storage_protocol": "iSCSI",
                "total_capacity_gb": round((service.total_bytes or 0) / GIB, 2),
                "free_capacity_gb": round(free_bytes(service, allocated) / GIB, 2),
                "allocated_capacity_gb": allocated,
                "reserved_percentage": 0,
                "thin_provisioning_support": service.thin,
                "thick_provisioning_support": not service.thin,
                "multiattach": True,
                "availability_zone": service.availability_zone,
                "timestamp": views.when(service.heartbeat_at),
            }
        pools.append(pool)
    return views.reply({"pools": pools})
