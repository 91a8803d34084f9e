"""Idempotency-Key and the reservation lease across the workers of a real `tether serve --workers 2` on PostgreSQL.

Concurrent retries arrive on several connections at once, so they are served by both workers: the key lives in
the database, and exactly one volume or attachment is made whichever worker serves which retry.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, start_server, stop_server

HEADER = "Idempotency-Key"
DELAY = 0.4  # every fake backend call: a connect is in flight for about 2 x DELAY


@pytest.fixture(scope="module")
def live(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "TETHER_DATABASE_URL": postgres_url,
        "TETHER_FAKE_DELAY": str(DELAY),
        "TETHER_RECONCILE_ON_START": "false",  # the database is shared with other tests' projects
        "TETHER_RESERVATION_TTL": "1",
        "TETHER_SWEEP_INTERVAL": "0.5",
    }
    server = start_server(tmp_path_factory.mktemp("idempotency-live"), env, workers=2)
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture
async def http(live: Server) -> AsyncIterator[httpx.AsyncClient]:
    project = f"p{uuid.uuid4().hex[:12]}"
    # no keep-alive reuse limit: every request of a gather gets a connection of its own, spread over both workers
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=f"{live.endpoint}/{project}",
        headers={"X-Auth-Token": f"alice:{project}", "OpenStack-API-Version": "volume 3.71"},
        timeout=60,
        limits=limits,
    ) as client:
        yield client


async def new_volume(http: httpx.AsyncClient) -> dict[str, Any]:
    created = await http.post("/volumes", json={"volume": {"size": 1}})
    assert created.status_code == 202, created.text
    volume_id = created.json()["volume"]["id"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        volume = (await http.get(f"/volumes/{volume_id}")).json()["volume"]
        if volume["status"] == "available":
            return volume  # type: ignore[no-any-return]
        await asyncio.sleep(0.05)
    pytest.fail(f"volume {volume_id} was not available in time")


async def attachments_of(http: httpx.AsyncClient, volume_id: str) -> list[dict[str, Any]]:
    listed = await http.get("/attachments/detail", params={"volume_id": volume_id})
    assert listed.status_code == 200, listed.text
    return listed.json()["attachments"]  # type: ignore[no-any-return]


def connector(host: str) -> dict[str, Any]:
    return {"initiator": f"iqn.1993-08.org.debian:01:{host}", "host": host, "ip": "192.0.2.9"}


async def test_concurrent_retries_of_a_volume_create_make_one_volume(http: httpx.AsyncClient) -> None:
    key = str(uuid.uuid4())
    body = {"volume": {"size": 1, "name": "once"}}
    responses = await asyncio.gather(*(http.post("/volumes", json=body, headers={HEADER: key}) for _ in range(16)))

    codes = Counter(r.status_code for r in responses)
    assert set(codes) <= {202, 409}, codes
    answered = [r for r in responses if r.status_code == 202]
    assert len({r.content for r in answered}) == 1
    assert sum("Idempotent-Replayed" not in r.headers for r in answered) == 1
    listed = (await http.get("/volumes")).json()["volumes"]
    assert [v["id"] for v in listed] == [answered[0].json()["volume"]["id"]]


async def test_concurrent_retries_of_a_create_with_a_connector_connect_once(http: httpx.AsyncClient) -> None:
    volume = await new_volume(http)
    key = str(uuid.uuid4())
    body = {"attachment": {"volume_uuid": volume["id"], "connector": connector("racer")}}
    responses = await asyncio.gather(*(http.post("/attachments", json=body, headers={HEADER: key}) for _ in range(16)))

    codes = Counter(r.status_code for r in responses)
    assert set(codes) <= {200, 409}, codes
    answered = [r for r in responses if r.status_code == 200]
    assert len({r.content for r in answered}) == 1
    (attachment,) = await attachments_of(http, volume["id"])
    assert attachment["id"] == answered[0].json()["attachment"]["id"]
    assert attachment["connection_info"] == answered[0].json()["attachment"]["connection_info"]


async def test_retries_while_the_first_connects_are_409_then_get_its_answer(http: httpx.AsyncClient) -> None:
    volume = await new_volume(http)
    key = str(uuid.uuid4())
    body = {"attachment": {"volume_uuid": volume["id"], "connector": connector("slow")}}
    first = asyncio.create_task(http.post("/attachments", json=body, headers={HEADER: key}))
    await asyncio.sleep(DELAY / 2)  # its claim (key in flight) is committed; its export is under way

    during = await asyncio.gather(*(http.post("/attachments", json=body, headers={HEADER: key}) for _ in range(8)))

    assert [r.status_code for r in during] == [409] * 8, [r.text for r in during]
    assert all("conflictingRequest" in r.json() for r in during)
    done = await first
    assert done.status_code == 200, done.text
    again = await http.post("/attachments", json=body, headers={HEADER: key})
    assert again.status_code == 200
    assert again.content == done.content
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(await attachments_of(http, volume["id"])) == 1


async def test_the_lease_expires_a_reservation_on_a_multi_worker_server(http: httpx.AsyncClient) -> None:
    volume = await new_volume(http)
    reserved = await http.post("/attachments", json={"attachment": {"volume_uuid": volume["id"]}})
    assert reserved.status_code == 200, reserved.text
    attachment_id = reserved.json()["attachment"]["id"]
    started = time.monotonic()
    while (await http.get(f"/attachments/{attachment_id}")).status_code != 404:
        assert time.monotonic() - started < 1 + 10, "the reservation outlived TETHER_RESERVATION_TTL + 10 s"
        await asyncio.sleep(0.1)
    assert (await http.get(f"/volumes/{volume['id']}")).json()["volume"]["status"] == "available"


def test_the_server_log_names_each_replay_and_each_expiry(live: Server) -> None:
    text = Path(live.log).read_text()
    assert "replayed" in text
    assert "reservation lease: removed attachment" in text
