"""The attachments API (3.27+): every step of the state machine, its errors, the views and the lists."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import delete

from app.backends.base import Chap
from app.db.models import Attachment
from tests.api.attaching import (
    CONNECTION_INFO_KEYS,
    DETAIL_KEYS,
    IQN_PREFIX,
    MULTIPATH_KEYS,
    PORTAL,
    SUMMARY_KEYS,
    TIMESTAMP,
    attachment_rows,
    complete,
    connect,
    connector,
    create_attachment,
    decoded,
    exported,
    initiator,
    listed,
    new_uuid,
    remove,
    reserve,
    set_volume_status,
    show,
    specs,
    target,
    volume_state,
)
from tests.conftest import Api, fault


def assert_connection_info(info: dict[str, Any], *, volume_id: str, attachment_id: str, mode: str = "rw") -> None:
    assert CONNECTION_INFO_KEYS <= set(info) <= CONNECTION_INFO_KEYS | MULTIPATH_KEYS | {"discard"}, info
    assert info["driver_volume_type"] == "iscsi"
    assert info["target_discovered"] is False
    assert info["target_iqn"] == f"{IQN_PREFIX}{volume_id}"
    assert info["target_portal"] == PORTAL
    assert isinstance(info["target_lun"], int)
    assert info["volume_id"] == volume_id
    assert info["attachment_id"] == attachment_id
    assert info["auth_method"] == "CHAP"
    assert len(info["auth_username"]) == 20
    assert info["auth_username"].isalnum()
    assert len(info["auth_password"]) == 16
    assert info["auth_password"].isalnum()
    assert info["access_mode"] == mode
    assert info["encrypted"] is False
    assert info["qos_specs"] is None
    assert info["cacheable"] is False  # as Cinder's: os-brick and Nova read it
    assert info["enforce_multipath"] is False


def assert_exported_to(api: Api, volume_id: str, info: dict[str, Any], initiators: set[str]) -> None:
    """The target holds the export the connection_info describes, with exactly these ACLs."""
    export = target(api).targets[volume_id]
    assert export.iqn == info["target_iqn"]
    assert export.chap == Chap(info["auth_username"], info["auth_password"])
    assert target(api).acls(volume_id) == initiators


# -- the state machine, row by row -----------------------------------------------------------------


@pytest.mark.parametrize("empty", ["missing", None, {}])
async def test_create_without_connector_reserves(api: Api, empty: Any) -> None:
    volume = await api.create_volume()
    instance = new_uuid()
    fields = {} if empty == "missing" else {"connector": empty}
    response = await api.post(
        "/attachments", {"attachment": {"volume_uuid": volume["id"], "instance_uuid": instance, **fields}}
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"attachment"}
    attachment = body["attachment"]
    assert set(attachment) == DETAIL_KEYS
    assert attachment["status"] == "reserved"
    assert attachment["instance"] == instance
    assert attachment["volume_id"] == volume["id"]
    assert attachment["attach_mode"] == "null"
    assert attachment["attached_at"] == ""
    assert attachment["detached_at"] == ""
    assert attachment["connection_info"] == {}
    assert attachment["shared_connections_by_attachment"] == []
    assert await show(api, attachment["id"]) == attachment
    assert await volume_state(api, volume["id"]) == ("reserved", "reserved")
    assert (await api.volume(volume["id"]))["attachments"] == []
    assert not exported(api, volume["id"])
    assert target(api).faults.calls == []
    assert await specs(api, attachment["id"]) == {}


async def test_update_with_connector_connects(api: Api) -> None:
    volume = await api.create_volume()
    reserved = await reserve(api, volume["id"], instance_uuid=new_uuid())
    host = connector("compute1")

    attachment = await connect(api, reserved["id"], host)

    assert set(attachment) == DETAIL_KEYS
    assert attachment["id"] == reserved["id"]
    assert attachment["status"] == "attaching"
    assert TIMESTAMP.match(attachment["attached_at"]), attachment["attached_at"]
    assert attachment["detached_at"] == ""
    assert attachment["attach_mode"] == "rw"
    assert_connection_info(attachment["connection_info"], volume_id=volume["id"], attachment_id=reserved["id"])
    assert not MULTIPATH_KEYS & set(attachment["connection_info"])
    assert await show(api, reserved["id"]) == attachment
    assert await volume_state(api, volume["id"]) == ("attaching", "attaching")
    assert_exported_to(api, volume["id"], attachment["connection_info"], {initiator("compute1")})
    assert decoded(await specs(api, reserved["id"])) == host


async def test_create_with_connector_reserves_and_connects_in_one_call(api: Api) -> None:
    volume = await api.create_volume()
    instance = new_uuid()

    response = await create_attachment(api, volume["id"], instance_uuid=instance, connector=connector("metal1"))

    assert response.status_code == 200, response.text
    attachment = response.json()["attachment"]
    assert set(attachment) == DETAIL_KEYS
    assert attachment["status"] == "attaching"
    assert attachment["instance"] == instance
    assert TIMESTAMP.match(attachment["attached_at"])
    assert attachment["attach_mode"] == "rw"
    assert_connection_info(attachment["connection_info"], volume_id=volume["id"], attachment_id=attachment["id"])
    assert await show(api, attachment["id"]) == attachment
    assert await volume_state(api, volume["id"]) == ("attaching", "attaching")
    assert_exported_to(api, volume["id"], attachment["connection_info"], {initiator("metal1")})
    assert decoded(await specs(api, attachment["id"])) == connector("metal1")


@pytest.mark.parametrize("flag", [True, "True", "true"])
async def test_multipath_connector_gets_the_lists(api: Api, flag: Any) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"], connector=connector("mp1", multipath=flag))

    info = attachment["connection_info"]
    assert_connection_info(info, volume_id=volume["id"], attachment_id=attachment["id"])
    assert info["target_iqns"] == [info["target_iqn"]]
    assert info["target_portals"] == [info["target_portal"]]
    assert info["target_luns"] == [info["target_lun"]]


async def test_os_complete_attaches(api: Api) -> None:
    volume = await api.create_volume()
    instance = new_uuid()
    connected = await reserve(api, volume["id"], instance_uuid=instance, connector=connector("compute1"))

    await complete(api, connected["id"])

    attachment = await show(api, connected["id"])
    assert attachment["status"] == "attached"
    assert attachment["attached_at"] == connected["attached_at"]
    assert attachment["connection_info"] == connected["connection_info"]
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")
    shown = await api.volume(volume["id"])
    assert shown["attachments"] == [
        {
            "id": volume["id"],
            "attachment_id": connected["id"],
            "volume_id": volume["id"],
            "server_id": instance,
            "host_name": None,
            "device": None,
            "attached_at": connected["attached_at"],
        }
    ]
    admin_view = await api.as_(user="admin").volume(volume["id"])
    assert admin_view["attachments"][0]["host_name"] == "compute1"
    assert_exported_to(api, volume["id"], attachment["connection_info"], {initiator("compute1")})

    # completing again is harmless
    await complete(api, connected["id"])
    assert (await show(api, connected["id"]))["status"] == "attached"
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")


async def test_update_of_an_attached_attachment_reexports_and_stays_attached(api: Api) -> None:
    volume = await api.create_volume()
    first = await reserve(api, volume["id"], connector=connector("compute1"))
    await complete(api, first["id"])

    again = await connect(api, first["id"], connector("compute1"))

    assert again["status"] == "attached"
    assert again["connection_info"]["auth_username"] == first["connection_info"]["auth_username"]
    assert again["connection_info"]["auth_password"] == first["connection_info"]["auth_password"]
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")
    assert_exported_to(api, volume["id"], again["connection_info"], {initiator("compute1")})


async def test_reconnecting_from_another_host_moves_the_acl(api: Api) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"], connector=connector("old-host"))
    await complete(api, attachment["id"])

    moved = await connect(api, attachment["id"], connector("new-host"))

    assert moved["status"] == "attached"
    assert target(api).acls(volume["id"]) == {initiator("new-host")}
    assert decoded(await specs(api, attachment["id"])) == connector("new-host")
    assert (await api.as_(user="admin").volume(volume["id"]))["attachments"][0]["host_name"] == "new-host"
    await remove(api, attachment["id"])
    assert not exported(api, volume["id"])


async def test_delete_of_a_reserved_attachment_touches_no_backend(api: Api) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"])

    assert await remove(api, attachment["id"]) == []

    assert target(api).faults.calls == []
    assert await volume_state(api, volume["id"]) == ("available", "detached")
    fault(await api.get(f"/attachments/{attachment['id']}"), 404)
    assert await listed(api) == []
    assert await listed(api, detail=True) == []
    assert await attachment_rows(api, volume["id"]) == []


async def test_an_attachment_deleted_by_another_process_is_404_here(api: Api) -> None:
    # this process remembers which volume each attachment it made belongs to; another process sharing the
    # database (a second worker, `tether reconcile`) may delete the row behind its back
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"])
    async with api.app.state.db.write() as session:
        await session.execute(delete(Attachment).where(Attachment.id == attachment["id"]))  # type: ignore[arg-type]

    assert "could not be found" in fault(await api.delete(f"/attachments/{attachment['id']}"), 404)
    body = {"attachment": {"connector": connector("compute1")}}
    assert "could not be found" in fault(await api.put(f"/attachments/{attachment['id']}", body), 404)
    assert "could not be found" in fault(await api.delete(f"/attachments/{attachment['id']}"), 404)
    assert target(api).faults.calls == []


@pytest.mark.parametrize("completed", [False, True])
async def test_delete_of_a_connected_attachment_removes_acl_and_export(api: Api, completed: bool) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"], connector=connector("compute1"))
    if completed:
        await complete(api, attachment["id"])
    assert exported(api, volume["id"])

    assert await remove(api, attachment["id"]) == []

    assert await volume_state(api, volume["id"]) == ("available", "detached")
    assert not exported(api, volume["id"])
    assert target(api).acls(volume["id"]) == set()
    assert await specs(api, attachment["id"]) == {}
    fault(await api.get(f"/attachments/{attachment['id']}"), 404)
    assert (await api.volume(volume["id"]))["attachments"] == []
    # the volume is free again
    assert (await reserve(api, volume["id"]))["status"] == "reserved"


async def test_delete_recomputes_the_volume_from_the_remaining_attachments(api: Api) -> None:
    volume = await api.create_volume(volume_type=await api.multiattach_type())
    attached = await reserve(api, volume["id"], instance_uuid=new_uuid(), connector=connector("h1"))
    await complete(api, attached["id"])
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")
    # a reserve moves even an in-use multiattach volume to reserved (as Cinder does); a connect of a second
    # attachment puts it in attaching (SPEC 5's table), and os-complete back in use
    reserved = await reserve(api, volume["id"], instance_uuid=new_uuid())
    assert await volume_state(api, volume["id"]) == ("reserved", "reserved")
    attaching = await reserve(api, volume["id"], instance_uuid=new_uuid(), connector=connector("h2"))
    assert await volume_state(api, volume["id"]) == ("attaching", "attaching")
    fault(await create_attachment(api, volume["id"], instance_uuid=new_uuid()), 400)

    remaining = await remove(api, attached["id"])
    assert remaining == [
        {"id": a["id"], "status": s, "instance": a["instance"], "volume_id": volume["id"]}
        for a, s in ((reserved, "reserved"), (attaching, "attaching"))
    ]
    assert await volume_state(api, volume["id"]) == ("attaching", "attaching")
    assert target(api).acls(volume["id"]) == {initiator("h2")}

    remaining = await remove(api, attaching["id"])
    assert [a["id"] for a in remaining] == [reserved["id"]]
    assert await volume_state(api, volume["id"]) == ("reserved", "reserved")
    assert not exported(api, volume["id"])

    assert await remove(api, reserved["id"]) == []
    assert await volume_state(api, volume["id"]) == ("available", "detached")


async def test_delete_keeps_in_use_while_an_attached_attachment_remains(api: Api) -> None:
    volume = await api.create_volume(volume_type=await api.multiattach_type())
    keep = await reserve(api, volume["id"], instance_uuid=new_uuid(), connector=connector("h1"))
    await complete(api, keep["id"])
    drop = await reserve(api, volume["id"], instance_uuid=new_uuid(), connector=connector("h2"))
    await complete(api, drop["id"])

    remaining = await remove(api, drop["id"])

    assert remaining == [
        {"id": keep["id"], "status": "attached", "instance": keep["instance"], "volume_id": volume["id"]}
    ]
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")
    assert target(api).acls(volume["id"]) == {initiator("h1")}


# -- reserve errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status",
    ["reserved", "attaching", "in-use", "detaching", "creating", "deleting", "maintenance", "error", "error_deleting"],
)
async def test_reserve_of_a_volume_that_is_not_available(api: Api, status: str) -> None:
    volume = await api.create_volume()
    await set_volume_status(api, volume["id"], status)

    message = fault(await create_attachment(api, volume["id"], instance_uuid=new_uuid()), 400)

    assert message == f"Volume {volume['id']} status must be available to reserve, but the current status is {status}."
    assert await attachment_rows(api, volume["id"]) == []
    assert (await api.volume(volume["id"]))["status"] == status


@pytest.mark.parametrize("status", ["error", "error_deleting", "error_restoring", "error_extending", "maintenance"])
async def test_reserve_of_a_multiattach_volume_in_a_bad_status(api: Api, status: str) -> None:
    volume = await api.create_volume(volume_type=await api.multiattach_type())
    await set_volume_status(api, volume["id"], status)

    message = fault(await create_attachment(api, volume["id"], connector=connector()), 400)

    assert f"the current status is {status}." in message
    assert await attachment_rows(api, volume["id"]) == []
    assert (await api.volume(volume["id"]))["status"] == status
    assert not exported(api, volume["id"])


async def test_reserve_of_a_volume_whose_backend_create_failed(api: Api) -> None:
    api.app.state.backends.volumes.faults.fail("create")
    volume = await api.create_volume()
    assert volume["status"] == "error"

    message = fault(await create_attachment(api, volume["id"], connector=connector()), 400)

    assert message == f"Volume {volume['id']} status must be available to reserve, but the current status is error."
    assert await attachment_rows(api, volume["id"]) == []
    assert not exported(api, volume["id"])


async def test_second_attachment_of_a_non_multiattach_volume(api: Api) -> None:
    volume = await api.create_volume()
    first = await reserve(api, volume["id"], instance_uuid=new_uuid())

    for other in ({"instance_uuid": new_uuid()}, {}, {"instance_uuid": new_uuid(), "connector": connector("h2")}):
        message = fault(await create_attachment(api, volume["id"], **other), 400)
        assert message == (
            f"Volume {volume['id']} status must be available to reserve, but the current status is reserved."
        )

    assert [a["id"] for a in await listed(api)] == [first["id"]]
    assert await volume_state(api, volume["id"]) == ("reserved", "reserved")
    assert not exported(api, volume["id"])


async def test_unknown_volume(api: Api) -> None:
    missing = new_uuid()
    assert fault(await create_attachment(api, missing), 404) == f"Volume {missing} could not be found."


async def test_another_projects_volume_cannot_be_attached(api: Api) -> None:
    volume = await api.create_volume()
    stranger = api.as_(project=f"{api.project}x")

    fault(await create_attachment(stranger, volume["id"], connector=connector()), 404)

    assert await volume_state(api, volume["id"]) == ("available", "detached")
    assert not exported(api, volume["id"])


# -- the same-instance exception ---------------------------------------------------------------------


async def test_same_instance_may_reserve_again_while_reserved(api: Api) -> None:
    volume = await api.create_volume()
    instance = new_uuid()
    first = await reserve(api, volume["id"], instance_uuid=instance)

    second = await reserve(api, volume["id"], instance_uuid=instance)

    assert second["id"] != first["id"]
    assert second["status"] == "reserved"
    assert second["instance"] == instance
    assert await volume_state(api, volume["id"]) == ("reserved", "reserved")
    assert {a["id"] for a in await listed(api)} == {first["id"], second["id"]}


async def test_same_instance_may_reserve_again_while_in_use(api: Api) -> None:
    volume = await api.create_volume()
    instance = new_uuid()
    first = await reserve(api, volume["id"], instance_uuid=instance, connector=connector("source"))
    await complete(api, first["id"])

    second = await reserve(api, volume["id"], instance_uuid=instance)

    assert second["status"] == "reserved"
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")
    assert {(a["id"], a["status"]) for a in await listed(api)} == {
        (first["id"], "attached"),
        (second["id"], "reserved"),
    }
    # a different instance (or none) is still refused
    fault(await create_attachment(api, volume["id"], instance_uuid=new_uuid()), 400)
    fault(await create_attachment(api, volume["id"]), 400)
    assert len(await listed(api)) == 2


async def test_same_instance_exception_does_not_apply_while_attaching(api: Api) -> None:
    volume = await api.create_volume()
    instance = new_uuid()
    await reserve(api, volume["id"], instance_uuid=instance, connector=connector("source"))

    message = fault(await create_attachment(api, volume["id"], instance_uuid=instance), 400)

    assert message.endswith("but the current status is attaching.")
    assert len(await listed(api)) == 1


async def test_connecting_a_second_attachment_of_a_non_multiattach_volume_conflicts(api: Api) -> None:
    volume = await api.create_volume()
    instance = new_uuid()
    first = await reserve(api, volume["id"], instance_uuid=instance, connector=connector("source"))
    await complete(api, first["id"])
    second = await reserve(api, volume["id"], instance_uuid=instance)

    response = await api.put(f"/attachments/{second['id']}", {"attachment": {"connector": connector("dest")}})

    message = fault(response, 409)
    assert "conflictingRequest" in response.json()
    assert volume["id"] in message
    assert (await show(api, second["id"]))["status"] == "reserved"
    assert (await show(api, second["id"]))["connection_info"] == {}
    assert await specs(api, second["id"]) == {}
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")
    assert target(api).acls(volume["id"]) == {initiator("source")}


async def test_update_that_conflicts_leaves_no_trace(api: Api) -> None:
    """A PUT that would connect a second host to a non-multiattach volume is Cinder's "duplicate connectors"."""
    volume = await api.create_volume()
    instance = new_uuid()
    first = await reserve(api, volume["id"], instance_uuid=instance, connector=connector("source"))
    await complete(api, first["id"])
    second = await reserve(api, volume["id"], instance_uuid=instance)  # Nova's same-instance exception

    response = await api.put(f"/attachments/{second['id']}", {"attachment": {"connector": connector("dest")}})

    assert "duplicate connectors" in fault(response, 409)
    listed_now = [(a["id"], a["status"]) for a in await listed(api)]
    assert listed_now == [(second["id"], "reserved"), (first["id"], "attached")]
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")
    assert target(api).acls(volume["id"]) == {initiator("source")}


async def test_live_migration_connects_the_destination_beside_the_source(api: Api) -> None:
    """Nova's live migration (SPEC 5): a create with the destination's connector for the same instance connects
    while the source's attachment is connected; deleting the source leaves only the destination's access."""
    volume = await api.create_volume()
    instance = new_uuid()
    source = await reserve(api, volume["id"], instance_uuid=instance, connector=connector("source"))
    await complete(api, source["id"])

    destination = await reserve(api, volume["id"], instance_uuid=instance, connector=connector("dest"))

    assert destination["status"] == "attaching"
    assert destination["connection_info"]["target_iqn"] == source["connection_info"]["target_iqn"]
    assert await volume_state(api, volume["id"]) == ("attaching", "attaching")
    assert target(api).acls(volume["id"]) == {initiator("source"), initiator("dest")}
    await complete(api, destination["id"])
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")

    assert [a["id"] for a in await remove(api, source["id"])] == [destination["id"]]
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")
    assert target(api).acls(volume["id"]) == {initiator("dest")}
    assert exported(api, volume["id"])


async def test_live_migration_rollback_leaves_the_source_as_it_was(api: Api) -> None:
    volume = await api.create_volume()
    instance = new_uuid()
    source = await reserve(api, volume["id"], instance_uuid=instance, connector=connector("source"))
    await complete(api, source["id"])
    before = await show(api, source["id"])

    destination = await reserve(api, volume["id"], instance_uuid=instance, connector=connector("dest"))
    assert [a["id"] for a in await remove(api, destination["id"])] == [source["id"]]

    assert await show(api, source["id"]) == before
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")
    assert target(api).acls(volume["id"]) == {initiator("source")}
    assert exported(api, volume["id"])


# -- connectors --------------------------------------------------------------------------------------

GOOD = initiator("good")
BAD_CONNECTORS = [
    pytest.param({"ip": "192.0.2.1", "host": "h1"}, "initiator", id="missing-initiator"),
    pytest.param({"initiator": None, "host": "h1"}, "initiator", id="null-initiator"),
    pytest.param({"initiator": "not-an-iqn"}, "initiator", id="not-an-iqn"),
    pytest.param({"initiator": "iqn.1993-8.org.debian:01:x"}, "initiator", id="bad-date"),
    pytest.param({"initiator": 42}, "initiator", id="not-a-string"),
    pytest.param({"initiator": f"{GOOD};reboot"}, "initiator", id="semicolon"),
    pytest.param({"initiator": f"{GOOD}$(id)"}, "initiator", id="command-substitution"),
    pytest.param({"initiator": f"{GOOD}`id`"}, "initiator", id="backticks"),
    pytest.param({"initiator": f"{GOOD}|cat"}, "initiator", id="pipe"),
    pytest.param({"initiator": f"{GOOD} x"}, "initiator", id="space"),
    pytest.param({"initiator": f"{GOOD}\n"}, "initiator", id="newline"),
    pytest.param({"initiator": GOOD + ":" + "a" * 223}, "initiator", id="too-long"),
    pytest.param({"initiator": GOOD, "ip": "300.1.2.3"}, "ip", id="bad-ip"),
    pytest.param({"initiator": GOOD, "ip": "192.0.2.1;id"}, "ip", id="ip-metacharacters"),
    pytest.param({"initiator": GOOD, "ip": 12}, "ip", id="ip-not-a-string"),
    pytest.param({"initiator": GOOD, "host": "bad host"}, "host", id="host-space"),
    pytest.param({"initiator": GOOD, "host": "h1;rm -rf /"}, "host", id="host-metacharacters"),
    pytest.param({"initiator": GOOD, "host": "-leading"}, "host", id="host-leading-dash"),
    pytest.param({"initiator": GOOD, "host": ""}, "host", id="host-empty"),
]


@pytest.mark.parametrize(("bad", "key"), BAD_CONNECTORS)
async def test_bad_connector_on_create_changes_nothing(api: Api, bad: dict[str, Any], key: str) -> None:
    volume = await api.create_volume()

    message = fault(await create_attachment(api, volume["id"], instance_uuid=new_uuid(), connector=bad), 400)

    assert f"connector.{key}" in message
    assert await attachment_rows(api, volume["id"]) == []
    assert await volume_state(api, volume["id"]) == ("available", "detached")
    assert target(api).faults.calls == []
    assert not exported(api, volume["id"])


@pytest.mark.parametrize(("bad", "key"), BAD_CONNECTORS)
async def test_bad_connector_on_update_changes_nothing(api: Api, bad: dict[str, Any], key: str) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"])

    response = await api.put(f"/attachments/{attachment['id']}", {"attachment": {"connector": bad}})

    assert f"connector.{key}" in fault(response, 400)
    assert await show(api, attachment["id"]) == attachment
    assert await specs(api, attachment["id"]) == {}
    assert await volume_state(api, volume["id"]) == ("reserved", "reserved")
    assert target(api).faults.calls == []


@pytest.mark.parametrize("body", [{"connector": {}}, {"connector": None}, {}, {"connector": "iqn.x"}])
async def test_update_needs_a_non_empty_connector(api: Api, body: dict[str, Any]) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"])

    message = fault(await api.put(f"/attachments/{attachment['id']}", {"attachment": body}), 400)

    assert "connector" in message
    assert await show(api, attachment["id"]) == attachment
    assert await volume_state(api, volume["id"]) == ("reserved", "reserved")


async def test_update_of_an_unknown_attachment(api: Api) -> None:
    missing = new_uuid()
    response = await api.put(f"/attachments/{missing}", {"attachment": {"connector": connector()}})
    assert fault(response, 404) == f"Volume attachment {missing} could not be found."
    assert target(api).faults.calls == []


# -- bodies ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["3.27", "3.53"])
async def test_mode_before_3_54_is_refused(api: Api, version: str) -> None:
    volume = await api.create_volume()
    caller = api.as_(version=version)

    for mode in ("rw", "ro", None):
        message = fault(await create_attachment(caller, volume["id"], mode=mode), 400)
        assert "mode" in message

    assert await attachment_rows(api, volume["id"]) == []
    assert await volume_state(api, volume["id"]) == ("available", "detached")


async def test_mode_at_3_54_sets_attach_mode(api: Api) -> None:
    caller = api.as_(version="3.54")
    volume = await caller.create_volume()

    attachment = await reserve(caller, volume["id"], mode="ro")
    assert attachment["attach_mode"] == "ro"
    connected = await connect(caller, attachment["id"], connector())
    assert connected["attach_mode"] == "ro"
    assert connected["connection_info"]["access_mode"] == "ro"

    other = await caller.create_volume()
    direct = await reserve(caller, other["id"], mode="rw", connector=connector())
    assert direct["attach_mode"] == "rw"
    assert direct["connection_info"]["access_mode"] == "rw"


async def test_mode_must_be_rw_or_ro(api: Api) -> None:
    volume = await api.create_volume()
    message = fault(await create_attachment(api.as_(version="3.54"), volume["id"], mode="rx"), 400)
    assert "attachment.mode" in message
    assert await attachment_rows(api, volume["id"]) == []


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda v: {"attachment": {"volume_uuid": v, "foo": 1}}, "attachment.foo"),
        (lambda v: {"attachment": {"volume_uuid": v, "host_name": "h1"}}, "attachment.host_name"),
        (lambda v: {"attachment": {"volume_uuid": v}, "extra": True}, "extra"),
        (lambda v: {"attachment": {}}, "attachment.volume_uuid"),
        (lambda v: {"attachment": {"volume_uuid": "not-a-uuid"}}, "attachment.volume_uuid"),
        (lambda v: {"attachment": {"volume_uuid": v, "instance_uuid": "not-a-uuid"}}, "attachment.instance_uuid"),
        (lambda v: {"attachment": {"volume_uuid": v, "instance_uuid": 12}}, "attachment.instance_uuid"),
        (lambda v: {"attachment": {"volume_uuid": v, "connector": ["iqn.x"]}}, "attachment.connector"),
        (lambda v: {"volume_uuid": v}, "attachment"),
        (lambda v: {"attachment": v}, "attachment"),
    ],
)
async def test_bad_create_bodies(api: Api, make: Callable[[str], dict[str, Any]], field: str) -> None:
    volume = await api.create_volume()

    message = fault(await api.post("/attachments", make(volume["id"])), 400)

    assert field in message
    assert await attachment_rows(api, volume["id"]) == []
    assert await volume_state(api, volume["id"]) == ("available", "detached")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"attachment": {"connector": connector(), "mode": "ro"}}, "attachment.mode"),
        ({"attachment": {"connector": connector(), "instance_uuid": new_uuid()}}, "attachment.instance_uuid"),
        ({"attachment": {"connector": connector()}, "extra": 1}, "extra"),
        ({"connector": connector()}, "attachment"),
    ],
)
async def test_bad_update_bodies(api: Api, body: dict[str, Any], field: str) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"])

    assert field in fault(await api.put(f"/attachments/{attachment['id']}", body), 400)

    assert await show(api, attachment["id"]) == attachment
    assert target(api).faults.calls == []


async def test_malformed_json(api: Api) -> None:
    response = await api.client.post(
        api.url("/attachments"), content=b'{"attachment": ', headers=api.headers({"Content-Type": "application/json"})
    )
    fault(response, 400)


# -- os-complete and actions -------------------------------------------------------------------------


async def test_os_complete_of_a_reserved_attachment(api: Api) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"])

    response = await api.post(f"/attachments/{attachment['id']}/action", {"os-complete": None})

    assert fault(response, 400) == (
        f"Attachment {attachment['id']} status must be attaching or attached to complete, "
        "but the current status is reserved."
    )
    assert (await show(api, attachment["id"]))["status"] == "reserved"
    assert await volume_state(api, volume["id"]) == ("reserved", "reserved")


async def test_os_complete_needs_3_44(api: Api) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"], connector=connector())

    fault(await api.as_(version="3.43").post(f"/attachments/{attachment['id']}/action", {"os-complete": None}), 404)

    assert (await show(api, attachment["id"]))["status"] == "attaching"
    assert await volume_state(api, volume["id"]) == ("attaching", "attaching")
    await complete(api.as_(version="3.44"), attachment["id"])
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")


@pytest.mark.parametrize("value", [None, {}, True, "x"])
async def test_os_complete_takes_any_value(api: Api, value: Any) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"], connector=connector())
    response = await api.post(f"/attachments/{attachment['id']}/action", {"os-complete": value})
    assert response.status_code == 204, response.text
    assert (await show(api, attachment["id"]))["status"] == "attached"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"os-foo": None}, "There is no such action: os-foo"),
        ({"os-complete": None, "os-foo": None}, "Malformed request body"),
        ({}, "Malformed request body"),
    ],
)
async def test_bad_actions(api: Api, body: dict[str, Any], message: str) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"], connector=connector())

    assert fault(await api.post(f"/attachments/{attachment['id']}/action", body), 400) == message

    assert (await show(api, attachment["id"]))["status"] == "attaching"


@pytest.mark.parametrize("body", [["os-complete"], "os-complete"])
async def test_action_body_must_be_an_object(api: Api, body: Any) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"], connector=connector())
    fault(await api.post(f"/attachments/{attachment['id']}/action", body), 400)
    assert (await show(api, attachment["id"]))["status"] == "attaching"


async def test_os_complete_of_an_unknown_attachment(api: Api) -> None:
    missing = new_uuid()
    response = await api.post(f"/attachments/{missing}/action", {"os-complete": None})
    assert fault(response, 404) == f"Volume attachment {missing} could not be found."


# -- versions, scoping, unknown ids ------------------------------------------------------------------


@pytest.mark.parametrize("version", [None, "3.0", "3.26"])
async def test_attachments_routes_need_3_27(api: Api, version: str | None) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"], connector=connector())
    old = api.as_(version=version)
    path = f"/attachments/{attachment['id']}"

    fault(await create_attachment(old, volume["id"]), 404)
    fault(await old.get("/attachments"), 404)
    fault(await old.get("/attachments/detail"), 404)
    fault(await old.get(path), 404)
    fault(await old.put(path, {"attachment": {"connector": connector()}}), 404)
    fault(await old.post(f"{path}/action", {"os-complete": None}), 404)
    fault(await old.delete(path), 404)

    assert await show(api, attachment["id"]) == attachment
    assert await volume_state(api, volume["id"]) == ("attaching", "attaching")
    assert target(api).acls(volume["id"]) == {initiator()}


async def test_another_projects_attachment_does_not_exist(api: Api) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"], connector=connector())
    stranger = api.as_(project=f"{api.project}x")
    path = f"/attachments/{attachment['id']}"
    message = f"Volume attachment {attachment['id']} could not be found."

    assert fault(await stranger.get(path), 404) == message
    assert fault(await stranger.put(path, {"attachment": {"connector": connector("evil")}}), 404) == message
    assert fault(await stranger.post(f"{path}/action", {"os-complete": None}), 404) == message
    assert fault(await stranger.delete(path), 404) == message
    assert await listed(stranger) == []
    assert await listed(stranger, f"?volume_id={volume['id']}", detail=True) == []
    assert await listed(stranger, "?all_tenants=1", detail=True) == []

    assert await show(api, attachment["id"]) == attachment
    assert target(api).acls(volume["id"]) == {initiator()}
    assert await volume_state(api, volume["id"]) == ("attaching", "attaching")


async def test_admin_reaches_another_projects_attachment(api: Api) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"], connector=connector())
    admin = api.as_(user="admin", project=f"{api.project}admin")

    shown = await show(admin, attachment["id"])
    assert shown["connection_info"] == attachment["connection_info"]
    await complete(admin, attachment["id"])
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")
    assert await remove(admin, attachment["id"]) == []
    assert await volume_state(api, volume["id"]) == ("available", "detached")
    assert not exported(api, volume["id"])


@pytest.mark.parametrize("attachment_id", [new_uuid(), "not-a-uuid"], ids=["uuid", "not-a-uuid"])
async def test_unknown_attachment(api: Api, attachment_id: str) -> None:
    message = f"Volume attachment {attachment_id} could not be found."
    assert fault(await api.get(f"/attachments/{attachment_id}"), 404) == message
    assert fault(await api.delete(f"/attachments/{attachment_id}"), 404) == message


# -- attachment_specs --------------------------------------------------------------------------------


async def test_connector_is_stored_key_by_key_and_never_shown(api: Api) -> None:
    volume = await api.create_volume()
    secret = f"never-shown-{new_uuid()}"
    long_value = "x" * 300 + secret
    host = connector(
        "specs1",
        wwpns=["50014380186af83c", "50014380186af83e"],
        nqn=None,
        uuid=new_uuid(),
        long_key=long_value,
        nested={"a": [1, 2, {"b": secret}]},
    )
    attachment = await reserve(api, volume["id"])

    response = await api.put(f"/attachments/{attachment['id']}", {"attachment": {"connector": host}})

    assert response.status_code == 200, response.text
    rows = await specs(api, attachment["id"])
    assert set(rows) == set(host)
    assert decoded(rows) == host
    assert len(rows["long_key"]) > 255
    assert rows["initiator"] == f'"{initiator("specs1")}"'
    assert rows["multipath"] == "false"
    assert rows["nqn"] == "null"
    await complete(api, attachment["id"])
    for seen in (
        response,
        await api.get(f"/attachments/{attachment['id']}"),
        await api.get("/attachments"),
        await api.get("/attachments/detail"),
        await api.get(f"/volumes/{volume['id']}"),
        await api.as_(user="admin").get("/attachments/detail"),
        await api.delete(f"/attachments/{attachment['id']}"),
    ):
        assert seen.status_code == 200, seen.text
        assert secret not in seen.text
        assert "wwpns" not in seen.text
        assert "50014380186af83c" not in seen.text

    assert await specs(api, attachment["id"]) == {}


async def test_reconnecting_replaces_the_stored_connector(api: Api) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"], connector=connector("first", extra="one"))
    await connect(api, attachment["id"], connector("first"))
    assert decoded(await specs(api, attachment["id"])) == connector("first")


async def test_the_stored_connector_is_what_detach_uses(api: Api) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"], connector=connector("stored"))
    assert target(api).acls(volume["id"]) == {initiator("stored")}
    await remove(api, attachment["id"])
    assert "remove_initiator" in target(api).faults.calls
    assert target(api).acls(volume["id"]) == set()


# -- lists -------------------------------------------------------------------------------------------


async def three_attachments(api: Api) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A multiattach volume with one attached, one attaching and one reserved attachment (oldest first)."""
    volume = await api.create_volume(volume_type=await api.multiattach_type())
    attached = await reserve(api, volume["id"], instance_uuid=new_uuid(), connector=connector("l1"))
    await complete(api, attached["id"])
    # a connect puts the volume in attaching, where it takes no new reservation (SPEC 5): reserve first
    attaching = await reserve(api, volume["id"], instance_uuid=new_uuid())
    reserved = await reserve(api, volume["id"], instance_uuid=new_uuid())
    await connect(api, attaching["id"], connector("l2"))
    return volume, [await show(api, a["id"]) for a in (attached, attaching, reserved)]


async def test_list_shows_summaries_and_detail_shows_details(api: Api) -> None:
    _volume, made = await three_attachments(api)
    newest_first = list(reversed(made))

    summaries = await listed(api)
    details = await listed(api, detail=True)

    assert summaries == [{k: a[k] for k in SUMMARY_KEYS} for a in newest_first]
    assert details == newest_first
    assert all(set(d) == DETAIL_KEYS for d in details)
    assert [d["status"] for d in details] == ["reserved", "attaching", "attached"]


async def test_list_filters(api: Api) -> None:
    volume, (attached, attaching, reserved) = await three_attachments(api)
    other_volume = await api.create_volume()
    other = await reserve(api, other_volume["id"], instance_uuid=attached["instance"])

    async def ids(query: str) -> list[str]:
        return [a["id"] for a in await listed(api, query)]

    assert await ids(f"?volume_id={volume['id']}") == [reserved["id"], attaching["id"], attached["id"]]
    assert await ids(f"?volume_id={other_volume['id']}") == [other["id"]]
    assert await ids("?status=attached") == [attached["id"]]
    assert await ids("?status=attaching") == [attaching["id"]]
    assert await ids("?status=reserved") == [other["id"], reserved["id"]]
    assert await ids(f"?status=reserved&volume_id={volume['id']}") == [reserved["id"]]
    assert await ids("?status=detached") == []
    assert await ids(f"?instance_id={attached['instance']}") == [other["id"], attached["id"]]
    assert await ids(f"?instance_id={attaching['instance']}") == [attaching["id"]]
    assert await ids(f"?volume_id={new_uuid()}") == []
    assert [a["id"] for a in await listed(api, "?status=attaching", detail=True)] == [attaching["id"]]


async def test_unknown_filters(api: Api) -> None:
    await three_attachments(api)

    for query in ("?foo=bar", f"?project_id={api.project}", "?host=l1", "?with_count=true"):
        message = fault(await api.get(f"/attachments{query}"), 400)
        assert query[1:].split("=")[0] in message
        fault(await api.get(f"/attachments/detail{query}"), 400)

    # before 3.31 they are dropped
    old = api.as_(version="3.30")
    assert len(await listed(old, "?foo=bar")) == 3
    assert len(await listed(old, "?foo=bar&status=reserved")) == 1
    # all_tenants from a member is ignored, not refused
    assert len(await listed(api, "?all_tenants=1")) == 3


async def test_all_tenants_for_admins(api: Api) -> None:
    volume = await api.create_volume()
    mine = await reserve(api, volume["id"])
    neighbour = api.as_(project=f"{api.project}n")
    their_volume = await neighbour.create_volume()
    theirs = await reserve(neighbour, their_volume["id"])
    admin = api.as_(user="admin", project=f"{api.project}a")

    assert await listed(admin) == []
    everything = {a["id"] for a in await listed(admin, "?all_tenants=1")}
    assert {mine["id"], theirs["id"]} <= everything
    assert [a["id"] for a in await listed(admin, f"?all_tenants=1&project_id={neighbour.project}")] == [theirs["id"]]
    assert [a["id"] for a in await listed(admin, f"?all_tenants=true&volume_id={volume['id']}", detail=True)] == [
        mine["id"]
    ]
    # members: ignored
    assert [a["id"] for a in await listed(api, "?all_tenants=1")] == [mine["id"]]
    assert [a["id"] for a in await listed(neighbour, "?all_tenants=1", detail=True)] == [theirs["id"]]


async def test_sort(api: Api) -> None:
    _volume, made = await three_attachments(api)
    ids = [a["id"] for a in made]

    assert [a["id"] for a in await listed(api, "?sort=created_at:asc")] == ids
    assert [a["id"] for a in await listed(api, "?sort=created_at:desc")] == ids[::-1]
    assert [a["id"] for a in await listed(api, "?sort_key=created_at&sort_dir=asc")] == ids
    assert [a["id"] for a in await listed(api, "?sort=id:asc")] == sorted(ids)
    by_status = await listed(api, "?sort=status:asc,created_at:asc")
    assert [a["status"] for a in by_status] == ["attached", "attaching", "reserved"]
    fault(await api.get("/attachments?sort=size"), 400)
    fault(await api.get("/attachments?sort=created_at:sideways"), 400)
    fault(await api.get("/attachments?sort=id&sort_key=id"), 400)


async def test_pagination(api: Api) -> None:
    volume = await api.create_volume(volume_type=await api.multiattach_type())
    made = [(await reserve(api, volume["id"], instance_uuid=new_uuid()))["id"] for _ in range(5)]

    seen: list[str] = []
    url = api.url("/attachments/detail?limit=2&sort=created_at:asc")
    pages = 0
    while url:
        response = await api.client.get(url, headers=api.headers())
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["attachments"]) <= 2
        seen += [a["id"] for a in body["attachments"]]
        links = body.get("attachments_links")
        if links:
            assert links[0]["rel"] == "next"
            assert "limit=2" in links[0]["href"]
            assert f"marker={body['attachments'][-1]['id']}" in links[0]["href"]
        url = links[0]["href"] if links else ""
        pages += 1
        assert pages < 10
    assert seen == made
    assert pages == 3

    page = await listed(api, f"?marker={made[1]}&sort=created_at:asc")
    assert [a["id"] for a in page] == made[2:]
    page = await listed(api, f"?marker={made[1]}")
    assert [a["id"] for a in page] == made[:1]
    last = await api.get("/attachments?limit=10")
    assert "attachments_links" not in last.json()
    assert fault(await api.get(f"/attachments?marker={(missing := new_uuid())}"), 404).endswith(
        f"{missing} could not be found."
    )
    fault(await api.get("/attachments?limit=-1"), 400)
    fault(await api.get("/attachments?limit=x"), 400)
    assert await listed(api, "?limit=0") == []


async def test_marker_from_another_project_is_unknown(api: Api) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"])
    stranger = api.as_(project=f"{api.project}x")
    fault(await stranger.get(f"/attachments?marker={attachment['id']}"), 404)
