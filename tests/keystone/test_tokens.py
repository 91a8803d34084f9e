"""Keystone mode's tokens (SPEC 11): who may pass, what is ignored, what is remembered, what a Keystone outage does."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from tests.conftest import fault
from tests.keystone.callers import Caller
from tests.keystone.keystone import Cloud, soon


def www_authenticate(response: httpx.Response, cloud: Cloud) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == f'Keystone uri="{cloud.url}"'
    fault(response, 401)


async def test_no_token_or_a_bad_one_is_401_saying_where_to_get_one(kclient: httpx.AsyncClient, cloud: Cloud) -> None:
    alice = cloud.users["alice"]
    path = f"/v3/{alice.project_id}/volumes"
    www_authenticate(await kclient.get(path), cloud)
    for token in ("nonsense", f"alice:{alice.project_id}", "x" * 300, "a" * 9000):
        www_authenticate(await kclient.get(path, headers={"X-Auth-Token": token}), cloud)


async def test_discovery_and_health_need_no_token(kclient: httpx.AsyncClient) -> None:
    assert (await kclient.get("/")).status_code == 300
    assert (await kclient.get("/v3/")).status_code == 200
    assert (await kclient.get("/v3")).status_code == 200
    assert (await kclient.get("/healthcheck")).text == "OK"


async def test_a_valid_token_works_and_its_project_must_be_the_urls(kclient: httpx.AsyncClient, cloud: Cloud) -> None:
    alice = Caller(kclient, cloud.users["alice"])
    assert (await alice.get("/volumes")).status_code == 200
    # the token's project, not the path's, is the caller's: another project in the URL is Cinder's 400
    other = cloud.users["bob"].project_id
    response = await kclient.get(f"/v3/{other}/volumes", headers=alice.headers())
    assert fault(response, 400) == "Malformed request url"
    # without a project in the URL the token's project is used
    assert (await kclient.get("/v3/volumes", headers=alice.headers())).status_code == 200


async def test_spoofed_identity_headers_are_ignored(
    kclient: httpx.AsyncClient, keystone_app: Any, cloud: Cloud
) -> None:
    spoofed = {
        "X-User-Id": cloud.users["admin"].id,
        "X-Project-Id": cloud.users["admin"].project_id,
        "X-Roles": "admin,member,reader,service",
        "X-Service-Roles": "service",
        "X-Identity-Status": "Confirmed",
        "X-Service-Identity-Status": "Confirmed",
        "X-Is-Admin-Project": "True",
        "X-Tenant-Id": cloud.users["admin"].project_id,
    }
    # with no token, the headers alone are no one
    www_authenticate(await kclient.get(f"/v3/{cloud.users['alice'].project_id}/volumes", headers=spoofed), cloud)
    # with a member's token, the member stays a member: no admin action, no other project, no service role
    alice = Caller(kclient, cloud.users["alice"], extra=spoofed)
    volume = await alice.create_volume(keystone_app)
    assert volume["user_id"] == cloud.users["alice"].id
    assert volume["os-vol-tenant-attr:tenant_id"] == cloud.users["alice"].project_id
    assert "os-vol-host-attr:host" not in volume
    fault(await alice.action(volume["id"], "os-reset_status", {"status": "error"}), 403)
    fault(await alice.get("/scheduler-stats/get_pools"), 403)
    attachment = await alice.attach(volume["id"], instance="7c3b0e4e-1d53-4c0c-9a55-1a7d2b1b2f10")
    fault(await alice.delete(f"/attachments/{attachment['id']}"), 409)
    listed = await alice.get("/volumes?all_tenants=1")
    assert {v["id"] for v in listed.json()["volumes"]} <= {
        v["id"] for v in (await Caller(kclient, cloud.users["alice"]).get("/volumes")).json()["volumes"]
    }


async def test_a_token_revoked_before_its_first_use_is_refused(kclient: httpx.AsyncClient, cloud: Cloud) -> None:
    token = cloud.token("alice")
    cloud.revoke(token)
    www_authenticate(await Caller(kclient, cloud.users["alice"], token).get("/volumes"), cloud)


@pytest.mark.parametrize("settings_overrides", [{"keystone_token_cache_time": 1}])
async def test_a_revoked_token_is_refused_once_its_cache_time_is_over(kclient: httpx.AsyncClient, cloud: Cloud) -> None:
    token = cloud.token("alice")
    alice = Caller(kclient, cloud.users["alice"], token)
    assert (await alice.get("/volumes")).status_code == 200
    cloud.revoke(token)
    # believed for at most the cache time (keystonemiddleware's trade too), then asked again and refused
    await asyncio.sleep(1.2)
    www_authenticate(await alice.get("/volumes"), cloud)


async def test_an_expired_token_is_refused_though_its_cache_time_is_not_over(
    kclient: httpx.AsyncClient, cloud: Cloud
) -> None:
    # Keystone caps a token at its application credential's expiry: a token that lives a few seconds
    credential, secret = cloud.application_credential("alice", expires_at=soon(4))
    token = cloud.application_credential_token(credential, secret)
    alice = Caller(kclient, cloud.users["alice"], token)
    assert (await alice.get("/volumes")).status_code == 200
    deadline = time.monotonic() + 10
    while (response := await alice.get("/volumes")).status_code == 200:
        assert time.monotonic() < deadline, "an expired token was still accepted"
        await asyncio.sleep(0.5)
    # the default cache time (300 s) did not keep it past its expiry
    www_authenticate(response, cloud)


async def test_concurrent_requests_with_a_new_token_share_one_validation(
    kclient: httpx.AsyncClient, keystone_app: Any, cloud: Cloud
) -> None:
    alice = Caller(kclient, cloud.users["alice"], cloud.token("alice"))
    validator = keystone_app.state.keystone
    asked = 0
    validation = validator._validation

    async def counted(token: str) -> Any:
        nonlocal asked
        asked += 1
        return await validation(token)

    validator._validation = counted
    responses = await asyncio.gather(*(alice.get("/volumes") for _ in range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    assert asked == 1
    await alice.get("/volumes")
    assert asked == 1  # and then it is cached


async def test_an_invalid_service_token_is_401(kclient: httpx.AsyncClient, cloud: Cloud) -> None:
    alice = Caller(kclient, cloud.users["alice"])
    www_authenticate(await alice.with_service("not-a-token").get("/volumes"), cloud)
    # a user's token passed off as a service token (no service role): refused, as keystonemiddleware does
    response = await alice.with_service(cloud.users["bob"].token).get("/volumes")
    www_authenticate(response, cloud)
    assert (await alice.with_service(cloud.users["nova"].token).get("/volumes")).status_code == 200


async def test_metrics_are_for_admins_in_keystone_mode(kclient: httpx.AsyncClient, cloud: Cloud) -> None:
    www_authenticate(await kclient.get("/metrics"), cloud)
    member = await kclient.get("/metrics", headers={"X-Auth-Token": cloud.users["alice"].token})
    fault(member, 403)
    admin = await kclient.get("/metrics", headers={"X-Auth-Token": cloud.users["admin"].token})
    assert admin.status_code == 200
    assert "tether_http_requests" in admin.text


async def test_keystone_down_is_503_for_any_token_it_has_not_vouched_for(
    kclient: httpx.AsyncClient, cloud: Cloud
) -> None:
    alice = Caller(kclient, cloud.users["alice"])
    assert (await alice.get("/volumes")).status_code == 200
    fresh = cloud.token("alice")
    with cloud.keystone.stopped():
        # a token never validated cannot be believed: neither a 500 nor a request let through
        response = await Caller(kclient, cloud.users["alice"], fresh).get("/volumes")
        assert fault(response, 503) == "The identity service is unavailable; try again later."
        response = await Caller(kclient, cloud.users["alice"], "garbage-token").get("/volumes")
        fault(response, 503)
        # a token validated before the outage is believed for its cache time, as keystonemiddleware does
        assert (await alice.get("/volumes")).status_code == 200
    assert (await Caller(kclient, cloud.users["alice"], fresh).get("/volumes")).status_code == 200
