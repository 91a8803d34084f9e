"""What the OpenAPI spec says about each operation: fault responses and the minimum microversion."""

from __future__ import annotations

from typing import Any

from app import microversions
from app.errors import FAULT_NAMES
from app.microversions import APIVersion
from app.schemas.responses import fault_model

_FAULT_MODELS = {code: fault_model(name) for code, name in FAULT_NAMES.items()}
_FAULT_MODELS[500] = fault_model("computeFault")
_DESCRIPTIONS = {
    400: "Bad request (validation, state or microversion format)",
    401: "No credentials, or a token Keystone refused",
    403: "Not allowed for this caller",
    404: "Not found, another project's, or below the operation's microversion",
    406: "Microversion outside 3.0-3.71",
    409: "Conflict with the resource's state, or a request with this Idempotency-Key still in progress",
    413: "Body over 1 MiB",
    422: "The Idempotency-Key was used for a different request",
    500: "Backend or unexpected failure (no internals in the message)",
    503: "Keystone, or a storage node the operation needs, is unavailable",
}


def faults(*codes: int) -> dict[int | str, dict[str, Any]]:
    """Fault responses in Cinder's format; 400, 401, 403 (the policy), 406, 500 and 503 apply to every API
    operation."""
    wanted = sorted({400, 401, 403, 406, 500, 503, *codes})
    return {code: {"model": _FAULT_MODELS[code], "description": _DESCRIPTIONS[code]} for code in wanted}


def since(version: APIVersion = microversions.MIN) -> dict[str, Any]:
    return {"x-openstack-microversion": {"min": str(version), "max": str(microversions.MAX)}}


_QUERY: dict[str, tuple[dict[str, Any], str]] = {
    "limit": ({"type": "integer", "minimum": 0}, "At most this many items (1000 at most)."),
    "marker": ({"type": "string"}, "The id of the last item of the previous page."),
    "offset": ({"type": "integer", "minimum": 0}, "Skip this many items."),
    "sort": ({"type": "string"}, "`key[:asc|desc],…`; not with sort_key/sort_dir."),
    "sort_key": ({"type": "string"}, "Deprecated: use sort."),
    "sort_dir": ({"type": "string", "enum": ["asc", "desc"]}, "Deprecated: use sort."),
    "with_count": ({"type": "boolean"}, "Add the total count (3.45 and later)."),
    "all_tenants": ({"type": "boolean"}, "Admins: every project's items; ignored for others."),
    "name": ({"type": "string"}, "Filter: the volume name."),
    "status": ({"type": "string"}, "Filter: the status."),
    "metadata": ({"type": "string"}, 'Filter: a JSON object of metadata, e.g. `{"k": "v"}`.'),
    "bootable": ({"type": "boolean"}, "Filter: bootable volumes."),
    "availability_zone": ({"type": "string"}, "Filter: the availability zone."),
    "volume_id": ({"type": "string"}, "Filter: the attachment's volume."),
    "instance_id": ({"type": "string"}, "Filter: the attachment's instance."),
}


def list_query(*filters: str, count: bool = False) -> dict[str, Any]:
    """The query parameters a list operation reads (from request.query_params, so FastAPI cannot see them)."""
    names = [*filters, "limit", "marker", "offset", "sort", "sort_key", "sort_dir"]
    names += ["with_count"] if count else []
    # admins also narrow all_tenants with project_id; it is left out here, as the path already has a project_id
    names += ["all_tenants"]
    return {
        "parameters": [
            {"name": name, "in": "query", "required": False, "schema": _QUERY[name][0], "description": _QUERY[name][1]}
            for name in names
        ]
    }
