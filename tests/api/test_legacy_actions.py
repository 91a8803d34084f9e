"""Legacy volume actions (SPEC §6): the classic Nova sequences, every failure branch, multiattach, dispatch.

After each step the test checks what a user can see: the response, the volume's status (and its stored
attach_status, which the API does not show), the attachments `GET /attachments` lists, and what the
fake iSCSI target really has (export, ACLs).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlmodel import col, select

from app.backends.targets.fake import FakeTarget
from app.db.models import Volume
from tests.api import attaching
from tests.api.attaching import initiator
from tests.conftest import Api, fault

IQN_PREFIX = "iqn.2010-10.org.openstack:volume-"
PORTAL = "127.0.0.1:3260"


def connector(host: str = "compute-1", **extra: Any) -> dict[str, Any]:
    """What Nova (through os-brick) sends for an iSCSI compute host."""
    return attaching.connector(host, **extra)


def new_uuid() -> str:
    return str(uuid.uuid4())


def target(api: Api) -> FakeTarget:
    found = api.app.state.backends.target
    assert isinstance(found, FakeTarget)
    return found


@dataclass(frozen=True)
class Seen:
    """Everything a user (and the storage host) can observe about one volume."""

    status: str
    attach_status: str
    attachments: tuple[tuple[str, str | None], ...] = ()  # (status, instance) as GET /attachments lists them
    acls: frozenset[str] = frozenset()
    exported: bool = False


def seen_as(
    status: str,
    attach_status: str,
    attachments: Sequence[tuple[str, str | None]] = (),
    acls: set[str] | None = None,
    *,
    exported: bool = False,
) -> Seen:
    return Seen(status, attach_status, tuple(sorted(attachments, key=_order)), frozenset(acls or ()), exported)


def _order(item: tuple[str, str | None]) -> tuple[str, str]:
    return item[0], item[1] or ""


async def stored_attach_status(api: Api, volume_id: str) -> str:
    async with api.app.state.db.read() as session:
        return str(await session.scalar(select(col(Volume.attach_status)).where(col(Volume.id) == volume_id)))


async def attachments_of(api: Api, volume_id: str) -> list[dict[str, Any]]:
    response = await api.get(f"/attachments?volume_id={volume_id}")
    assert response.status_code == 200, response.text
    return response.json()["attachments"]  # type: ignore[no-any-return]


async def seen(api: Api, volume_id: str) -> Seen:
    volume = await api.volume(volume_id)
    listed = await attachments_of(api, volume_id)
    assert all(a["volume_id"] == volume_id for a in listed)
    return seen_as(
        volume["status"],
        await stored_attach_status(api, volume_id),
        [(a["status"], a["instance"]) for a in listed],
        target(api).acls(volume_id),
        exported=volume_id in target(api).targets,
    )


async def act(api: Api, volume_id: str, action: str, value: Any = None) -> httpx.Response:
    return await api.post(f"/volumes/{volume_id}/action", {action: value})


async def accepted(api: Api, volume_id: str, action: str, value: Any = None) -> None:
    response = await act(api, volume_id, action, value)
    assert response.status_code == 202, response.text
    assert response.content == b""


async def initialize(api: Api, volume_id: str, conn: dict[str, Any]) -> dict[str, Any]:
    response = await act(api, volume_id, "os-initialize_connection", {"connector": conn})
    assert response.status_code == 200, response.text
    return response.json()["connection_info"]  # type: ignore[no-any-return]


async def classic_attach(api: Api, volume_id: str, conn: dict[str, Any], instance: str, mountpoint: str) -> None:
    """Nova's legacy attach: reserve, initialize the connection, mark attached."""
    await accepted(api, volume_id, "os-reserve")
    await initialize(api, volume_id, conn)
    await accepted(api, volume_id, "os-attach", {"instance_uuid": instance, "mountpoint": mountpoint})


async def reconcile(api: Api, volume_id: str) -> None:
    """What a worker's start-up (or `tether reconcile`) does to the target, on the running app's backends (the
    database is shared with other tests: only this volume's errors count)."""
    report = await api.app.state.reconciler.run()
    assert not [error for error in report.errors if volume_id in error], report


async def only_attachment_id(api: Api, volume_id: str) -> str:
    (attachment,) = await attachments_of(api, volume_id)
    return str(attachment["id"])


# -- (a) Nova's attach --------------------------------------------------------------------------


async def test_nova_attach_step_by_step(api: Api) -> None:
    volume = await api.create_volume()
    vid = volume["id"]
    instance = new_uuid()
    conn = connector("compute-1")
    assert await seen(api, vid) == seen_as("available", "detached")

    await accepted(api, vid, "os-reserve")
    assert await seen(api, vid) == seen_as("attaching", "attaching", [("reserved", None)])

    response = await act(api, vid, "os-initialize_connection", {"connector": conn})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"connection_info"}
    info = body["connection_info"]
    assert info["driver_volume_type"] == "iscsi"
    assert info["enforce_multipath"] is False
    data = info["data"]
    export = target(api).targets[vid]
    assert data["target_iqn"] == f"{IQN_PREFIX}{vid}" == export.iqn
    assert data["target_portal"] == PORTAL
    assert data["target_lun"] == 1
    assert data["target_discovered"] is False
    assert data["volume_id"] == vid
    assert data["auth_method"] == "CHAP"
    assert (data["auth_username"], data["auth_password"]) == (export.chap.username, export.chap.secret)
    assert len(data["auth_username"]) == 20
    assert len(data["auth_password"]) == 16
    assert data["access_mode"] == "rw"
    assert "target_iqns" not in data  # no multipath asked for
    # the connection does not change the status; the attachment is connected but not yet attached
    assert await seen(api, vid) == seen_as(
        "attaching", "attaching", [("attaching", None)], {conn["initiator"]}, exported=True
    )
    assert (await api.volume(vid))["attachments"] == []

    await accepted(api, vid, "os-attach", {"instance_uuid": instance, "mountpoint": "/dev/vdb"})
    assert await seen(api, vid) == seen_as(
        "in-use", "attached", [("attached", instance)], {conn["initiator"]}, exported=True
    )
    attachment_id = await only_attachment_id(api, vid)
    (shown,) = (await api.volume(vid))["attachments"]
    assert shown["id"] == vid
    assert shown["attachment_id"] == attachment_id
    assert shown["volume_id"] == vid
    assert shown["server_id"] == instance
    assert shown["device"] == "/dev/vdb"
    assert shown["host_name"] is None  # only admins see the host
    assert shown["attached_at"]
    (as_admin,) = (await api.as_(user="admin").volume(vid))["attachments"]
    assert as_admin["host_name"] == "compute-1"

    detail = (await api.get(f"/attachments/{attachment_id}")).json()["attachment"]
    assert detail["status"] == "attached"
    assert detail["instance"] == instance
    assert detail["attach_mode"] == "rw"
    assert detail["connection_info"]["target_iqn"] == data["target_iqn"]
    assert detail["connection_info"]["auth_password"] == data["auth_password"]


async def test_initialize_connection_with_multipath_lists_every_path(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    await accepted(api, vid, "os-reserve")
    data = (await initialize(api, vid, connector("compute-1", multipath=True)))["data"]
    assert data["target_iqns"] == [f"{IQN_PREFIX}{vid}"]
    assert data["target_portals"] == [PORTAL]
    assert data["target_luns"] == [1]


async def test_initialize_connection_without_reserve_reserves_for_nova(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    conn = connector("compute-1")
    data = (await initialize(api, vid, conn))["data"]
    assert data["target_iqn"] == f"{IQN_PREFIX}{vid}"
    assert await seen(api, vid) == seen_as(
        "attaching", "attaching", [("attaching", None)], {conn["initiator"]}, exported=True
    )
    instance = new_uuid()
    await accepted(api, vid, "os-attach", {"instance_uuid": instance, "mountpoint": "/dev/vdc"})
    assert await seen(api, vid) == seen_as(
        "in-use", "attached", [("attached", instance)], {conn["initiator"]}, exported=True
    )


async def test_initialize_connection_again_on_an_attached_volume_keeps_it_attached(api: Api) -> None:
    """Nova re-initializes on a hard reboot: same host, same target, nothing else changes."""
    vid = (await api.create_volume())["id"]
    conn, instance = connector("compute-1"), new_uuid()
    await classic_attach(api, vid, conn, instance, "/dev/vdb")
    before = await seen(api, vid)
    first = target(api).targets[vid].chap

    data = (await initialize(api, vid, conn))["data"]
    assert data["target_iqn"] == f"{IQN_PREFIX}{vid}"
    assert (data["auth_username"], data["auth_password"]) == (first.username, first.secret)
    assert (
        await seen(api, vid)
        == before
        == seen_as("in-use", "attached", [("attached", instance)], {conn["initiator"]}, exported=True)
    )


async def test_live_migration_initializes_the_destination_then_terminates_the_source(api: Api) -> None:
    """Nova's legacy live migration: connect the destination host, then drop the source host's connection."""
    vid = (await api.create_volume())["id"]
    source, destination, instance = connector("compute-1"), connector("compute-2"), new_uuid()
    await classic_attach(api, vid, source, instance, "/dev/vdb")

    data = (await initialize(api, vid, destination))["data"]
    assert data["target_iqn"] == f"{IQN_PREFIX}{vid}"
    # the destination's attachment of the same instance stands beside the source's until one is terminated
    both = seen_as(
        "in-use",
        "attached",
        [("attached", instance), ("attached", instance)],
        {source["initiator"], destination["initiator"]},
        exported=True,
    )
    assert await seen(api, vid) == both
    await reconcile(api, vid)  # reconcile keeps both hosts' access while both attachments live
    assert await seen(api, vid) == both
    await accepted(api, vid, "os-terminate_connection", {"connector": source})
    await reconcile(api, vid)
    assert await seen(api, vid) == seen_as(
        "in-use", "attached", [("attached", instance)], {destination["initiator"]}, exported=True
    )
    # the attachment now follows the destination host: a normal detach there cleans everything
    await accepted(api, vid, "os-begin_detaching")
    await accepted(api, vid, "os-terminate_connection", {"connector": destination})
    await accepted(api, vid, "os-detach", {})
    assert await seen(api, vid) == seen_as("available", "detached", [], set(), exported=False)


async def test_live_migration_rollback_terminates_the_destination(api: Api) -> None:
    """Nova's rollback of a legacy live migration: os-terminate_connection of the destination; the source's
    attachment, ACL and export are exactly as before, and reconcile agrees."""
    vid = (await api.create_volume())["id"]
    source, destination, instance = connector("compute-1"), connector("compute-2"), new_uuid()
    await classic_attach(api, vid, source, instance, "/dev/vdb")
    before = await seen(api, vid)
    (source_attachment,) = await attachments_of(api, vid)

    await initialize(api, vid, destination)
    await accepted(api, vid, "os-terminate_connection", {"connector": destination})

    assert await seen(api, vid) == before
    assert await attachments_of(api, vid) == [source_attachment]
    await reconcile(api, vid)
    assert await seen(api, vid) == before


async def test_reconcile_never_gives_a_terminated_connection_its_access_back(api: Api) -> None:
    """os-begin_detaching + os-terminate_connection, then a reconcile (a worker starting) before os-detach."""
    vid = (await api.create_volume())["id"]
    conn, instance = connector("compute-1"), new_uuid()
    await classic_attach(api, vid, conn, instance, "/dev/vdb")
    await accepted(api, vid, "os-begin_detaching")
    await accepted(api, vid, "os-terminate_connection", {"connector": conn})
    terminated = seen_as("detaching", "attached", [("attached", instance)], set(), exported=True)
    assert await seen(api, vid) == terminated

    await reconcile(api, vid)
    assert await seen(api, vid) == terminated

    # Nova changes its mind (os-roll_detaching) and connects again: the access comes back, and stays
    await accepted(api, vid, "os-roll_detaching")
    await initialize(api, vid, conn)
    await reconcile(api, vid)
    assert await seen(api, vid) == seen_as(
        "in-use", "attached", [("attached", instance)], {conn["initiator"]}, exported=True
    )
    await accepted(api, vid, "os-begin_detaching")
    await accepted(api, vid, "os-terminate_connection", {"connector": conn})
    await accepted(api, vid, "os-detach", {})
    await reconcile(api, vid)
    assert await seen(api, vid) == seen_as("available", "detached", [], set(), exported=False)


async def test_attach_by_host_name_and_read_only(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    await accepted(api, vid, "os-reserve")
    await accepted(api, vid, "os-attach", {"host_name": "baremetal-7", "mountpoint": "/dev/sdb", "mode": "ro"})
    assert await seen(api, vid) == seen_as("in-use", "attached", [("attached", None)])
    attachment_id = await only_attachment_id(api, vid)
    assert (await api.get(f"/attachments/{attachment_id}")).json()["attachment"]["attach_mode"] == "ro"
    (as_admin,) = (await api.as_(user="admin").volume(vid))["attachments"]
    assert (as_admin["host_name"], as_admin["server_id"], as_admin["device"]) == ("baremetal-7", None, "/dev/sdb")


async def test_attach_needs_an_instance_or_a_host_and_a_valid_mode(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    await accepted(api, vid, "os-reserve")
    before = await seen(api, vid)
    message = fault(await act(api, vid, "os-attach", {"mountpoint": "/dev/vdb"}), 400)
    assert "instance_uuid" in message
    assert "host_name" in message
    message = fault(
        await act(api, vid, "os-attach", {"instance_uuid": new_uuid(), "mountpoint": "/dev/vdb", "mode": "rx"}), 400
    )
    assert "mode" in message
    fault(await act(api, vid, "os-attach", {"instance_uuid": 42, "mountpoint": "/dev/vdb"}), 400)
    assert await seen(api, vid) == before


async def test_legacy_actions_exist_at_3_0(api: Api) -> None:
    old = api.as_(version=None)
    vid = (await api.create_volume())["id"]
    response = await act(old, vid, "os-reserve")
    assert response.status_code == 202, response.text
    assert response.headers["OpenStack-API-Version"] == "volume 3.0"
    assert (await initialize(old, vid, connector()))["driver_volume_type"] == "iscsi"
    await accepted(old, vid, "os-attach", {"instance_uuid": new_uuid(), "mountpoint": "/dev/vdb"})
    assert (await api.volume(vid))["status"] == "in-use"


# -- (b) detach ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name_it", [True, False], ids=["attachment_id", "only-attachment"])
async def test_nova_detach_step_by_step(api: Api, name_it: bool) -> None:
    vid = (await api.create_volume())["id"]
    conn, instance = connector("compute-1"), new_uuid()
    await classic_attach(api, vid, conn, instance, "/dev/vdb")
    attachment_id = await only_attachment_id(api, vid)

    await accepted(api, vid, "os-begin_detaching")
    assert await seen(api, vid) == seen_as(
        "detaching", "attached", [("attached", instance)], {conn["initiator"]}, exported=True
    )

    await accepted(api, vid, "os-terminate_connection", {"connector": conn})
    assert await seen(api, vid) == seen_as("detaching", "attached", [("attached", instance)], exported=True)

    # cinderclient sends {"attachment_id": null} when none is named
    await accepted(api, vid, "os-detach", {"attachment_id": attachment_id if name_it else None})
    assert await seen(api, vid) == seen_as("available", "detached")
    assert (await api.volume(vid))["attachments"] == []
    fault(await api.get(f"/attachments/{attachment_id}"), 404)

    # nothing is left behind: the volume can be deleted
    assert (await api.delete(f"/volumes/{vid}")).status_code == 202
    await api.settle()
    fault(await api.get(f"/volumes/{vid}"), 404)


async def test_detach_without_terminate_still_cleans_the_target(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    await classic_attach(api, vid, connector("compute-1"), new_uuid(), "/dev/vdb")
    await accepted(api, vid, "os-detach", {})
    assert await seen(api, vid) == seen_as("available", "detached")


async def test_attach_again_after_a_detach(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    await classic_attach(api, vid, connector("compute-1"), new_uuid(), "/dev/vdb")
    await accepted(api, vid, "os-begin_detaching")
    await accepted(api, vid, "os-terminate_connection", {"connector": connector("compute-1")})
    await accepted(api, vid, "os-detach")
    instance, conn = new_uuid(), connector("compute-2")
    await classic_attach(api, vid, conn, instance, "/dev/vdd")
    assert await seen(api, vid) == seen_as(
        "in-use", "attached", [("attached", instance)], {conn["initiator"]}, exported=True
    )


# -- (c) the way back ---------------------------------------------------------------------------


async def test_reserve_then_unreserve(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    await accepted(api, vid, "os-reserve")
    assert await seen(api, vid) == seen_as("attaching", "attaching", [("reserved", None)])
    await accepted(api, vid, "os-unreserve")
    assert await seen(api, vid) == seen_as("available", "detached")
    # again: nothing to undo
    await accepted(api, vid, "os-unreserve")
    assert await seen(api, vid) == seen_as("available", "detached")
    # and the volume can be reserved once more
    await accepted(api, vid, "os-reserve")
    assert (await api.volume(vid))["status"] == "attaching"


async def test_failed_nova_attach_rolls_back_completely(api: Api) -> None:
    """Nova's clean-up when the guest attach fails: terminate the connection, then unreserve."""
    vid = (await api.create_volume())["id"]
    conn = connector("compute-1")
    await accepted(api, vid, "os-reserve")
    await initialize(api, vid, conn)
    await accepted(api, vid, "os-terminate_connection", {"connector": conn})
    assert await seen(api, vid) == seen_as("attaching", "attaching", [("attaching", None)], exported=True)
    await accepted(api, vid, "os-unreserve")
    assert await seen(api, vid) == seen_as("available", "detached")
    assert (await api.delete(f"/volumes/{vid}")).status_code == 202


@pytest.mark.parametrize("operation", ["create_export", "add_initiator"])
async def test_backend_failure_during_initialize_then_unreserve(api: Api, operation: str) -> None:
    """The target fails mid-connect: a 500 that leaks nothing, the reservation intact, and Nova's unreserve works."""
    vid = (await api.create_volume())["id"]
    await accepted(api, vid, "os-reserve")
    target(api).faults.fail(operation)
    response = await act(api, vid, "os-initialize_connection", {"connector": connector("compute-1")})
    message = fault(response, 500)
    assert "injected" not in message
    state = await seen(api, vid)
    assert (state.status, state.acls, state.exported) == ("attaching", frozenset(), False)
    await accepted(api, vid, "os-unreserve")
    assert await seen(api, vid) == seen_as("available", "detached")


async def test_backend_failure_during_initialize_without_reserve_leaves_no_trace(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    target(api).faults.fail("add_initiator")
    fault(await act(api, vid, "os-initialize_connection", {"connector": connector("compute-1")}), 500)
    assert await seen(api, vid) == seen_as("available", "detached")


async def test_unreserve_leaves_an_attached_volume_alone(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    conn, instance = connector("compute-1"), new_uuid()
    await classic_attach(api, vid, conn, instance, "/dev/vdb")
    before = await seen(api, vid)
    await accepted(api, vid, "os-unreserve")
    assert (
        await seen(api, vid)
        == before
        == seen_as("in-use", "attached", [("attached", instance)], {conn["initiator"]}, exported=True)
    )


async def test_roll_detaching(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    # no-op on an available volume
    await accepted(api, vid, "os-roll_detaching")
    assert await seen(api, vid) == seen_as("available", "detached")

    conn, instance = connector("compute-1"), new_uuid()
    await classic_attach(api, vid, conn, instance, "/dev/vdb")
    attached = seen_as("in-use", "attached", [("attached", instance)], {conn["initiator"]}, exported=True)
    # no-op on an in-use volume
    await accepted(api, vid, "os-roll_detaching")
    assert await seen(api, vid) == attached

    await accepted(api, vid, "os-begin_detaching")
    assert (await seen(api, vid)).status == "detaching"
    await accepted(api, vid, "os-roll_detaching")
    assert await seen(api, vid) == attached
    # and detaching can begin again
    await accepted(api, vid, "os-begin_detaching")
    assert (await api.volume(vid))["status"] == "detaching"


async def test_roll_detaching_leaves_an_attaching_volume_alone(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    await accepted(api, vid, "os-reserve")
    await accepted(api, vid, "os-roll_detaching")
    assert await seen(api, vid) == seen_as("attaching", "attaching", [("reserved", None)])


# -- failure branches ---------------------------------------------------------------------------


async def test_reserve_needs_an_available_volume(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    await accepted(api, vid, "os-reserve")
    before = await seen(api, vid)
    message = fault(await act(api, vid, "os-reserve"), 400)
    assert message == f"Volume {vid} status must be available to reserve, but the current status is attaching."
    assert await seen(api, vid) == before

    await initialize(api, vid, connector())
    await accepted(api, vid, "os-attach", {"instance_uuid": new_uuid(), "mountpoint": "/dev/vdb"})
    before = await seen(api, vid)
    assert "current status is in-use" in fault(await act(api, vid, "os-reserve"), 400)
    assert await seen(api, vid) == before

    errored = (await api.create_volume())["id"]
    await accepted(api.as_(user="admin"), errored, "os-reset_status", {"status": "error"})
    assert "current status is error" in fault(await act(api, errored, "os-reserve"), 400)
    assert await seen(api, errored) == seen_as("error", "detached")


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"host": "compute-1", "ip": "192.0.2.10"}, "initiator"),
        ({"initiator": "iqn.2004-10.com.example:x; rm -rf /", "host": "compute-1"}, "initiator"),
        ({"initiator": initiator("compute-1"), "host": "compute 1"}, "host"),
        ({"initiator": initiator("compute-1"), "ip": "not-an-ip"}, "ip"),
    ],
    ids=["no-initiator", "shell-initiator", "bad-host", "bad-ip"],
)
async def test_initialize_connection_rejects_a_bad_connector_before_any_change(
    api: Api, bad: dict[str, Any], named: str
) -> None:
    reserved = (await api.create_volume())["id"]
    await accepted(api, reserved, "os-reserve")
    untouched = (await api.create_volume())["id"]
    target(api).faults.calls.clear()

    for vid, expected in (
        (reserved, seen_as("attaching", "attaching", [("reserved", None)])),
        # without a reservation os-initialize_connection would reserve on Nova's behalf: not with a bad connector
        (untouched, seen_as("available", "detached")),
    ):
        message = fault(await act(api, vid, "os-initialize_connection", {"connector": bad}), 400)
        assert named in message
        assert await seen(api, vid) == expected
    assert target(api).faults.calls == []  # rejected before any backend call


@pytest.mark.parametrize("value", [None, {}, {"connector": None}, {"connector": {}}, {"connector": "iqn"}])
async def test_initialize_and_terminate_need_a_connector(api: Api, value: Any) -> None:
    vid = (await api.create_volume())["id"]
    await accepted(api, vid, "os-reserve")
    before = await seen(api, vid)
    for action in ("os-initialize_connection", "os-terminate_connection"):
        assert "connector" in fault(await act(api, vid, action, value), 400)
    assert await seen(api, vid) == before


async def test_terminate_connection_with_a_bad_connector_keeps_the_acl(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    conn = connector("compute-1")
    await classic_attach(api, vid, conn, new_uuid(), "/dev/vdb")
    before = await seen(api, vid)
    message = fault(await act(api, vid, "os-terminate_connection", {"connector": {"host": "compute-1"}}), 400)
    assert "initiator" in message
    assert await seen(api, vid) == before
    assert before.acls == {conn["initiator"]}


async def test_begin_detaching_needs_an_in_use_volume(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    message = fault(await act(api, vid, "os-begin_detaching"), 400)
    assert "in-use" in message
    assert "available" in message
    assert await seen(api, vid) == seen_as("available", "detached")

    await accepted(api, vid, "os-reserve")
    assert "attaching" in fault(await act(api, vid, "os-begin_detaching"), 400)
    assert await seen(api, vid) == seen_as("attaching", "attaching", [("reserved", None)])

    await initialize(api, vid, connector())
    await accepted(api, vid, "os-attach", {"instance_uuid": new_uuid(), "mountpoint": "/dev/vdb"})
    await accepted(api, vid, "os-begin_detaching")
    before = await seen(api, vid)
    assert "detaching" in fault(await act(api, vid, "os-begin_detaching"), 400)
    assert await seen(api, vid) == before


async def test_detach_needs_a_name_when_there_are_several(api: Api) -> None:
    vid = (await api.create_volume(volume_type=await api.multiattach_type()))["id"]
    first, second = new_uuid(), new_uuid()
    await classic_attach(api, vid, connector("compute-1"), first, "/dev/vdb")
    await classic_attach(api, vid, connector("compute-2"), second, "/dev/vdb")
    before = await seen(api, vid)
    assert len(before.attachments) == 2
    for body in (None, {}, {"attachment_id": None}):
        assert "attachment_id" in fault(await act(api, vid, "os-detach", body), 400)
        assert await seen(api, vid) == before


async def test_detach_refuses_an_attachment_of_another_volume(api: Api) -> None:
    mine = (await api.create_volume())["id"]
    other = (await api.create_volume())["id"]
    await classic_attach(api, mine, connector("compute-1"), new_uuid(), "/dev/vdb")
    await classic_attach(api, other, connector("compute-2"), new_uuid(), "/dev/vdc")
    theirs = await only_attachment_id(api, other)
    before = (await seen(api, mine), await seen(api, other))
    message = fault(await act(api, mine, "os-detach", {"attachment_id": theirs}), 400)
    assert theirs in message
    fault(await act(api, mine, "os-detach", {"attachment_id": new_uuid()}), 400)
    assert (await seen(api, mine), await seen(api, other)) == before


async def test_detach_refuses_a_non_string_attachment_id(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    await classic_attach(api, vid, connector("compute-1"), new_uuid(), "/dev/vdb")
    before = await seen(api, vid)
    assert "attachment_id" in fault(await act(api, vid, "os-detach", {"attachment_id": 7}), 400)
    assert await seen(api, vid) == before


# -- admin actions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "value"),
    [
        ("os-force_detach", {}),
        ("os-force_detach", {"attachment_id": None, "connector": None}),
        ("os-reset_status", {"status": "available"}),
        ("os-reset_status", {"attach_status": "detached"}),
    ],
)
async def test_admin_actions_are_forbidden_to_members(api: Api, action: str, value: Any) -> None:
    vid = (await api.create_volume())["id"]
    conn, instance = connector("compute-1"), new_uuid()
    await classic_attach(api, vid, conn, instance, "/dev/vdb")
    before = await seen(api, vid)
    fault(await act(api, vid, action, value), 403)
    assert await seen(api, vid) == before


async def test_force_detach_removes_everything_whatever_the_state(api: Api) -> None:
    admin = api.as_(user="admin")
    vid = (await api.create_volume())["id"]
    conn = connector("compute-1")
    await classic_attach(api, vid, conn, new_uuid(), "/dev/vdb")
    await accepted(api, vid, "os-begin_detaching")
    await accepted(
        admin, vid, "os-force_detach", {"attachment_id": await only_attachment_id(api, vid), "connector": conn}
    )
    assert await seen(api, vid) == seen_as("available", "detached")

    # a half-done attach (reserved and connected, never attached) goes too, without a connector
    await accepted(api, vid, "os-reserve")
    await initialize(api, vid, conn)
    await accepted(admin, vid, "os-force_detach", {})
    assert await seen(api, vid) == seen_as("available", "detached")


async def test_force_detach_of_one_attachment_keeps_the_others(api: Api) -> None:
    admin = api.as_(user="admin")
    vid = (await api.create_volume(volume_type=await api.multiattach_type()))["id"]
    first, second = new_uuid(), new_uuid()
    await classic_attach(api, vid, connector("compute-1"), first, "/dev/vdb")
    await classic_attach(api, vid, connector("compute-2"), second, "/dev/vdb")
    by_instance = {a["instance"]: a["id"] for a in await attachments_of(api, vid)}
    await accepted(admin, vid, "os-force_detach", {"attachment_id": by_instance[first]})
    assert await seen(api, vid) == seen_as(
        "in-use", "attached", [("attached", second)], {initiator("compute-2")}, exported=True
    )
    other = (await api.create_volume())["id"]
    assert by_instance[second] in fault(
        await act(admin, other, "os-force_detach", {"attachment_id": by_instance[second]}), 400
    )
    assert (await seen(api, vid)).attachments == (("attached", second),)


async def test_reset_status_sets_what_it_is_given(api: Api) -> None:
    admin = api.as_(user="admin")
    vid = (await api.create_volume())["id"]
    conn, instance = connector("compute-1"), new_uuid()
    await classic_attach(api, vid, conn, instance, "/dev/vdb")
    attachments, acls = [("attached", instance)], {conn["initiator"]}

    await accepted(admin, vid, "os-reset_status", {"status": "error"})
    assert await seen(api, vid) == seen_as("error", "attached", attachments, acls, exported=True)

    await accepted(admin, vid, "os-reset_status", {"status": "in-use", "attach_status": "attached"})
    assert await seen(api, vid) == seen_as("in-use", "attached", attachments, acls, exported=True)

    await accepted(admin, vid, "os-reset_status", {"status": "maintenance"})
    assert "maintenance" in fault(await act(api, vid, "os-begin_detaching"), 400)
    await accepted(admin, vid, "os-reset_status", {"status": "in-use"})

    # attach_status alone changes neither the status nor the attachments
    await accepted(admin, vid, "os-reset_status", {"attach_status": "attached"})
    assert await seen(api, vid) == seen_as("in-use", "attached", attachments, acls, exported=True)


async def test_reset_to_detached_removes_every_attachment_and_the_export(api: Api) -> None:
    admin = api.as_(user="admin")
    vid = (await api.create_volume(volume_type=await api.multiattach_type()))["id"]
    await classic_attach(api, vid, connector("compute-1"), new_uuid(), "/dev/vdb")
    await classic_attach(api, vid, connector("compute-2"), new_uuid(), "/dev/vdb")
    await accepted(api, vid, "os-reserve")  # and one more still in flight
    ids = [a["id"] for a in await attachments_of(api, vid)]
    assert len(ids) == 3

    await accepted(admin, vid, "os-reset_status", {"status": "available", "attach_status": "detached"})
    assert await seen(api, vid) == seen_as("available", "detached")
    assert (await api.volume(vid))["attachments"] == []
    for attachment_id in ids:
        fault(await api.get(f"/attachments/{attachment_id}"), 404)
    # usable again from scratch
    instance = new_uuid()
    await classic_attach(api, vid, connector("compute-3"), instance, "/dev/vdb")
    assert await seen(api, vid) == seen_as(
        "in-use", "attached", [("attached", instance)], {initiator("compute-3")}, exported=True
    )


async def test_reset_attach_status_detached_alone_keeps_the_status(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    await classic_attach(api, vid, connector("compute-1"), new_uuid(), "/dev/vdb")
    await accepted(api.as_(user="admin"), vid, "os-reset_status", {"attach_status": "detached"})
    assert await seen(api, vid) == seen_as("in-use", "detached")


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (None, "status"),
        ({}, "status"),
        ({"migration_status": "migrating"}, "status"),
        ({"status": "bogus"}, "bogus"),
        ({"status": "available", "attach_status": "bogus"}, "bogus"),
        ({"attach_status": "attaching"}, "attaching"),
        ({"status": 3}, "status"),
        ("available", "os-reset_status"),
    ],
)
async def test_reset_status_rejects_what_it_cannot_set(api: Api, value: Any, named: str) -> None:
    vid = (await api.create_volume())["id"]
    conn, instance = connector("compute-1"), new_uuid()
    await classic_attach(api, vid, conn, instance, "/dev/vdb")
    before = await seen(api, vid)
    assert named in fault(await act(api.as_(user="admin"), vid, "os-reset_status", value), 400)
    assert await seen(api, vid) == before


async def test_admin_reaches_another_projects_volume_through_its_own_project(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    await classic_attach(api, vid, connector("compute-1"), new_uuid(), "/dev/vdb")
    admin = api.as_(user="admin", project=f"admins-{uuid.uuid4().hex[:8]}")
    await accepted(admin, vid, "os-reset_status", {"status": "available", "attach_status": "detached"})
    assert await seen(api, vid) == seen_as("available", "detached")


# -- dispatch and scoping -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"os-reserve": None, "os-unreserve": None},
        {},
        [{"os-reserve": None}],
        "os-reserve",
        None,
        7,
    ],
    ids=["two-keys", "empty", "list", "string", "null", "number"],
)
async def test_malformed_action_bodies(api: Api, body: Any) -> None:
    vid = (await api.create_volume())["id"]
    assert fault(await api.post(f"/volumes/{vid}/action", body), 400).startswith("Malformed request body")
    assert await seen(api, vid) == seen_as("available", "detached")


async def test_invalid_json_is_a_bad_request(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    response = await api.client.post(
        api.url(f"/volumes/{vid}/action"),
        content=b'{"os-reserve": ',
        headers=api.headers({"Content-Type": "application/json"}),
    )
    fault(response, 400)
    assert await seen(api, vid) == seen_as("available", "detached")


@pytest.mark.parametrize("action", ["os-frobnicate", "os-complete", "os-extend_volume", "reserve"])
async def test_unknown_action(api: Api, action: str) -> None:
    vid = (await api.create_volume())["id"]
    assert fault(await act(api, vid, action), 400) == f"There is no such action: {action}"
    assert await seen(api, vid) == seen_as("available", "detached")


@pytest.mark.parametrize("action", ["os-attach", "os-detach", "os-force_detach", "os-reset_status"])
async def test_an_action_value_that_is_not_an_object(api: Api, action: str) -> None:
    vid = (await api.create_volume())["id"]
    assert action in fault(await act(api.as_(user="admin"), vid, action, ["x"]), 400)
    assert await seen(api, vid) == seen_as("available", "detached")


MEMBER_ACTIONS: list[tuple[str, Any]] = [
    ("os-reserve", None),
    ("os-unreserve", None),
    ("os-initialize_connection", {"connector": connector("intruder")}),
    ("os-attach", {"instance_uuid": "7c1f8d52-8f3b-4a8e-9d7b-0f6a1b2c3d4e", "mountpoint": "/dev/vdz"}),
    ("os-begin_detaching", None),
    ("os-roll_detaching", None),
    ("os-terminate_connection", {"connector": connector("compute-1")}),
    ("os-detach", None),
]


@pytest.mark.parametrize(("action", "value"), MEMBER_ACTIONS, ids=[a for a, _ in MEMBER_ACTIONS])
async def test_another_projects_volume_does_not_exist(api: Api, action: str, value: Any) -> None:
    vid = (await api.create_volume())["id"]
    conn, instance = connector("compute-1"), new_uuid()
    await classic_attach(api, vid, conn, instance, "/dev/vdb")
    if action == "os-roll_detaching":
        await accepted(api, vid, "os-begin_detaching")
    before = await seen(api, vid)
    stranger = api.as_(user="mallory", project=f"other-{uuid.uuid4().hex[:8]}")
    fault(await act(stranger, vid, action, value), 404)
    fault(await act(api, new_uuid(), action, value), 404)
    assert await seen(api, vid) == before


# -- multiattach --------------------------------------------------------------------------------


async def test_multiattach_two_instances_on_two_hosts(api: Api) -> None:
    vid = (await api.create_volume(volume_type=await api.multiattach_type()))["id"]
    assert (await api.volume(vid))["multiattach"] is True
    one, two = connector("compute-1"), connector("compute-2")
    first, second = new_uuid(), new_uuid()

    await classic_attach(api, vid, one, first, "/dev/vdb")
    assert await seen(api, vid) == seen_as(
        "in-use", "attached", [("attached", first)], {one["initiator"]}, exported=True
    )

    await accepted(api, vid, "os-reserve")
    assert await seen(api, vid) == seen_as(
        "attaching", "attaching", [("attached", first), ("reserved", None)], {one["initiator"]}, exported=True
    )
    chap = target(api).targets[vid].chap
    data = (await initialize(api, vid, two))["data"]
    assert data["target_iqn"] == f"{IQN_PREFIX}{vid}"
    assert (data["auth_username"], data["auth_password"]) == (chap.username, chap.secret)  # one target, one CHAP
    assert await seen(api, vid) == seen_as(
        "attaching",
        "attaching",
        [("attached", first), ("attaching", None)],
        {one["initiator"], two["initiator"]},
        exported=True,
    )
    await accepted(api, vid, "os-attach", {"instance_uuid": second, "mountpoint": "/dev/vdc"})
    both = seen_as(
        "in-use",
        "attached",
        [("attached", first), ("attached", second)],
        {one["initiator"], two["initiator"]},
        exported=True,
    )
    assert await seen(api, vid) == both
    shown = (await api.volume(vid))["attachments"]
    assert sorted((a["server_id"], a["device"]) for a in shown) == sorted([(first, "/dev/vdb"), (second, "/dev/vdc")])
    by_instance = {a["instance"]: a["id"] for a in await attachments_of(api, vid)}

    # the first host leaves: its ACL goes, the second host's stays
    await accepted(api, vid, "os-begin_detaching")
    await accepted(api, vid, "os-terminate_connection", {"connector": one})
    assert await seen(api, vid) == seen_as(
        "detaching", "attached", [("attached", first), ("attached", second)], {two["initiator"]}, exported=True
    )
    await accepted(api, vid, "os-detach", {"attachment_id": by_instance[first]})
    assert await seen(api, vid) == seen_as(
        "in-use", "attached", [("attached", second)], {two["initiator"]}, exported=True
    )

    # then the second: now the only attachment, so it need not be named
    await accepted(api, vid, "os-begin_detaching")
    await accepted(api, vid, "os-terminate_connection", {"connector": two})
    assert await seen(api, vid) == seen_as("detaching", "attached", [("attached", second)], exported=True)
    await accepted(api, vid, "os-detach")
    assert await seen(api, vid) == seen_as("available", "detached")


async def test_multiattach_same_host_twice_shares_one_acl(api: Api) -> None:
    vid = (await api.create_volume(volume_type=await api.multiattach_type()))["id"]
    host = connector("compute-1")
    first, second = new_uuid(), new_uuid()
    await classic_attach(api, vid, host, first, "/dev/vdb")
    await classic_attach(api, vid, host, second, "/dev/vdc")
    assert await seen(api, vid) == seen_as(
        "in-use", "attached", [("attached", first), ("attached", second)], {host["initiator"]}, exported=True
    )
    by_instance = {a["instance"]: a["id"] for a in await attachments_of(api, vid)}
    detail = (await api.get(f"/attachments/{by_instance[first]}")).json()["attachment"]
    assert detail["shared_connections_by_attachment"] == [by_instance[second]]

    # the first instance leaves: the host still needs its ACL for the second one
    await accepted(api, vid, "os-begin_detaching")
    await accepted(api, vid, "os-terminate_connection", {"connector": host})
    assert await seen(api, vid) == seen_as(
        "detaching", "attached", [("attached", first), ("attached", second)], {host["initiator"]}, exported=True
    )
    await accepted(api, vid, "os-detach", {"attachment_id": by_instance[first]})
    assert await seen(api, vid) == seen_as(
        "in-use", "attached", [("attached", second)], {host["initiator"]}, exported=True
    )

    # the last one takes the ACL and the export with it
    await accepted(api, vid, "os-begin_detaching")
    await accepted(api, vid, "os-terminate_connection", {"connector": host})
    assert await seen(api, vid) == seen_as("detaching", "attached", [("attached", second)], exported=True)
    await accepted(api, vid, "os-detach", {"attachment_id": by_instance[second]})
    assert await seen(api, vid) == seen_as("available", "detached")


async def test_multiattach_failed_second_attach_rolls_back_only_itself(api: Api) -> None:
    vid = (await api.create_volume(volume_type=await api.multiattach_type()))["id"]
    one, two = connector("compute-1"), connector("compute-2")
    first = new_uuid()
    await classic_attach(api, vid, one, first, "/dev/vdb")
    attached = seen_as("in-use", "attached", [("attached", first)], {one["initiator"]}, exported=True)

    await accepted(api, vid, "os-reserve")
    await accepted(api, vid, "os-unreserve")
    assert await seen(api, vid) == attached

    await accepted(api, vid, "os-reserve")
    await initialize(api, vid, two)
    await accepted(api, vid, "os-terminate_connection", {"connector": two})
    await accepted(api, vid, "os-unreserve")
    assert await seen(api, vid) == attached


async def test_a_non_multiattach_volume_takes_one_instance(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    assert (await api.volume(vid))["multiattach"] is False
    conn, instance = connector("compute-1"), new_uuid()
    await classic_attach(api, vid, conn, instance, "/dev/vdb")
    before = await seen(api, vid)
    fault(await act(api, vid, "os-reserve"), 400)
    fault(await act(api, vid, "os-attach", {"instance_uuid": new_uuid(), "mountpoint": "/dev/vdc"}), 400)
    assert await seen(api, vid) == before
