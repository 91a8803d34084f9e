"""Version discovery, the health check, microversion negotiation and the headers every response carries."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.conftest import Api, fault

REQUEST_ID = re.compile(r"^req-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def versions_body(base: str) -> dict[str, object]:
    return {
        "versions": [
            {
                "id": "v3.0",
                "status": "CURRENT",
                "version": "3.71",
                "min_version": "3.0",
                "updated": "2023-08-31T00:00:00Z",
                "links": [
                    {"rel": "describedby", "type": "text/html", "href": "https://docs.openstack.org/"},
                    {"rel": "self", "href": f"{base}/v3/"},
                ],
                "media-types": [
                    {"base": "application/json", "type": "application/vnd.openstack.volume+json;version=3"}
                ],
            }
        ]
    }


def assert_request_id(response: httpx.Response) -> str:
    request_id = response.headers["x-openstack-request-id"]
    assert REQUEST_ID.match(request_id), request_id
    assert response.headers["x-compute-request-id"] == request_id
    return request_id


def assert_version_headers(response: httpx.Response, version: str) -> None:
    assert response.headers["openstack-api-version"] == f"volume {version}"
    assert "OpenStack-API-Version" in response.headers["vary"]


# -- discovery -------------------------------------------------------------------------------


async def test_root_lists_versions_without_auth(client: httpx.AsyncClient) -> None:
    response = await client.get("/")
    assert response.status_code == 300
    assert response.json() == versions_body("http://tether.test")
    assert_request_id(response)


async def test_root_ignores_a_bad_microversion_header(client: httpx.AsyncClient) -> None:
    # discovery is how a client learns the range, so it cannot depend on asking for a valid one
    response = await client.get("/", headers={"OpenStack-API-Version": "volume 9.9"})
    assert response.status_code == 300
    assert response.json()["versions"][0]["version"] == "3.71"


async def test_v3_shows_the_version_with_auth(api: Api) -> None:
    response = await api.client.get("/v3/", headers=api.headers())
    assert response.status_code == 200
    assert response.json() == versions_body("http://tether.test")
    assert_version_headers(response, "3.71")


async def test_v3_without_auth_is_401(client: httpx.AsyncClient) -> None:
    # keystoneauth discovers without a token and retries with one only after a 401
    response = await client.get("/v3/")
    fault(response, 401)
    assert "unauthorized" in response.json()
    assert_request_id(response)


async def test_healthcheck(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthcheck", headers={"OpenStack-API-Version": "volume 9.9"})
    assert response.status_code == 200
    assert response.text == "OK"
    assert_request_id(response)


# -- negotiation -----------------------------------------------------------------------------


async def test_no_header_means_3_0(api: Api) -> None:
    response = await api.as_(version=None).get("/volumes")
    assert response.status_code == 200
    assert_version_headers(response, "3.0")


async def test_latest_means_3_71(api: Api) -> None:
    response = await api.as_(version="latest").get("/volumes")
    assert response.status_code == 200
    assert_version_headers(response, "3.71")


@pytest.mark.parametrize("version", ["3.0", "3.27", "3.50", "3.71"])
async def test_requested_version_is_echoed(api: Api, version: str) -> None:
    response = await api.as_(version=version).get("/volumes")
    assert response.status_code == 200
    assert_version_headers(response, version)


@pytest.mark.parametrize("name", ["openstack-api-version", "OPENSTACK-API-VERSION", "OpenStack-Api-Version"])
async def test_header_name_is_case_insensitive(api: Api, name: str) -> None:
    caller = api.as_(version=None)
    response = await caller.get("/volumes", headers={name: "volume 3.42"})
    assert response.status_code == 200
    assert_version_headers(response, "3.42")


@pytest.mark.parametrize(
    "value",
    ["compute 2.1, volume 3.40", "volume 3.40, compute 2.1", "identity 3.0,volume 3.40 , placement 1.2"],
)
async def test_volume_entry_is_taken_from_several_services(api: Api, value: str) -> None:
    response = await api.as_(version=None).get("/volumes", headers={"OpenStack-API-Version": value})
    assert response.status_code == 200
    assert_version_headers(response, "3.40")


@pytest.mark.parametrize(
    "value",
    ["volume 3", "volume 3.x", "volume 3.01", "volume x.3", "volume 3.5.1", "volume", "garbage", "compute 2.1", ""],
)
async def test_bad_version_format_is_400(api: Api, value: str) -> None:
    response = await api.as_(version=None).get("/volumes", headers={"OpenStack-API-Version": value})
    fault(response, 400)
    assert "badRequest" in response.json()
    assert_request_id(response)


@pytest.mark.parametrize("version", ["2.0", "3.72", "4.0"])
async def test_version_out_of_range_is_406(api: Api, version: str) -> None:
    response = await api.as_(version=version).get("/volumes")
    message = fault(response, 406)
    assert "notAcceptable" in response.json()
    assert message == f"Version {version} is not supported by the API. Minimum is 3.0 and maximum is 3.71."
    assert_request_id(response)


async def test_out_of_range_version_is_refused_before_auth(client: httpx.AsyncClient) -> None:
    response = await client.get("/v3/volumes", headers={"OpenStack-API-Version": "volume 3.72"})
    fault(response, 406)


# -- headers on every response ---------------------------------------------------------------


async def test_version_headers_on_success_and_faults(api: Api) -> None:
    caller = api.as_(version="3.33")
    created = await caller.post("/volumes", {"volume": {"size": 1}})
    assert created.status_code == 202
    assert_version_headers(created, "3.33")

    missing = await caller.get("/volumes/00000000-0000-4000-8000-000000000000")
    fault(missing, 404)
    assert_version_headers(missing, "3.33")

    invalid = await caller.post("/volumes", {"volume": {"size": 0}})
    fault(invalid, 400)
    assert_version_headers(invalid, "3.33")

    unauthenticated = await api.client.get(api.url("/volumes"), headers={"OpenStack-API-Version": "volume 3.33"})
    fault(unauthenticated, 401)
    assert_version_headers(unauthenticated, "3.33")

    wrong_method = await caller.client.patch(api.url("/volumes"), headers=caller.headers())
    fault(wrong_method, 405)
    assert_version_headers(wrong_method, "3.33")


async def test_request_id_on_every_response_and_unique(api: Api) -> None:
    responses = [
        await api.client.get("/"),
        await api.client.get("/healthcheck"),
        await api.get("/volumes"),
        await api.post("/volumes", {"volume": {"size": 1}}),
        await api.get("/volumes/nope"),
        await api.post("/volumes", {"volume": {"size": "abc"}}),
        await api.client.get("/v3/volumes"),
        await api.as_(version="3.72").get("/volumes"),
        await api.as_(version="3.x").get("/volumes"),
        await api.client.get("/no/such/route"),
    ]
    ids = [assert_request_id(r) for r in responses]
    assert len(set(ids)) == len(ids)
    await api.settle()


# -- routes with a minimum version -----------------------------------------------------------


@pytest.mark.parametrize("path", ["/attachments", "/attachments/detail"])
async def test_route_below_its_minimum_version_is_404(api: Api, path: str) -> None:
    below = await api.as_(version="3.26").get(path)
    fault(below, 404)
    assert "itemNotFound" in below.json()
    assert_version_headers(below, "3.26")

    at = await api.as_(version="3.27").get(path)
    assert at.status_code == 200, at.text
    assert at.json() == {"attachments": []}


async def test_attachment_create_below_3_27_is_404_and_changes_nothing(api: Api) -> None:
    volume = await api.create_volume()
    response = await api.as_(version="3.26").post("/attachments", {"attachment": {"volume_uuid": volume["id"]}})
    fault(response, 404)
    assert (await api.volume(volume["id"]))["status"] == "available"
