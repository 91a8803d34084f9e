"""Volume metadata (Cinder's /volumes/{id}/metadata API): every route, limits, scoping, and racing merges."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from app.db.models import Volume
from app.routers.volume_metadata import POLICIES, router
from tests.conftest import Api, fault

MISSING = "00000000-0000-4000-8000-000000000000"
IRONIC_KEY = "ironic_node_1be26c0b-03f2-4d2e-ae87-c02d7f33c123"


def metadata_url(volume_id: str, key: str | None = None) -> str:
    return f"/volumes/{volume_id}/metadata" + (f"/{key}" if key is not None else "")


async def metadata(api: Api, volume_id: str) -> dict[str, str]:
    response = await api.get(metadata_url(volume_id))
    assert response.status_code == 200, response.text
    return response.json()["metadata"]  # type: ignore[no-any-return]


async def set_status(api: Api, volume_id: str, status: str) -> None:
    async with api.app.state.db.write() as session:
        await session.execute(update(Volume).where(Volume.id == volume_id).values(status=status))  # type: ignore[arg-type]


# -- reads -----------------------------------------------------------------------------------------------------


async def test_show_metadata(api: Api) -> None:
    volume = await api.create_volume(metadata={"a": "1", "b": "2"})
    response = await api.get(metadata_url(volume["id"]))
    assert response.status_code == 200
    assert response.json() == {"metadata": {"a": "1", "b": "2"}}


async def test_show_metadata_of_a_volume_without_any(api: Api) -> None:
    volume = await api.create_volume()
    assert (await api.get(metadata_url(volume["id"]))).json() == {"metadata": {}}


async def test_show_one_key(api: Api) -> None:
    volume = await api.create_volume(metadata={"a": "1", "b": "2"})
    response = await api.get(metadata_url(volume["id"], "b"))
    assert response.status_code == 200
    assert response.json() == {"meta": {"b": "2"}}


async def test_show_a_missing_key_is_404_with_cinders_message(api: Api) -> None:
    volume = await api.create_volume(metadata={"a": "1"})
    message = fault(await api.get(metadata_url(volume["id"], "nope")), 404)
    assert message == f"Volume {volume['id']} has no metadata with key nope."


@pytest.mark.parametrize(
    ("method", "key", "body"),
    [
        ("GET", None, None),
        ("POST", None, {"metadata": {"k": "v"}}),
        ("PUT", None, {"metadata": {"k": "v"}}),
        ("GET", "k", None),
        ("PUT", "k", {"meta": {"k": "v"}}),
        ("DELETE", "k", None),
    ],
)
async def test_a_missing_volume_is_404(api: Api, method: str, key: str | None, body: Any) -> None:
    response = await api.client.request(method, api.url(metadata_url(MISSING, key)), json=body, headers=api.headers())
    assert fault(response, 404) == f"Volume {MISSING} could not be found."


# -- POST merges -----------------------------------------------------------------------------------------------


async def test_post_merges_and_answers_the_whole_metadata(api: Api) -> None:
    volume = await api.create_volume(metadata={"keep": "me", "change": "old"})
    response = await api.post(metadata_url(volume["id"]), {"metadata": {"change": "new", IRONIC_KEY: "attached"}})
    assert response.status_code == 200, response.text
    expected = {"keep": "me", "change": "new", IRONIC_KEY: "attached"}
    assert response.json() == {"metadata": expected}
    assert await metadata(api, volume["id"]) == expected


async def test_post_an_empty_object_changes_nothing(api: Api) -> None:
    volume = await api.create_volume(metadata={"a": "1"})
    response = await api.post(metadata_url(volume["id"]), {"metadata": {}})
    assert response.status_code == 200, response.text
    assert response.json() == {"metadata": {"a": "1"}}


async def test_metadata_writes_show_in_the_volume_views(api: Api) -> None:
    volume = await api.create_volume()
    assert (await api.post(metadata_url(volume["id"]), {"metadata": {IRONIC_KEY: "x"}})).status_code == 200
    assert (await api.volume(volume["id"]))["metadata"] == {IRONIC_KEY: "x"}
    listed = (await api.get("/volumes/detail")).json()["volumes"]
    assert [v["metadata"] for v in listed] == [{IRONIC_KEY: "x"}]
    # and the list filter finds it
    found = (await api.get("/volumes", params={"metadata": f'{{"{IRONIC_KEY}": "x"}}'})).json()["volumes"]
    assert [v["id"] for v in found] == [volume["id"]]


async def test_metadata_writes_leave_the_volumes_updated_at(api: Api) -> None:
    # Cinder's metadata writes touch only the metadata rows, never the volume's
    volume = await api.create_volume(metadata={"a": "1"})
    assert (await api.post(metadata_url(volume["id"]), {"metadata": {"b": "2"}})).status_code == 200
    assert (await api.put(metadata_url(volume["id"]), {"metadata": {"c": "3"}})).status_code == 200
    assert (await api.put(metadata_url(volume["id"], "d"), {"meta": {"d": "4"}})).status_code == 200
    assert (await api.delete(metadata_url(volume["id"], "d"))).status_code == 200
    assert (await api.volume(volume["id"]))["updated_at"] == volume["updated_at"]


# -- PUT replaces ----------------------------------------------------------------------------------------------


async def test_put_replaces_the_whole_metadata(api: Api) -> None:
    volume = await api.create_volume(metadata={"gone": "1", "kept": "old"})
    response = await api.put(metadata_url(volume["id"]), {"metadata": {"kept": "new", "added": "2"}})
    assert response.status_code == 200, response.text
    assert response.json() == {"metadata": {"kept": "new", "added": "2"}}
    assert await metadata(api, volume["id"]) == {"kept": "new", "added": "2"}


async def test_put_an_empty_object_clears_it(api: Api) -> None:
    volume = await api.create_volume(metadata={"a": "1", "b": "2"})
    response = await api.put(metadata_url(volume["id"]), {"metadata": {}})
    assert response.status_code == 200, response.text
    assert response.json() == {"metadata": {}}
    assert (await api.volume(volume["id"]))["metadata"] == {}


# -- one key ---------------------------------------------------------------------------------------------------


async def test_put_one_key_sets_it_and_keeps_the_others(api: Api) -> None:
    volume = await api.create_volume(metadata={"a": "1"})
    for value in ("first", "second"):
        response = await api.put(metadata_url(volume["id"], "b"), {"meta": {"b": value}})
        assert response.status_code == 200, response.text
        assert response.json() == {"meta": {"b": value}}
    assert await metadata(api, volume["id"]) == {"a": "1", "b": "second"}


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"other": "v"}, "Request body and URI mismatch"),
        ({}, "Request body and URI mismatch"),
        ({"k": "v", "other": "v"}, "Request body contains too many items"),
    ],
)
async def test_put_one_key_needs_exactly_the_urls_key(api: Api, meta: dict[str, str], message: str) -> None:
    volume = await api.create_volume(metadata={"a": "1"})
    assert fault(await api.put(metadata_url(volume["id"], "k"), {"meta": meta}), 400) == message
    assert await metadata(api, volume["id"]) == {"a": "1"}


async def test_delete_one_key(api: Api) -> None:
    volume = await api.create_volume(metadata={"a": "1", "b": "2"})
    response = await api.delete(metadata_url(volume["id"], "a"))
    assert response.status_code == 200
    assert response.content == b""
    assert await metadata(api, volume["id"]) == {"b": "2"}
    fault(await api.get(metadata_url(volume["id"], "a")), 404)


async def test_delete_a_missing_key_is_404(api: Api) -> None:
    volume = await api.create_volume(metadata={"a": "1"})
    message = fault(await api.delete(metadata_url(volume["id"], "b")), 404)
    assert message == f"Volume {volume['id']} has no metadata with key b."
    assert await metadata(api, volume["id"]) == {"a": "1"}


async def test_keys_with_dots_colons_and_spaces(api: Api) -> None:
    volume = await api.create_volume()
    key = "ironic:node.name x"
    assert (await api.put(metadata_url(volume["id"], key), {"meta": {key: "v"}})).status_code == 200
    assert (await api.get(metadata_url(volume["id"], key))).json() == {"meta": {key: "v"}}
    assert (await api.delete(metadata_url(volume["id"], key))).status_code == 200
    assert await metadata(api, volume["id"]) == {}


# -- limits and malformed bodies -------------------------------------------------------------------------------


async def test_keys_and_values_at_the_limits_are_accepted(api: Api) -> None:
    volume = await api.create_volume()
    body = {"metadata": {"k" * 255: "v" * 255, "e": ""}}
    response = await api.post(metadata_url(volume["id"]), body)
    assert response.status_code == 200, response.text
    assert response.json() == body


@pytest.mark.parametrize(
    ("items", "field"),
    [
        ({"": "v"}, "metadata"),
        ({"k" * 256: "v"}, "metadata"),
        ({"k": "v" * 256}, "metadata.k"),
        ({"k": 1}, "metadata.k"),
        ({"k": None}, "metadata.k"),
        ({"k": True}, "metadata.k"),
        ({"k": ["v"]}, "metadata.k"),
        ({"k": {"v": "w"}}, "metadata.k"),
    ],
)
@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_bad_keys_and_values_are_400_naming_the_field(
    api: Api, method: str, items: dict[str, Any], field: str
) -> None:
    volume = await api.create_volume(metadata={"a": "1"})
    response = await api.client.request(
        method, api.url(metadata_url(volume["id"])), json={"metadata": items}, headers=api.headers()
    )
    assert f"field/attribute {field}" in fault(response, 400)
    assert await metadata(api, volume["id"]) == {"a": "1"}


@pytest.mark.parametrize(
    ("items", "field"), [({"k": "v" * 256}, "meta.k"), ({"k": 1}, "meta.k"), ({"k": None}, "meta.k")]
)
async def test_bad_values_for_one_key_are_400_naming_the_field(api: Api, items: dict[str, Any], field: str) -> None:
    volume = await api.create_volume()
    assert f"field/attribute {field}" in fault(await api.put(metadata_url(volume["id"], "k"), {"meta": items}), 400)
    assert await metadata(api, volume["id"]) == {}


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "metadata",
        {},
        {"metadata": None},
        {"metadata": []},
        {"metadata": "k=v"},
        {"meta": {"k": "v"}},
        {"metadata": {"k": "v"}, "extra": 1},
    ],
)
@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_malformed_bodies_are_400(api: Api, method: str, body: Any) -> None:
    volume = await api.create_volume(metadata={"a": "1"})
    response = await api.client.request(method, api.url(metadata_url(volume["id"])), json=body, headers=api.headers())
    fault(response, 400)
    assert await metadata(api, volume["id"]) == {"a": "1"}


@pytest.mark.parametrize("body", [None, {}, {"meta": None}, {"meta": "v"}, {"metadata": {"k": "v"}}])
async def test_malformed_bodies_for_one_key_are_400(api: Api, body: Any) -> None:
    volume = await api.create_volume()
    fault(await api.put(metadata_url(volume["id"], "k"), body), 400)


@pytest.mark.parametrize(("method", "key"), [("POST", None), ("PUT", None), ("PUT", "k")])
async def test_invalid_json_is_400(api: Api, method: str, key: str | None) -> None:
    volume = await api.create_volume()
    response = await api.client.request(
        method,
        api.url(metadata_url(volume["id"], key)),
        content=b'{"metadata": {"k": ',
        headers=api.headers({"Content-Type": "application/json"}),
    )
    assert fault(response, 400) == "Malformed request body: the body is not valid JSON."


# -- statuses: Cinder refuses metadata writes in maintenance -------------------------------------------------


async def test_writes_in_maintenance_are_400_and_reads_still_work(api: Api) -> None:
    volume = await api.create_volume(metadata={"a": "1"})
    await set_status(api, volume["id"], "maintenance")
    for response in (
        await api.post(metadata_url(volume["id"]), {"metadata": {"b": "2"}}),
        await api.put(metadata_url(volume["id"]), {"metadata": {}}),
        await api.put(metadata_url(volume["id"], "b"), {"meta": {"b": "2"}}),
    ):
        assert "Updating volume metadata is not allowed for volumes in maintenance status" in fault(response, 400)
    assert "Deleting volume metadata is not allowed" in fault(await api.delete(metadata_url(volume["id"], "a")), 400)
    # a missing key is a 404 before the status is looked at, as in Cinder
    fault(await api.delete(metadata_url(volume["id"], "b")), 404)
    assert await metadata(api, volume["id"]) == {"a": "1"}
    await set_status(api, volume["id"], "available")
    assert (await api.delete(metadata_url(volume["id"], "a"))).status_code == 200


async def test_writes_to_an_attached_volume_are_allowed(api: Api) -> None:
    # Ironic labels the volumes it attaches: in-use is no obstacle
    volume = await api.create_volume()
    connector = {"initiator": "iqn.1993-08.org.debian:01:meta", "host": "node-1", "ip": "127.0.0.1"}
    made = await api.post("/attachments", {"attachment": {"volume_uuid": volume["id"], "connector": connector}})
    assert made.status_code == 200, made.text
    assert (await api.post(f"/attachments/{made.json()['attachment']['id']}/action", {"os-complete": None})).is_success
    assert (await api.volume(volume["id"]))["status"] == "in-use"
    response = await api.post(metadata_url(volume["id"]), {"metadata": {IRONIC_KEY: "attached"}})
    assert response.status_code == 200, response.text
    assert (await api.volume(volume["id"]))["status"] == "in-use"


# -- scoping ---------------------------------------------------------------------------------------------------


async def test_another_projects_volume_does_not_exist(api: Api) -> None:
    volume = await api.create_volume(metadata={"secret": "victim"})
    other = api.as_(user="mallory", project=f"q{uuid.uuid4().hex[:12]}")
    requests: list[tuple[str, str | None, Any]] = [
        ("GET", None, None),
        ("POST", None, {"metadata": {"owned": "yes"}}),
        ("PUT", None, {"metadata": {}}),
        ("GET", "secret", None),
        ("PUT", "secret", {"meta": {"secret": "owned"}}),
        ("DELETE", "secret", None),
    ]
    for method, key, body in requests:
        for url in (other.url(metadata_url(volume["id"], key)), "/v3" + metadata_url(volume["id"], key)):
            response = await other.client.request(method, url, json=body, headers=other.headers())
            assert fault(response, 404) == f"Volume {volume['id']} could not be found.", (method, url)
            assert "victim" not in response.text
    assert await metadata(api, volume["id"]) == {"secret": "victim"}


async def test_an_admin_reaches_any_projects_volume(api: Api) -> None:
    volume = await api.create_volume(metadata={"a": "1"})
    admin = api.as_(user="admin", project="adminproject")
    response = await admin.post(metadata_url(volume["id"]), {"metadata": {"b": "2"}})
    assert response.status_code == 200, response.text
    assert await metadata(api, volume["id"]) == {"a": "1", "b": "2"}


async def test_the_project_less_urls_answer_the_same(api: Api) -> None:
    volume = await api.create_volume()
    headers = api.headers()
    url = f"/v3/volumes/{volume['id']}/metadata"
    assert (await api.client.post(url, json={"metadata": {"a": "1"}}, headers=headers)).json() == {
        "metadata": {"a": "1"}
    }
    assert (await api.client.put(f"{url}/b", json={"meta": {"b": "2"}}, headers=headers)).status_code == 200
    assert (await api.client.get(f"{url}/b", headers=headers)).json() == {"meta": {"b": "2"}}
    assert (await api.client.delete(f"{url}/a", headers=headers)).status_code == 200
    assert (await api.client.put(url, json={"metadata": {"c": "3"}}, headers=headers)).status_code == 200
    assert (await api.client.get(url, headers=headers)).json() == {"metadata": {"c": "3"}}


async def test_a_path_project_other_than_the_callers_is_400(api: Api) -> None:
    volume = await api.create_volume()
    response = await api.client.get(f"/v3/someoneelse/volumes/{volume['id']}/metadata", headers=api.headers())
    assert fault(response, 400) == "Malformed request url"


def test_every_route_names_its_cinder_policy() -> None:
    # Cinder's rule names (cinder/policies/volume_metadata.py): POST is create_volume_metadata there too
    assert {route.operation_id: POLICIES[route.operation_id] for route in router.routes} == {  # type: ignore[attr-defined]
        "show_volume_metadata": "volume:get_volume_metadata",
        "create_volume_metadata": "volume:create_volume_metadata",
        "update_volume_metadata": "volume:update_volume_metadata",
        "show_volume_metadata_item": "volume:get_volume_metadata",
        "update_volume_metadata_item": "volume:update_volume_metadata",
        "delete_volume_metadata_item": "volume:delete_volume_metadata",
    }
    assert len(POLICIES) == len(router.routes)


# -- races (PostgreSQL: SQLite serialises every writer) --------------------------------------------------------


@pytest.fixture
def postgres_only(database_url: str) -> None:
    if "sqlite" in database_url:
        pytest.skip("race tests need concurrent writers: PostgreSQL only")


@pytest.mark.usefixtures("postgres_only")
@pytest.mark.parametrize("settings_overrides", [{"write_concurrency": 16}])
async def test_concurrent_merges_keep_every_key(api: Api) -> None:
    volume = await api.create_volume(metadata={"base": "0"})
    url = metadata_url(volume["id"])
    # every caller sets its own key and the same shared one: distinct keys must all survive, the shared one
    # must never be a unique-key error
    bodies = [{"metadata": {f"node-{i}": str(i), "shared": str(i)}} for i in range(16)]
    responses = await asyncio.gather(*[api.post(url, body) for body in bodies])
    assert [r.status_code for r in responses] == [200] * 16, [r.text for r in responses if r.status_code != 200]
    for body, response in zip(bodies, responses, strict=True):
        merged = response.json()["metadata"]
        # each answer holds at least its own write (and everything committed before it)
        assert merged.items() >= {k: v for k, v in body["metadata"].items() if k != "shared"}.items()
        assert "base" in merged
    final = await metadata(api, volume["id"])
    assert set(final) == {"base", "shared", *(f"node-{i}" for i in range(16))}
    assert final["shared"] in {str(i) for i in range(16)}


@pytest.mark.usefixtures("postgres_only")
@pytest.mark.parametrize("settings_overrides", [{"write_concurrency": 16}])
async def test_concurrent_merges_replaces_and_deletes_never_fail(api: Api) -> None:
    volume = await api.create_volume(metadata={"k": "0"})
    url = metadata_url(volume["id"])

    async def one(i: int) -> httpx.Response:
        match i % 4:
            case 0:
                return await api.post(url, {"metadata": {"k": str(i), f"m{i}": "x"}})
            case 1:
                return await api.put(url, {"metadata": {"k": str(i)}})
            case 2:
                return await api.put(metadata_url(volume["id"], "k"), {"meta": {"k": str(i)}})
            case _:
                return await api.delete(metadata_url(volume["id"], "k"))

    responses = await asyncio.gather(*[one(i) for i in range(24)])
    # a delete may find the key gone (404); nothing else may fail, and nothing is a 5xx
    for i, response in enumerate(responses):
        allowed = {200, 404} if i % 4 == 3 else {200}
        assert response.status_code in allowed, (i, response.text)
    # what is left is the outcome of some order of these writes: a replace leaves only `k`, merges add m<i>
    final = await metadata(api, volume["id"])
    assert set(final) <= {"k", *(f"m{i}" for i in range(0, 24, 4))}
