"""TokenValidator against a scripted Keystone (httpx.MockTransport): what each answer becomes, what is remembered.

The real Keystone tests (tests/keystone) cover the happy paths and an outage; these cover the answers a real
Keystone gives only when misconfigured or broken.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.errors import ServiceUnavailable, Unauthorized
from app.keystone import INVALID_CACHE_SECONDS, TokenValidator

AUTH_URL = "http://keystone.test:5000"


def token_body(*, seconds: float = 3600, project: bool = True, roles: tuple[str, ...] = ("member", "reader")) -> Any:
    expires = (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    body: dict[str, Any] = {
        "user": {"id": "u1", "name": "alice"},
        "roles": [{"id": r, "name": r} for r in roles],
        "expires_at": expires,
    }
    if project:
        body["project"] = {"id": "p1", "name": "demo"}
    return {"token": body}


def validator(handler: Callable[[httpx.Request], httpx.Response], **overrides: Any) -> tuple[TokenValidator, list[Any]]:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        auth="keystone",
        keystone_auth_url=AUTH_URL,
        keystone_username="tether",
        keystone_password="secret",
        **overrides,
    )
    made = TokenValidator(settings, transport=httpx.MockTransport(handler))
    renewals: list[Any] = []

    async def service_token(*, renew: bool = False) -> str:
        renewals.append(renew)
        return "service-token-2" if renew else "service-token"

    made._service_token = service_token  # type: ignore[method-assign]
    return made, renewals


async def test_a_validation_asks_v3_auth_tokens_with_both_tokens() -> None:
    seen: list[httpx.Request] = []

    def keystone(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=token_body())

    check, _ = validator(keystone)
    token = await check.validate("user-token")
    assert (token.user_id, token.project_id, token.roles) == ("u1", "p1", frozenset({"member", "reader"}))
    (request,) = seen
    assert request.url.path == "/v3/auth/tokens"
    assert request.headers["X-Auth-Token"] == "service-token"
    assert request.headers["X-Subject-Token"] == "user-token"
    await check.validate("user-token")
    assert len(seen) == 1  # remembered


@pytest.mark.parametrize("status", [500, 502, 403, 401])
async def test_keystone_failing_is_503_and_nothing_is_remembered(status: int) -> None:
    calls = 0

    def keystone(_request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(status, json={"error": {}})

    check, _ = validator(keystone)
    for _ in range(2):
        with pytest.raises(ServiceUnavailable):
            await check.validate("user-token")
    assert calls == (4 if status == 401 else 2)  # a 401 (our own token) is retried once with a new one


async def test_keystone_unreachable_is_503() -> None:
    def keystone(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    check, _ = validator(keystone)
    with pytest.raises(ServiceUnavailable):
        await check.validate("user-token")


async def test_a_garbled_answer_is_503_not_a_500() -> None:
    check, _ = validator(lambda _request: httpx.Response(200, text="<html>proxy error</html>"))
    with pytest.raises(ServiceUnavailable):
        await check.validate("user-token")
    check, _ = validator(lambda _request: httpx.Response(200, json={"token": {"user": {}}}))
    with pytest.raises(ServiceUnavailable):
        await check.validate("user-token")


async def test_our_own_token_refused_is_renewed_once() -> None:
    def keystone(request: httpx.Request) -> httpx.Response:
        if request.headers["X-Auth-Token"] == "service-token":
            return httpx.Response(401, json={"error": {}})
        return httpx.Response(200, json=token_body())

    check, renewals = validator(keystone)
    assert (await check.validate("user-token")).user_id == "u1"
    assert renewals == [False, True]


async def test_a_refused_token_is_401_and_remembered_briefly() -> None:
    calls = 0

    def keystone(_request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(404, json={"error": {"code": 404}})

    check, _ = validator(keystone)
    for _ in range(3):
        with pytest.raises(Unauthorized) as refused:
            await check.validate("user-token")
        assert refused.value.headers == {"WWW-Authenticate": f'Keystone uri="{AUTH_URL}"'}
    assert calls == 1
    ((deadline, known),) = check._cache.values()
    assert known is None
    assert deadline - time.monotonic() <= INVALID_CACHE_SECONDS


async def test_a_token_is_never_believed_past_its_expiry() -> None:
    check, _ = validator(lambda _request: httpx.Response(200, json=token_body(seconds=3)))
    await check.validate("user-token")
    ((deadline, _known),) = check._cache.values()
    assert deadline - time.monotonic() <= 3


async def test_no_cache_time_means_every_request_asks() -> None:
    calls = 0

    def keystone(_request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(200, json=token_body())

    check, _ = validator(keystone, keystone_token_cache_time=0)
    await check.validate("user-token")
    await check.validate("user-token")
    assert calls == 2


async def test_an_unscoped_token_is_401() -> None:
    check, _ = validator(lambda _request: httpx.Response(200, json=token_body(project=False)))
    with pytest.raises(Unauthorized, match="project-scoped"):
        await check.context({"x-auth-token": "user-token"}, None)


def test_keystone_mode_needs_its_credentials() -> None:
    with pytest.raises(ValueError, match="TETHER_KEYSTONE_PASSWORD"):
        Settings(_env_file=None, auth="keystone", keystone_auth_url=AUTH_URL, keystone_username="t")  # type: ignore[call-arg]
