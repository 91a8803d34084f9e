"""python-cinderclient's CLI, unmodified, against the real `tether serve` process."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import IN_CI, Server, start_server, stop_server

CINDER = Path(sys.executable).parent / "cinder"

# a missing cinderclient is a failure in CI (it is in the test extra), a skip elsewhere
pytestmark = pytest.mark.skipif(not CINDER.exists() and not IN_CI, reason="python-cinderclient is not installed")


class Cinder:
    """One user in one project running the `cinder` command against a server."""

    def __init__(self, server: Server, user: str, project: str, version: str | None = "3.71") -> None:
        self.server = server
        self.user = user
        self.project = project
        self.version = version

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [
            str(CINDER),
            "--os-auth-type",
            "noauth",
            "--os-user-id",
            self.user,
            "--os-project-id",
            self.project,
            "--os-endpoint",
            self.server.endpoint,
        ]
        if self.version is not None:
            argv += ["--os-volume-api-version", self.version]
        result = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60, check=False)
        if check:
            assert result.returncode == 0, f"cinder {' '.join(args)}: {result.stdout}\n{result.stderr}"
        return result

    def table(self, *args: str) -> list[dict[str, str]]:
        return parse_table(self.run(*args).stdout)

    def properties(self, *args: str) -> dict[str, str]:
        return {row["Property"]: row["Value"] for row in self.table(*args)}

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"X-Auth-Token": f"{self.user}:{self.project}", "OpenStack-API-Version": "volume 3.71"}
        return httpx.request(method, f"{self.server.endpoint}/{self.project}{path}", headers=headers, timeout=10, **kw)

    def wait_for(self, volume_id: str, *, gone: bool = False, status: str = "available") -> dict[str, Any]:
        for _ in range(100):
            response = self.api("GET", f"/volumes/{volume_id}")
            if gone and response.status_code == 404:
                return {}
            if not gone and response.json()["volume"]["status"] == status:
                return response.json()["volume"]  # type: ignore[no-any-return]
            time.sleep(0.05)
        raise AssertionError(f"volume {volume_id} never became {'gone' if gone else status}")


def parse_table(output: str) -> list[dict[str, str]]:
    """The rows of the first prettytable in the output, as dicts keyed by the header."""
    lines = [line for line in output.splitlines() if line.startswith("|")]
    assert lines, f"no table in {output!r}"
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, [cell.strip() for cell in line.strip("|").split("|")], strict=True)) for line in lines[1:]]


def project() -> str:
    return f"p{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module: every test works in projects of its own."""
    running = start_server(tmp_path_factory.mktemp("cinderclient"))
    yield running
    stop_server(running)


def create(cinder: Cinder, name: str, size: int = 1, **fields: Any) -> str:
    """Set-up through the API (each CLI call costs a Python start-up)."""
    response = cinder.api("POST", "/volumes", json={"volume": {"size": size, "name": name, **fields}})
    assert response.status_code == 202, response.text
    volume_id: str = response.json()["volume"]["id"]
    cinder.wait_for(volume_id)
    return volume_id


@pytest.mark.parametrize("version", ["3.71", None])
def test_create_list_show_delete(shared_server: Server, version: str | None) -> None:
    cinder = Cinder(shared_server, "alice", project(), version)

    created = cinder.properties(
        "create", "--name", "first", "--description", "from the CLI", "--metadata", "k=v", "--hint", "a=b", "2"
    )
    volume_id = created["id"]
    assert created["name"] == "first"
    assert created["size"] == "2"
    assert created["os-vol-tenant-attr:tenant_id"] == cinder.project
    assert created["user_id"] == "alice"
    cinder.wait_for(volume_id)

    rows = cinder.table("list")
    assert [(r["ID"], r["Status"], r["Name"], r["Size"]) for r in rows] == [(volume_id, "available", "first", "2")]
    assert rows[0]["Volume Type"] == "__DEFAULT__"

    shown = cinder.properties("show", "first")
    assert shown["id"] == volume_id
    assert shown["status"] == "available"
    assert shown["description"] == "from the CLI"
    assert shown["metadata"] == "k : v"
    # without --os-volume-api-version the client negotiates 3.71 from GET /: the newest fields are there
    assert shown["volume_type_id"]
    assert shown["consumes_quota"] == "True"

    api_view = cinder.api("GET", f"/volumes/{volume_id}").json()["volume"]
    assert (api_view["name"], api_view["description"], api_view["size"]) == ("first", "from the CLI", 2)
    assert api_view["metadata"] == {"k": "v"}

    deleted = cinder.run("delete", volume_id)
    assert f"Request to delete volume {volume_id} has been accepted." in deleted.stdout
    cinder.wait_for(volume_id, gone=True)
    assert cinder.api("GET", "/volumes").json() == {"volumes": []}


def test_list_filters_sort_and_count(shared_server: Server) -> None:
    cinder = Cinder(shared_server, "alice", project())
    for name, size, tier in (("a", 1, "gold"), ("b", 3, "silver"), ("c", 2, "gold")):
        create(cinder, name, size, metadata={"tier": tier})

    assert [r["Name"] for r in cinder.table("list", "--name", "b")] == ["b"]
    assert sorted(r["Name"] for r in cinder.table("list", "--metadata", "tier=gold")) == ["a", "c"]
    assert [r["Name"] for r in cinder.table("list", "--status", "available", "--sort", "size:asc")] == ["a", "c", "b"]
    assert [r["Name"] for r in cinder.table("list", "--sort", "name:desc", "--limit", "2")] == ["c", "b"]
    assert "Volume in total: 3" in cinder.run("list", "--with-count").stdout


def test_projects_and_admin(shared_server: Server) -> None:
    alice = Cinder(shared_server, "alice", project())
    bob = Cinder(shared_server, "bob", project())
    admin = Cinder(shared_server, "admin", project())
    volume_id = create(alice, "alices")

    assert bob.table("list") == []
    refused = bob.run("delete", volume_id, check=False)
    assert refused.returncode != 0
    assert "No volume with a name or ID" in refused.stdout + refused.stderr
    assert alice.api("GET", f"/volumes/{volume_id}").json()["volume"]["status"] == "available"

    everyone = admin.table("list", "--all-tenants", "--name", "alices")
    assert (volume_id, alice.project) in [(r["ID"], r["Tenant ID"]) for r in everyone]
    assert admin.properties("show", volume_id)["os-vol-host-attr:host"]


def test_multiattach_type(shared_server: Server) -> None:
    admin = Cinder(shared_server, "admin", project())
    alice = Cinder(shared_server, "alice", project())
    name = f"multi-{uuid.uuid4().hex[:8]}"
    admin.run("type-create", name)
    admin.run("type-key", name, "set", "multiattach=<is> True")
    specs = admin.api("GET", "/types").json()["volume_types"]
    assert next(t for t in specs if t["name"] == name)["extra_specs"] == {"multiattach": "<is> True"}

    created = alice.properties("create", "--volume-type", name, "1")
    assert created["multiattach"] == "True"
    assert created["volume_type"] == name
    assert alice.wait_for(created["id"])["multiattach"] is True

    refused = alice.run("type-create", f"{name}-2", check=False)
    assert refused.returncode != 0
    assert "HTTP 403" in refused.stderr


def test_errors_reach_the_cli(shared_server: Server) -> None:
    cinder = Cinder(shared_server, "alice", project())
    failed = cinder.run("create", "--volume-type", "no-such-type", "1", check=False)
    assert failed.returncode != 0
    assert "no-such-type" in failed.stderr
    assert "HTTP 404" in failed.stderr
    assert cinder.api("GET", "/volumes").json() == {"volumes": []}


@pytest.mark.parametrize("version", ["3.71", "3.0"])
def test_metadata_set_show_update_all_unset(shared_server: Server, version: str) -> None:
    # the microversion changes the CLI's unset: a DELETE per key before 3.15, from 3.15 on a GET then a PUT of the rest
    cinder = Cinder(shared_server, "alice", project(), version)
    volume_id = create(cinder, "labelled", metadata={"keep": "me"})
    node = "ironic_node_1be26c0b-03f2-4d2e-ae87-c02d7f33c123"

    cinder.run("metadata", volume_id, "set", f"{node}=attached", "role=boot")
    shown = {row["Metadata-property"]: row["Value"] for row in cinder.table("metadata-show", volume_id)}
    assert shown == {"keep": "me", node: "attached", "role": "boot"}

    cinder.run("metadata", volume_id, "unset", node, "role")
    assert cinder.api("GET", f"/volumes/{volume_id}/metadata").json() == {"metadata": {"keep": "me"}}

    replaced = cinder.table("metadata-update-all", volume_id, "only=this")
    assert {row["Metadata-property"]: row["Value"] for row in replaced} == {"only": "this"}
    assert cinder.wait_for(volume_id)["metadata"] == {"only": "this"}
