"""The Idempotency-Key header of POST /volumes and POST /attachments (SPEC 12): read, documented, replayed.

A route declares `key: IdempotencyDep` and hands `key.answer(status, render)` to its service, after its policy
check: the service replays a stored answer (Replayed, rendered by `replay`) before any write, or stores the
answer it renders with the state change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Header, Request
from fastapi.responses import JSONResponse

from app.errors import InvalidInput
from app.routers.deps import get_caller, version_of
from app.services.idempotency import HEADER, KEY_PATTERN, Answer, Idempotency, KeyedRequest, Replayed, fingerprint

log = logging.getLogger("tether.idempotency")
T = TypeVar("T")

REPLAYED_HEADER = "Idempotent-Replayed"
_WHAT = {"create_volume": "volume", "create_attachment": "attachment"}


@dataclass(frozen=True)
class Keyed:
    """A request with a key: its service replays the answer stored for it, or runs it and stores its answer."""

    store: Idempotency
    request: KeyedRequest

    def answer(self, status: int, render: Callable[[T], dict[str, Any]]) -> Answer[T]:
        return self.store.answer(self.request, status, render)


async def _keyed(
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias=HEADER,
            min_length=1,
            max_length=255,
            pattern=KEY_PATTERN,
            description=(
                "Makes a retry safe (the IETF httpapi draft's header): a retry with the same key and body gets "
                "the first answer again, and changes nothing. 1 to 255 printable ASCII characters, per project, "
                "kept TETHER_IDEMPOTENCY_TTL seconds (default a day). The same key in flight: 409; with another "
                "body: 422."
            ),
        ),
    ] = None,
) -> Keyed | None:
    if idempotency_key is None:
        return None
    if len(request.headers.getlist(HEADER)) > 1:
        raise InvalidInput(f"Invalid input for field/attribute {HEADER}: send one key.")
    try:
        body = await request.json()
    except ValueError:
        return None  # not JSON: the route's own validation refuses the body (400), and nothing runs
    ctx = await get_caller(request)
    route = request.scope["route"]
    operation = str(getattr(route, "operation_id", None) or route.name)
    keyed = KeyedRequest(
        project_id=ctx.project_id,
        key=idempotency_key,
        operation=operation,
        fingerprint=fingerprint(
            method=request.method,
            operation=operation,
            version=str(version_of(request)),
            user=ctx.user_id,
            body=body,
        ),
    )
    return Keyed(request.app.state.idempotency, keyed)


IdempotencyDep = Annotated[Keyed | None, Depends(_keyed)]


async def replay(request: Request, error: Exception) -> JSONResponse:
    """The stored answer, sent again as it was first sent (status and body), marked as a replay."""
    assert isinstance(error, Replayed)
    keyed, reply = error.request, error.reply
    request.app.state.metrics.observe_replay(keyed.operation)
    log.info(
        "Idempotency-Key %r of project %s: %s replayed, %s %s (status %d)",
        keyed.key,
        keyed.project_id,
        keyed.operation,
        _WHAT.get(keyed.operation, "resource"),
        reply.resource_id,
        reply.status,
        extra={f"{_WHAT.get(keyed.operation, 'resource')}_id": reply.resource_id},
    )
    return JSONResponse(reply.body, status_code=reply.status, headers={REPLAYED_HEADER: "true"})
