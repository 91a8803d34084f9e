"""python-cinderclient's attachment-* commands, unmodified, against the real `tether serve` process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server

CINDER = Path(sys.executable).parent / "cinder"
IQN = "iqn.1993-08.org.debian:01:cli-host"
ROW = re.compile(r"^\|\s*(.*?)\s*\|\s*(.*?)\s*\|$")


@pytest.fixture
def project() -> str:
    return f"cli{uuid.uuid4().hex[:10]}"


def cinder(server: Server, project: str, *args: str, version: str = "3.54") -> subprocess.CompletedProcess[str]:
    argv = [
        str(CINDER),
        "--os-auth-type",
        "noauth",
        "--os-user-id",
        "cli-user",
        "--os-project-id",
        project,
        "--os-endpoint",
        server.endpoint,
        "--os-volume-api-version",
        version,
        *args,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OS_", "CINDER_"))}
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def properties(output: str) -> dict[str, str]:
    """Every `| key | value |` row of the Property/Value tables cinderclient prints."""
    rows = {}
    for line in output.splitlines():
        match = ROW.match(line.strip())
        if match and match.group(1) != "Property":
            rows[match.group(1)] = match.group(2)
    return rows


def table(output: str) -> list[dict[str, str]]:
    """The rows of a list table, keyed by its header."""
    lines = [line for line in output.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[1:]]


class Rest:
    """The same server, asked directly, to check what the CLI did."""

    def __init__(self, server: Server, project: str) -> None:
        self.base = f"{server.endpoint}/{project}"
        self.headers = {"X-Auth-Token": f"cli-user:{project}", "OpenStack-API-Version": "volume 3.71"}

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.base}{path}", headers=self.headers, timeout=30)

    def volume(self, volume_id: str) -> dict[str, Any]:
        response = self.get(f"/volumes/{volume_id}")
        assert response.status_code == 200, response.text
        return response.json()["volume"]  # type: ignore[no-any-return]

    def attachment(self, attachment_id: str) -> dict[str, Any]:
        response = self.get(f"/attachments/{attachment_id}")
        assert response.status_code == 200, response.text
        return response.json()["attachment"]  # type: ignore[no-any-return]

    def create_volume(self, multiattach_type: str | None = None) -> str:
        body: dict[str, Any] = {"size": 1}
        if multiattach_type:
            body["volume_type"] = multiattach_type
        response = httpx.post(f"{self.base}/volumes", json={"volume": body}, headers=self.headers, timeout=30)
        assert response.status_code == 202, response.text
        volume_id = str(response.json()["volume"]["id"])
        deadline = time.monotonic() + 30
        while self.volume(volume_id)["status"] != "available":
            assert time.monotonic() < deadline, self.volume(volume_id)
            time.sleep(0.05)
        return volume_id


@pytest.fixture
def rest(server: Server, project: str) -> Rest:
    return Rest(server, project)


def test_reserve_show_list_delete(server: Server, project: str, rest: Rest) -> None:
    volume_id = rest.create_volume()
    instance = str(uuid.uuid4())

    created = properties(ok(cinder(server, project, "attachment-create", volume_id, instance)))

    assert created["status"] == "reserved"
    assert created["instance"] == instance
    assert created["volume_id"] == volume_id
    assert created["attach_mode"] == "null"
    attachment_id = created["id"]
    assert rest.attachment(attachment_id)["status"] == "reserved"
    assert rest.volume(volume_id)["status"] == "reserved"

    shown = properties(ok(cinder(server, project, "attachment-show", attachment_id)))
    assert shown["id"] == attachment_id
    assert shown["status"] == "reserved"
    assert shown["attached_at"] == ""

    (row,) = table(ok(cinder(server, project, "attachment-list")))
    assert row == {"ID": attachment_id, "Volume ID": volume_id, "Status": "reserved", "Server ID": instance}
    assert table(ok(cinder(server, project, "attachment-list", "--volume-id", volume_id)))[0]["ID"] == attachment_id
    assert table(ok(cinder(server, project, "attachment-list", "--filters", "status=reserved")))[0]["ID"] == (
        attachment_id
    )
    assert table(ok(cinder(server, project, "attachment-list", "--filters", "status=attached"))) == []

    ok(cinder(server, project, "attachment-delete", attachment_id))

    assert rest.get(f"/attachments/{attachment_id}").status_code == 404
    assert rest.volume(volume_id)["status"] == "available"
    assert table(ok(cinder(server, project, "attachment-list"))) == []


def test_connect_complete_delete(server: Server, project: str, rest: Rest) -> None:
    volume_id = rest.create_volume()
    instance = str(uuid.uuid4())

    output = ok(
        cinder(
            server,
            project,
            "attachment-create",
            volume_id,
            instance,
            "--connect",
            "True",
            "--initiator",
            IQN,
            "--ip",
            "127.0.0.1",
            "--host",
            "h1",
        )
    )

    created = properties(output)
    attachment_id = created["id"]
    assert created["status"] == "attaching"
    assert created["attach_mode"] == "rw"
    # the second table is the connection_info
    assert created["driver_volume_type"] == "iscsi"
    assert created["target_iqn"] == f"iqn.2010-10.org.openstack:volume-{volume_id}"
    assert created["target_portal"] == "127.0.0.1:3260"
    assert created["auth_method"] == "CHAP"
    assert created["attachment_id"] == attachment_id
    assert created["volume_id"] == volume_id
    api_view = rest.attachment(attachment_id)
    assert api_view["status"] == "attaching"
    assert api_view["connection_info"]["auth_password"] == created["auth_password"]
    assert rest.volume(volume_id)["status"] == "attaching"

    ok(cinder(server, project, "attachment-complete", attachment_id))

    assert rest.attachment(attachment_id)["status"] == "attached"
    volume = rest.volume(volume_id)
    assert volume["status"] == "in-use"
    assert [(a["attachment_id"], a["server_id"]) for a in volume["attachments"]] == [(attachment_id, instance)]
    assert properties(ok(cinder(server, project, "attachment-show", attachment_id)))["status"] == "attached"
    (row,) = table(ok(cinder(server, project, "attachment-list", "--filters", "status=attached")))
    assert row["ID"] == attachment_id

    ok(cinder(server, project, "attachment-delete", attachment_id))

    assert rest.get(f"/attachments/{attachment_id}").status_code == 404
    volume = rest.volume(volume_id)
    assert volume["status"] == "available"
    assert volume["attachments"] == []


def test_update_then_complete(server: Server, project: str, rest: Rest) -> None:
    volume_id = rest.create_volume()
    attachment_id = properties(ok(cinder(server, project, "attachment-create", volume_id)))["id"]

    updated = properties(
        ok(cinder(server, project, "attachment-update", attachment_id, "--initiator", IQN, "--host", "h2"))
    )

    assert updated["id"] == attachment_id
    assert updated["status"] == "attaching"
    assert rest.attachment(attachment_id)["connection_info"]["attachment_id"] == attachment_id
    ok(cinder(server, project, "attachment-complete", attachment_id))
    assert rest.volume(volume_id)["status"] == "in-use"
    ok(cinder(server, project, "attachment-delete", attachment_id))
    assert rest.volume(volume_id)["status"] == "available"


def test_mode_and_multipath(server: Server, project: str, rest: Rest) -> None:
    volume_id = rest.create_volume()

    output = ok(
        cinder(
            server,
            project,
            "attachment-create",
            volume_id,
            "--mode",
            "ro",
            "--connect",
            "true",
            "--initiator",
            IQN,
            "--multipath",
            "True",
        )
    )

    created = properties(output)
    assert created["attach_mode"] == "ro"
    assert created["access_mode"] == "ro"
    info = rest.attachment(created["id"])["connection_info"]
    assert info["target_iqns"] == [info["target_iqn"]]
    assert info["target_portals"] == [info["target_portal"]]


def test_errors_reach_the_user(server: Server, project: str, rest: Rest) -> None:
    volume_id = rest.create_volume()
    first = properties(ok(cinder(server, project, "attachment-create", volume_id, str(uuid.uuid4()))))

    refused = cinder(server, project, "attachment-create", volume_id, str(uuid.uuid4()))
    assert refused.returncode != 0
    assert f"Volume {volume_id} status must be available to reserve" in refused.stderr
    assert "(HTTP 400)" in refused.stderr

    ok(cinder(server, project, "attachment-delete", first["id"]))
    bad = cinder(server, project, "attachment-create", volume_id, "--connect", "True", "--initiator", "iqn.x;reboot")
    assert bad.returncode != 0
    assert "connector.initiator" in bad.stderr
    assert rest.volume(volume_id)["status"] == "available"

    missing = cinder(server, project, "attachment-show", str(uuid.uuid4()))
    assert missing.returncode != 0
    assert "(HTTP 404)" in missing.stderr

    # os-complete does not exist before 3.44: the client will not even send it
    attachment_id = properties(ok(cinder(server, project, "attachment-create", volume_id)))["id"]
    too_old = cinder(server, project, "attachment-complete", attachment_id, version="3.43")
    assert too_old.returncode != 0
    assert "invalid choice: 'attachment-complete'" in too_old.stderr
    assert rest.attachment(attachment_id)["status"] == "reserved"
    # and completing a reservation that never connected is refused by the server
    refused = cinder(server, project, "attachment-complete", attachment_id)
    assert refused.returncode != 0
    assert "(HTTP 400)" in refused.stderr
    assert rest.attachment(attachment_id)["status"] == "reserved"
