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
    401: "No credentials",
    403: "Not allowed for this caller",
    404: "Not found, another project's, or below the operation's microversion",
    406: "Microversion outside 3.0-3.71",
    409: "Conflict with the resource's state",
    413: "Body over 1 MiB",
    500: "Backend or unexpected failure (no internals in the message)",
}


def faults(*codes: int) -> dict[int | str, dict[str, Any]]:
    """Fault responses in Cinder's format; 400, 401, 406 and 500 apply to every API operation."""
    wanted = sorted({400, 401, 406, 500, *codes})
    return {code: {"model": _FAULT_MODELS[code], "description": _DESCRIPTIONS[code]} for code in wanted}


def since(version: APIVersion = microversions.MIN) -> dict[str, Any]:
    return {"x-openstack-microversion": {"min": str(version), "max": str(microversions.MAX)}}
