"""Real clients drive the legacy actions against the real `tether serve` process.

openstacksdk's block_storage proxy and python-cinderclient's library each walk Nova's classic attach and
detach, the way back (unreserve, roll back a detach), an admin reset and the errors they must raise;
after every call the test reads the server's view over plain HTTP.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cinderclient import client as cinder_client
from cinderclient import exceptions as cinder_exceptions
from cinderclient.contrib.noauth import CinderNoAuthPlugin
from keystoneauth1 import session as ks_session
from openstack import connection
from openstack import exceptions as sdk_exceptions

from tests.conftest import Server

# the SDK's own deprecations (influxdb, _compute_attributes, …) say nothing about Tether
pytestmark = pytest.mark.filterwarnings("ignore:::openstack")

IQN_PREFIX = "iqn.2010-10.org.openstack:volume-"
CONNECTOR = {
    "initiator": "iqn.1993-08.org.debian:01:compute-1",
    "ip": "192.0.2.10",
    "host": "compute-1",
    "platform": "x86_64",
    "os_type": "linux",
    "multipath": False,
}


class View:
    """The server's view of one project, over plain HTTP."""

    def __init__(self, server: Server, project: str) -> None:
        self.http = httpx.Client(
            base_url=f"{server.endpoint}/{project}",
            headers={"X-Auth-Token": f"alice:{project}", "OpenStack-API-Version": "volume 3.71"},
            timeout=10,
        )

    def close(self) -> None:
        self.http.close()

    def volume(self, volume_id: str) -> dict[str, Any]:
        response = self.http.get(f"/volumes/{volume_id}")
        assert response.status_code == 200, response.text
        return response.json()["volume"]  # type: ignore[no-any-return]

    def attachments(self, volume_id: str) -> list[tuple[str, str | None]]:
        response = self.http.get("/attachments", params={"volume_id": volume_id})
        assert response.status_code == 200, response.text
        return [(a["status"], a["instance"]) for a in response.json()["attachments"]]

    def state(self, volume_id: str) -> tuple[str, list[tuple[str, str | None]]]:
        return self.volume(volume_id)["status"], self.attachments(volume_id)

    def attachment(self, volume_id: str) -> dict[str, Any]:
        response = self.http.get("/attachments/detail", params={"volume_id": volume_id})
        assert response.status_code == 200, response.text
        (only,) = response.json()["attachments"]
        return only  # type: ignore[no-any-return]

    def wait_for(self, volume_id: str, status: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            response = self.http.get(f"/volumes/{volume_id}")
            current = response.json()["volume"]["status"] if response.status_code == 200 else response.status_code
            if current == status:
                return
            time.sleep(0.05)
        raise AssertionError(f"volume {volume_id} did not become {status}")

    def wait_gone(self, volume_id: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.http.get(f"/volumes/{volume_id}").status_code == 404:
                return
            time.sleep(0.05)
        raise AssertionError(f"volume {volume_id} was not deleted")


@pytest.fixture
def project() -> str:
    return f"p{uuid.uuid4().hex[:12]}"


@pytest.fixture
def view(server: Server, project: str) -> Iterator[View]:
    seen = View(server, project)
    yield seen
    seen.close()


def sdk(server: Server, user: str, project: str) -> Any:
    """openstacksdk without Keystone: the endpoint is the server root; versions are discovered from it."""
    conn = connection.Connection(
        auth_type="admin_token",
        auth={"endpoint": server.base, "token": f"{user}:{project}"},
        block_storage_endpoint_override=server.base + "/",
        block_storage_api_version="3",
    )
    return conn.block_storage


def cinder(server: Server, user: str, project: str) -> Any:
    """cinderclient's library with the noauth plugin, as `cinder --os-auth-type noauth` builds it."""
    auth = CinderNoAuthPlugin(user, project, endpoint=server.endpoint)
    return cinder_client.Client("3.71", session=ks_session.Session(auth=auth))


def check_connection_info(info: dict[str, Any], volume_id: str) -> None:
    assert info["driver_volume_type"] == "iscsi"
    assert info["enforce_multipath"] is False
    data = info["data"]
    assert data["target_iqn"] == f"{IQN_PREFIX}{volume_id}"
    assert data["target_portal"] == "127.0.0.1:3260"
    assert data["target_lun"] == 1
    assert data["auth_method"] == "CHAP"
    assert len(data["auth_username"]) == 20
    assert len(data["auth_password"]) == 16
    assert data["access_mode"] == "rw"


def test_openstacksdk_legacy_actions(server: Server, project: str, view: View) -> None:
    bs = sdk(server, "alice", project)
    admin = sdk(server, "admin", project)
    instance = str(uuid.uuid4())

    volume = bs.create_volume(size=1, name="sdk-legacy")
    view.wait_for(volume.id, "available")
    vid = volume.id
    assert view.state(vid) == ("available", [])

    bs.reserve_volume(vid)
    assert view.state(vid) == ("attaching", [("reserved", None)])

    info = bs.init_volume_attachment(vid, CONNECTOR)
    check_connection_info(info, vid)
    assert view.state(vid) == ("attaching", [("attaching", None)])
    assert view.attachment(vid)["connection_info"]["auth_password"] == info["data"]["auth_password"]

    bs.attach_volume(vid, "/dev/vdb", instance=instance)
    assert view.state(vid) == ("in-use", [("attached", instance)])
    (shown,) = view.volume(vid)["attachments"]
    assert (shown["server_id"], shown["device"]) == (instance, "/dev/vdb")
    assert bs.get_volume(vid).status == "in-use"

    with pytest.raises(sdk_exceptions.BadRequestException) as refused:
        bs.reserve_volume(vid)
    assert "in-use" in str(refused.value)
    assert view.state(vid) == ("in-use", [("attached", instance)])

    bs.begin_volume_detaching(vid)
    assert view.state(vid) == ("detaching", [("attached", instance)])
    bs.abort_volume_detaching(vid)
    assert view.state(vid) == ("in-use", [("attached", instance)])

    bs.begin_volume_detaching(vid)
    bs.terminate_volume_attachment(vid, CONNECTOR)
    assert view.state(vid) == ("detaching", [("attached", instance)])
    bs.detach_volume(vid, shown["attachment_id"])
    assert view.state(vid) == ("available", [])
    assert view.volume(vid)["attachments"] == []

    # the way back from a reservation
    bs.reserve_volume(vid)
    assert view.state(vid) == ("attaching", [("reserved", None)])
    bs.unreserve_volume(vid)
    assert view.state(vid) == ("available", [])

    # an admin resets a stuck attach; a member may not
    bs.reserve_volume(vid)
    bs.init_volume_attachment(vid, CONNECTOR)
    bs.attach_volume(vid, "/dev/vdc", instance=instance)
    with pytest.raises(sdk_exceptions.ForbiddenException):
        bs.reset_volume_status(vid, status="available", attach_status="detached")
    assert view.state(vid) == ("in-use", [("attached", instance)])
    admin.reset_volume_status(vid, status="available", attach_status="detached")
    assert view.state(vid) == ("available", [])

    bs.delete_volume(vid)
    view.wait_gone(vid)


def test_cinderclient_legacy_actions(server: Server, project: str, view: View) -> None:
    cs = cinder(server, "alice", project)
    admin = cinder(server, "admin", project)
    instance = str(uuid.uuid4())

    volume = cs.volumes.create(size=1, name="cinderclient-legacy")
    view.wait_for(volume.id, "available")
    vid = volume.id
    assert view.state(vid) == ("available", [])

    cs.volumes.reserve(vid)
    assert view.state(vid) == ("attaching", [("reserved", None)])

    info = cs.volumes.initialize_connection(vid, CONNECTOR)
    check_connection_info(dict(info), vid)
    assert view.state(vid) == ("attaching", [("attaching", None)])

    cs.volumes.attach(vid, instance, "/dev/vdb")
    assert view.state(vid) == ("in-use", [("attached", instance)])
    (shown,) = view.volume(vid)["attachments"]
    assert (shown["server_id"], shown["device"]) == (instance, "/dev/vdb")
    assert cs.volumes.get(vid).status == "in-use"

    with pytest.raises(cinder_exceptions.BadRequest) as refused:
        cs.volumes.reserve(vid)
    assert "in-use" in str(refused.value)

    cs.volumes.begin_detaching(vid)
    assert view.state(vid) == ("detaching", [("attached", instance)])
    cs.volumes.roll_detaching(vid)
    assert view.state(vid) == ("in-use", [("attached", instance)])

    cs.volumes.begin_detaching(vid)
    cs.volumes.terminate_connection(vid, CONNECTOR)
    assert view.state(vid) == ("detaching", [("attached", instance)])
    cs.volumes.detach(vid)  # no attachment named: the only one
    assert view.state(vid) == ("available", [])

    # Nova's failed attach: reserve, connect, then terminate and unreserve leave nothing behind
    cs.volumes.reserve(vid)
    cs.volumes.initialize_connection(vid, CONNECTOR)
    cs.volumes.terminate_connection(vid, CONNECTOR)
    cs.volumes.unreserve(vid)
    assert view.state(vid) == ("available", [])

    cs.volumes.reserve(vid)
    cs.volumes.initialize_connection(vid, CONNECTOR)
    cs.volumes.attach(vid, instance, "/dev/vdc")
    with pytest.raises(cinder_exceptions.Forbidden):
        cs.volumes.reset_state(vid, "available", attach_status="detached")
    assert view.state(vid) == ("in-use", [("attached", instance)])
    admin.volumes.reset_state(vid, "available", attach_status="detached")
    assert view.state(vid) == ("available", [])

    with pytest.raises(cinder_exceptions.NotFound):
        cinder(server, "mallory", f"other-{uuid.uuid4().hex[:8]}").volumes.reserve(vid)
    assert view.state(vid) == ("available", [])

    cs.volumes.delete(vid)
    view.wait_gone(vid)
