"""Races the stress tests (tests/stress) found, pinned down one by one: reconcile on a live system, and the
order a transition takes the volume's and the attachment's rows in."""

from __future__ import annotations

import asyncio
import json

import pytest
from sqlalchemy import func, select, update

from app.db.models import Attachment, AttachStatus, Volume
from tests.api.attaching import connector, target
from tests.conftest import Api


async def set_attachment(api: Api, attachment_id: str, **values: object) -> None:
    async with api.app.state.db.write() as session:
        await session.execute(update(Attachment).where(Attachment.id == attachment_id).values(**values))  # type: ignore[arg-type]


async def reserved(api: Api) -> tuple[str, str]:
    volume_id = (await api.create_volume())["id"]
    response = await api.post("/attachments", {"attachment": {"volume_uuid": volume_id}})
    assert response.status_code == 200, response.text
    return volume_id, response.json()["attachment"]["id"]


# -- reconcile on a live system: a worker starting while its siblings serve, or `tether reconcile` -------------


async def test_reconcile_waits_for_a_connect_in_flight_instead_of_rolling_it_back(api: Api) -> None:
    volume_id, attachment_id = await reserved(api)
    state = api.app.state

    async with state.dispatcher.exclusive(volume_id):
        # a connect holding the volume's lock has claimed the attachment and is in its backend calls
        await set_attachment(api, attachment_id, attach_status=AttachStatus.ATTACHING)
        reconciling = asyncio.create_task(state.reconciler.run())
        await asyncio.sleep(0.3)
        assert not reconciling.done()  # waiting for the volume's lock, not rolling the claim back
        await set_attachment(api, attachment_id, connection_info=json.dumps({"driver_volume_type": "iscsi"}))
    report = await reconciling

    assert report.attachments_rolled_back == []
    assert (await api.get(f"/attachments/{attachment_id}")).json()["attachment"]["status"] == "attaching"


async def test_reconcile_rolls_back_a_connect_nobody_is_finishing(api: Api) -> None:
    volume_id, attachment_id = await reserved(api)
    await set_attachment(api, attachment_id, attach_status=AttachStatus.ATTACHING)

    report = await api.app.state.reconciler.run()

    assert report.attachments_rolled_back == [attachment_id]
    assert (await api.get(f"/attachments/{attachment_id}")).json()["attachment"]["status"] == "reserved"
    assert (await api.volume(volume_id))["status"] == "reserved"


# -- lock order: the volume's row, then the attachment's ----------------------------------------------------


async def test_a_connect_records_its_result_without_deadlocking_against_os_complete(
    api: Api, database_url: str
) -> None:
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite serialises writers (BEGIN IMMEDIATE): no row locks to take in the wrong order")
    volume_id, attachment_id = await reserved(api)  # a fresh volume: the connect records provider_location
    state = api.app.state
    target(api).faults.delay = 0.3
    try:
        connecting = asyncio.create_task(
            api.put(f"/attachments/{attachment_id}", {"attachment": {"connector": connector()}})
        )
        deadline = asyncio.get_running_loop().time() + 10
        while (await api.get(f"/attachments/{attachment_id}")).json()["attachment"]["status"] != "attaching":
            assert asyncio.get_running_loop().time() < deadline, "the connect never claimed the attachment"
            await asyncio.sleep(0.01)
        # an os-complete of the attachment: it takes the volume's row, then the attachment's
        async with state.db.engine.connect() as other, other.begin():
            await other.execute(select(Volume.id).where(Volume.id == volume_id).with_for_update())  # type: ignore[arg-type]
            await asyncio.sleep(0.9)  # the backend calls end meanwhile, and the connect comes to record its result
            await other.execute(
                update(Attachment).where(Attachment.id == attachment_id).values(updated_at=func.now())  # type: ignore[arg-type]
            )
        response = await connecting
    finally:
        target(api).faults.delay = 0.0

    assert response.status_code == 200, response.text  # taken the other way round, PostgreSQL kills one: a 500
    assert response.json()["attachment"]["status"] == "attaching"
