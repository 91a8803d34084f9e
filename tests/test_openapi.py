"""The checked-in spec is what SDK generators read: current, valid, typed, with faults and microversions."""

import json
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from app.config import Settings
from app.main import create_app

SPEC_FILE = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"
SPEC: dict[str, Any] = json.loads(SPEC_FILE.read_text())
OPERATIONS = [
    (path, method, operation) for path, operations in SPEC["paths"].items() for method, operation in operations.items()
]
API_OPERATIONS = [op for op in OPERATIONS if op[0].startswith("/v3/{project_id}")]


def test_checked_in_spec_is_current() -> None:
    served = create_app(Settings(_env_file=None)).openapi()  # type: ignore[call-arg]
    assert served == SPEC, "openapi/openapi.json is stale: run `.venv/bin/tether openapi` and commit it"


def test_spec_validates() -> None:
    validate(SPEC)


def test_operation_ids_are_stable_readable_and_unique() -> None:
    ids = [operation["operationId"] for _, _, operation in OPERATIONS]
    assert len(ids) == len(set(ids))
    assert all(i.replace("_", "").isalpha() and i.islower() for i in ids), ids
    assert {
        "create_volume",
        "show_volume",
        "list_volumes",
        "list_volumes_detail",
        "update_volume",
        "delete_volume",
        "create_attachment",
        "update_attachment",
        "show_attachment",
        "list_attachments",
        "list_attachments_detail",
        "complete_attachment",
        "delete_attachment",
        "volume_action",
    } <= set(ids)


@pytest.mark.parametrize(("path", "method", "operation"), API_OPERATIONS, ids=lambda v: str(v)[:40])
def test_api_operation_is_documented(path: str, method: str, operation: dict[str, Any]) -> None:
    assert operation["tags"]
    names = {(p["in"], p["name"]) for p in operation.get("parameters", [])}
    assert ("header", "OpenStack-API-Version") in names
    assert ("path", "project_id") in names
    microversion = operation["x-openstack-microversion"]
    assert microversion["max"] == "3.71"
    responses = operation["responses"]
    for code in ("400", "401", "406", "500"):
        schema = responses[code]["content"]["application/json"]["schema"]
        assert schema["$ref"].startswith("#/components/schemas/")
    for code, response in responses.items():
        schema = response.get("content", {}).get("application/json", {}).get("schema")
        assert schema != {}, f"{method} {path} {code} has a bare schema"
    if method in ("post", "put") and operation["operationId"] not in ("complete_attachment", "volume_action"):
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body.get("$ref"), f"{method} {path} has an untyped body"


def test_minimum_microversions() -> None:
    by_id = {operation["operationId"]: operation for _, _, operation in OPERATIONS}
    assert by_id["create_attachment"]["x-openstack-microversion"]["min"] == "3.27"
    assert by_id["complete_attachment"]["x-openstack-microversion"]["min"] == "3.44"
    assert by_id["create_volume"]["x-openstack-microversion"]["min"] == "3.0"


def test_fault_schemas_have_cinder_names() -> None:
    schemas = SPEC["components"]["schemas"]
    assert schemas["ItemNotFoundFault"]["properties"]["itemNotFound"]["$ref"] == "#/components/schemas/Fault"
    assert "computeFault" in schemas["ComputeFault"]["properties"]
