"""Volumes: create, show, list (filters, sorting, pagination, counts), update and delete."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import Api, fault

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}$")
CONNECTOR = {"initiator": "iqn.1993-08.org.debian:01:tether-test", "host": "compute-1", "ip": "127.0.0.1"}
MISSING = "00000000-0000-4000-8000-000000000000"

BASE_FIELDS = {
    "id",
    "name",
    "description",
    "status",
    "size",
    "availability_zone",
    "created_at",
    "updated_at",
    "volume_type",
    "snapshot_id",
    "source_volid",
    "metadata",
    "links",
    "user_id",
    "bootable",
    "encrypted",
    "replication_status",
    "consistencygroup_id",
    "multiattach",
    "attachments",
    "os-vol-tenant-attr:tenant_id",
}
ADMIN_FIELDS = {"os-vol-host-attr:host", "migration_status"}


def other_project() -> str:
    return f"q{uuid.uuid4().hex[:12]}"


async def post_volume(api: Api, **fields: Any) -> httpx.Response:
    return await api.post("/volumes", {"volume": {"size": 1, **fields}})


async def names(api: Api, query: str = "", path: str = "/volumes") -> list[str | None]:
    response = await api.get(f"{path}?{query}" if query else path)
    assert response.status_code == 200, response.text
    return [v["name"] for v in response.json()["volumes"]]


async def reset_status(api: Api, volume_id: str, **body: str) -> None:
    response = await api.as_(user="admin").post(f"/volumes/{volume_id}/action", {"os-reset_status": body})
    assert response.status_code == 202, response.text


async def reserve(api: Api, volume_id: str) -> dict[str, Any]:
    response = await api.post("/attachments", {"attachment": {"volume_uuid": volume_id}})
    assert response.status_code == 200, response.text
    return response.json()["attachment"]  # type: ignore[no-any-return]


async def attach(api: Api, volume_id: str) -> dict[str, Any]:
    response = await api.post("/attachments", {"attachment": {"volume_uuid": volume_id, "connector": CONNECTOR}})
    assert response.status_code == 200, response.text
    attachment = response.json()["attachment"]
    completed = await api.post(f"/attachments/{attachment['id']}/action", {"os-complete": None})
    assert completed.status_code == 204, completed.text
    return attachment  # type: ignore[no-any-return]


# -- create ----------------------------------------------------------------------------------


async def test_create_is_202_creating_then_available(api: Api) -> None:
    response = await post_volume(api, size=3, name="vol", description="desc")
    assert response.status_code == 202
    volume = response.json()["volume"]
    assert volume["status"] == "creating"
    assert volume["size"] == 3
    assert volume["name"] == "vol"
    assert volume["description"] == "desc"
    assert volume["updated_at"] is None
    await api.settle()
    shown = await api.volume(volume["id"])
    assert shown["status"] == "available"
    assert shown["size"] == 3
    assert shown["created_at"] == volume["created_at"]
    assert TIMESTAMP.match(shown["updated_at"])
    assert shown["updated_at"] >= shown["created_at"]


async def test_create_accepts_a_numeric_string_size(api: Api) -> None:
    response = await post_volume(api, size="2")
    assert response.status_code == 202, response.text
    assert response.json()["volume"]["size"] == 2
    await api.settle()
    assert (await api.volume(response.json()["volume"]["id"]))["size"] == 2


@pytest.mark.parametrize("size", [0, -1, "abc", True, False, 1.5, "1.5", "", None, [], {}, "-1", 2**31])
async def test_create_with_a_bad_size_is_400(api: Api, size: Any) -> None:
    response = await post_volume(api, size=size)
    assert "size" in fault(response, 400)
    assert (await api.get("/volumes")).json() == {"volumes": []}


async def test_create_without_size_is_400(api: Api) -> None:
    response = await api.post("/volumes", {"volume": {"name": "no size"}})
    assert "size" in fault(response, 400)


async def test_create_with_display_name_and_description(api: Api) -> None:
    volume = await api.create_volume(display_name="legacy name", display_description="legacy description")
    assert volume["name"] == "legacy name"
    assert volume["description"] == "legacy description"


async def test_create_name_wins_over_display_name(api: Api) -> None:
    volume = await api.create_volume(name="new", display_name="old")
    assert volume["name"] == "new"


async def test_create_without_name(api: Api) -> None:
    volume = await api.create_volume()
    assert volume["name"] is None
    assert volume["description"] is None
    assert volume["metadata"] == {}


async def test_create_with_metadata(api: Api) -> None:
    volume = await api.create_volume(metadata={"purpose": "test", "owner": "ops"})
    assert volume["metadata"] == {"purpose": "test", "owner": "ops"}


@pytest.mark.parametrize("metadata", [{"k": 1}, {"k": None}, {"": "v"}, {"k": "x" * 256}, {"k" * 256: "v"}, ["k"]])
async def test_create_with_bad_metadata_is_400(api: Api, metadata: Any) -> None:
    response = await post_volume(api, metadata=metadata)
    fault(response, 400)
    assert (await api.get("/volumes")).json() == {"volumes": []}


async def test_create_with_the_body_python_cinderclient_sends(api: Api) -> None:
    body = {
        "size": 1,
        "consistencygroup_id": None,
        "snapshot_id": None,
        "name": "from-client",
        "description": None,
        "volume_type": None,
        "metadata": {},
        "imageRef": None,
        "source_volid": None,
        "backup_id": None,
        "availability_zone": None,
    }
    response = await api.post("/volumes", {"volume": body})
    assert response.status_code == 202, response.text
    await api.settle()
    volume = await api.volume(response.json()["volume"]["id"])
    assert volume["volume_type"] == "__DEFAULT__"
    assert volume["availability_zone"] == "nova"


async def test_create_with_volume_type_by_name_and_by_id(api: Api) -> None:
    admin = api.as_(user="admin")
    name = f"gold-{uuid.uuid4().hex[:8]}"
    created = await admin.post("/types", {"volume_type": {"name": name}})
    assert created.status_code == 200, created.text
    type_id = created.json()["volume_type"]["id"]

    by_name = await api.create_volume(volume_type=name)
    by_id = await api.create_volume(volume_type=type_id)
    for volume in (by_name, by_id):
        assert volume["volume_type"] == name
        assert volume["volume_type_id"] == type_id


async def test_create_without_type_uses_the_default(api: Api) -> None:
    default = await api.get("/types/__DEFAULT__")
    assert default.status_code == 200
    volume = await api.create_volume()
    assert volume["volume_type"] == "__DEFAULT__"
    assert volume["volume_type_id"] == default.json()["volume_type"]["id"]


@pytest.mark.parametrize("volume_type", ["no-such-type", MISSING])
async def test_create_with_an_unknown_type_is_404(api: Api, volume_type: str) -> None:
    response = await post_volume(api, volume_type=volume_type)
    assert volume_type in fault(response, 404)
    assert (await api.get("/volumes")).json() == {"volumes": []}


async def test_create_in_availability_zone_nova(api: Api) -> None:
    volume = await api.create_volume(availability_zone="nova")
    assert volume["availability_zone"] == "nova"


async def test_create_in_another_availability_zone_is_400(api: Api) -> None:
    response = await post_volume(api, availability_zone="moon")
    assert "moon" in fault(response, 400)
    assert (await api.get("/volumes")).json() == {"volumes": []}


@pytest.mark.parametrize("version", ["3.0", "3.50", "3.71"])
@pytest.mark.parametrize("multiattach", [True, False])
async def test_multiattach_in_the_body_is_400(api: Api, version: str, multiattach: bool) -> None:
    response = await post_volume(api.as_(version=version), multiattach=multiattach)
    assert "multiattach" in fault(response, 400)
    assert (await api.get("/volumes")).json() == {"volumes": []}


@pytest.mark.parametrize("version", ["3.0", "3.52"])
async def test_unknown_keys_are_accepted_below_3_53(api: Api, version: str) -> None:
    response = await post_volume(api.as_(version=version), bogus="x", name="lenient")
    assert response.status_code == 202, response.text
    await api.settle()
    assert (await api.volume(response.json()["volume"]["id"]))["name"] == "lenient"


@pytest.mark.parametrize("version", ["3.53", "3.71"])
async def test_unknown_keys_are_400_from_3_53(api: Api, version: str) -> None:
    response = await post_volume(api.as_(version=version), bogus="x")
    assert "bogus" in fault(response, 400)
    assert (await api.get("/volumes")).json() == {"volumes": []}


@pytest.mark.parametrize("version", ["3.0", "3.53", "3.71"])
@pytest.mark.parametrize("hints", [{"same_host": ["x"]}, None])
async def test_scheduler_hints_next_to_the_volume_are_accepted(api: Api, version: str, hints: Any) -> None:
    # python-cinderclient's `create --hint` sends them there; Cinder's schema allows them at every version
    body = {"volume": {"size": 1, "name": "hinted"}, "OS-SCH-HNT:scheduler_hints": hints}
    response = await api.as_(version=version).post("/volumes", body)
    assert response.status_code == 202, response.text
    await api.settle()
    assert (await api.volume(response.json()["volume"]["id"]))["name"] == "hinted"


async def test_unknown_key_next_to_the_volume_is_400_from_3_53(api: Api) -> None:
    response = await api.as_(version="3.53").post("/volumes", {"volume": {"size": 1}, "bogus": {}})
    assert "bogus" in fault(response, 400)
    assert (await api.get("/volumes")).json() == {"volumes": []}


async def test_create_failing_in_the_backend_keeps_the_row_in_error(api: Api, app: Any) -> None:
    app.state.backends.volumes.faults.fail("create")
    response = await post_volume(api, name="doomed")
    assert response.status_code == 202
    volume_id = response.json()["volume"]["id"]
    await api.settle()

    assert (await api.volume(volume_id))["status"] == "error"
    listed = (await api.get("/volumes/detail")).json()["volumes"]
    assert [(v["id"], v["status"]) for v in listed] == [(volume_id, "error")]
    # the next create works, and an errored volume can be deleted
    assert (await api.create_volume())["status"] == "available"
    assert (await api.delete(f"/volumes/{volume_id}")).status_code == 202
    await api.settle()
    fault(await api.get(f"/volumes/{volume_id}"), 404)


@pytest.mark.parametrize("settings_overrides", [{"fake_delay": 0.3}])
async def test_slow_backend_shows_creating_first(api: Api) -> None:
    response = await post_volume(api)
    assert response.status_code == 202
    volume_id = response.json()["volume"]["id"]
    assert (await api.volume(volume_id))["status"] == "creating"
    listed = (await api.get("/volumes/detail")).json()["volumes"]
    assert [v["status"] for v in listed] == ["creating"]
    # a creating volume cannot be deleted yet
    assert "creating" in fault(await api.delete(f"/volumes/{volume_id}"), 400)
    await api.settle()
    assert (await api.volume(volume_id))["status"] == "available"


# -- show ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "extra"),
    [
        ("3.0", set()),
        ("3.47", set()),
        ("3.48", {"shared_targets", "service_uuid"}),
        ("3.62", {"shared_targets", "service_uuid"}),
        ("3.63", {"shared_targets", "service_uuid", "volume_type_id"}),
        ("3.64", {"shared_targets", "service_uuid", "volume_type_id"}),
        ("3.65", {"shared_targets", "service_uuid", "volume_type_id", "consumes_quota"}),
        ("3.71", {"shared_targets", "service_uuid", "volume_type_id", "consumes_quota"}),
    ],
)
async def test_detail_fields_by_version(api: Api, version: str, extra: set[str]) -> None:
    volume = await api.create_volume()
    caller = api.as_(version=version)
    shown = (await caller.get(f"/volumes/{volume['id']}")).json()["volume"]
    assert set(shown) == BASE_FIELDS | extra
    admin_view = (await caller.as_(user="admin").get(f"/volumes/{volume['id']}")).json()["volume"]
    assert set(admin_view) == BASE_FIELDS | ADMIN_FIELDS | extra
    (listed,) = (await caller.get("/volumes/detail")).json()["volumes"]
    assert set(listed) == BASE_FIELDS | extra


async def test_detail_values(api: Api) -> None:
    response = await post_volume(api, size=2, name="shown", description="a volume", metadata={"a": "b"})
    volume_id = response.json()["volume"]["id"]
    await api.settle()
    v = await api.volume(volume_id)
    assert v["id"] == volume_id
    assert v["name"] == "shown"
    assert v["description"] == "a volume"
    assert v["status"] == "available"
    assert v["size"] == 2
    assert v["availability_zone"] == "nova"
    assert TIMESTAMP.match(v["created_at"])
    assert TIMESTAMP.match(v["updated_at"])
    # naive UTC
    created = datetime.fromisoformat(v["created_at"]).replace(tzinfo=UTC)
    assert abs(datetime.now(UTC) - created) < timedelta(minutes=5)
    assert v["volume_type"] == "__DEFAULT__"
    assert v["snapshot_id"] is None
    assert v["source_volid"] is None
    assert v["metadata"] == {"a": "b"}
    assert v["links"] == [
        {"href": f"http://tether.test/v3/{api.project}/volumes/{volume_id}", "rel": "self"},
        {"href": f"http://tether.test/{api.project}/volumes/{volume_id}", "rel": "bookmark"},
    ]
    assert v["user_id"] == api.user
    assert v["bootable"] == "false"
    assert v["encrypted"] is False
    assert v["consistencygroup_id"] is None
    assert v["multiattach"] is False
    assert v["attachments"] == []
    assert v["os-vol-tenant-attr:tenant_id"] == api.project
    assert v["shared_targets"] is False
    assert uuid.UUID(v["service_uuid"])
    assert uuid.UUID(v["volume_type_id"])
    assert v["consumes_quota"] is True


async def test_admin_only_fields(api: Api) -> None:
    volume = await api.create_volume()
    assert "os-vol-host-attr:host" not in volume
    assert "migration_status" not in volume
    admin_view = await api.as_(user="admin").volume(volume["id"])
    assert isinstance(admin_view["os-vol-host-attr:host"], str)
    assert admin_view["os-vol-host-attr:host"]
    assert admin_view["migration_status"] is None


async def test_attached_volume_lists_its_attachment(api: Api) -> None:
    volume = await api.create_volume()
    attachment = await attach(api, volume["id"])
    shown = await api.volume(volume["id"])
    assert shown["status"] == "in-use"
    (entry,) = shown["attachments"]
    assert entry["id"] == volume["id"]
    assert entry["volume_id"] == volume["id"]
    assert entry["attachment_id"] == attachment["id"]
    assert entry["host_name"] is None
    assert TIMESTAMP.match(entry["attached_at"])


async def test_reserved_volume_lists_no_attachment(api: Api) -> None:
    volume = await api.create_volume()
    await reserve(api, volume["id"])
    shown = await api.volume(volume["id"])
    assert shown["status"] == "reserved"
    assert shown["attachments"] == []


@pytest.mark.parametrize("volume_id", [MISSING, "not-a-uuid"])
async def test_show_unknown_volume_is_404(api: Api, volume_id: str) -> None:
    assert volume_id in fault(await api.get(f"/volumes/{volume_id}"), 404)


# -- list ------------------------------------------------------------------------------------


async def test_list_summaries_and_details(api: Api) -> None:
    first = await api.create_volume(name="one")
    second = await api.create_volume(name="two", metadata={"k": "v"})

    summaries = (await api.get("/volumes")).json()
    assert set(summaries) == {"volumes"}
    assert [v["id"] for v in summaries["volumes"]] == [second["id"], first["id"]]
    for summary in summaries["volumes"]:
        assert set(summary) == {"id", "name", "links"}
    assert summaries["volumes"][0]["name"] == "two"
    assert summaries["volumes"][0]["links"][0]["href"].endswith(f"/v3/{api.project}/volumes/{second['id']}")

    details = (await api.get("/volumes/detail")).json()["volumes"]
    assert [v["id"] for v in details] == [second["id"], first["id"]]
    assert details[0] == await api.volume(second["id"])
    assert details[0]["metadata"] == {"k": "v"}


async def test_list_of_an_empty_project(api: Api) -> None:
    assert (await api.get("/volumes")).json() == {"volumes": []}
    assert (await api.get("/volumes/detail")).json() == {"volumes": []}


async def test_filters(api: Api, app: Any) -> None:
    await api.create_volume(name="alpha", metadata={"tier": "gold", "env": "prod"})
    await api.create_volume(name="beta", metadata={"tier": "silver"})
    app.state.backends.volumes.faults.fail("create")
    await api.create_volume(name="gamma", metadata={"tier": "gold", "env": "dev"})

    assert await names(api, "name=beta") == ["beta"]
    assert await names(api, "name=nobody") == []
    assert await names(api, "status=error") == ["gamma"]
    assert await names(api, "status=available") == ["beta", "alpha"]
    gold = quote(json.dumps({"tier": "gold"}))
    assert await names(api, f"metadata={gold}") == ["gamma", "alpha"]
    gold_prod = quote(json.dumps({"tier": "gold", "env": "prod"}))
    assert await names(api, f"metadata={gold_prod}") == ["alpha"]
    # python-cinderclient sends a Python dict's repr
    assert await names(api, f"metadata={quote(str({'tier': 'silver'}))}") == ["beta"]
    assert await names(api, f"metadata={quote(json.dumps({'tier': 'bronze'}))}") == []
    assert await names(api, "bootable=false") == ["gamma", "beta", "alpha"]
    assert await names(api, "bootable=true") == []
    assert await names(api, "availability_zone=nova") == ["gamma", "beta", "alpha"]
    assert await names(api, "availability_zone=moon") == []
    assert await names(api, "name=alpha&status=available") == ["alpha"]
    assert await names(api, "name=alpha&status=error") == []
    assert await names(api, "status=available", path="/volumes/detail") == ["beta", "alpha"]


@pytest.mark.parametrize("query", ["bootable=maybe", "metadata=notadict", "metadata=%5B1%5D"])
async def test_bad_filter_value_is_400(api: Api, query: str) -> None:
    fault(await api.get(f"/volumes?{query}"), 400)


@pytest.mark.parametrize("version", ["3.31", "3.71"])
@pytest.mark.parametrize("key", ["foo", "project_id", "host"])
async def test_unknown_filter_is_400_from_3_31(api: Api, version: str, key: str) -> None:
    await api.create_volume()
    response = await api.as_(version=version).get(f"/volumes?{key}=x")
    assert key in fault(response, 400)


@pytest.mark.parametrize("version", ["3.0", "3.30"])
async def test_unknown_filter_is_ignored_below_3_31(api: Api, version: str) -> None:
    await api.create_volume(name="kept")
    assert await names(api.as_(version=version), "foo=x&project_id=elsewhere") == ["kept"]


async def test_all_tenants_for_admin(api: Api) -> None:
    tag = uuid.uuid4().hex[:8]
    mine = await api.create_volume(name=tag)
    theirs_project = other_project()
    theirs = await api.as_(user="bob", project=theirs_project).create_volume(name=tag)
    admin = api.as_(user="admin", project=other_project())

    everyone = (await admin.get(f"/volumes/detail?all_tenants=1&name={tag}")).json()["volumes"]
    assert {v["id"] for v in everyone} == {mine["id"], theirs["id"]}
    assert {v["os-vol-tenant-attr:tenant_id"] for v in everyone} == {api.project, theirs_project}

    narrowed = (await admin.get(f"/volumes?all_tenants=true&project_id={theirs_project}")).json()["volumes"]
    assert [v["id"] for v in narrowed] == [theirs["id"]]
    counted = (await admin.get(f"/volumes?all_tenants=1&name={tag}&with_count=true&limit=1")).json()
    assert counted["count"] == 2
    assert len(counted["volumes"]) == 1

    assert (await admin.get(f"/volumes?all_tenants=0&name={tag}")).json() == {"volumes": []}
    assert (await admin.get(f"/volumes?name={tag}")).json() == {"volumes": []}


async def test_all_tenants_is_ignored_for_members(api: Api) -> None:
    tag = uuid.uuid4().hex[:8]
    mine = await api.create_volume(name=tag)
    await api.as_(user="bob", project=other_project()).create_volume(name=tag)
    listed = (await api.get(f"/volumes?all_tenants=1&name={tag}")).json()["volumes"]
    assert [v["id"] for v in listed] == [mine["id"]]


async def test_default_order_is_newest_first(api: Api) -> None:
    created = [(await api.create_volume(name=f"v{i}"))["id"] for i in range(3)]
    listed = (await api.get("/volumes")).json()["volumes"]
    assert [v["id"] for v in listed] == created[::-1]


async def make_sortable(api: Api) -> None:
    for size, name in ((2, "a"), (1, "b"), (2, "c"), (1, "d")):
        await api.create_volume(size, name=name)


async def test_sort(api: Api) -> None:
    await make_sortable(api)
    assert await names(api, "sort=size:asc,name") == ["d", "b", "c", "a"]
    assert await names(api, "sort=size:asc,name:asc") == ["b", "d", "a", "c"]
    assert await names(api, "sort=size:desc,name:desc") == ["c", "a", "d", "b"]
    assert await names(api, "sort=name:asc") == ["a", "b", "c", "d"]
    assert await names(api, "sort=name") == ["d", "c", "b", "a"]
    assert await names(api, "sort=created_at:asc") == ["a", "b", "c", "d"]
    assert await names(api, "sort=name:asc", path="/volumes/detail") == ["a", "b", "c", "d"]
    # python-cinderclient sends Cinder's column name for `name`
    assert await names(api, "sort=display_name:asc") == ["a", "b", "c", "d"]
    assert await names(api, "sort_key=display_name&sort_dir=desc") == ["d", "c", "b", "a"]


async def test_sort_key_and_sort_dir(api: Api) -> None:
    await make_sortable(api)
    assert await names(api, "sort_key=name&sort_dir=asc") == ["a", "b", "c", "d"]
    assert await names(api, "sort_key=name") == ["d", "c", "b", "a"]
    listed = (await api.get("/volumes/detail?sort_key=size&sort_dir=asc")).json()["volumes"]
    assert [v["size"] for v in listed] == [1, 1, 2, 2]


@pytest.mark.parametrize(
    "query",
    [
        "sort=name&sort_key=size",
        "sort=name&sort_dir=asc",
        "sort=bogus",
        "sort=size:up",
        "sort=size:asc,bogus:desc",
        "sort_key=bogus",
        "sort_dir=sideways",
    ],
)
async def test_bad_sort_is_400(api: Api, query: str) -> None:
    fault(await api.get(f"/volumes?{query}"), 400)


async def walk(api: Api, first: str) -> list[list[str]]:
    """Follow volumes_links next hrefs from the first page; the ids on each page."""
    pages: list[list[str]] = []
    url: str | None = api.url(first)
    while url is not None:
        response = await api.client.get(url, headers=api.headers())
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append([v["id"] for v in body["volumes"]])
        links = body.get("volumes_links")
        url = None
        if links:
            (link,) = links
            assert link["rel"] == "next"
            assert link["href"].startswith(f"http://tether.test/v3/{api.project}/volumes")
            url = link["href"]
        assert len(pages) < 20, "pagination does not end"
    return pages


async def test_pagination_follows_next_links(api: Api) -> None:
    created = [(await api.create_volume(name=f"v{i}"))["id"] for i in range(5)]
    pages = await walk(api, "/volumes?limit=2")
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [i for p in pages for i in p] == created[::-1]


async def test_pagination_of_an_exact_multiple_ends_with_an_empty_page(api: Api) -> None:
    created = [(await api.create_volume())["id"] for _ in range(4)]
    pages = await walk(api, "/volumes/detail?limit=2")
    # the second page is full, so it links to a third, empty one (as Cinder does)
    assert pages == [created[:1:-1], created[1::-1], []]


async def test_pagination_keeps_sort_and_filters(api: Api) -> None:
    await make_sortable(api)
    await api.create_volume(5, name="e")
    await api.create_volume(1)
    pages = await walk(api, "/volumes?limit=1&sort=size:asc,name:asc&status=available")
    ids = [i for p in pages for i in p]
    assert len(ids) == len(set(ids)) == 6
    by_id = {v["id"]: v for v in (await api.get("/volumes/detail")).json()["volumes"]}
    assert [(by_id[i]["size"], by_id[i]["name"]) for i in ids] == [
        (1, None),
        (1, "b"),
        (1, "d"),
        (2, "a"),
        (2, "c"),
        (5, "e"),
    ]
    desc = [i for p in await walk(api, "/volumes?limit=4&sort=name:desc") for i in p]
    assert [by_id[i]["name"] for i in desc] == ["e", "d", "c", "b", "a", None]


async def test_offset(api: Api) -> None:
    created = [(await api.create_volume())["id"] for _ in range(5)]
    newest_first = created[::-1]
    listed = (await api.get("/volumes?limit=2&offset=1")).json()["volumes"]
    assert [v["id"] for v in listed] == newest_first[1:3]
    listed = (await api.get("/volumes?offset=3")).json()["volumes"]
    assert [v["id"] for v in listed] == newest_first[3:]
    assert (await api.get("/volumes?offset=10")).json() == {"volumes": []}


async def test_marker_alone(api: Api) -> None:
    created = [(await api.create_volume())["id"] for _ in range(3)]
    listed = (await api.get(f"/volumes?marker={created[2]}")).json()["volumes"]
    assert [v["id"] for v in listed] == [created[1], created[0]]


async def test_unknown_marker_is_404(api: Api) -> None:
    await api.create_volume()
    assert MISSING in fault(await api.get(f"/volumes?marker={MISSING}"), 404)


async def test_another_projects_marker_is_404(api: Api) -> None:
    theirs = await api.as_(user="bob", project=other_project()).create_volume()
    fault(await api.get(f"/volumes?marker={theirs['id']}"), 404)


@pytest.mark.parametrize("query", ["limit=-1", "limit=abc", "limit=1.5", "limit=", "offset=-1", "offset=x"])
async def test_bad_limit_or_offset_is_400(api: Api, query: str) -> None:
    fault(await api.get(f"/volumes?{query}"), 400)


@pytest.mark.parametrize("version", ["3.45", "3.71"])
async def test_with_count(api: Api, version: str) -> None:
    for name in ("a", "b", "c"):
        await api.create_volume(name=name)
    caller = api.as_(version=version)
    body = (await caller.get("/volumes?with_count=true&limit=1")).json()
    assert body["count"] == 3
    assert len(body["volumes"]) == 1
    body = (await caller.get("/volumes/detail?with_count=true&name=b")).json()
    assert body["count"] == 1
    assert [v["name"] for v in body["volumes"]] == ["b"]
    assert "count" not in (await caller.get("/volumes?with_count=false")).json()
    assert "count" not in (await caller.get("/volumes")).json()


@pytest.mark.parametrize("version", ["3.31", "3.44"])
async def test_with_count_below_3_45_is_400(api: Api, version: str) -> None:
    assert "with_count" in fault(await api.as_(version=version).get("/volumes?with_count=true"), 400)


async def test_with_count_is_ignored_below_3_31(api: Api) -> None:
    await api.create_volume()
    body = (await api.as_(version="3.30").get("/volumes?with_count=true")).json()
    assert "count" not in body
    assert len(body["volumes"]) == 1


# -- update ----------------------------------------------------------------------------------


async def test_update_name_description_metadata(api: Api) -> None:
    volume = await api.create_volume(name="before", description="old", metadata={"keep": "no", "k": "1"})
    response = await api.put(
        f"/volumes/{volume['id']}", {"volume": {"name": "after", "description": "new", "metadata": {"k": "2"}}}
    )
    assert response.status_code == 200, response.text
    updated = response.json()["volume"]
    assert set(updated) >= BASE_FIELDS
    assert (updated["name"], updated["description"], updated["metadata"]) == ("after", "new", {"k": "2"})
    assert updated["status"] == "available"
    assert updated["updated_at"] >= volume["updated_at"]
    assert await api.volume(volume["id"]) == updated


async def test_update_one_field_leaves_the_others(api: Api) -> None:
    volume = await api.create_volume(name="n", description="d", metadata={"k": "v"})
    response = await api.put(f"/volumes/{volume['id']}", {"volume": {"description": "only this"}})
    assert response.status_code == 200
    shown = await api.volume(volume["id"])
    assert (shown["name"], shown["description"], shown["metadata"]) == ("n", "only this", {"k": "v"})

    response = await api.put(f"/volumes/{volume['id']}", {"volume": {"metadata": {}}})
    assert response.status_code == 200
    shown = await api.volume(volume["id"])
    assert (shown["name"], shown["description"], shown["metadata"]) == ("n", "only this", {})


async def test_update_display_name_and_clearing_a_name(api: Api) -> None:
    volume = await api.create_volume(name="n")
    response = await api.put(f"/volumes/{volume['id']}", {"volume": {"display_name": "legacy"}})
    assert response.json()["volume"]["name"] == "legacy"
    response = await api.put(f"/volumes/{volume['id']}", {"volume": {"name": None}})
    assert response.status_code == 200
    assert (await api.volume(volume["id"]))["name"] is None


@pytest.mark.parametrize(
    "body",
    [
        {"volume": {}},
        {"volume": {"metadata": {"k": 1}}},
        {"volume": {"name": "x" * 256}},
        {"volume": "x"},
        {},
    ],
)
async def test_bad_update_is_400(api: Api, body: Any) -> None:
    volume = await api.create_volume(name="same", metadata={"k": "v"})
    fault(await api.put(f"/volumes/{volume['id']}", body), 400)
    shown = await api.volume(volume["id"])
    assert (shown["name"], shown["metadata"]) == ("same", {"k": "v"})


async def test_update_unknown_keys_by_version(api: Api) -> None:
    volume = await api.create_volume(name="same")
    strict = await api.as_(version="3.53").put(f"/volumes/{volume['id']}", {"volume": {"name": "x", "bogus": 1}})
    assert "bogus" in fault(strict, 400)
    assert (await api.volume(volume["id"]))["name"] == "same"
    lenient = await api.as_(version="3.52").put(f"/volumes/{volume['id']}", {"volume": {"name": "x", "bogus": 1}})
    assert lenient.status_code == 200
    assert (await api.volume(volume["id"]))["name"] == "x"


async def test_update_unknown_volume_is_404(api: Api) -> None:
    fault(await api.put(f"/volumes/{MISSING}", {"volume": {"name": "x"}}), 404)


# -- delete ----------------------------------------------------------------------------------


async def delete_and_check_gone(api: Api, volume_id: str, query: str = "") -> None:
    response = await api.delete(f"/volumes/{volume_id}{query}")
    assert response.status_code == 202, response.text
    assert response.content == b""
    await api.settle()
    fault(await api.get(f"/volumes/{volume_id}"), 404)


@pytest.mark.parametrize("status", ["available", "error", "error_restoring", "error_extending"])
async def test_delete_from_an_allowed_status(api: Api, status: str) -> None:
    volume = await api.create_volume()
    if status != "available":
        await reset_status(api, volume["id"], status=status)
    assert (await api.volume(volume["id"]))["status"] == status
    await delete_and_check_gone(api, volume["id"])
    assert (await api.get("/volumes")).json() == {"volumes": []}
    fault(await api.get(f"/volumes/{volume['id']}"), 404)


@pytest.mark.parametrize("status", ["maintenance", "error_deleting", "in-use", "attaching", "detaching"])
async def test_delete_from_another_status_is_400_naming_it(api: Api, status: str) -> None:
    volume = await api.create_volume()
    await reset_status(api, volume["id"], status=status)
    message = fault(await api.delete(f"/volumes/{volume['id']}"), 400)
    assert status in message
    await api.settle()
    assert (await api.volume(volume["id"]))["status"] == status


async def test_delete_reserved_volume_is_400(api: Api) -> None:
    volume = await api.create_volume()
    await reserve(api, volume["id"])
    assert "reserved" in fault(await api.delete(f"/volumes/{volume['id']}"), 400)
    await api.settle()
    assert (await api.volume(volume["id"]))["status"] == "reserved"


async def test_delete_in_use_volume_is_400(api: Api) -> None:
    volume = await api.create_volume()
    await attach(api, volume["id"])
    assert "in-use" in fault(await api.delete(f"/volumes/{volume['id']}"), 400)
    await api.settle()
    assert (await api.volume(volume["id"]))["status"] == "in-use"


async def test_delete_with_an_attachment_left_is_400_even_when_available(api: Api) -> None:
    volume = await api.create_volume()
    await reserve(api, volume["id"])
    await reset_status(api, volume["id"], status="available")
    assert "available" in fault(await api.delete(f"/volumes/{volume['id']}"), 400)
    # force skips the status check, not the attachment check
    assert "available" in fault(await api.as_(user="admin").delete(f"/volumes/{volume['id']}?force=true"), 400)
    await api.settle()
    assert (await api.volume(volume["id"]))["status"] == "available"


async def test_delete_after_the_attachment_is_gone(api: Api) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"])
    removed = await api.delete(f"/attachments/{attachment['id']}")
    assert removed.status_code == 200, removed.text
    await delete_and_check_gone(api, volume["id"])


@pytest.mark.parametrize("status", ["maintenance", "error_deleting", "creating"])
async def test_admin_force_delete_skips_the_status_check(api: Api, status: str) -> None:
    volume = await api.create_volume()
    await reset_status(api, volume["id"], status=status)
    await delete_and_check_gone(api.as_(user="admin"), volume["id"], "?force=true")
    fault(await api.get(f"/volumes/{volume['id']}"), 404)


async def test_admin_without_force_keeps_the_status_check(api: Api) -> None:
    volume = await api.create_volume()
    await reset_status(api, volume["id"], status="maintenance")
    fault(await api.as_(user="admin").delete(f"/volumes/{volume['id']}?force=false"), 400)


async def test_member_force_delete_is_403(api: Api) -> None:
    volume = await api.create_volume()
    fault(await api.delete(f"/volumes/{volume['id']}?force=true"), 403)
    assert (await api.volume(volume["id"]))["status"] == "available"
    # force=false is the plain delete
    await delete_and_check_gone(api, volume["id"], "?force=false")


async def test_cascade_is_accepted(api: Api) -> None:
    volume = await api.create_volume()
    await delete_and_check_gone(api, volume["id"], "?cascade=true")


@pytest.mark.parametrize("query", ["?force=maybe", "?cascade=perhaps"])
async def test_bad_delete_flags_are_400(api: Api, query: str) -> None:
    volume = await api.create_volume()
    fault(await api.delete(f"/volumes/{volume['id']}{query}"), 400)
    assert (await api.volume(volume["id"]))["status"] == "available"


async def test_backend_delete_failure_is_error_deleting(api: Api, app: Any) -> None:
    volume = await api.create_volume()
    app.state.backends.volumes.faults.fail("delete")
    assert (await api.delete(f"/volumes/{volume['id']}")).status_code == 202
    await api.settle()
    assert (await api.volume(volume["id"]))["status"] == "error_deleting"
    assert "error_deleting" in fault(await api.delete(f"/volumes/{volume['id']}"), 400)
    await delete_and_check_gone(api.as_(user="admin"), volume["id"], "?force=true")


@pytest.mark.parametrize("settings_overrides", [{"fake_delay": 0.3}])
async def test_delete_shows_deleting_until_the_backend_is_done(api: Api) -> None:
    response = await post_volume(api)
    volume_id = response.json()["volume"]["id"]
    await api.settle()
    assert (await api.delete(f"/volumes/{volume_id}")).status_code == 202
    assert (await api.volume(volume_id))["status"] == "deleting"
    assert "deleting" in fault(await api.delete(f"/volumes/{volume_id}"), 400)
    await api.settle()
    fault(await api.get(f"/volumes/{volume_id}"), 404)


async def test_concurrent_deletes_accept_exactly_one(api: Api) -> None:
    volume = await api.create_volume()
    responses = await asyncio.gather(*[api.delete(f"/volumes/{volume['id']}") for _ in range(5)])
    codes = sorted(r.status_code for r in responses)
    assert codes[0] == 202
    assert all(code in (400, 404) for code in codes[1:]), codes
    await api.settle()
    fault(await api.get(f"/volumes/{volume['id']}"), 404)


async def test_deleted_volume_is_404_everywhere(api: Api) -> None:
    volume = await api.create_volume()
    await delete_and_check_gone(api, volume["id"])
    fault(await api.put(f"/volumes/{volume['id']}", {"volume": {"name": "x"}}), 404)
    fault(await api.delete(f"/volumes/{volume['id']}"), 404)
    assert (await api.get("/volumes/detail")).json() == {"volumes": []}


async def test_delete_unknown_volume_is_404(api: Api) -> None:
    assert MISSING in fault(await api.delete(f"/volumes/{MISSING}"), 404)
