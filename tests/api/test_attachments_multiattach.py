"""Multiattach volumes: several live attachments, one ACL per host, shared connections and their teardown."""

from __future__ import annotations

from typing import Any

from tests.api.attaching import (
    complete,
    connect,
    connector,
    create_attachment,
    exported,
    initiator,
    listed,
    new_uuid,
    remove,
    reserve,
    show,
    target,
    volume_state,
)
from tests.conftest import Api, fault


async def multiattach_volume(api: Api) -> dict[str, Any]:
    volume = await api.create_volume(volume_type=await api.multiattach_type())
    assert volume["multiattach"] is True
    return volume


async def attached(api: Api, volume_id: str, host: str, **fields: Any) -> dict[str, Any]:
    """Create with a connector and complete: a multiattach volume that is `attaching` takes no new reservation."""
    attachment = await reserve(api, volume_id, connector=connector(host), **fields)
    await complete(api, attachment["id"])
    return attachment


async def test_several_live_attachments(api: Api) -> None:
    volume = await multiattach_volume(api)
    made = []
    for n in range(3):
        made.append(await attached(api, volume["id"], f"host{n}", instance_uuid=new_uuid()))

    assert await volume_state(api, volume["id"]) == ("in-use", "attached")
    assert target(api).acls(volume["id"]) == {initiator(f"host{n}") for n in range(3)}
    # one export, one CHAP account: every attachment is told the same target and secret
    infos = [a["connection_info"] for a in made]
    assert len({(i["target_iqn"], i["auth_username"], i["auth_password"]) for i in infos}) == 1
    assert [i["attachment_id"] for i in infos] == [a["id"] for a in made]
    shown = await api.volume(volume["id"])
    assert [a["attachment_id"] for a in shown["attachments"]] == [a["id"] for a in made]
    assert [a["server_id"] for a in shown["attachments"]] == [a["instance"] for a in made]
    assert all(a["shared_connections_by_attachment"] == [] for a in await listed(api, detail=True))


async def test_reserve_is_allowed_while_in_use_or_reserved(api: Api) -> None:
    volume = await multiattach_volume(api)
    first = await reserve(api, volume["id"], instance_uuid=new_uuid())
    assert await volume_state(api, volume["id"]) == ("reserved", "reserved")
    second = await reserve(api, volume["id"], instance_uuid=new_uuid())
    assert await volume_state(api, volume["id"]) == ("reserved", "reserved")
    await connect(api, first["id"], connector("h1"))
    await complete(api, first["id"])
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")
    third = await reserve(api, volume["id"])

    assert third["status"] == "reserved"
    assert {a["id"] for a in await listed(api)} == {first["id"], second["id"], third["id"]}


async def test_two_hosts_have_two_acls(api: Api) -> None:
    volume = await multiattach_volume(api)
    a = await attached(api, volume["id"], "hostA", instance_uuid=new_uuid())
    b = await attached(api, volume["id"], "hostB", instance_uuid=new_uuid())

    assert target(api).acls(volume["id"]) == {initiator("hostA"), initiator("hostB")}
    assert a["shared_connections_by_attachment"] == []
    assert b["shared_connections_by_attachment"] == []
    assert (await show(api, a["id"]))["shared_connections_by_attachment"] == []


async def test_one_host_shares_one_acl(api: Api) -> None:
    volume = await multiattach_volume(api)
    first = await attached(api, volume["id"], "shared", instance_uuid=new_uuid())
    second = await attached(api, volume["id"], "shared", instance_uuid=new_uuid())

    assert target(api).acls(volume["id"]) == {initiator("shared")}
    assert first["shared_connections_by_attachment"] == []  # it was alone when it was written
    assert second["shared_connections_by_attachment"] == [first["id"]]
    assert (await show(api, first["id"]))["shared_connections_by_attachment"] == [second["id"]]
    assert (await show(api, second["id"]))["shared_connections_by_attachment"] == [first["id"]]
    details = {a["id"]: a["shared_connections_by_attachment"] for a in await listed(api, detail=True)}
    assert details == {first["id"]: [second["id"]], second["id"]: [first["id"]]}
    # re-connecting changes nothing about the sharing
    await connect(api, first["id"], connector("shared"))
    assert (await show(api, first["id"]))["shared_connections_by_attachment"] == [second["id"]]


async def test_shared_lists_only_connected_attachments_of_the_same_volume(api: Api) -> None:
    volume = await multiattach_volume(api)
    other_volume = await multiattach_volume(api)
    connected = await attached(api, volume["id"], "same")
    other_host = await attached(api, volume["id"], "different")
    elsewhere = await attached(api, other_volume["id"], "same")
    pending = await reserve(api, volume["id"])

    for attachment in (connected, pending, elsewhere, other_host):
        assert (await show(api, attachment["id"]))["shared_connections_by_attachment"] == []
    assert target(api).acls(other_volume["id"]) == {initiator("same")}

    # once the pending one connects from the same host, the two share
    joined = await connect(api, pending["id"], connector("same"))
    assert joined["shared_connections_by_attachment"] == [connected["id"]]
    assert (await show(api, connected["id"]))["shared_connections_by_attachment"] == [pending["id"]]
    assert (await show(api, elsewhere["id"]))["shared_connections_by_attachment"] == []


async def test_deleting_one_of_the_shared_keeps_the_acl(api: Api) -> None:
    volume = await multiattach_volume(api)
    first = await attached(api, volume["id"], "shared", instance_uuid=new_uuid())
    second = await attached(api, volume["id"], "shared", instance_uuid=new_uuid())
    calls = len(target(api).faults.calls)

    remaining = await remove(api, first["id"])

    assert remaining == [
        {"id": second["id"], "status": "attached", "instance": second["instance"], "volume_id": volume["id"]}
    ]
    assert target(api).faults.calls[calls:] == []
    assert target(api).acls(volume["id"]) == {initiator("shared")}
    assert exported(api, volume["id"])
    assert (await show(api, second["id"]))["shared_connections_by_attachment"] == []
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")

    assert await remove(api, second["id"]) == []

    assert target(api).acls(volume["id"]) == set()
    assert not exported(api, volume["id"])
    assert await volume_state(api, volume["id"]) == ("available", "detached")


async def test_deleting_one_host_keeps_the_other_hosts_acl_and_the_export(api: Api) -> None:
    volume = await multiattach_volume(api)
    a = await attached(api, volume["id"], "hostA", instance_uuid=new_uuid())
    b = await attached(api, volume["id"], "hostB", instance_uuid=new_uuid())

    await remove(api, a["id"])

    assert target(api).acls(volume["id"]) == {initiator("hostB")}
    assert exported(api, volume["id"])
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")
    # hostB still connects with what it was given
    export = target(api).targets[volume["id"]]
    assert export.chap.username == b["connection_info"]["auth_username"]

    await remove(api, b["id"])
    assert not exported(api, volume["id"])


async def test_two_hosts_one_shared(api: Api) -> None:
    volume = await multiattach_volume(api)
    a1 = await attached(api, volume["id"], "hostA", instance_uuid=new_uuid())
    a2 = await attached(api, volume["id"], "hostA", instance_uuid=new_uuid())
    b = await attached(api, volume["id"], "hostB", instance_uuid=new_uuid())
    assert target(api).acls(volume["id"]) == {initiator("hostA"), initiator("hostB")}
    assert b["shared_connections_by_attachment"] == []

    await remove(api, b["id"])
    assert target(api).acls(volume["id"]) == {initiator("hostA")}
    await remove(api, a2["id"])
    assert target(api).acls(volume["id"]) == {initiator("hostA")}
    assert exported(api, volume["id"])
    await remove(api, a1["id"])
    assert not exported(api, volume["id"])
    assert await volume_state(api, volume["id"]) == ("available", "detached")


async def test_a_reserved_attachment_does_not_keep_the_export(api: Api) -> None:
    volume = await multiattach_volume(api)
    connected = await attached(api, volume["id"], "h1")
    pending = await reserve(api, volume["id"], instance_uuid=new_uuid())

    assert [a["id"] for a in await remove(api, connected["id"])] == [pending["id"]]

    assert not exported(api, volume["id"])
    assert await volume_state(api, volume["id"]) == ("reserved", "reserved")
    calls = len(target(api).faults.calls)
    assert await remove(api, pending["id"]) == []
    assert target(api).faults.calls[calls:] == []
    assert await volume_state(api, volume["id"]) == ("available", "detached")


async def test_the_chap_account_survives_reexports(api: Api) -> None:
    volume = await multiattach_volume(api)
    first = await reserve(api, volume["id"], connector=connector("h1"))
    await remove(api, first["id"])
    assert not exported(api, volume["id"])

    again = await reserve(api, volume["id"], connector=connector("h2"))

    assert again["connection_info"]["auth_username"] == first["connection_info"]["auth_username"]
    assert again["connection_info"]["auth_password"] == first["connection_info"]["auth_password"]
    assert target(api).acls(volume["id"]) == {initiator("h2")}


async def test_non_multiattach_volume_refuses_what_multiattach_allows(api: Api) -> None:
    volume = await api.create_volume()
    first = await reserve(api, volume["id"], instance_uuid=new_uuid(), connector=connector("h1"))
    await complete(api, first["id"])

    fault(await create_attachment(api, volume["id"], instance_uuid=new_uuid(), connector=connector("h1")), 400)
    assert target(api).acls(volume["id"]) == {initiator("h1")}
    assert [a["id"] for a in await listed(api)] == [first["id"]]


async def test_an_attaching_multiattach_volume_takes_no_new_reservation(api: Api) -> None:
    volume = await multiattach_volume(api)
    connecting = await reserve(api, volume["id"], connector=connector("h1"))
    assert await volume_state(api, volume["id"]) == ("attaching", "attaching")

    message = fault(await create_attachment(api, volume["id"], instance_uuid=new_uuid()), 400)

    assert message == f"Volume {volume['id']} status must be available to reserve, but the current status is attaching."
    await complete(api, connecting["id"])
    assert (await reserve(api, volume["id"], instance_uuid=new_uuid()))["status"] == "reserved"


async def test_reconnecting_one_of_the_shared_from_another_host_keeps_the_shared_acl(api: Api) -> None:
    volume = await multiattach_volume(api)
    staying = await attached(api, volume["id"], "shared")
    moving = await attached(api, volume["id"], "shared")

    moved = await connect(api, moving["id"], connector("elsewhere"))

    assert moved["shared_connections_by_attachment"] == []
    assert target(api).acls(volume["id"]) == {initiator("shared"), initiator("elsewhere")}
    assert (await show(api, staying["id"]))["shared_connections_by_attachment"] == []
    await remove(api, staying["id"])
    assert target(api).acls(volume["id"]) == {initiator("elsewhere")}
