"""The storage host failing at each step of attach and detach: safe 500s, no trace, and retries that work."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.api.attaching import (
    attachment_rows,
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
    specs,
    target,
    volume_state,
)
from tests.conftest import Api, fault

CONNECT_STEPS = ["create_export", "add_initiator"]
DISCONNECT_STEPS = ["remove_initiator", "remove_export"]


def backend_fault(response: httpx.Response, volume_id: str) -> str:
    """A 500 computeFault that says what was attempted and nothing of how it failed."""
    message = fault(response, 500)
    assert set(response.json()) == {"computeFault"}
    assert volume_id in message
    for leak in ("injected", f"volume-{volume_id}", "Traceback", "/dev/", "iqn."):
        assert leak not in message, message
    return message


# -- create with a connector: no trace ---------------------------------------------------------------


@pytest.mark.parametrize("step", CONNECT_STEPS)
async def test_failed_create_with_connector_leaves_no_trace(api: Api, step: str) -> None:
    volume = await api.create_volume()
    target(api).faults.fail(step)

    response = await create_attachment(api, volume["id"], instance_uuid=new_uuid(), connector=connector("h1"))

    message = backend_fault(response, volume["id"])
    assert message == f"Unable to connect volume {volume['id']}: the storage backend failed."
    assert step in target(api).faults.calls
    assert await attachment_rows(api, volume["id"]) == []
    assert await listed(api) == []
    assert await volume_state(api, volume["id"]) == ("available", "detached")
    assert not exported(api, volume["id"])
    assert target(api).acls(volume["id"]) == set()

    # nothing is left in the way of a retry
    retried = await reserve(api, volume["id"], connector=connector("h1"))
    assert retried["status"] == "attaching"
    assert target(api).acls(volume["id"]) == {initiator("h1")}
    assert len(await listed(api)) == 1


@pytest.mark.parametrize("step", CONNECT_STEPS)
async def test_failed_create_on_an_in_use_multiattach_volume_keeps_the_other_host(api: Api, step: str) -> None:
    volume = await api.create_volume(volume_type=await api.multiattach_type())
    other = await reserve(api, volume["id"], instance_uuid=new_uuid(), connector=connector("hostA"))
    await complete(api, other["id"])
    target(api).faults.fail(step)

    response = await create_attachment(api, volume["id"], instance_uuid=new_uuid(), connector=connector("hostB"))

    backend_fault(response, volume["id"])
    assert [a["id"] for a in await listed(api)] == [other["id"]]
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")
    assert target(api).acls(volume["id"]) == {initiator("hostA")}
    assert exported(api, volume["id"])
    assert (await show(api, other["id"]))["status"] == "attached"


async def test_failed_create_from_a_host_that_shares_keeps_its_acl(api: Api) -> None:
    volume = await api.create_volume(volume_type=await api.multiattach_type())
    other = await reserve(api, volume["id"], instance_uuid=new_uuid(), connector=connector("hostA"))
    await complete(api, other["id"])
    target(api).faults.fail("add_initiator")

    response = await create_attachment(api, volume["id"], instance_uuid=new_uuid(), connector=connector("hostA"))

    backend_fault(response, volume["id"])
    assert target(api).acls(volume["id"]) == {initiator("hostA")}
    assert exported(api, volume["id"])
    assert [a["id"] for a in await listed(api)] == [other["id"]]
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")


# -- update: error_attaching, cleaned up, and a retry that works ------------------------------------


@pytest.mark.parametrize("step", CONNECT_STEPS)
async def test_failed_update_marks_error_attaching_and_a_retry_succeeds(api: Api, step: str) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"], instance_uuid=new_uuid())
    target(api).faults.fail(step)

    response = await api.put(f"/attachments/{attachment['id']}", {"attachment": {"connector": connector("h1")}})

    message = backend_fault(response, volume["id"])
    assert message == f"Unable to connect volume {volume['id']}: the storage backend failed."
    failed = await show(api, attachment["id"])
    assert failed["status"] == "error_attaching"
    assert failed["connection_info"] == {}
    assert [a["id"] for a in await listed(api, "?status=error_attaching")] == [attachment["id"]]
    assert target(api).acls(volume["id"]) == set()
    assert not exported(api, volume["id"])
    assert await volume_state(api, volume["id"]) == ("reserved", "reserved")
    assert (await api.volume(volume["id"]))["attachments"] == []

    retried = await connect(api, attachment["id"], connector("h1"))

    assert retried["status"] == "attaching"
    assert retried["connection_info"]["attachment_id"] == attachment["id"]
    assert target(api).acls(volume["id"]) == {initiator("h1")}
    assert await volume_state(api, volume["id"]) == ("attaching", "attaching")
    await complete(api, attachment["id"])
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")


async def test_error_attaching_cannot_be_completed_and_deletes_without_the_backend(api: Api) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"])
    target(api).faults.fail("add_initiator")
    fault(await api.put(f"/attachments/{attachment['id']}", {"attachment": {"connector": connector()}}), 500)

    response = await api.post(f"/attachments/{attachment['id']}/action", {"os-complete": None})
    assert fault(response, 400).endswith("but the current status is error_attaching.")

    calls = len(target(api).faults.calls)
    assert await remove(api, attachment["id"]) == []
    assert target(api).faults.calls[calls:] == []
    assert await volume_state(api, volume["id"]) == ("available", "detached")
    assert await specs(api, attachment["id"]) == {}


@pytest.mark.parametrize("step", CONNECT_STEPS)
async def test_failed_update_on_a_multiattach_volume_keeps_the_other_host(api: Api, step: str) -> None:
    volume = await api.create_volume(volume_type=await api.multiattach_type())
    other = await reserve(api, volume["id"], instance_uuid=new_uuid(), connector=connector("hostA"))
    await complete(api, other["id"])
    attachment = await reserve(api, volume["id"], instance_uuid=new_uuid())
    target(api).faults.fail(step)

    response = await api.put(f"/attachments/{attachment['id']}", {"attachment": {"connector": connector("hostB")}})

    backend_fault(response, volume["id"])
    assert (await show(api, attachment["id"]))["status"] == "error_attaching"
    assert target(api).acls(volume["id"]) == {initiator("hostA")}
    assert exported(api, volume["id"])
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")


@pytest.mark.parametrize("step", CONNECT_STEPS)
async def test_failed_reconnect_from_another_host_keeps_the_host_using_it(api: Api, step: str) -> None:
    """Attached from host1, a PUT with host2's connector fails: host1 keeps its export, ACL and in-use status,
    and the attachment is exactly as it was (connector, connection_info, status)."""
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"], instance_uuid=new_uuid(), connector=connector("host1"))
    await complete(api, attachment["id"])
    before, stored = await show(api, attachment["id"]), await specs(api, attachment["id"])
    target(api).faults.fail(step)

    response = await api.put(f"/attachments/{attachment['id']}", {"attachment": {"connector": connector("host2")}})

    backend_fault(response, volume["id"])
    assert await show(api, attachment["id"]) == before
    assert await specs(api, attachment["id"]) == stored
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")
    assert exported(api, volume["id"])
    assert target(api).acls(volume["id"]) == {initiator("host1")}
    # and a reconcile (a worker starting) agrees with what the client sees
    report = await api.app.state.reconciler.run()
    assert not [error for error in report.errors if volume["id"] in error]  # the database is shared
    assert target(api).acls(volume["id"]) == {initiator("host1")}

    # once the target works again, the same re-connect moves the attachment to host2 alone
    moved = await connect(api, attachment["id"], connector("host2"))
    assert moved["status"] == "attached"
    assert target(api).acls(volume["id"]) == {initiator("host2")}
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")


# -- delete: error_detaching, and a retry that works -------------------------------------------------


@pytest.mark.parametrize("step", DISCONNECT_STEPS)
async def test_failed_delete_keeps_the_attachment_as_error_detaching(api: Api, step: str) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"], instance_uuid=new_uuid(), connector=connector("h1"))
    await complete(api, attachment["id"])
    target(api).faults.fail(step)

    response = await api.delete(f"/attachments/{attachment['id']}")

    message = backend_fault(response, volume["id"])
    assert message == f"Unable to disconnect volume {volume['id']}: the storage backend failed."
    kept = await show(api, attachment["id"])
    assert kept["status"] == "error_detaching"
    assert kept["connection_info"] == attachment["connection_info"]
    assert await specs(api, attachment["id"]) != {}
    assert exported(api, volume["id"])
    assert target(api).acls(volume["id"]) == ({initiator("h1")} if step == "remove_initiator" else set())
    # the volume is still connected to the host: it is not free for anyone else
    assert (await api.volume(volume["id"]))["status"] == "in-use"
    fault(await create_attachment(api, volume["id"], instance_uuid=new_uuid()), 400)

    assert await remove(api, attachment["id"]) == []

    fault(await api.get(f"/attachments/{attachment['id']}"), 404)
    assert await specs(api, attachment["id"]) == {}
    assert not exported(api, volume["id"])
    assert target(api).acls(volume["id"]) == set()
    assert await volume_state(api, volume["id"]) == ("available", "detached")


async def test_failed_delete_of_one_multiattach_host_keeps_the_others(api: Api) -> None:
    volume = await api.create_volume(volume_type=await api.multiattach_type())
    a = await reserve(api, volume["id"], instance_uuid=new_uuid(), connector=connector("hostA"))
    await complete(api, a["id"])
    b = await reserve(api, volume["id"], instance_uuid=new_uuid(), connector=connector("hostB"))
    await complete(api, b["id"])
    target(api).faults.fail("remove_initiator")

    backend_fault(await api.delete(f"/attachments/{a['id']}"), volume["id"])

    assert (await show(api, a["id"]))["status"] == "error_detaching"
    assert (await show(api, b["id"]))["status"] == "attached"
    assert target(api).acls(volume["id"]) == {initiator("hostA"), initiator("hostB")}

    remaining = await remove(api, a["id"])

    assert [r["id"] for r in remaining] == [b["id"]]
    assert target(api).acls(volume["id"]) == {initiator("hostB")}
    assert exported(api, volume["id"])
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")


async def test_a_failure_that_persists_keeps_failing_cleanly(api: Api) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"], connector=connector("h1"))
    target(api).faults.fail("remove_export", times=-1)

    for _ in range(3):
        backend_fault(await api.delete(f"/attachments/{attachment['id']}"), volume["id"])
        assert (await show(api, attachment["id"]))["status"] == "error_detaching"

    target(api).faults.clear()
    assert await remove(api, attachment["id"]) == []
    assert not exported(api, volume["id"])
    assert await volume_state(api, volume["id"]) == ("available", "detached")


# -- a client that goes away mid-attach --------------------------------------------------------------


async def _wait_for(check: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_dropped_client_does_not_strand_the_attachment(api: Api) -> None:
    volume = await api.create_volume()
    target(api).faults.delay = 0.3
    request = asyncio.create_task(
        create_attachment(api, volume["id"], instance_uuid=new_uuid(), connector=connector("h1"))
    )
    await _wait_for(lambda: _called(api, "create_export"))

    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request

    async def connected() -> bool:
        return target(api).acls(volume["id"]) == {initiator("h1")} and bool(
            (await listed(api, "?status=attaching", detail=True) or [{}])[0].get("connection_info")
        )

    await _wait_for(connected)
    (attachment,) = await listed(api, detail=True)
    assert attachment["connection_info"]["attachment_id"] == attachment["id"]
    assert await volume_state(api, volume["id"]) == ("attaching", "attaching")
    target(api).faults.delay = 0
    await remove(api, attachment["id"])
    assert not exported(api, volume["id"])


async def _called(api: Api, operation: str) -> bool:
    return operation in target(api).faults.calls


async def test_a_volume_lock_lost_before_the_connect_job_leaves_no_claim(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock lost between the claim and the node's job (its connection dropped): a 503, and the claim is gone.
    On PostgreSQL the claim is one statement committed by itself (app/services/one_trip.py), so it is undone; in a
    transaction it rolls back with the job's."""
    from app.backends.dispatch import LockLost
    from app.services.nodes import NodeRunner

    volume = await api.create_volume()

    def lost(self: NodeRunner) -> None:  # what the runner's first look at its lease says once the claim is made
        raise LockLost(self.volume_id)

    monkeypatch.setattr(NodeRunner, "check", lost)
    response = await create_attachment(api, volume["id"], instance_uuid=new_uuid(), connector=connector("h1"))
    monkeypatch.undo()

    assert response.status_code == 503, response.text
    assert await attachment_rows(api, volume["id"]) == []
    assert await volume_state(api, volume["id"]) == ("available", "detached")
    assert not exported(api, volume["id"])
    retried = await reserve(api, volume["id"], connector=connector("h1"))
    assert retried["status"] == "attaching"
