"""Operator endpoints outside the versioned API: Prometheus metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from app import policy
from app.errors import Forbidden
from app.routers.deps import get_caller
from app.services.status import counts, node_states

router = APIRouter(tags=["operations"])


async def _metrics_reader(request: Request) -> None:
    """keystone mode: metrics are for admins (rule tether:get_metrics); noauth serves them to anyone, as
    before, since there every caller can say it is an admin anyway."""
    if request.app.state.keystone is None:
        return
    ctx = await get_caller(request)
    if not request.app.state.policy.allows(ctx, policy.METRICS, ctx.project_id):
        raise Forbidden()


@router.get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics of this process",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request, _caller: Annotated[None, Depends(_metrics_reader)]) -> Response:
    state = request.app.state
    volumes, attachments = await counts(state.db)
    state.metrics.set_counts(volumes, attachments)
    state.metrics.set_nodes(await node_states(state.nodes))
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
