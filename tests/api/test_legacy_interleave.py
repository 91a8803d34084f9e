"""The legacy actions and the attachments API are two faces of one state machine: mix them freely."""

from __future__ import annotations

from typing import Any

from tests.api.test_legacy_actions import (
    IQN_PREFIX,
    accepted,
    act,
    attachments_of,
    classic_attach,
    connector,
    initiator,
    new_uuid,
    only_attachment_id,
    seen,
    seen_as,
    target,
)
from tests.conftest import Api, fault


async def new_attach(api: Api, volume_id: str, conn: dict[str, Any] | None, instance: str) -> dict[str, Any]:
    """The attachments API: create (with a connector: reserve and connect), then os-complete."""
    body: dict[str, Any] = {"volume_uuid": volume_id, "instance_uuid": instance}
    if conn is not None:
        body["connector"] = conn
    response = await api.post("/attachments", {"attachment": body})
    assert response.status_code == 200, response.text
    attachment: dict[str, Any] = response.json()["attachment"]
    if conn is not None:
        completed = await api.post(f"/attachments/{attachment['id']}/action", {"os-complete": None})
        assert completed.status_code == 204, completed.text
    return attachment


async def test_a_legacy_attachment_is_an_attachment(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    conn, instance = connector("compute-1"), new_uuid()
    await classic_attach(api, vid, conn, instance, "/dev/vdb")

    (summary,) = await attachments_of(api, vid)
    assert summary == {"id": summary["id"], "status": "attached", "instance": instance, "volume_id": vid}
    (detail,) = (await api.get(f"/attachments/detail?volume_id={vid}")).json()["attachments"]
    assert detail["id"] == summary["id"]
    assert detail["attach_mode"] == "rw"
    assert detail["attached_at"]
    assert detail["detached_at"] == ""
    assert detail["connection_info"]["target_iqn"] == f"{IQN_PREFIX}{vid}"
    assert detail["connection_info"]["attachment_id"] == summary["id"]
    assert detail["shared_connections_by_attachment"] == []
    by_status = (await api.get(f"/attachments?status=attached&instance_id={instance}")).json()["attachments"]
    assert [a["id"] for a in by_status] == [summary["id"]]


async def test_legacy_attach_then_delete_the_attachment(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    conn, instance = connector("compute-1"), new_uuid()
    await classic_attach(api, vid, conn, instance, "/dev/vdb")
    assert await seen(api, vid) == seen_as(
        "in-use", "attached", [("attached", instance)], {conn["initiator"]}, exported=True
    )
    attachment_id = await only_attachment_id(api, vid)

    response = await api.delete(f"/attachments/{attachment_id}")
    assert response.status_code == 200, response.text
    assert response.json() == {"attachments": []}
    assert await seen(api, vid) == seen_as("available", "detached")
    assert (await api.volume(vid))["attachments"] == []
    fault(await api.get(f"/attachments/{attachment_id}"), 404)


async def test_legacy_reserve_then_delete_the_reservation(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    await accepted(api, vid, "os-reserve")
    target(api).faults.calls.clear()
    response = await api.delete(f"/attachments/{await only_attachment_id(api, vid)}")
    assert response.status_code == 200, response.text
    assert await seen(api, vid) == seen_as("available", "detached")
    assert target(api).faults.calls == []  # a reservation never touched the target


async def test_new_attach_then_legacy_detach(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    conn, instance = connector("compute-1"), new_uuid()
    attachment = await new_attach(api, vid, conn, instance)
    assert await seen(api, vid) == seen_as(
        "in-use", "attached", [("attached", instance)], {conn["initiator"]}, exported=True
    )
    (shown,) = (await api.volume(vid))["attachments"]
    assert (shown["attachment_id"], shown["server_id"]) == (attachment["id"], instance)

    await accepted(api, vid, "os-begin_detaching")
    assert await seen(api, vid) == seen_as(
        "detaching", "attached", [("attached", instance)], {conn["initiator"]}, exported=True
    )
    await accepted(api, vid, "os-terminate_connection", {"connector": conn})
    assert await seen(api, vid) == seen_as("detaching", "attached", [("attached", instance)], exported=True)
    await accepted(api, vid, "os-detach", {"attachment_id": attachment["id"]})
    assert await seen(api, vid) == seen_as("available", "detached")
    fault(await api.get(f"/attachments/{attachment['id']}"), 404)


async def test_os_attach_reuses_the_instances_attachment(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    conn, instance = connector("compute-1"), new_uuid()
    response = await api.post(
        "/attachments", {"attachment": {"volume_uuid": vid, "instance_uuid": instance, "connector": conn}}
    )
    assert response.status_code == 200, response.text
    attachment_id = response.json()["attachment"]["id"]
    assert await seen(api, vid) == seen_as(
        "attaching", "attaching", [("attaching", instance)], {conn["initiator"]}, exported=True
    )
    await accepted(api, vid, "os-attach", {"instance_uuid": instance, "mountpoint": "/dev/vdb"})
    assert await seen(api, vid) == seen_as(
        "in-use", "attached", [("attached", instance)], {conn["initiator"]}, exported=True
    )
    assert await only_attachment_id(api, vid) == attachment_id
    (shown,) = (await api.volume(vid))["attachments"]
    assert shown["device"] == "/dev/vdb"


async def test_a_new_api_reservation_blocks_a_legacy_reserve(api: Api) -> None:
    vid = (await api.create_volume())["id"]
    instance = new_uuid()
    await new_attach(api, vid, None, instance)
    before = await seen(api, vid)
    assert before == seen_as("reserved", "reserved", [("reserved", instance)])
    assert "current status is reserved" in fault(await act(api, vid, "os-reserve"), 400)
    assert await seen(api, vid) == before


async def test_force_detach_and_reset_reach_new_api_attachments(api: Api) -> None:
    admin = api.as_(user="admin")
    vid = (await api.create_volume())["id"]
    attachment = await new_attach(api, vid, connector("compute-1"), new_uuid())
    await accepted(admin, vid, "os-force_detach", {"attachment_id": attachment["id"]})
    assert await seen(api, vid) == seen_as("available", "detached")

    await new_attach(api, vid, connector("compute-2"), new_uuid())
    await accepted(admin, vid, "os-reset_status", {"status": "available", "attach_status": "detached"})
    assert await seen(api, vid) == seen_as("available", "detached")


async def test_multiattach_across_both_faces(api: Api) -> None:
    vid = (await api.create_volume(volume_type=await api.multiattach_type()))["id"]
    one, two = connector("compute-1"), connector("compute-2")
    legacy_instance, new_instance = new_uuid(), new_uuid()
    await classic_attach(api, vid, one, legacy_instance, "/dev/vdb")
    created = await new_attach(api, vid, two, new_instance)
    assert await seen(api, vid) == seen_as(
        "in-use",
        "attached",
        [("attached", legacy_instance), ("attached", new_instance)],
        {one["initiator"], two["initiator"]},
        exported=True,
    )
    legacy_id = next(a["id"] for a in await attachments_of(api, vid) if a["instance"] == legacy_instance)

    # the new API's attachment goes with DELETE; the legacy one keeps its ACL and the export
    response = await api.delete(f"/attachments/{created['id']}")
    assert response.status_code == 200, response.text
    assert [a["id"] for a in response.json()["attachments"]] == [legacy_id]
    assert await seen(api, vid) == seen_as(
        "in-use", "attached", [("attached", legacy_instance)], {one["initiator"]}, exported=True
    )

    await accepted(api, vid, "os-begin_detaching")
    await accepted(api, vid, "os-terminate_connection", {"connector": one})
    await accepted(api, vid, "os-detach")
    assert await seen(api, vid) == seen_as("available", "detached")


async def test_one_host_shared_by_both_faces(api: Api) -> None:
    vid = (await api.create_volume(volume_type=await api.multiattach_type()))["id"]
    host = connector("compute-1")
    legacy_instance, new_instance = new_uuid(), new_uuid()
    await classic_attach(api, vid, host, legacy_instance, "/dev/vdb")
    created = await new_attach(api, vid, host, new_instance)
    legacy_id = next(a["id"] for a in await attachments_of(api, vid) if a["instance"] == legacy_instance)
    detail = (await api.get(f"/attachments/{created['id']}")).json()["attachment"]
    assert detail["shared_connections_by_attachment"] == [legacy_id]
    assert target(api).acls(vid) == {initiator("compute-1")}

    # the legacy instance leaves; the new API's attachment still needs the host's ACL
    await accepted(api, vid, "os-begin_detaching")
    await accepted(api, vid, "os-terminate_connection", {"connector": host})
    await accepted(api, vid, "os-detach", {"attachment_id": legacy_id})
    assert await seen(api, vid) == seen_as(
        "in-use", "attached", [("attached", new_instance)], {host["initiator"]}, exported=True
    )
    assert (await api.get(f"/attachments/{created['id']}")).json()["attachment"][
        "shared_connections_by_attachment"
    ] == []

    response = await api.delete(f"/attachments/{created['id']}")
    assert response.status_code == 200, response.text
    assert await seen(api, vid) == seen_as("available", "detached")
