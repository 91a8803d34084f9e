"""The policy at every route, in noauth mode (SPEC 11): a reader persona, and a policy file that allows nothing.

The same enforcement runs without Keystone: TETHER_ADMIN_USERS have the role admin, TETHER_READER_USERS only
reader, everyone else member and reader.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.main import create_app
from app.policy import RULES
from tests.api.attaching import connector
from tests.conftest import Api, fault, make_settings


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"reader_users": "rita"}


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


async def test_a_noauth_reader_reads_and_writes_are_403(api: Api) -> None:
    volume = await api.create_volume()
    rita = api.as_(user="rita")
    assert (await rita.get(f"/volumes/{volume['id']}")).status_code == 200
    assert (await rita.get("/volumes/detail")).status_code == 200
    assert (await rita.get("/attachments")).status_code == 200
    fault(await rita.post("/volumes", {"volume": {"size": 1}}), 403)
    fault(await rita.post(f"/volumes/{volume['id']}/action", {"os-reserve": None}), 403)
    fault(await rita.post("/attachments", {"attachment": {"volume_uuid": volume["id"]}}), 403)
    fault(await rita.delete(f"/volumes/{volume['id']}"), 403)
    # another project's reader: the volume does not exist for it
    fault(await rita.as_(project="elsewhere").get(f"/volumes/{volume['id']}"), 404)
    fault(await rita.as_(project="elsewhere").delete(f"/volumes/{volume['id']}"), 404)


# a valid request of every operation of the versioned API, so that only the policy can refuse it
BODIES: dict[str, Any] = {
    "create_volume": {"volume": {"size": 1}},
    "update_volume": {"volume": {"name": "renamed"}},
    "create_volume_metadata": {"metadata": {"a": "b"}},
    "update_volume_metadata": {"metadata": {"a": "b"}},
    "update_volume_metadata_item": {"meta": {"k": "w"}},
    "create_attachment": {"attachment": {"volume_uuid": "{volume_id}"}},
    "update_attachment": {"attachment": {"connector": connector("denied")}},
    "complete_attachment": {"os-complete": None},
    "create_volume_type": {"volume_type": {"name": "denied"}},
    "set_volume_type_extra_specs": {"extra_specs": {"a": "b"}},
}
READS_AND_DELETES = {
    "list_volumes",
    "list_services",
    "list_volumes_detail",
    "show_volume",
    "delete_volume",
    "show_volume_metadata",
    "show_volume_metadata_item",
    "delete_volume_metadata_item",
    "list_attachments",
    "list_attachments_detail",
    "show_attachment",
    "delete_attachment",
    "list_volume_types",
    "show_default_volume_type",
    "show_volume_type",
    "delete_volume_type",
    "list_volume_type_extra_specs",
    "delete_volume_type_extra_spec",
    "list_pools",
}
LEGACY_ACTIONS: dict[str, Any] = {
    "os-reserve": None,
    "os-unreserve": None,
    "os-initialize_connection": {"connector": connector("denied")},
    "os-attach": {"instance_uuid": "0b1c6a39-3f0e-4e53-9d4c-6f9bb1f1c0de"},
    "os-begin_detaching": None,
    "os-roll_detaching": None,
    "os-terminate_connection": {"connector": connector("denied")},
    "os-detach": None,
    "os-force_detach": None,
    "os-reset_status": {"status": "error"},
}


def _fill(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**ids) if value.startswith("{") else value
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    return value


@pytest.fixture
async def denying(sqlite_url: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A second app on the same database whose policy file allows nothing at all."""
    path = tmp_path / "policy.yaml"
    path.write_text("".join(f'"{rule.name}": "!"\n' for rule in RULES))
    application = create_app(make_settings(sqlite_url, policy_file=str(path)))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://tether.test") as client:
            yield client


async def test_every_operation_asks_the_policy(api: Api, denying: httpx.AsyncClient) -> None:
    volume = await api.create_volume(metadata={"k": "v"})
    reserved = await api.post("/attachments", {"attachment": {"volume_uuid": volume["id"]}})
    assert reserved.status_code == 200, reserved.text
    ids = {
        "project_id": api.project,
        "volume_id": volume["id"],
        "attachment_id": reserved.json()["attachment"]["id"],
        "type_id": "__DEFAULT__",
        "key": "k",
    }
    operations = [
        (method, path, operation["operationId"])
        for path, methods in api.app.openapi()["paths"].items()
        if path.startswith("/v3/{project_id}/")
        for method, operation in methods.items()
    ]
    seen = set()
    for method, path, operation_id in operations:
        seen.add(operation_id)
        url = path.format(**ids)
        if operation_id == "volume_action":
            for action, value in LEGACY_ACTIONS.items():
                response = await denying.post(url, json={action: value}, headers=api.headers())
                assert response.status_code == 403, f"{action}: {response.text}"
            continue
        body = _fill(BODIES.get(operation_id), ids)
        response = await denying.request(method.upper(), url, json=body, headers=api.headers())
        assert response.status_code == 403, f"{operation_id} {method} {url}: {response.status_code} {response.text}"
    # a new operation must be added here, with a valid request, and ask the policy
    assert seen == set(BODIES) | READS_AND_DELETES | {"volume_action"}
    # and nothing changed
    assert (await api.volume(volume["id"]))["status"] == "reserved"
