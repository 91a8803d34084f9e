"""The reservation lease (SPEC 12), on SQLite and PostgreSQL: TETHER_RESERVATION_TTL removes the reservations
nobody connected, recomputes their volumes, and never touches a connected attachment; one process sweeps.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from app.config import Settings
from app.db.engine import Database
from app.db.locks import advisory_key, asyncpg_dsn, sole_turn
from app.secrets import SecretBox
from app.services.idempotency import Idempotency
from app.services.sweeper import Sweeper
from tests.api.attaching import complete, connector, create_attachment, reserve, show, target, volume_state
from tests.conftest import Api

TTL = 1.0


@pytest.fixture
def settings_overrides(request: pytest.FixtureRequest) -> dict[str, Any]:
    return {"reservation_ttl": TTL, "sweep_interval": 0.2, **getattr(request, "param", {})}


async def gone(api: Api, attachment_id: str, within: float) -> float:
    """Seconds until the attachment is gone (fails after `within`)."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if (await api.get(f"/attachments/{attachment_id}")).status_code == 404:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    pytest.fail(f"attachment {attachment_id} still exists after {within} s")


def expired(api: Api) -> float:
    return float(api.app.state.metrics.registry.get_sample_value("tether_reservations_expired_total") or 0)


# -- plain and multiattach volumes ------------------------------------------------------------------------


async def test_a_reservation_nobody_connects_expires_and_the_volume_is_available_again(
    api: Api, tether_log: pytest.LogCaptureFixture
) -> None:
    volume = await api.create_volume()
    before = expired(api)
    reservation = await reserve(api, volume["id"], instance_uuid=str(uuid.uuid4()))
    assert await volume_state(api, volume["id"]) == ("reserved", "reserved")

    took = await gone(api, reservation["id"], within=TTL + 10)

    assert TTL * 0.5 < took < TTL + 10
    assert await volume_state(api, volume["id"]) == ("available", "detached")
    assert expired(api) >= before + 1
    lines = [r for r in tether_log.records if r.name == "tether.sweeper" and reservation["id"] in r.getMessage()]
    (line,) = lines
    assert api.project in line.getMessage()
    assert volume["id"] in line.getMessage()
    assert line.attachment_id == reservation["id"]  # type: ignore[attr-defined]
    assert line.project_id == api.project  # type: ignore[attr-defined]
    # a new reservation of the volume works as on any available volume
    assert (await create_attachment(api, volume["id"])).status_code == 200


async def test_on_a_plain_volume_the_attached_attachment_survives_beside_an_expiring_one(api: Api) -> None:
    """Nova's live migration leaves a second attachment of the same instance reserved on a plain volume."""
    volume = await api.create_volume()
    instance = str(uuid.uuid4())
    attached = (await create_attachment(api, volume["id"], instance_uuid=instance, connector=connector("src"))).json()
    await complete(api, attached["attachment"]["id"])
    migration = await reserve(api, volume["id"], instance_uuid=instance)

    await gone(api, migration["id"], within=TTL + 10)

    assert (await show(api, attached["attachment"]["id"]))["status"] == "attached"
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")
    assert target(api).acls(volume["id"]) == {"iqn.1993-08.org.debian:01:src"}


async def test_on_a_multiattach_volume_only_the_reservation_expires(api: Api) -> None:
    volume = await api.create_volume(volume_type=await api.multiattach_type())
    attached = (await create_attachment(api, volume["id"], connector=connector("a"))).json()["attachment"]
    await complete(api, attached["id"])
    reservation = await reserve(api, volume["id"], instance_uuid=str(uuid.uuid4()))
    connecting = (await create_attachment(api, volume["id"], connector=connector("b"))).json()["attachment"]
    assert connecting["status"] == "attaching"

    await gone(api, reservation["id"], within=TTL + 10)
    await asyncio.sleep(TTL)  # and a while longer: connected attachments never expire

    assert (await show(api, attached["id"]))["status"] == "attached"
    assert (await show(api, connecting["id"]))["status"] == "attaching"
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")
    await complete(api, connecting["id"])
    assert target(api).acls(volume["id"]) == {"iqn.1993-08.org.debian:01:a", "iqn.1993-08.org.debian:01:b"}


async def test_a_reservation_connected_before_its_lease_ends_never_expires(api: Api) -> None:
    volume = await api.create_volume()
    reservation = await reserve(api, volume["id"])
    response = await api.put(f"/attachments/{reservation['id']}", {"attachment": {"connector": connector("h")}})
    assert response.status_code == 200, response.text

    await asyncio.sleep(TTL + 1)

    assert (await show(api, reservation["id"]))["status"] == "attaching"
    assert await volume_state(api, volume["id"]) == ("attaching", "attaching")


async def test_a_legacy_os_reserve_expires_too(api: Api) -> None:
    volume = await api.create_volume()
    assert (await api.post(f"/volumes/{volume['id']}/action", {"os-reserve": {}})).status_code == 202
    assert (await api.volume(volume["id"]))["status"] == "attaching"
    (reservation,) = (await api.get(f"/attachments?volume_id={volume['id']}")).json()["attachments"]

    await gone(api, reservation["id"], within=TTL + 10)

    assert await volume_state(api, volume["id"]) == ("available", "detached")


@pytest.mark.parametrize("settings_overrides", [{"reservation_ttl": 0}], indirect=True)
async def test_off_by_default_nothing_expires(api: Api) -> None:
    assert Settings(_env_file=None).reservation_ttl == 0  # type: ignore[call-arg]
    volume = await api.create_volume()
    reservation = await reserve(api, volume["id"])
    await asyncio.sleep(0.5)

    report = await api.app.state.sweeper.sweep()

    assert report.reservations == []
    assert (await show(api, reservation["id"]))["status"] == "reserved"


@pytest.mark.parametrize("settings_overrides", [{"sweep_interval": 5.0}], indirect=True)
async def test_with_the_default_interval_a_reservation_goes_within_ttl_plus_10_seconds(api: Api) -> None:
    assert Settings(_env_file=None).sweep_interval == 5.0  # type: ignore[call-arg]
    volume = await api.create_volume()
    started = time.monotonic()
    reservation = await reserve(api, volume["id"])

    await gone(api, reservation["id"], within=TTL + 10)

    assert time.monotonic() - started <= TTL + 10


# -- one sweeper across processes -------------------------------------------------------------------------


def other_process(api: Api) -> tuple[Database, Sweeper]:
    """What another `tether serve` process has: its own engine and its own sweeper."""
    db = Database(api.app.state.db.url)
    return db, Sweeper(db, Idempotency(db, SecretBox(None), 60), reservation_ttl=TTL, interval=1)


async def test_racing_sweepers_remove_each_reservation_once(api: Api, database_url: str) -> None:
    volumes = [await api.create_volume() for _ in range(6)]
    reservations = {(await reserve(api, v["id"]))["id"] for v in volumes}
    await api.app.state.sweeper.stop()  # this test's sweeps only
    await asyncio.sleep(TTL + 0.1)
    others = [other_process(api) for _ in range(3)]
    try:
        reports = await asyncio.gather(*(sweeper.sweep() for _db, sweeper in others))
    finally:
        for db, _sweeper in others:
            await db.dispose()

    removed = [e.attachment_id for report in reports for e in report.reservations if e.project_id == api.project]
    assert sorted(removed) == sorted(reservations)  # each once, none twice
    for volume in volumes:
        assert await volume_state(api, volume["id"]) == ("available", "detached")


async def test_a_sweeper_skips_the_round_another_process_is_sweeping(api: Api, database_url: str) -> None:
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite has one serving process: it always has the turn")
    volume = await api.create_volume()
    reservation = await reserve(api, volume["id"])
    await api.app.state.sweeper.stop()
    await asyncio.sleep(TTL + 0.1)
    db, sweeper = other_process(api)
    try:
        async with sole_turn(api.app.state.db, "tether:sweep") as mine:
            assert mine
            skipped = await sweeper.sweep()
            assert not skipped.ran
            assert (await show(api, reservation["id"]))["status"] == "reserved"
        swept = await sweeper.sweep()
    finally:
        await db.dispose()
    assert swept.ran
    assert reservation["id"] in {e.attachment_id for e in swept.reservations}


async def test_a_sweeper_that_dies_mid_round_does_not_stop_the_others(api: Api, database_url: str) -> None:
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite has one serving process")
    import asyncpg

    volume = await api.create_volume()
    reservation = await reserve(api, volume["id"])
    await api.app.state.sweeper.stop()
    await asyncio.sleep(TTL + 0.1)
    # a process took its turn and died (its connection dropped) before it swept anything
    dying = await asyncpg.connect(asyncpg_dsn(api.app.state.db.url))
    await dying.execute("BEGIN")
    assert await dying.fetchval("SELECT pg_try_advisory_xact_lock($1)", advisory_key("tether:sweep"))
    db, sweeper = other_process(api)
    try:
        assert not (await sweeper.sweep()).ran
        dying.terminate()
        await asyncio.sleep(0.1)
        swept = await sweeper.sweep()
    finally:
        await db.dispose()
    assert swept.ran
    assert reservation["id"] in {e.attachment_id for e in swept.reservations}
