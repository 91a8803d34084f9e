"""The checked-in spec is what SDK generators read: it must equal what the app serves."""

import json
from pathlib import Path

from app.config import Settings
from app.main import create_app

SPEC = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"


def test_checked_in_spec_is_current() -> None:
    served = create_app(Settings(_env_file=None)).openapi()  # type: ignore[call-arg]
    checked_in = json.loads(SPEC.read_text())
    assert checked_in == served, "openapi/openapi.json is stale: run `.venv/bin/tether openapi` and commit it"


def test_every_operation_has_a_stable_id_and_a_tag() -> None:
    spec = json.loads(SPEC.read_text())
    ids = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert operation.get("operationId"), f"{method} {path} has no operationId"
            assert operation.get("tags"), f"{method} {path} has no tag"
            ids.append(operation["operationId"])
    assert len(ids) == len(set(ids))
    assert {"create_attachment", "complete_attachment", "create_volume", "volume_action"} <= set(ids)
