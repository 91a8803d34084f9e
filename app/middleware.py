"""The one ASGI middleware: request ids, microversion negotiation, body size limit, last-resort 500, access log."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import microversions
from app.db.engine import database_unavailable
from app.errors import DatabaseUnavailable, OverLimit, TetherError
from app.logs import begin_request, end_request

log = logging.getLogger("tether.api")
# one INFO line per request; TETHER_ACCESS_LOG=false (or a TETHER_LOG_LEVEL above INFO) silences it
access_log = logging.getLogger("tether.access")

MAX_BODY = 1024 * 1024

# paths that are not part of the versioned API
_UNVERSIONED = ("/", "/healthcheck", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")


class _TooLarge(Exception):
    pass


def _json_response_messages(status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> list[Message]:
    payload = json.dumps(body).encode()
    return [
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        },
        {"type": "http.response.body", "body": payload},
    ]


class APIMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # TETHER_ACCESS_LOG, read once from the first request's app (the middleware is only given the next app)
        self._access_log: bool | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started_at = time.perf_counter()
        status_code = 500
        request_id = f"req-{uuid.uuid4()}"
        token = begin_request(request_id)
        extra: list[tuple[bytes, bytes]] = [
            (b"x-openstack-request-id", request_id.encode()),
            (b"x-compute-request-id", request_id.encode()),
        ]
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started, status_code
            if message["type"] == "http.response.start":
                started = True
                status_code = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        async def fail(error: TetherError) -> None:
            for message in _json_response_messages(error.code, error.body(), []):
                await send_with_headers(message)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            if scope["path"] not in _UNVERSIONED:
                version = microversions.from_header(headers.get(microversions.HEADER.lower()))
                scope.setdefault("state", {})["api_version"] = version
                extra += [
                    (microversions.HEADER.encode(), f"{microversions.SERVICE} {version}".encode()),
                    (b"vary", microversions.HEADER.encode()),
                ]
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > MAX_BODY:
                raise OverLimit()
        except TetherError as error:
            await fail(error)
            self._done(scope, error.code, started_at, token, request_id)
            return
        except Exception:
            # a request must never escape without the fault body and request id, whatever failed
            log.exception("unexpected error reading the headers of %s %s", scope["method"], scope["path"])
            await fail(TetherError())
            self._done(scope, 500, started_at, token, request_id)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send_with_headers)
        except _TooLarge:
            if not started:
                await fail(OverLimit())
        except Exception as error:
            failure: TetherError = TetherError()
            if database_unavailable(error):  # reached past the services (a lock's or the queue's own connection)
                failure = DatabaseUnavailable()
                log.warning("%s %s: %s (%s)", scope["method"], scope["path"], failure.message, error)
            else:
                log.exception("unexpected error serving %s %s", scope["method"], scope["path"])
            if not started:
                for message in _json_response_messages(failure.code, failure.body(), []):
                    await send_with_headers(message)
        finally:
            self._done(scope, status_code, started_at, token, request_id)

    def _done(
        self, scope: Scope, status: int, started_at: float, token: tuple[object, object], request_id: str
    ) -> None:
        """The request is over: its access line (while its ids are still bound), then its metrics."""
        seconds = time.perf_counter() - started_at
        if self._access_log is None:
            settings = getattr(scope["app"].state, "settings", None) if "app" in scope else None
            self._access_log = bool(getattr(settings, "access_log", True))
        if self._access_log and access_log.isEnabledFor(logging.INFO):
            duration_ms = round(seconds * 1000, 2)
            # the path only: a query string or a header (X-Auth-Token) is never written; a decoded %0a in the
            # path must not start a forged line
            path = scope["path"]
            if not path.isprintable():
                path = path.encode("unicode_escape").decode()
            access_log.info(
                "%s %s %d %.2fms",
                scope["method"],
                path,
                status,
                duration_ms,
                extra={
                    "method": scope["method"],
                    "path": path,
                    "status": status,
                    "duration_ms": duration_ms,
                    "request_id": request_id,
                },
            )
        end_request(token)
        _observe(scope, status, seconds)


def _observe(scope: Scope, status: int, seconds: float) -> None:
    metrics = getattr(scope["app"].state, "metrics", None) if "app" in scope else None
    if metrics is None:
        return
    metrics.observe_request(scope["method"], route_template(scope), status, seconds)


def route_template(scope: Scope) -> str:
    """The route a request matched, with ids folded back into their names (bounded label values)."""
    if "route" not in scope:
        return "unmatched"
    names = {str(value): name for name, value in scope.get("path_params", {}).items()}
    segments = [f"{{{names[s]}}}" if s in names else s for s in scope["path"].split("/")]
    return "/".join(segments).replace("/v3/{project_id}", "/v3")
