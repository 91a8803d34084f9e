"""Attachments under real concurrency: racing reserves, create/delete storms, and an event loop that never blocks.

asyncio.gather through the ASGI client runs the requests interleaved on one event loop, each with its
own pooled connection, so the races below are the database's, not the test's. They run on PostgreSQL
(SQLite serialises every writer); the event-loop test runs on both.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import statistics
import time
from collections import Counter
from typing import Any

import httpx
import pytest
from sqlalchemy import delete as sa_delete
from sqlalchemy import func, select
from sqlalchemy import update as sa_update

from app.db.models import Attachment, AttachmentSpec, Volume
from tests.api.attaching import (
    complete,
    connector,
    create_attachment,
    exported,
    initiator,
    new_uuid,
    reserve,
    show,
    target,
    volume_state,
)
from tests.conftest import Api, fault


@pytest.fixture
def postgres_only(database_url: str) -> None:
    if "sqlite" in database_url:
        pytest.skip("race tests need concurrent writers: PostgreSQL only")


def expected_status(statuses: list[str]) -> tuple[str, str]:
    """The volume status a set of live attachment statuses implies (SPEC §5, delete row)."""
    if not statuses:
        return "available", "detached"
    if "attached" in statuses:
        return "in-use", "attached"
    if "attaching" in statuses:
        return "attaching", "attaching"
    return "reserved", "reserved"


def allowed_status(statuses: list[str]) -> set[tuple[str, str]]:
    """What a volume may show at rest: the recompute, or `reserved` after a reserve (of a multiattach volume) or
    `attaching` after a connect, which move it whatever else it holds until a recompute (SPEC 5)."""
    allowed = {expected_status(statuses)}
    if "reserved" in statuses:
        allowed.add(("reserved", "reserved"))
    if "attaching" in statuses:
        allowed.add(("attaching", "attaching"))
    return allowed


async def live_attachments(api: Api, volume_id: str) -> list[tuple[Attachment, dict[str, Any]]]:
    async with api.app.state.db.read() as session:
        rows = (await session.execute(select(Attachment).where(Attachment.volume_id == volume_id))).scalars().all()
        result = []
        for row in rows:
            found = await session.execute(select(AttachmentSpec).where(AttachmentSpec.attachment_id == row.id))
            result.append((row, {s.key: json.loads(s.value) for s in found.scalars().all()}))
        return result


async def assert_target_matches(api: Api, volume_id: str) -> list[tuple[Attachment, dict[str, Any]]]:
    live = await live_attachments(api, volume_id)
    connected = {spec["initiator"] for a, spec in live if a.attach_status in ("attaching", "attached")}
    assert target(api).acls(volume_id) == connected, volume_id
    assert exported(api, volume_id) == bool(connected), volume_id
    for a, spec in live:
        if a.attach_status == "reserved":
            assert spec == {}
    return live


# -- one volume, fifty callers -----------------------------------------------------------------------


@pytest.mark.usefixtures("postgres_only")
async def test_fifty_concurrent_reserves_of_one_volume_have_one_winner(api: Api) -> None:
    for round_ in range(3):
        volume = await api.create_volume()
        hosts = {n: f"racer{round_}-{n}" for n in range(50)}

        async def attempt(n: int, host: str, volume_id: str = volume["id"]) -> httpx.Response:
            with_connector = connector(host) if n % 2 else None
            return await create_attachment(api, volume_id, instance_uuid=new_uuid(), connector=with_connector)

        responses = await asyncio.gather(*(attempt(n, hosts[n]) for n in range(50)))

        codes = Counter(r.status_code for r in responses)
        assert codes == {200: 1, 400: 49}, codes
        (n,) = [n for n, r in enumerate(responses) if r.status_code == 200]
        winner = responses[n].json()["attachment"]
        for response in responses:
            if response.status_code == 400:
                message = fault(response, 400)
                assert message.startswith(f"Volume {volume['id']} status must be available to reserve")
        live = await assert_target_matches(api, volume["id"])
        assert [a.id for a, _ in live] == [winner["id"]]
        if n % 2:
            assert winner["status"] == "attaching"
            assert winner["connection_info"]["attachment_id"] == winner["id"]
            assert target(api).acls(volume["id"]) == {initiator(hosts[n])}
            assert await volume_state(api, volume["id"]) == ("attaching", "attaching")
        else:
            assert winner["status"] == "reserved"
            assert target(api).acls(volume["id"]) == set()
            assert not exported(api, volume["id"])
            assert await volume_state(api, volume["id"]) == ("reserved", "reserved")


@pytest.mark.usefixtures("postgres_only")
async def test_complete_racing_delete_never_fails_badly(api: Api) -> None:
    for _ in range(15):
        volume = await api.create_volume()
        attachment = (await create_attachment(api, volume["id"], connector=connector("racer"))).json()["attachment"]

        completed, deleted = await asyncio.gather(
            api.post(f"/attachments/{attachment['id']}/action", {"os-complete": None}),
            api.delete(f"/attachments/{attachment['id']}"),
        )

        assert deleted.status_code == 200, deleted.text
        assert completed.status_code in (204, 404), completed.text
        assert await volume_state(api, volume["id"]) == ("available", "detached")
        assert not exported(api, volume["id"])


async def test_complete_that_loses_to_a_delete_is_a_404(api: Api) -> None:
    """The interleaving the race above hits only now and then, pinned down with the volume's row lock."""
    volume = await api.create_volume()
    attachment = (await create_attachment(api, volume["id"], connector=connector("racer"))).json()["attachment"]
    async with api.app.state.db.write() as session:
        await session.execute(select(Volume).where(Volume.id == volume["id"]).with_for_update())
        completing = asyncio.create_task(api.post(f"/attachments/{attachment['id']}/action", {"os-complete": None}))
        await asyncio.sleep(0.3)  # on PostgreSQL it has read the attachment and waits for the volume's lock
        await session.execute(sa_delete(Attachment).where(Attachment.id == attachment["id"]))  # what delete commits

    response = await completing
    assert fault(response, 404) == f"Volume attachment {attachment['id']} could not be found."


async def test_a_failed_connect_recomputes_with_what_others_committed(api: Api) -> None:
    """The volume status written by a failed connect's undo sees a completion that committed meanwhile."""
    volume = await api.create_volume(volume_type=await api.multiattach_type())
    first = (await create_attachment(api, volume["id"])).json()["attachment"]
    failing = (await create_attachment(api, volume["id"])).json()["attachment"]
    await api.put(f"/attachments/{first['id']}", {"attachment": {"connector": connector("hostA")}})
    target(api).faults.delay = 0.3
    target(api).faults.fail("add_initiator")
    body = {"attachment": {"connector": connector("hostB")}}
    calls = len(target(api).faults.calls)
    connecting = asyncio.create_task(api.put(f"/attachments/{failing['id']}", body))
    deadline = time.perf_counter() + 10
    while "create_export" not in target(api).faults.calls[calls:]:
        assert time.perf_counter() < deadline
        await asyncio.sleep(0.01)  # the failing attachment is claimed; its backend calls have begun
    async with api.app.state.db.write() as session:
        # what os-complete of the first attachment commits, while the failing connect rolls back
        await session.execute(select(Volume).where(Volume.id == volume["id"]).with_for_update())
        await session.execute(
            sa_update(Attachment).where(Attachment.id == first["id"]).values(attach_status="attached")
        )
        await asyncio.sleep(0.9)  # the undo runs now and waits for the volume's lock

    fault(await connecting, 500)
    target(api).faults.delay = 0
    assert (await show(api, failing["id"]))["status"] == "error_attaching"
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")
    assert target(api).acls(volume["id"]) == {initiator("hostA")}


@pytest.mark.usefixtures("postgres_only")
async def test_concurrent_deletes_of_one_attachment(api: Api) -> None:
    volume = await api.create_volume()
    attachment = (await create_attachment(api, volume["id"], connector=connector("h1"))).json()["attachment"]

    responses = await asyncio.gather(*(api.delete(f"/attachments/{attachment['id']}") for _ in range(10)))

    assert Counter(r.status_code for r in responses) == {200: 1, 404: 9}
    assert target(api).faults.calls.count("remove_export") == 1
    assert await volume_state(api, volume["id"]) == ("available", "detached")
    assert not exported(api, volume["id"])


# -- storms --------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("postgres_only")
async def test_create_delete_storm_leaves_volumes_and_target_consistent(api: Api) -> None:
    rng = random.Random(20261121)  # a reproducible storm
    multi = await api.multiattach_type()
    volumes = [(await api.create_volume(volume_type=multi if n % 2 else None))["id"] for n in range(10)]
    known: dict[str, str] = {}  # attachment id -> volume id
    hosts = ["stormA", "stormB", "stormC"]
    outcomes: Counter[tuple[str, int]] = Counter()

    async def create(volume_id: str) -> None:
        with_connector = connector(rng.choice(hosts)) if rng.random() < 0.6 else None
        response = await create_attachment(api, volume_id, instance_uuid=new_uuid(), connector=with_connector)
        outcomes["create", response.status_code] += 1
        assert response.status_code in (200, 400), response.text
        if response.status_code == 200:
            known[response.json()["attachment"]["id"]] = volume_id

    async def delete(attachment_id: str) -> None:
        response = await api.delete(f"/attachments/{attachment_id}")
        outcomes["delete", response.status_code] += 1
        assert response.status_code in (200, 404), response.text
        known.pop(attachment_id, None)

    async def finish(attachment_id: str) -> None:
        response = await api.post(f"/attachments/{attachment_id}/action", {"os-complete": None})
        outcomes["complete", response.status_code] += 1
        assert response.status_code in (204, 400, 404), response.text

    async def update(attachment_id: str) -> None:
        body = {"attachment": {"connector": connector(rng.choice(hosts))}}
        response = await api.put(f"/attachments/{attachment_id}", body)
        outcomes["update", response.status_code] += 1
        assert response.status_code in (200, 400, 404, 409), response.text

    for _wave in range(8):
        ops = []
        for _ in range(45):
            roll = rng.random()
            if roll < 0.45 or not known:
                ops.append(create(rng.choice(volumes)))
            elif roll < 0.7:
                ops.append(delete(rng.choice(list(known))))
            elif roll < 0.9:
                ops.append(finish(rng.choice(list(known))))
            else:
                ops.append(update(rng.choice(list(known))))
        await asyncio.gather(*ops)

    assert sum(outcomes.values()) == 8 * 45
    assert outcomes["create", 200] > 20, outcomes
    assert outcomes["delete", 200] > 20, outcomes
    # a reserve moves a multiattach volume to `reserved` whatever else it holds, and a connect to `attaching`
    # (SPEC 5); os-complete and delete recompute
    for volume_id in volumes:
        live = await assert_target_matches(api, volume_id)
        statuses = [a.attach_status for a, _ in live]
        state = await volume_state(api, volume_id)
        assert state in allowed_status(statuses), (volume_id, state, statuses)
        if statuses and volume_id in volumes[::2]:
            assert len(statuses) == 1  # not multiattach: at most one live attachment
    # drop what is only reserved and complete what is attaching: every volume's last word is then a recompute,
    # and must follow the rule
    reserved = [a.id for v in volumes for a, _ in await live_attachments(api, v) if a.attach_status == "reserved"]
    await asyncio.gather(*(delete(a) for a in reserved))
    attaching = [a.id for v in volumes for a, _ in await live_attachments(api, v) if a.attach_status == "attaching"]
    await asyncio.gather(*(finish(a) for a in attaching))
    for volume_id in volumes:
        live = await assert_target_matches(api, volume_id)
        assert await volume_state(api, volume_id) == expected_status([a.attach_status for a, _ in live])
    # and everything can be taken down cleanly
    everything = [a.id for v in volumes for a, _ in await live_attachments(api, v)]
    await asyncio.gather(*(delete(a) for a in everything))
    for volume_id in volumes:
        assert await live_attachments(api, volume_id) == []
        assert await volume_state(api, volume_id) == ("available", "detached")
        assert not exported(api, volume_id)


# -- the event loop keeps answering while the target is slow -----------------------------------------


async def claimed(api: Api, volume_ids: list[str]) -> int:
    async with api.app.state.db.read() as session:
        found = await session.scalar(
            select(func.count())
            .select_from(Attachment)
            .where(Attachment.volume_id.in_(volume_ids), Attachment.attach_status == "attaching")  # type: ignore[attr-defined]
        )
    return int(found or 0)


async def test_slow_target_does_not_block_the_event_loop(api: Api, database_url: str) -> None:
    volumes = [(await api.create_volume())["id"] for _ in range(20)]
    dispatcher = api.app.state.dispatcher
    gc.collect()  # the garbage of the set-up is not the app's to pay for while we measure
    target(api).faults.delay = 0.2  # after the volumes exist: only attach work is slow
    started = time.perf_counter()
    attaching = asyncio.gather(
        *(
            create_attachment(api, volume_id, instance_uuid=new_uuid(), connector=connector(f"loop{n}"))
            for n, volume_id in enumerate(volumes)
        )
    )
    # measure once all twenty have claimed their attachment and wait on the storage host, not while
    # twenty requests are still being parsed and reserved
    while await claimed(api, volumes) < 20:
        assert time.perf_counter() - started < 10
        await asyncio.sleep(0.01)
    in_flight_at_start = dispatcher.busy + dispatcher.waiting

    latencies: list[float] = []
    while not attaching.done():
        before = time.perf_counter()
        response = await api.get("/volumes")
        elapsed = time.perf_counter() - before
        assert response.status_code == 200
        assert len(response.json()["volumes"]) == 20
        if not attaching.done():
            latencies.append(elapsed)
        await asyncio.sleep(0.05)
    responses = await attaching
    total = time.perf_counter() - started

    assert [r.status_code for r in responses] == [200] * 20
    for volume_id in volumes:
        assert await volume_state(api, volume_id) == ("attaching", "attaching")
    # 40 backend calls of 0.2 s on 4 workers: the attaches really were slow while we measured
    assert total >= 1.6, total
    assert in_flight_at_start > 4, in_flight_at_start  # the pool was full and had a queue
    assert len(latencies) >= 5, latencies
    print(
        f"\n[{database_url.split('+')[0]}] GET /volumes while 20 attaches ran ({total:.2f} s): "
        f"n={len(latencies)} median={statistics.median(latencies) * 1000:.1f} ms "
        f"p90={sorted(latencies)[int(len(latencies) * 0.9)] * 1000:.1f} ms max={max(latencies) * 1000:.1f} ms"
    )
    assert max(latencies) < 0.25, latencies
    target(api).faults.delay = 0
    await asyncio.gather(*(complete(api, r.json()["attachment"]["id"]) for r in responses))


@pytest.mark.usefixtures("postgres_only")
async def test_a_reconnect_that_waits_for_the_volume_sees_a_completion_committed_meanwhile(api: Api) -> None:
    """PUT (a connect) of an attaching attachment, while os-complete of it holds the volume and commits: the connect
    reads the attachment again under the volume's lock, so the volume ends in-use, not attaching with its only
    attachment attached (the crash suite's 'attaching/attaching with attachments [attached]')."""
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"], instance_uuid=new_uuid(), connector=connector("hostA"))
    assert attachment["status"] == "attaching"
    async with api.app.state.db.write() as session:
        # what os-complete commits, holding the volume's row lock while the connect starts and reads the attachment
        await session.execute(select(Volume).where(Volume.id == volume["id"]).with_for_update())
        connecting = asyncio.create_task(
            api.put(f"/attachments/{attachment['id']}", {"attachment": {"connector": connector("hostA")}})
        )
        await asyncio.sleep(0.5)  # the connect has read the attachment and waits for the volume's lock
        assert not connecting.done()
        await session.execute(
            sa_update(Attachment).where(Attachment.id == attachment["id"]).values(attach_status="attached")
        )
        await session.execute(
            sa_update(Volume).where(Volume.id == volume["id"]).values(status="in-use", attach_status="attached")
        )
    response = await connecting
    assert response.status_code == 200, response.text
    assert response.json()["attachment"]["status"] == "attached"
    assert await volume_state(api, volume["id"]) == ("in-use", "attached")
