"""The access log: one line per request with method, path, status, duration and request id, never a secret."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from tests.conftest import Api

ON = {"log_level": "INFO"}


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return dict(ON)


def only_access(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "tether.access"]


async def test_one_line_per_request_with_its_fields(api: Api, tether_log: pytest.LogCaptureFixture) -> None:
    caller = api.as_(user="tok3n-user")  # X-Auth-Token: tok3n-user:<project>
    response = await caller.get("/volumes", params={"limit": "1", "name": "hunter2"})
    assert response.status_code == 200, response.text

    (record,) = only_access(tether_log)
    assert record.levelno == logging.INFO
    assert record.method == "GET"  # type: ignore[attr-defined]
    assert record.path == f"/v3/{api.project}/volumes"  # type: ignore[attr-defined]
    assert record.status == 200  # type: ignore[attr-defined]
    assert isinstance(record.duration_ms, float)  # type: ignore[attr-defined]
    assert 0 <= record.duration_ms < 60_000  # type: ignore[attr-defined]
    assert record.request_id == response.headers["x-openstack-request-id"]  # type: ignore[attr-defined]
    assert record.request_id.startswith("req-")  # type: ignore[attr-defined]
    message = record.getMessage()
    assert message.startswith(f"GET /v3/{api.project}/volumes 200 ")
    assert message.endswith("ms")
    # neither the query string nor a header reaches the line
    assert "hunter2" not in message
    assert "limit" not in message
    assert "tok3n-user" not in message
    assert "tok3n-user" not in str(vars(record))


async def test_faults_are_logged_with_their_status(api: Api, tether_log: pytest.LogCaptureFixture) -> None:
    missing = await api.get("/volumes/00000000-0000-0000-0000-000000000000")
    too_new = await api.get("/volumes", headers={"OpenStack-API-Version": "volume 3.99"})  # refused by the middleware
    no_token = await api.client.get(f"/v3/{api.project}/volumes")
    assert (missing.status_code, too_new.status_code, no_token.status_code) == (404, 406, 401)

    records = only_access(tether_log)
    assert [r.status for r in records] == [404, 406, 401]  # type: ignore[attr-defined]
    assert [r.request_id for r in records] == [  # type: ignore[attr-defined]
        r.headers["x-openstack-request-id"] for r in (missing, too_new, no_token)
    ]


async def test_a_newline_in_the_path_cannot_forge_a_line(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    await api.client.get(f"/v3/{api.project}/volumes%0a2026-01-01 INFO tether.access [req-forged] GET / 200")
    lines = [line for line in capsys.readouterr().err.splitlines() if "tether.access" in line]
    assert len(lines) == 1
    assert "volumes\\n2026-01-01" in lines[0]


async def test_plain_line(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    response = await api.get("/volumes")
    (line,) = [line for line in capsys.readouterr().err.splitlines() if " tether.access " in line]
    request_id = response.headers["x-openstack-request-id"]
    assert f" INFO tether.access [{request_id}] GET /v3/{api.project}/volumes 200 " in line
    assert line.endswith("ms")


@pytest.mark.parametrize("settings_overrides", [{**ON, "log_json": True}])
async def test_json_line(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    response = await api.post("/volumes", {"volume": {"size": 1}})
    assert response.status_code == 202
    await api.settle()

    entries = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    (entry,) = [e for e in entries if e["logger"] == "tether.access"]
    assert entry["level"] == "INFO"
    assert entry["method"] == "POST"
    assert entry["path"] == f"/v3/{api.project}/volumes"
    assert entry["status"] == 202
    assert isinstance(entry["duration_ms"], float)
    assert entry["request_id"] == response.headers["x-openstack-request-id"]
    assert entry["project_id"] == api.project
    assert entry["message"].startswith(f"POST /v3/{api.project}/volumes 202 ")
    assert api.user not in json.dumps(entry)


@pytest.mark.parametrize("settings_overrides", [{**ON, "access_log": False}])
async def test_turned_off_it_logs_nothing(
    api: Api, tether_log: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (await api.get("/volumes")).status_code == 200
    assert (await api.get("/volumes", headers={"OpenStack-API-Version": "volume 9.0"})).status_code == 406
    assert only_access(tether_log) == []
    assert "tether.access" not in capsys.readouterr().err


async def test_unversioned_routes_are_logged_too(api: Api, tether_log: pytest.LogCaptureFixture) -> None:
    assert (await api.client.get("/healthcheck")).status_code == 200
    (record,) = only_access(tether_log)
    assert (record.method, record.path, record.status) == ("GET", "/healthcheck", 200)  # type: ignore[attr-defined]
