"""States the review found wrong (issue 13), each made impossible: rows that vanish mid-request, forced deletes
racing reservations, reset racing an attach, reconcile facing an attached volume set to `deleting`, and what
Cinder 29 shows for a connector's mountpoint."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import select

from app.db.models import Attachment, Volume
from app.main import create_app
from tests.api.attaching import complete, connector, create_attachment, exported, initiator, new_uuid, target
from tests.conftest import Api, fault, make_settings


async def wanted_equals_target(api: Api, volume_id: str) -> None:
    """What the database says the target must have for this volume is what the target has."""
    async with api.app.state.db.read() as session:
        rows = (await session.execute(select(Attachment).where(Attachment.volume_id == volume_id))).scalars().all()
        connected = [a for a in rows if a.attach_status in ("attaching", "attached") and a.connection_info]
    assert exported(api, volume_id) == bool(connected)
    assert len(target(api).acls(volume_id)) == len({a.attached_host for a in connected if not a.terminated})


# -- 1. no 500 from a row that vanished mid-request ---------------------------------------------------


@pytest.mark.parametrize("settings_overrides", [{"fake_delay": 0.002}])
async def test_requests_racing_a_background_delete_never_answer_500(api: Api) -> None:
    """DELETE, GET and PUT of a volume whose background delete removes the row while they run."""
    seen: Counter[tuple[str, int]] = Counter()
    for _ in range(12):
        volume = await api.create_volume()
        path = f"/volumes/{volume['id']}"

        async def hammer(method: str, path: str = path) -> None:
            for _ in range(15):
                if method == "DELETE":
                    response = await api.delete(path)
                elif method == "GET":
                    response = await api.get(path)
                else:
                    response = await api.put(path, {"volume": {"name": "renamed"}})
                seen[(method, response.status_code)] += 1
                assert response.status_code < 500, response.text
                if response.status_code == 404:
                    return
                await asyncio.sleep(0)

        await asyncio.gather(hammer("DELETE"), hammer("DELETE"), hammer("GET"), hammer("PUT"))
        await api.settle()
        fault(await api.get(path), 404)
    assert seen[("DELETE", 202)] >= 12, seen


# -- 4. a volume with live attachments is never deleted -----------------------------------------------


async def test_reconcile_keeps_an_attached_volume_reset_to_deleting_and_a_worker_still_starts(
    api: Api, database_url: str
) -> None:
    volume = await api.create_volume()
    attachment = await create_attachment(api, volume["id"], instance_uuid=new_uuid(), connector=connector("h1"))
    await complete(api, attachment.json()["attachment"]["id"])
    admin = api.as_(user="admin")
    response = await admin.post(f"/volumes/{volume['id']}/action", {"os-reset_status": {"status": "deleting"}})
    assert response.status_code == 202, response.text

    report = await api.app.state.reconciler.run()

    assert volume["id"] not in report.volumes_deleted
    assert [e for e in report.errors if volume["id"] in e] == [f"delete {volume['id']}: it has attachments"]
    assert volume["id"] in api.app.state.backends.volumes.volumes  # the storage is still there
    assert (await api.volume(volume["id"]))["status"] == "error_deleting"
    assert target(api).acls(volume["id"]) == {initiator("h1")}
    # a worker starting on this database (it reconciles first) starts and serves
    worker = create_app(make_settings(database_url, reconcile_on_start=True))
    async with worker.router.lifespan_context(worker):
        pass


async def test_a_bad_row_does_not_stop_reconcile(api: Api) -> None:
    """A volume whose stored CHAP credentials are mangled is reported; the others are still restored."""
    broken, fine = await api.create_volume(), await api.create_volume()
    for volume in (broken, fine):
        created = await create_attachment(api, volume["id"], instance_uuid=new_uuid(), connector=connector("h1"))
        assert created.status_code == 200, created.text
    async with api.app.state.db.write() as session:
        row = await session.get(Volume, broken["id"])
        assert row is not None
        stored, row.provider_auth = row.provider_auth, "mangled"
    for volume in (broken, fine):  # a tgtd restarted empty
        target(api).targets[volume["id"]].acls.clear()

    try:
        report = await api.app.state.reconciler.run()
    finally:  # the database is shared with other tests' reconciles
        async with api.app.state.db.write() as session:
            row = await session.get(Volume, broken["id"])
            assert row is not None
            row.provider_auth = stored

    assert f"export {broken['id']}" in report.errors
    assert (fine["id"], initiator("h1")) in report.acls_added


@pytest.mark.parametrize("settings_overrides", [{"fake_delay": 0.001}])
async def test_a_forced_delete_never_deletes_a_volume_reserved_meanwhile(api: Api, database_url: str) -> None:
    if "sqlite" in database_url:
        pytest.skip("the race needs concurrent writers: PostgreSQL only")
    admin = api.as_(user="admin")
    outcomes: Counter[tuple[int, int]] = Counter()
    for _ in range(25):
        volume = await api.create_volume()
        deleted, reserved = await asyncio.gather(
            admin.delete(f"/volumes/{volume['id']}?force=true"),
            create_attachment(api, volume["id"], instance_uuid=new_uuid()),
        )
        outcomes[(deleted.status_code, reserved.status_code)] += 1
        assert (deleted.status_code, reserved.status_code) in ((202, 400), (202, 404), (400, 200)), outcomes
        await api.settle()
    assert len(outcomes) >= 1


# -- 5. reset to detached and an attach never interleave ----------------------------------------------


async def test_reset_to_detached_and_an_attach_are_one_after_the_other(api: Api) -> None:
    """The attach queued on the volume first: reset must not commit its database change before it and then
    tear down the target under the attach that already answered 200."""
    volume = await api.create_volume(volume_type=await api.multiattach_type())
    first = await create_attachment(api, volume["id"], instance_uuid=new_uuid(), connector=connector("h1"))
    await complete(api, first.json()["attachment"]["id"])
    admin = api.as_(user="admin")
    reset_body = {"os-reset_status": {"status": "available", "attach_status": "detached"}}

    async with api.app.state.dispatcher.exclusive(volume["id"]):  # another operation holds the volume
        attach = asyncio.ensure_future(
            create_attachment(api, volume["id"], instance_uuid=new_uuid(), connector=connector("h2"))
        )
        await asyncio.sleep(0.05)
        reset = asyncio.ensure_future(admin.post(f"/volumes/{volume['id']}/action", reset_body))
        await asyncio.sleep(0.05)
    attached, was_reset = await asyncio.gather(attach, reset)

    assert attached.status_code == 200, attached.text
    assert was_reset.status_code == 202, was_reset.text
    # the reset came last: nothing is attached, and the target has nothing either
    async with api.app.state.db.read() as session:
        left = (await session.execute(select(Attachment).where(Attachment.volume_id == volume["id"]))).all()
    assert left == []
    assert not exported(api, volume["id"])
    assert target(api).acls(volume["id"]) == set()


# -- 9. Cinder compatibility ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["create", "update"])
async def test_a_connectors_mountpoint_is_the_attachments_device(api: Api, how: str) -> None:
    """Nova sends the mountpoint inside the connector; the volume's attachments[].device shows it."""
    volume = await api.create_volume()
    with_mountpoint = connector("h1", mountpoint="/dev/vdb")
    if how == "create":
        response = await create_attachment(api, volume["id"], instance_uuid=new_uuid(), connector=with_mountpoint)
    else:
        reserved = await create_attachment(api, volume["id"], instance_uuid=new_uuid())
        response = await api.put(
            f"/attachments/{reserved.json()['attachment']['id']}", {"attachment": {"connector": with_mountpoint}}
        )
    assert response.status_code == 200, response.text
    await complete(api, response.json()["attachment"]["id"])

    (shown,) = (await api.volume(volume["id"]))["attachments"]
    assert shown["device"] == "/dev/vdb"
    assert shown["attachment_id"] == response.json()["attachment"]["id"]


@pytest.mark.parametrize("mountpoint", ["", "/dev/" + "x" * 300, 42, ["/dev/vdb"]])
async def test_a_bad_mountpoint_is_a_400_before_anything_changes(api: Api, mountpoint: Any) -> None:
    volume = await api.create_volume()
    bad = connector("h1", mountpoint=mountpoint)
    response = await create_attachment(api, volume["id"], instance_uuid=new_uuid(), connector=bad)
    assert "connector.mountpoint" in fault(response, 400)
    assert (await api.volume(volume["id"]))["status"] == "available"
    assert not exported(api, volume["id"])
