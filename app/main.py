"""create_app(settings): the FastAPI application, its error handlers and its lifespan."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.backends.dispatch import Dispatcher, LockLost, LockTimeout
from app.backends.factory import connector_validator
from app.config import Settings
from app.db.engine import Database
from app.db.locks import cross_process_locks
from app.errors import Conflict, ServiceUnavailable, TetherError, fault_body
from app.logs import configure_logging
from app.metrics import Metrics
from app.middleware import APIMiddleware, _TooLarge
from app.node import Heartbeat, LocalStorage, local_storage
from app.policy import Policy
from app.queue import JobQueue
from app.routers import (
    attachments,
    idempotency,
    operations,
    os_services,
    scheduler_stats,
    types,
    versions,
    volume_actions,
    volume_metadata,
    volumes,
)
from app.routers.deps import project_path, version_header
from app.secrets import SecretBox
from app.services.attachments import AttachmentService, ConnectorValidator
from app.services.idempotency import Idempotency, Replayed
from app.services.legacy import LegacyService
from app.services.nodes import Nodes, scheduler_row
from app.services.sweeper import Sweeper
from app.services.types import VolumeTypeService
from app.services.volume_metadata import VolumeMetadataService
from app.services.volumes import VolumeService
from app.services.work import BackgroundWork, every

log = logging.getLogger("tether")


def _operation_id(route: APIRoute) -> str:
    return route.operation_id or route.name


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


async def _tether_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, TetherError)
    if error.code >= 500:
        log.error("request failed: %s", error.message)
    return JSONResponse(error.body(), status_code=error.code, headers=error.headers)


async def _lock_error(_request: Request, error: Exception) -> JSONResponse:
    """A volume busy past the dispatcher's wait is a 409; a lock lost mid-way (its connection dropped) a 503."""
    assert isinstance(error, LockTimeout | LockLost)
    log.warning("%s", error)
    failure: TetherError = Conflict(f"Volume {error.key} is busy with another operation; try again.")
    if isinstance(error, LockLost):
        failure = ServiceUnavailable(f"The lock on volume {error.key} was lost; try again.")
    return JSONResponse(failure.body(), status_code=failure.code)


async def _validation_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    first = error.errors()[0] if error.errors() else {}
    if first.get("type") == "json_invalid":
        message = "Malformed request body: the body is not valid JSON."
    elif first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        message = "Malformed request body: a JSON body is required."
    elif tuple(first.get("loc", ())) == ("body",) and isinstance(first.get("input"), bytes):
        # FastAPI leaves the body unparsed when the Content-Type is missing or not JSON
        message = "Malformed request body: send JSON with Content-Type: application/json."
    else:
        field = _field_name(tuple(first.get("loc", ())))
        reason = str(first.get("msg", "invalid value"))
        message = f"Invalid input for field/attribute {field}. {reason}."
    return JSONResponse(fault_body(400, message), status_code=400)


async def _http_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    if isinstance(error.__cause__, _TooLarge):
        return JSONResponse(fault_body(413, "Request body is too large."), status_code=413)
    messages = {404: "The resource could not be found.", 405: "The method is not allowed for this resource."}
    message = messages.get(error.status_code) or str(error.detail)
    return JSONResponse(fault_body(error.status_code, message), status_code=error.status_code, headers=error.headers)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's spec, of the API's documented routes (`_DOCUMENTED`), without its 422 responses: validation
    failures are 400 faults here."""
    if app.openapi_schema is None:
        spec = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            description=app.description,
            routes=[*app.routes, *app.state.documented_routes],  # the API's served routes are not in the spec
        )
        for operations in spec["paths"].values():
            for operation in operations.values():
                # FastAPI's own 422 (request validation); a 422 fault of ours (SPEC 12) stays
                if "HTTPValidationError" in str(operation["responses"].get("422")):
                    operation["responses"].pop("422")
        for unused in ("HTTPValidationError", "ValidationError"):
            spec.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = spec
    return app.openapi_schema


# routing tries routes in this order: attachments, the busiest resource (Nova, bare-metal provisioners), first
_RESOURCE_MODULES = (attachments, volumes, volume_actions, volume_metadata, types, scheduler_stats, os_services)


# what only documents a parameter (the project segment, the microversion header: the middleware parses it) is
# declared on the routes the spec is built from, not on the ones that serve: FastAPI resolves every dependency
# of a route on every request, ~6.5% of an attach cycle request's instructions each (issue 17)
_DOCUMENTED = [Depends(project_path), Depends(version_header)]


def _include_api(app: FastAPI) -> None:
    """Each resource's router straight under the app, once under the project segment and once without it (one
    level of routers: FastAPI matches a request level by level, twice), and once more under the project segment
    with the documented parameters, for the spec only."""
    documented = APIRouter()
    # a resource name is never taken for a project id (the segment's convertor refuses them), so the project
    # URLs, which nearly every client uses, are matched first: routing walks the routes in order
    register_url_convertor("project", _ProjectSegment())
    for prefix in ("/v3/{project_id:project}", "/v3"):
        for module in _RESOURCE_MODULES:
            app.include_router(module.router, prefix=prefix, include_in_schema=False)
    for module in _RESOURCE_MODULES:
        documented.include_router(module.router, prefix="/v3/{project_id:project}", dependencies=_DOCUMENTED)
    app.state.documented_routes = documented.routes


_RESOURCES = sorted({route.path.split("/")[1] for module in _RESOURCE_MODULES for route in module.router.routes})


class _ProjectSegment(Convertor[str]):
    """A project id in a URL: any segment but a resource name, so `/v3/volumes/...` is never a project's URL."""

    regex = "(?!(?:" + "|".join(re.escape(name) for name in _RESOURCES) + ")(?:/|$))[^/]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


async def _start_embedded_node(
    settings: Settings, storage: LocalStorage, nodes: Nodes, background: list[asyncio.Task[None]]
) -> None:
    """The in-process node: its row and heartbeat, its reconcile at start and then every interval."""
    beat = Heartbeat(settings, nodes, storage.node)
    storage.reconciler.on_change = beat.poke
    try:
        await beat.beat()
    except Exception:  # a worker always starts; the next heartbeat tries again
        log.exception("registering the embedded storage node failed")
    background.append(asyncio.create_task(beat.run(), name="node-heartbeat"))
    if settings.reconcile_on_start:
        try:
            await storage.reconciler.run()
        except Exception:  # a worker always starts: what reconcile could not settle, the next one retries
            log.exception("reconcile at start-up failed; serving anyway")
    background.append(
        asyncio.create_task(
            every(settings.reconcile_interval, storage.reconciler.run, "reconcile", first=False), name="reconcile"
        )
    )


def server_app() -> FastAPI:
    """What `tether serve` runs in each worker: the app, and the garbage collector frozen once it has started (not
    in create_app: a test process that starts many apps would keep every frozen one's garbage for good)."""
    app = create_app()
    app.state.freeze_gc = True
    return app


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_level, json_lines=settings.log_json)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings.database_url, settings.database_pool_size, settings.write_concurrency)
        locks = cross_process_locks(
            settings.database_url,
            settings.distributed_locks,
            one_host=settings.nodes == "embedded",
            lock_path=settings.lock_path,
        )
        dispatcher = Dispatcher(settings.backend_workers, locks, settings.lock_timeout)
        app.state.metrics.watch(dispatcher)
        work = BackgroundWork()
        secrets = SecretBox(settings.secret_key)
        queue: JobQueue | None = None
        storage: LocalStorage | None = None
        if settings.nodes == "embedded":  # this process is the one storage node
            storage = local_storage(settings, db, dispatcher, secrets)
            nodes = storage.nodes
            validator: ConnectorValidator = storage.backends.target.validate_connector
            app.state.backends = storage.backends
            app.state.reconciler = storage.reconciler
        else:  # a pure API tier: storage work is the nodes' jobs
            queue = JobQueue(settings.database_url, secrets)
            await queue.start()
            app.state.metrics.watch_queue(queue)
            nodes = Nodes(
                db, dispatcher, queue=queue, timeout=settings.node_timeout, down_time=settings.service_down_time
            )
            validator = connector_validator(lambda: nodes.targets() | {settings.target})
        attachment_service = AttachmentService(db, nodes, validator, secrets)
        app.state.db = db
        app.state.dispatcher = dispatcher
        app.state.nodes = nodes
        app.state.work = work
        app.state.volumes = VolumeService(db, nodes, settings, work)
        app.state.types = VolumeTypeService(db)
        app.state.volume_metadata = VolumeMetadataService(db)
        app.state.attachments = attachment_service
        app.state.legacy = LegacyService(db, attachment_service)
        app.state.idempotency = Idempotency(db, secrets, settings.idempotency_ttl)
        sweeper = Sweeper(
            db,
            app.state.idempotency,
            reservation_ttl=settings.reservation_ttl,
            interval=settings.sweep_interval,
            forget=attachment_service.forget,
            observe=lambda report: app.state.metrics.observe_expired(len(report.reservations)),
        )
        app.state.sweeper = sweeper
        if settings.auth == "keystone":
            from app.keystone import TokenValidator  # keystoneauth1 is imported only where it is used

            app.state.keystone = TokenValidator(settings)
        background: list[asyncio.Task[None]] = []
        if storage is not None:
            await _start_embedded_node(settings, storage, nodes, background)
        background.append(
            asyncio.create_task(
                every(settings.node_heartbeat, lambda: nodes.heartbeat(scheduler_row(settings)), "heartbeat"),
                name="api-heartbeat",
            )
        )
        sweeper.start()
        if getattr(app.state, "freeze_gc", False):
            # what start-up made (modules, routes, models, compiled statements: ~160k objects) lives as long as the
            # process; left to the collector, each full collection walked all of it, stopping the event loop for
            # 60-250 ms (a p99 of its own). Frozen, a full collection walks only what came after.
            gc.freeze()
        try:
            yield
        finally:
            await sweeper.stop()
            for task in background:
                task.cancel()
            if background:  # a periodic task that will not end never holds the shutdown up for good
                _done, stuck = await asyncio.wait(background, timeout=10)
                for task in stuck:
                    log.error("background task %s did not stop within 10 s of its cancel", task.get_name())
            await work.idle()
            if app.state.keystone is not None:
                await app.state.keystone.aclose()
            if queue is not None:
                await queue.close()
            if locks is not None:
                await locks.close()
            await db.dispose()

    app = FastAPI(
        title="Tether",
        version="0.1.0",
        summary="OpenStack Block Storage v3 volumes and attachments",
        lifespan=lifespan,
        generate_unique_id_function=_operation_id,
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.policy = Policy(settings.policy_file)
    app.state.keystone = None
    app.state.backends = None
    app.state.reconciler = None
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.state.metrics = Metrics()
    app.add_middleware(APIMiddleware)
    app.add_exception_handler(TetherError, _tether_error)
    app.add_exception_handler(LockTimeout, _lock_error)
    app.add_exception_handler(LockLost, _lock_error)
    app.add_exception_handler(Replayed, idempotency.replay)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    # the API's routers before the version document's and the operators' endpoints (/, /healthcheck, /metrics):
    # routing tries each included router in turn, and two tried before the attachments router cost ~5% of an
    # attach cycle request's instructions (benchmarks/instructions.sh, issue 17); no path of one matches the other's
    _include_api(app)
    app.include_router(versions.router)
    app.include_router(operations.router)
    return app
