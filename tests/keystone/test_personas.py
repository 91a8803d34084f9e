"""Cinder's personas through real Keystone tokens (SPEC 11): a member, a reader, another project, an admin, Nova.

Every caller here holds a token Keystone issued; the policy is Cinder's defaults unless a test loads a file.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from tests.api.attaching import connector, initiator
from tests.conftest import fault
from tests.keystone.callers import Caller
from tests.keystone.keystone import Cloud

SERVER = "0b1c6a39-3f0e-4e53-9d4c-6f9bb1f1c0de"


def acls(app: Any, volume_id: str) -> set[str] | None:
    """The fake target's ACLs of the volume (None: not exported)."""
    export = app.state.backends.target.targets.get(volume_id)
    return None if export is None else set(export.acls)


@pytest.fixture
def alice(kclient: httpx.AsyncClient, cloud: Cloud) -> Caller:
    return Caller(kclient, cloud.users["alice"])


@pytest.fixture
def rita(kclient: httpx.AsyncClient, cloud: Cloud) -> Caller:
    return Caller(kclient, cloud.users["rita"])


@pytest.fixture
def bob(kclient: httpx.AsyncClient, cloud: Cloud) -> Caller:
    return Caller(kclient, cloud.users["bob"])


@pytest.fixture
def admin(kclient: httpx.AsyncClient, cloud: Cloud) -> Caller:
    return Caller(kclient, cloud.users["admin"])


async def test_a_member_attaches_and_nova_detaches(alice: Caller, keystone_app: Any, cloud: Cloud) -> None:
    volume = await alice.create_volume(keystone_app)
    attachment = await alice.attach(volume["id"], instance=SERVER)
    assert attachment["status"] == "attached"
    assert attachment["connection_info"]["target_iqn"].endswith(volume["id"])
    assert acls(keystone_app, volume["id"]) == {initiator("compute1")}
    shown = (await alice.get(f"/volumes/{volume['id']}")).json()["volume"]
    assert shown["status"] == "in-use"
    assert [a["server_id"] for a in shown["attachments"]] == [SERVER]
    assert shown["attachments"][0]["host_name"] is None  # a member is not shown hosts
    listed = await alice.get(f"/attachments/detail?volume_id={volume['id']}")
    assert [a["id"] for a in listed.json()["attachments"]] == [attachment["id"]]
    # the detach comes from Nova: the user's token and Nova's service token
    nova = alice.with_service(cloud.users["nova"].token)
    deleted = await nova.delete(f"/attachments/{attachment['id']}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"attachments": []}
    assert acls(keystone_app, volume["id"]) is None
    assert (await alice.get(f"/volumes/{volume['id']}")).json()["volume"]["status"] == "available"
    assert (await alice.delete(f"/volumes/{volume['id']}")).status_code == 202


async def test_a_member_runs_the_legacy_attach_and_nova_the_legacy_detach(
    alice: Caller, keystone_app: Any, cloud: Cloud
) -> None:
    volume = await alice.create_volume(keystone_app)
    vid = volume["id"]
    assert (await alice.action(vid, "os-reserve")).status_code == 202
    info = await alice.action(vid, "os-initialize_connection", {"connector": connector("compute2")})
    assert info.status_code == 200, info.text
    attached = await alice.action(vid, "os-attach", {"instance_uuid": SERVER, "mountpoint": "/dev/vdb"})
    assert attached.status_code == 202
    assert (await alice.action(vid, "os-begin_detaching")).status_code == 202
    # the server uses it: the user alone may neither end the connection nor detach it
    terminate = await alice.action(vid, "os-terminate_connection", {"connector": connector("compute2")})
    assert "using the Compute API" in fault(terminate, 409)
    fault(await alice.action(vid, "os-detach"), 409)
    assert acls(keystone_app, vid) == {initiator("compute2")}
    nova = alice.with_service(cloud.users["nova"].token)
    assert (await nova.action(vid, "os-terminate_connection", {"connector": connector("compute2")})).status_code == 202
    assert (await nova.action(vid, "os-detach")).status_code == 202
    assert acls(keystone_app, vid) is None
    assert (await alice.get(f"/volumes/{vid}")).json()["volume"]["status"] == "available"


async def test_safe_detach_refuses_users_and_admins_and_changes_nothing(
    alice: Caller, admin: Caller, keystone_app: Any, cloud: Cloud
) -> None:
    volume = await alice.create_volume(keystone_app)
    attachment = await alice.attach(volume["id"], instance=SERVER)
    before = (await alice.get(f"/attachments/{attachment['id']}")).json()
    for caller in (alice, admin):
        refused = await caller.delete(f"/attachments/{attachment['id']}")
        assert fault(refused, 409) == f"Detach volume from instance {SERVER} using the Compute API"
    # nothing changed: the attachment, the volume's status and the target's ACL
    assert (await alice.get(f"/attachments/{attachment['id']}")).json() == before
    assert (await alice.get(f"/volumes/{volume['id']}")).json()["volume"]["status"] == "in-use"
    assert acls(keystone_app, volume["id"]) == {initiator("compute1")}
    # os-force_detach (an admin's) is not guarded
    forced = await admin.action(volume["id"], "os-force_detach", {"attachment_id": attachment["id"]})
    assert forced.status_code == 202, forced.text
    assert acls(keystone_app, volume["id"]) is None


async def test_safe_detach_spares_what_no_server_uses(alice: Caller, keystone_app: Any) -> None:
    volume = await alice.create_volume(keystone_app)
    # a reservation (no connection) and a bare-metal host's attachment (no instance) are the user's to delete
    reserved = await alice.post("/attachments", {"attachment": {"volume_uuid": volume["id"], "instance_uuid": SERVER}})
    assert (await alice.delete(f"/attachments/{reserved.json()['attachment']['id']}")).status_code == 200
    metal = await alice.attach(volume["id"])
    assert (await alice.delete(f"/attachments/{metal['id']}")).status_code == 200


async def test_a_reader_reads_and_every_write_is_403(
    alice: Caller, rita: Caller, keystone_app: Any, cloud: Cloud
) -> None:
    volume = await alice.create_volume(keystone_app)
    vid = volume["id"]
    assert (await alice.post(f"/volumes/{vid}/metadata", {"metadata": {"k": "v"}})).status_code == 200
    attachment = await alice.attach(vid, instance=SERVER)
    aid = attachment["id"]
    for path in (
        "/volumes",
        "/volumes/detail",
        f"/volumes/{vid}",
        f"/volumes/{vid}/metadata",
        f"/volumes/{vid}/metadata/k",
        "/attachments",
        "/attachments/detail",
        f"/attachments/{aid}",
        "/types",
        "/types/default",
    ):
        response = await rita.get(path)
        assert response.status_code == 200, f"{path}: {response.text}"
    assert (await rita.get(f"/volumes/{vid}")).json()["volume"]["id"] == vid
    writes = [
        rita.post("/volumes", {"volume": {"size": 1}}),
        rita.put(f"/volumes/{vid}", {"volume": {"name": "mine"}}),
        rita.delete(f"/volumes/{vid}"),
        rita.post(f"/volumes/{vid}/metadata", {"metadata": {"a": "b"}}),
        rita.put(f"/volumes/{vid}/metadata", {"metadata": {"a": "b"}}),
        rita.put(f"/volumes/{vid}/metadata/k", {"meta": {"k": "w"}}),
        rita.delete(f"/volumes/{vid}/metadata/k"),
        rita.post("/attachments", {"attachment": {"volume_uuid": vid}}),
        rita.put(f"/attachments/{aid}", {"attachment": {"connector": connector("h9")}}),
        rita.post(f"/attachments/{aid}/action", {"os-complete": None}),
        rita.delete(f"/attachments/{aid}"),
        rita.post("/types", {"volume_type": {"name": f"t-{uuid.uuid4().hex[:6]}"}}),
    ]
    writes += [
        rita.action(vid, action, value)
        for action, value in (
            ("os-reserve", None),
            ("os-unreserve", None),
            ("os-initialize_connection", {"connector": connector("h9")}),
            ("os-attach", {"instance_uuid": SERVER}),
            ("os-begin_detaching", None),
            ("os-roll_detaching", None),
            ("os-terminate_connection", {"connector": connector("h9")}),
            ("os-detach", None),
            ("os-force_detach", None),
            ("os-reset_status", {"status": "error"}),
        )
    ]
    for write in writes:
        fault(await write, 403)
    # and nothing changed
    shown = (await alice.get(f"/volumes/{vid}")).json()["volume"]
    assert (shown["status"], shown["name"], shown["metadata"]) == ("in-use", volume["name"], {"k": "v"})
    assert (await alice.get(f"/attachments/{aid}")).json()["attachment"]["status"] == "attached"


async def test_another_projects_resources_are_404_to_members_and_readers(
    alice: Caller, bob: Caller, kclient: httpx.AsyncClient, keystone_app: Any, cloud: Cloud
) -> None:
    volume = await alice.create_volume(keystone_app)
    vid = volume["id"]
    attachment = await alice.attach(vid)
    aid = attachment["id"]
    # a member and a reader of another project: 404 before any 403, as if nothing were there
    for caller in (bob, Caller(kclient, cloud.users["olga"])):
        for request in (
            caller.get(f"/volumes/{vid}"),
            caller.put(f"/volumes/{vid}", {"volume": {"name": "x"}}),
            caller.delete(f"/volumes/{vid}"),
            caller.get(f"/volumes/{vid}/metadata"),
            caller.post(f"/volumes/{vid}/metadata", {"metadata": {"a": "b"}}),
            caller.action(vid, "os-reserve"),
            caller.action(vid, "os-reset_status", {"status": "error"}),
            caller.post("/attachments", {"attachment": {"volume_uuid": vid}}),
            caller.get(f"/attachments/{aid}"),
            caller.put(f"/attachments/{aid}", {"attachment": {"connector": connector("h2")}}),
            caller.post(f"/attachments/{aid}/action", {"os-complete": None}),
            caller.delete(f"/attachments/{aid}"),
        ):
            fault(await request, 404)
        listed = (await caller.get("/volumes?all_tenants=1")).json()["volumes"]
        assert vid not in {v["id"] for v in listed}
    assert acls(keystone_app, vid) == {initiator("compute1")}


async def test_admin_only_actions_are_403_to_members_and_work_for_admins(
    alice: Caller, admin: Caller, keystone_app: Any
) -> None:
    volume = await alice.create_volume(keystone_app)
    vid = volume["id"]
    type_body = {"volume_type": {"name": f"t-{uuid.uuid4().hex[:6]}"}}
    for request in (
        alice.action(vid, "os-reset_status", {"status": "error"}),
        alice.action(vid, "os-force_detach"),
        alice.delete(f"/volumes/{vid}?force=true"),
        alice.post("/types", type_body),
        alice.get("/scheduler-stats/get_pools"),
    ):
        fault(await request, 403)
    assert "os-vol-host-attr:host" not in (await alice.get(f"/volumes/{vid}")).json()["volume"]
    # the admin reaches the member's volume by id through its own project's URL, and lists every project's
    as_admin = (await admin.get(f"/volumes/{vid}")).json()["volume"]
    assert as_admin["os-vol-host-attr:host"]
    assert "migration_status" in as_admin
    listed = (await admin.get("/volumes?all_tenants=1")).json()["volumes"]
    assert vid in {v["id"] for v in listed}
    assert (await admin.post("/types", type_body)).status_code == 200
    assert (await admin.get("/scheduler-stats/get_pools")).status_code == 200
    assert (await admin.action(vid, "os-reset_status", {"status": "error"})).status_code == 202
    assert (await admin.delete(f"/volumes/{vid}?force=true")).status_code == 202
