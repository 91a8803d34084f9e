"""Operator endpoints outside the versioned API: Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.services.status import counts

router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics of this process",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    state = request.app.state
    volumes, attachments = await counts(state.db)
    state.metrics.set_counts(volumes, attachments)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
