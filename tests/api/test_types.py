"""Volume types and extra specs (SPEC section 4): what makes a volume multiattach."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.conftest import Api, fault

TYPE_FIELDS = {
    "id",
    "name",
    "description",
    "is_public",
    "os-volume-type-access:is_public",
    "extra_specs",
    "qos_specs_id",
}


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def create_type(api: Api, **fields: Any) -> dict[str, Any]:
    response = await api.as_(user="admin").post("/types", {"volume_type": {"name": unique(), **fields}})
    assert response.status_code == 200, response.text
    return response.json()["volume_type"]  # type: ignore[no-any-return]


async def test_default_type_exists(api: Api) -> None:
    listed = (await api.get("/types")).json()["volume_types"]
    (default,) = [t for t in listed if t["name"] == "__DEFAULT__"]
    assert set(default) == TYPE_FIELDS
    assert default["is_public"] is True
    shown = await api.get(f"/types/{default['id']}")
    assert shown.status_code == 200
    assert shown.json()["volume_type"] == default


async def test_create_type(api: Api) -> None:
    name = unique("gold")
    response = await api.as_(user="admin").post(
        "/types", {"volume_type": {"name": name, "description": "fast", "extra_specs": {"tier": "gold"}}}
    )
    assert response.status_code == 200, response.text
    created = response.json()["volume_type"]
    assert set(created) == TYPE_FIELDS
    assert uuid.UUID(created["id"])
    assert created["name"] == name
    assert created["description"] == "fast"
    assert created["extra_specs"] == {"tier": "gold"}
    assert created["is_public"] is True
    assert created["os-volume-type-access:is_public"] is True
    assert created["qos_specs_id"] is None

    shown = await api.get(f"/types/{created['id']}")
    assert shown.status_code == 200
    assert shown.json() == {"volume_type": created}
    listed = (await api.get("/types")).json()["volume_types"]
    assert created in listed


async def test_show_type_by_name(api: Api) -> None:
    created = await create_type(api)
    shown = await api.get(f"/types/{created['name']}")
    assert shown.status_code == 200
    assert shown.json()["volume_type"]["id"] == created["id"]


async def test_types_without_project_in_path(api: Api) -> None:
    created = await create_type(api)
    shown = await api.client.get(f"/v3/types/{created['id']}", headers=api.headers())
    assert shown.status_code == 200
    assert shown.json()["volume_type"]["name"] == created["name"]


async def test_duplicate_type_name_is_409(api: Api) -> None:
    created = await create_type(api)
    response = await api.as_(user="admin").post("/types", {"volume_type": {"name": created["name"]}})
    assert created["name"] in fault(response, 409)
    assert "conflictingRequest" in response.json()
    listed = (await api.get("/types")).json()["volume_types"]
    assert [t["id"] for t in listed if t["name"] == created["name"]] == [created["id"]]


@pytest.mark.parametrize(
    "body",
    [
        {"volume_type": {}},
        {"volume_type": {"name": ""}},
        {"volume_type": {"name": "   "}},
        {"volume_type": {"name": "x" * 256}},
        {"volume_type": {"name": "ok", "extra_specs": {"k": 1}}},
        {"volume_type": {"name": "ok", "extra_specs": {"k": "x" * 256}}},
        {"volume_type": {"name": "ok", "bogus": 1}},
        {"volume_type": "x"},
        {},
    ],
)
async def test_bad_type_body_is_400(api: Api, body: Any) -> None:
    response = await api.as_(user="admin").post("/types", body)
    assert response.status_code != 422
    fault(response, 400)


async def test_create_type_is_403_for_members(api: Api) -> None:
    name = unique()
    fault(await api.post("/types", {"volume_type": {"name": name}}), 403)
    assert name not in [t["name"] for t in (await api.as_(user="admin").get("/types")).json()["volume_types"]]


@pytest.mark.parametrize("type_id", ["00000000-0000-4000-8000-000000000000", "no-such-type"])
async def test_unknown_type_is_404(api: Api, type_id: str) -> None:
    admin = api.as_(user="admin")
    fault(await api.get(f"/types/{type_id}"), 404)
    fault(await api.get(f"/types/{type_id}/extra_specs"), 404)
    fault(await admin.delete(f"/types/{type_id}"), 404)
    fault(await admin.post(f"/types/{type_id}/extra_specs", {"extra_specs": {"a": "b"}}), 404)
    fault(await admin.delete(f"/types/{type_id}/extra_specs/a"), 404)


async def test_private_type_is_hidden_from_members(api: Api) -> None:
    private = await create_type(api, **{"os-volume-type-access:is_public": False})
    assert private["is_public"] is False
    fault(await api.get(f"/types/{private['id']}"), 404)
    assert private["id"] not in [t["id"] for t in (await api.get("/types")).json()["volume_types"]]
    fault(await api.post("/volumes", {"volume": {"size": 1, "volume_type": private["id"]}}), 404)
    admin = api.as_(user="admin")
    assert private["id"] in [t["id"] for t in (await admin.get("/types")).json()["volume_types"]]
    assert (await admin.create_volume(volume_type=private["name"]))["volume_type"] == private["name"]


# -- delete ----------------------------------------------------------------------------------


async def test_delete_type(api: Api) -> None:
    created = await create_type(api)
    response = await api.as_(user="admin").delete(f"/types/{created['id']}")
    assert response.status_code == 202
    fault(await api.get(f"/types/{created['id']}"), 404)
    assert created["id"] not in [t["id"] for t in (await api.get("/types")).json()["volume_types"]]
    fault(await api.post("/volumes", {"volume": {"size": 1, "volume_type": created["name"]}}), 404)


async def test_delete_type_with_extra_specs(api: Api) -> None:
    created = await create_type(api, extra_specs={"a": "1", "b": "2"})
    assert (await api.as_(user="admin").delete(f"/types/{created['id']}")).status_code == 202
    # the name is free again, and the new type does not inherit the old specs
    again = await api.as_(user="admin").post("/types", {"volume_type": {"name": created["name"]}})
    assert again.status_code == 200, again.text
    assert again.json()["volume_type"]["extra_specs"] == {}


async def test_delete_type_in_use_is_400(api: Api) -> None:
    created = await create_type(api)
    volume = await api.create_volume(volume_type=created["name"])
    admin = api.as_(user="admin")
    fault(await admin.delete(f"/types/{created['id']}"), 400)
    assert (await api.get(f"/types/{created['id']}")).status_code == 200

    assert (await api.delete(f"/volumes/{volume['id']}")).status_code == 202
    await api.settle()
    assert (await admin.delete(f"/types/{created['id']}")).status_code == 202
    fault(await api.get(f"/types/{created['id']}"), 404)


async def test_delete_default_type_is_400(api: Api) -> None:
    fault(await api.as_(user="admin").delete("/types/__DEFAULT__"), 400)
    assert (await api.get("/types/__DEFAULT__")).status_code == 200


async def test_delete_type_is_403_for_members(api: Api) -> None:
    created = await create_type(api)
    fault(await api.delete(f"/types/{created['id']}"), 403)
    assert (await api.get(f"/types/{created['id']}")).status_code == 200


# -- extra specs -----------------------------------------------------------------------------


async def test_extra_specs_set_get_delete(api: Api) -> None:
    created = await create_type(api, extra_specs={"a": "1"})
    admin = api.as_(user="admin")

    response = await admin.post(f"/types/{created['id']}/extra_specs", {"extra_specs": {"a": "2", "b": "3"}})
    assert response.status_code == 200, response.text
    assert response.json() == {"extra_specs": {"a": "2", "b": "3"}}

    response = await admin.post(f"/types/{created['id']}/extra_specs", {"extra_specs": {"c": "4"}})
    assert response.json() == {"extra_specs": {"c": "4"}}

    specs = await api.get(f"/types/{created['id']}/extra_specs")
    assert specs.status_code == 200
    assert specs.json() == {"extra_specs": {"a": "2", "b": "3", "c": "4"}}
    shown = (await api.get(f"/types/{created['id']}")).json()["volume_type"]
    assert shown["extra_specs"] == {"a": "2", "b": "3", "c": "4"}

    deleted = await admin.delete(f"/types/{created['id']}/extra_specs/b")
    assert deleted.status_code == 202
    assert (await api.get(f"/types/{created['id']}/extra_specs")).json() == {"extra_specs": {"a": "2", "c": "4"}}
    listed = (await api.get("/types")).json()["volume_types"]
    assert next(t for t in listed if t["id"] == created["id"])["extra_specs"] == {"a": "2", "c": "4"}

    fault(await admin.delete(f"/types/{created['id']}/extra_specs/b"), 404)


async def test_extra_specs_by_type_name(api: Api) -> None:
    created = await create_type(api)
    admin = api.as_(user="admin")
    response = await admin.post(f"/types/{created['name']}/extra_specs", {"extra_specs": {"k": "v"}})
    assert response.status_code == 200
    assert (await api.get(f"/types/{created['id']}/extra_specs")).json() == {"extra_specs": {"k": "v"}}


@pytest.mark.parametrize("body", [{"extra_specs": {"k": 1}}, {"extra_specs": "k=v"}, {"specs": {"k": "v"}}, {}])
async def test_bad_extra_specs_are_400(api: Api, body: Any) -> None:
    created = await create_type(api, extra_specs={"a": "1"})
    fault(await api.as_(user="admin").post(f"/types/{created['id']}/extra_specs", body), 400)
    assert (await api.get(f"/types/{created['id']}/extra_specs")).json() == {"extra_specs": {"a": "1"}}


async def test_extra_specs_are_403_for_members(api: Api) -> None:
    created = await create_type(api, extra_specs={"a": "1"})
    fault(await api.post(f"/types/{created['id']}/extra_specs", {"extra_specs": {"a": "2"}}), 403)
    fault(await api.delete(f"/types/{created['id']}/extra_specs/a"), 403)
    assert (await api.get(f"/types/{created['id']}/extra_specs")).json() == {"extra_specs": {"a": "1"}}


# -- multiattach -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "multiattach"),
    [
        ("<is> True", True),
        ("<is> true", True),
        ("<IS> TRUE", True),
        ("True", True),
        ("<is> False", False),
        ("False", False),
        ("yes please", False),
    ],
)
async def test_multiattach_comes_from_the_type(api: Api, value: str, multiattach: bool) -> None:
    created = await create_type(api, extra_specs={"multiattach": value})
    volume = await api.create_volume(volume_type=created["name"])
    assert volume["multiattach"] is multiattach
    assert volume["volume_type"] == created["name"]


async def test_multiattach_type_helper(api: Api) -> None:
    name = await api.multiattach_type()
    assert (await api.create_volume(volume_type=name))["multiattach"] is True
    assert (await api.create_volume())["multiattach"] is False


async def test_multiattach_spec_set_later_applies_to_new_volumes(api: Api) -> None:
    created = await create_type(api)
    before = await api.create_volume(volume_type=created["id"])
    admin = api.as_(user="admin")
    response = await admin.post(f"/types/{created['id']}/extra_specs", {"extra_specs": {"multiattach": "<is> True"}})
    assert response.status_code == 200
    after = await api.create_volume(volume_type=created["id"])
    assert before["multiattach"] is False
    assert after["multiattach"] is True
    assert (await api.volume(before["id"]))["multiattach"] is False


async def test_default_type_is_shown_for_cinder_type_default(api: Api) -> None:
    response = await api.get("/types/default")
    assert response.status_code == 200
    assert response.json()["volume_type"]["name"] == "__DEFAULT__"


async def test_v3_without_slash_answers_like_v3_with_it(api: Api) -> None:
    assert (await api.client.get("/v3")).status_code == 401
    response = await api.client.get("/v3", headers=api.headers())
    assert response.status_code == 200
    assert response.json()["versions"][0]["version"] == "3.71"
