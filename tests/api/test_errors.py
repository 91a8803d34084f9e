"""Faults in Cinder's format: bad bodies, validation, size limits, unknown routes, unexpected errors."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.errors import TetherError
from tests.conftest import Api, fault

MIB = 1024 * 1024
GENERIC_500 = TetherError.message


# -- bodies ----------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", None])
@pytest.mark.parametrize("raw", [b"{", b'{"volume": {"size": 1}', b"not json", b"{'volume': {}}"])
async def test_malformed_json_is_400(api: Api, raw: bytes, content_type: str | None) -> None:
    headers = api.headers()
    if content_type:
        headers["Content-Type"] = content_type
    response = await api.client.post(api.url("/volumes"), content=raw, headers=headers)
    assert "badRequest" in response.json()
    assert "Malformed request body" in fault(response, 400)
    assert (await api.get("/volumes")).json() == {"volumes": []}


def json_headers(api: Api) -> dict[str, str]:
    return {**api.headers(), "Content-Type": "application/json"}


async def test_missing_body_is_400(api: Api) -> None:
    response = await api.client.post(api.url("/volumes"), headers=api.headers())
    fault(response, 400)


@pytest.mark.parametrize("body", [[], [{"volume": {"size": 1}}], "volume", 1, None, True])
async def test_body_not_an_object_is_400(api: Api, body: Any) -> None:
    response = await api.client.post(api.url("/volumes"), content=json.dumps(body), headers=json_headers(api))
    fault(response, 400)
    assert (await api.get("/volumes")).json() == {"volumes": []}


@pytest.mark.parametrize("body", [{"volume": []}, {"volume": "x"}, {"volume": None}, {"size": 1}, {}])
async def test_volume_key_not_an_object_is_400(api: Api, body: Any) -> None:
    response = await api.post("/volumes", body)
    assert "volume" in fault(response, 400)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"volume": {"size": "abc"}}, "size"),
        ({"volume": {}}, "size"),
        ({"volume": {"size": 1, "name": "x" * 256}}, "name"),
        ({"volume": {"size": 1, "metadata": {"k": 1}}}, "metadata"),
        ({"volume": {"size": 1, "metadata": "k=v"}}, "metadata"),
    ],
)
async def test_validation_error_is_400_naming_the_field(api: Api, body: Any, field: str) -> None:
    response = await api.post("/volumes", body)
    assert response.status_code != 422
    assert field in fault(response, 400)


async def test_validation_error_in_query_is_400(api: Api) -> None:
    response = await api.get("/volumes?limit=abc")
    assert "limit" in fault(response, 400)


async def test_body_over_1_mib_is_413(api: Api) -> None:
    body = json.dumps({"volume": {"size": 1, "description": "x" * MIB}})
    response = await api.client.post(api.url("/volumes"), content=body, headers=json_headers(api))
    assert "content-length" in response.request.headers
    fault(response, 413)
    assert "overLimit" in response.json()
    assert response.headers["openstack-api-version"] == "volume 3.71"
    assert response.headers["x-openstack-request-id"].startswith("req-")
    assert (await api.get("/volumes")).json() == {"volumes": []}


async def test_chunked_body_over_1_mib_is_413(api: Api) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"volume": {"size": 1, "description": "'
        for _ in range(20):
            yield b"x" * 64 * 1024
        yield b'"}}'

    response = await api.client.post(api.url("/volumes"), content=chunks(), headers=json_headers(api))
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    fault(response, 413)
    assert "overLimit" in response.json()
    assert (await api.get("/volumes")).json() == {"volumes": []}


async def test_body_just_under_the_limit_is_read(api: Api) -> None:
    # the description is too long for the schema, so the 400 proves the whole body was parsed
    head = b'{"volume": {"size": 1, "description": "'
    tail = b'"}}'
    body = head + b"x" * (MIB - len(head) - len(tail)) + tail
    assert len(body) == MIB
    response = await api.client.post(api.url("/volumes"), content=body, headers=json_headers(api))
    assert "description" in fault(response, 400)


async def test_lying_content_length_is_413(api: Api) -> None:
    headers = {**api.headers(), "Content-Length": str(MIB + 1)}
    response = await api.client.post(api.url("/volumes"), content=b"{}", headers=headers)
    fault(response, 413)


# -- routes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v3/{p}/nothing", "/v3/{p}/volumes/x/y/z", "/nothing", "/v2/{p}/volumes"])
async def test_unknown_route_is_404(api: Api, path: str) -> None:
    response = await api.client.get(path.format(p=api.project), headers=api.headers())
    assert fault(response, 404) == "The resource could not be found."
    assert "itemNotFound" in response.json()


@pytest.mark.parametrize(
    ("method", "path"), [("PATCH", "/volumes"), ("DELETE", "/volumes"), ("PUT", "/types"), ("POST", "/volumes/detail")]
)
async def test_wrong_method_is_405(api: Api, method: str, path: str) -> None:
    response = await api.client.request(method, api.url(path), headers=api.headers())
    fault(response, 405)
    assert "badMethod" in response.json()


# -- unexpected errors -----------------------------------------------------------------------


async def test_unexpected_exception_is_a_generic_500(
    api: Api, app: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def explode() -> None:
        raise RuntimeError("password=hunter2 at /srv/secret/path")

    app.add_api_route("/v3/{project_id}/explode", explode, methods=["GET"])
    logger = logging.getLogger("tether.api")
    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level(logging.ERROR, logger="tether.api"):
        response = await api.get("/explode")

    assert fault(response, 500) == GENERIC_500
    assert "computeFault" in response.json()
    assert "hunter2" not in response.text
    assert "secret" not in response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-openstack-request-id"].startswith("req-")
    assert response.headers["openstack-api-version"] == "volume 3.71"
    assert any(r.exc_info and "hunter2" in str(r.exc_info[1]) for r in caplog.records)


class Exploding:
    """Stands in for a service: every method raises something no handler knows."""

    def __getattr__(self, name: str) -> Any:
        async def broken(*_args: Any, **_kwargs: Any) -> None:
            raise KeyError(f"internal detail of {name}")

        return broken


async def test_unexpected_exception_in_a_service_is_a_generic_500(
    api: Api, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.state, "volumes", Exploding())
    for response in (await api.get("/volumes"), await api.post("/volumes", {"volume": {"size": 1}})):
        assert fault(response, 500) == GENERIC_500
        assert "internal detail" not in response.text


async def test_unknown_status_code_renders_as_compute_fault(api: Api, app: Any) -> None:
    class Teapot(TetherError):
        code = 418
        message = "I'm a teapot."

    async def brew() -> None:
        raise Teapot()

    app.add_api_route("/v3/{project_id}/brew", brew, methods=["GET"])
    response = await api.get("/brew")
    assert fault(response, 418) == "I'm a teapot."
    assert "computeFault" in response.json()


async def test_errors_after_a_500_are_still_served(api: Api, app: Any) -> None:
    async def explode() -> None:
        raise ValueError("boom")

    app.add_api_route("/v3/{project_id}/explode", explode, methods=["GET"])
    fault(await api.get("/explode"), 500)
    response = await api.get("/volumes")
    assert response.status_code == 200
