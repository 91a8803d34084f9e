"""Who is calling (noauth tokens and headers), project scoping, and what only admins may do."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import Api, fault

V = {"OpenStack-API-Version": "volume 3.71"}


def other_project() -> str:
    return f"q{uuid.uuid4().hex[:12]}"


async def create(client: httpx.AsyncClient, path: str, headers: dict[str, str], **fields: Any) -> dict[str, Any]:
    response = await client.post(path, json={"volume": {"size": 1, **fields}}, headers={**V, **headers})
    assert response.status_code == 202, response.text
    return response.json()["volume"]  # type: ignore[no-any-return]


# -- credentials -----------------------------------------------------------------------------


async def test_token_names_user_and_project(api: Api) -> None:
    volume = await create(api.client, f"/v3/{api.project}/volumes", {"X-Auth-Token": f"carol:{api.project}"})
    assert volume["user_id"] == "carol"
    assert volume["os-vol-tenant-attr:tenant_id"] == api.project
    await api.settle()
    listed = await api.get("/volumes")
    assert [v["id"] for v in listed.json()["volumes"]] == [volume["id"]]


async def test_token_without_colon_uses_the_user_as_project(api: Api) -> None:
    user = other_project()
    volume = await create(api.client, f"/v3/{user}/volumes", {"X-Auth-Token": user})
    assert volume["user_id"] == user
    assert volume["os-vol-tenant-attr:tenant_id"] == user
    await api.settle()


async def test_user_and_project_headers(api: Api) -> None:
    headers = {"X-User-Id": "dave", "X-Project-Id": api.project}
    volume = await create(api.client, f"/v3/{api.project}/volumes", headers)
    assert volume["user_id"] == "dave"
    assert volume["os-vol-tenant-attr:tenant_id"] == api.project
    await api.settle()
    shown = await api.client.get(f"/v3/{api.project}/volumes/{volume['id']}", headers={**V, **headers})
    assert shown.status_code == 200
    assert shown.json()["volume"]["user_id"] == "dave"


async def test_token_wins_over_user_headers(api: Api) -> None:
    headers = {"X-Auth-Token": f"erin:{api.project}", "X-User-Id": "mallory", "X-Project-Id": "elsewhere"}
    volume = await create(api.client, f"/v3/{api.project}/volumes", headers)
    assert volume["user_id"] == "erin"
    assert volume["os-vol-tenant-attr:tenant_id"] == api.project
    await api.settle()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v3/{p}/volumes"),
        ("GET", "/v3/volumes"),
        ("GET", "/v3/{p}/volumes/detail"),
        ("POST", "/v3/{p}/volumes"),
        ("GET", "/v3/{p}/types"),
        ("GET", "/v3/{p}/attachments"),
    ],
)
async def test_no_credentials_is_401(api: Api, method: str, path: str) -> None:
    response = await api.client.request(
        method, path.format(p=api.project), headers=V, json={"volume": {"size": 1}} if method == "POST" else None
    )
    fault(response, 401)
    assert "unauthorized" in response.json()
    assert (await api.get("/volumes")).json() == {"volumes": []}


@pytest.mark.parametrize("token", ["", ":", "alice:", ":project"])
async def test_token_without_user_or_project_is_401(api: Api, token: str) -> None:
    response = await api.client.get("/v3/volumes", headers={**V, "X-Auth-Token": token})
    fault(response, 401)


async def test_project_header_without_user_is_401(api: Api) -> None:
    response = await api.client.get("/v3/volumes", headers={**V, "X-Project-Id": api.project})
    fault(response, 401)


# -- the project in the path -----------------------------------------------------------------


@pytest.mark.parametrize("user", ["alice", "admin"])
async def test_path_project_differing_from_token_is_400(api: Api, user: str) -> None:
    volume = await api.create_volume()
    caller = api.as_(user=user)
    elsewhere = other_project()
    headers = caller.headers()
    for response in (
        await api.client.get(f"/v3/{elsewhere}/volumes", headers=headers),
        await api.client.get(f"/v3/{elsewhere}/volumes/{volume['id']}", headers=headers),
        await api.client.post(f"/v3/{elsewhere}/volumes", json={"volume": {"size": 1}}, headers=headers),
        await api.client.delete(f"/v3/{elsewhere}/volumes/{volume['id']}", headers=headers),
    ):
        assert fault(response, 400) == "Malformed request url"
    assert (await api.volume(volume["id"]))["status"] == "available"
    assert len((await api.get("/volumes")).json()["volumes"]) == 1


async def test_resources_without_project_in_path(api: Api) -> None:
    created = await api.client.post("/v3/volumes", json={"volume": {"size": 1, "name": "bare"}}, headers=api.headers())
    assert created.status_code == 202, created.text
    volume = created.json()["volume"]
    assert volume["os-vol-tenant-attr:tenant_id"] == api.project
    await api.settle()

    shown = await api.client.get(f"/v3/volumes/{volume['id']}", headers=api.headers())
    assert shown.status_code == 200
    assert shown.json()["volume"]["status"] == "available"
    listed = await api.client.get("/v3/volumes", headers=api.headers())
    assert [v["id"] for v in listed.json()["volumes"]] == [volume["id"]]
    # the same volume through the project URL
    assert (await api.volume(volume["id"]))["name"] == "bare"

    deleted = await api.client.delete(f"/v3/volumes/{volume['id']}", headers=api.headers())
    assert deleted.status_code == 202
    await api.settle()
    fault(await api.get(f"/volumes/{volume['id']}"), 404)


# -- scoping ---------------------------------------------------------------------------------


async def test_another_projects_volume_is_404(api: Api) -> None:
    volume = await api.create_volume(name="mine", metadata={"k": "v"})
    stranger = api.as_(user="bob", project=other_project())

    show = await stranger.get(f"/volumes/{volume['id']}")
    assert fault(show, 404) == f"Volume {volume['id']} could not be found."
    update = await stranger.put(f"/volumes/{volume['id']}", {"volume": {"name": "stolen"}})
    assert fault(update, 404) == f"Volume {volume['id']} could not be found."
    delete = await stranger.delete(f"/volumes/{volume['id']}")
    assert fault(delete, 404) == f"Volume {volume['id']} could not be found."
    assert (await stranger.get("/volumes")).json() == {"volumes": []}
    await api.settle()

    after = await api.volume(volume["id"])
    assert after["name"] == "mine"
    assert after["status"] == "available"
    assert after["metadata"] == {"k": "v"}


async def test_another_projects_volume_looks_like_a_missing_one(api: Api) -> None:
    volume = await api.create_volume()
    stranger = api.as_(user="bob", project=other_project())
    theirs = await stranger.get(f"/volumes/{volume['id']}")
    missing = await stranger.get("/volumes/00000000-0000-4000-8000-000000000000")
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json().keys() == missing.json().keys() == {"itemNotFound"}


async def test_admin_reaches_another_projects_volume_through_its_own_url(api: Api) -> None:
    volume = await api.create_volume(name="theirs")
    admin = api.as_(user="admin", project=other_project())

    shown = await admin.get(f"/volumes/{volume['id']}")
    assert shown.status_code == 200
    assert shown.json()["volume"]["os-vol-tenant-attr:tenant_id"] == api.project

    updated = await admin.put(f"/volumes/{volume['id']}", {"volume": {"name": "renamed by admin"}})
    assert updated.status_code == 200
    assert (await api.volume(volume["id"]))["name"] == "renamed by admin"

    deleted = await admin.delete(f"/volumes/{volume['id']}")
    assert deleted.status_code == 202
    await api.settle()
    fault(await api.get(f"/volumes/{volume['id']}"), 404)


async def test_admin_list_without_all_tenants_is_its_own_project(api: Api) -> None:
    await api.create_volume()
    admin = api.as_(user="admin", project=other_project())
    assert (await admin.get("/volumes")).json() == {"volumes": []}


@pytest.mark.parametrize("query", ["force=true", "force=True", "force=1"])
async def test_force_delete_by_member_is_403(api: Api, query: str) -> None:
    volume = await api.create_volume()
    response = await api.delete(f"/volumes/{volume['id']}?{query}")
    fault(response, 403)
    assert "forbidden" in response.json()
    await api.settle()
    assert (await api.volume(volume["id"]))["status"] == "available"


@pytest.mark.parametrize("settings_overrides", [{"admin_users": "root, boss"}])
async def test_configured_admin_users(api: Api) -> None:
    name = f"t-{uuid.uuid4().hex[:8]}"
    fault(await api.as_(user="admin").post("/types", {"volume_type": {"name": name}}), 403)
    created = await api.as_(user="boss").post("/types", {"volume_type": {"name": name}})
    assert created.status_code == 200, created.text
    volume = await api.as_(user="root").create_volume()
    assert "os-vol-host-attr:host" in volume
    assert "os-vol-host-attr:host" not in await api.volume(volume["id"])


# -- admin-only type routes ------------------------------------------------------------------


async def test_type_administration_is_403_for_members(api: Api) -> None:
    admin = api.as_(user="admin")
    name = f"t-{uuid.uuid4().hex[:8]}"
    created = await admin.post("/types", {"volume_type": {"name": name, "extra_specs": {"a": "1"}}})
    assert created.status_code == 200, created.text
    type_id = created.json()["volume_type"]["id"]

    fault(await api.post("/types", {"volume_type": {"name": f"{name}-x"}}), 403)
    fault(await api.delete(f"/types/{type_id}"), 403)
    fault(await api.post(f"/types/{type_id}/extra_specs", {"extra_specs": {"b": "2"}}), 403)
    fault(await api.delete(f"/types/{type_id}/extra_specs/a"), 403)

    # members still read types
    shown = await api.get(f"/types/{type_id}")
    assert shown.status_code == 200
    assert shown.json()["volume_type"]["extra_specs"] == {"a": "1"}
    specs = await api.get(f"/types/{type_id}/extra_specs")
    assert specs.json() == {"extra_specs": {"a": "1"}}
    names = [t["name"] for t in (await api.get("/types")).json()["volume_types"]]
    assert name in names
    assert f"{name}-x" not in names
