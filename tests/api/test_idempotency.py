"""Idempotency-Key on POST /volumes and POST /attachments (SPEC 12), on SQLite and PostgreSQL.

A retry with the same key and body gets the first answer again and changes nothing; the same key in flight is a
409, with another body a 422; keys are per project, 1-255 printable ASCII, and forgotten after their TTL.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from app.db.models import Attachment, IdempotencyKey, Volume
from tests.api.attaching import connector, initiator, target
from tests.conftest import Api, fault

HEADER = "Idempotency-Key"
SPEC = json.loads((Path(__file__).resolve().parents[2] / "openapi" / "openapi.json").read_text())


def keyed(key: str | None = None) -> dict[str, str]:
    return {HEADER: key or str(uuid.uuid4())}


async def create_volume(api: Api, key: str | None, size: int = 1, **fields: Any) -> httpx.Response:
    headers = {HEADER: key} if key is not None else None
    return await api.post("/volumes", {"volume": {"size": size, **fields}}, headers=headers)


async def create_attachment(api: Api, key: str | None, volume_id: str, **fields: Any) -> httpx.Response:
    headers = {HEADER: key} if key is not None else None
    return await api.post("/attachments", {"attachment": {"volume_uuid": volume_id, **fields}}, headers=headers)


async def count(api: Api, model: Any, *conditions: Any) -> int:
    async with api.app.state.db.read() as session:
        return int(await session.scalar(select(func.count()).select_from(model).where(*conditions)) or 0)


async def volumes_of(api: Api) -> int:
    return await count(api, Volume, Volume.project_id == api.project)


async def attachments_of(api: Api, volume_id: str) -> list[Attachment]:
    async with api.app.state.db.read() as session:
        rows = await session.execute(select(Attachment).where(Attachment.volume_id == volume_id))
        return list(rows.scalars().all())


async def key_row(api: Api, key: str, project: str | None = None) -> IdempotencyKey | None:
    async with api.app.state.db.read() as session:
        return await session.get(IdempotencyKey, (project or api.project, key))


def replays(api: Api, operation: str) -> float:
    value = api.app.state.metrics.registry.get_sample_value("tether_idempotent_replays_total", {"operation": operation})
    return float(value or 0)


def assert_replay(first: httpx.Response, again: httpx.Response) -> None:
    assert again.status_code == first.status_code, again.text
    assert again.content == first.content  # the very bytes: same status, same body
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["x-openstack-request-id"] != first.headers["x-openstack-request-id"]


# -- sequential retries ---------------------------------------------------------------------------------------


async def test_a_retried_volume_create_gets_the_first_answer_and_makes_one_volume(
    api: Api, tether_log: pytest.LogCaptureFixture
) -> None:
    key = str(uuid.uuid4())
    first = await create_volume(api, key, name="data", metadata={"role": "db"})
    assert first.status_code == 202, first.text
    await api.settle()

    again = await create_volume(api, key, name="data", metadata={"role": "db"})

    assert_replay(first, again)
    assert again.json()["volume"]["status"] == "creating"  # what the first answer said, not what it is now
    assert (await api.volume(first.json()["volume"]["id"]))["status"] == "available"
    assert await volumes_of(api) == 1
    assert replays(api, "create_volume") == 1
    (line,) = [r.getMessage() for r in tether_log.records if r.name == "tether.idempotency"]
    assert api.project in line
    assert f"volume {first.json()['volume']['id']}" in line


async def test_the_body_is_compared_as_json_not_as_text(api: Api) -> None:
    key = str(uuid.uuid4())
    first = await api.client.post(
        api.url("/volumes"),
        content=b'{"volume": {"size": 1, "name": "n"}}',
        headers=api.headers({HEADER: key, "Content-Type": "application/json"}),
    )
    assert first.status_code == 202, first.text
    again = await api.client.post(
        api.url("/volumes"),
        content=b'{"volume":{"name":"n","size":1}}',
        headers=api.headers({HEADER: key, "Content-Type": "application/json"}),
    )
    assert_replay(first, again)
    assert await volumes_of(api) == 1


async def test_a_retried_reservation_reserves_once(api: Api, tether_log: pytest.LogCaptureFixture) -> None:
    volume = await api.create_volume()
    key = str(uuid.uuid4())
    instance = str(uuid.uuid4())
    first = await create_attachment(api, key, volume["id"], instance_uuid=instance)
    assert first.status_code == 200, first.text

    again = await create_attachment(api, key, volume["id"], instance_uuid=instance)

    assert_replay(first, again)
    assert [a.id for a in await attachments_of(api, volume["id"])] == [first.json()["attachment"]["id"]]
    assert (await api.volume(volume["id"]))["status"] == "reserved"
    assert replays(api, "create_attachment") == 1
    (line,) = [r.getMessage() for r in tether_log.records if r.name == "tether.idempotency"]
    assert f"attachment {first.json()['attachment']['id']}" in line
    assert api.project in line


async def test_a_retried_create_with_a_connector_connects_once(api: Api) -> None:
    volume = await api.create_volume()
    key = str(uuid.uuid4())
    body = {"instance_uuid": str(uuid.uuid4()), "connector": connector("host-k")}
    first = await create_attachment(api, key, volume["id"], **body)
    assert first.status_code == 200, first.text
    calls = len(target(api).faults.calls)

    again = await create_attachment(api, key, volume["id"], **body)

    assert_replay(first, again)
    assert again.json()["attachment"]["connection_info"] == first.json()["attachment"]["connection_info"]
    assert again.json()["attachment"]["connection_info"]["auth_password"]
    assert len(target(api).faults.calls) == calls  # no backend call at all
    assert target(api).acls(volume["id"]) == {initiator("host-k")}
    assert len(await attachments_of(api, volume["id"])) == 1


async def test_a_replay_is_the_first_answer_even_after_the_state_moved_on(api: Api) -> None:
    volume = await api.create_volume()
    key = str(uuid.uuid4())
    body = {"connector": connector("host-m")}
    first = await create_attachment(api, key, volume["id"], **body)
    attachment_id = first.json()["attachment"]["id"]
    assert (await api.post(f"/attachments/{attachment_id}/action", {"os-complete": None})).status_code == 204

    again = await create_attachment(api, key, volume["id"], **body)

    assert_replay(first, again)
    assert again.json()["attachment"]["status"] == "attaching"
    assert (await api.get(f"/attachments/{attachment_id}")).json()["attachment"]["status"] == "attached"


async def test_requests_without_a_key_are_not_remembered(api: Api) -> None:
    volume = await api.create_volume()
    assert (await create_attachment(api, None, volume["id"])).status_code == 200
    again = await create_attachment(api, None, volume["id"])
    assert fault(again, 400).startswith(f"Volume {volume['id']} status must be available to reserve")
    assert await count(api, IdempotencyKey, IdempotencyKey.project_id == api.project) == 0


# -- a different request with the same key, and other projects -------------------------------------------------


async def test_the_same_key_with_another_body_is_a_422_and_changes_nothing(api: Api) -> None:
    key = str(uuid.uuid4())
    first = await create_volume(api, key, size=1)
    assert first.status_code == 202

    other = await create_volume(api, key, size=2)

    message = fault(other, 422)
    assert "unprocessableEntity" in other.json()
    assert key in message
    assert await volumes_of(api) == 1


async def test_the_same_key_on_another_operation_is_another_request(api: Api) -> None:
    key = str(uuid.uuid4())
    volume = (await create_volume(api, key)).json()["volume"]
    await api.settle()
    assert fault(await create_attachment(api, key, volume["id"]), 422)
    assert await attachments_of(api, volume["id"]) == []


async def test_the_same_key_at_another_microversion_or_from_another_user_is_another_request(api: Api) -> None:
    key = str(uuid.uuid4())
    assert (await create_volume(api, key)).status_code == 202
    assert fault(await create_volume(api.as_(version="3.60"), key), 422)
    assert fault(await create_volume(api.as_(user="bob"), key), 422)
    assert await volumes_of(api) == 1


async def test_keys_of_different_projects_never_collide(api: Api) -> None:
    key = "shared-key"
    other = api.as_(project=f"p{uuid.uuid4().hex[:12]}")
    mine = await create_volume(api, key, name="same")
    theirs = await create_volume(other, key, name="same")

    assert mine.status_code == theirs.status_code == 202
    assert "Idempotent-Replayed" not in theirs.headers
    assert mine.json()["volume"]["id"] != theirs.json()["volume"]["id"]
    assert await volumes_of(api) == 1
    assert await volumes_of(other) == 1
    # and each project's retry gets its own answer
    assert_replay(theirs, await create_volume(other, key, name="same"))
    assert_replay(mine, await create_volume(api, key, name="same"))


# -- malformed keys ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"k" * 256, id="256-characters"),
        pytest.param("clé".encode("latin-1"), id="not-ascii"),
        pytest.param("ключ".encode(), id="utf-8"),
        pytest.param(b"a\tb", id="tab"),
        pytest.param(b"a\x7fb", id="del"),
    ],
)
async def test_a_malformed_key_is_a_400_naming_the_header(api: Api, value: bytes) -> None:
    for path, body in (("/volumes", {"volume": {"size": 1}}), ("/attachments", {"attachment": {"volume_uuid": "x"}})):
        response = await api.client.post(api.url(path), json=body, headers={**api.headers(), HEADER: value})  # type: ignore[dict-item]
        assert HEADER in fault(response, 400)
    assert await volumes_of(api) == 0


async def test_a_key_of_255_printable_characters_is_fine(api: Api) -> None:
    key = ("~ !\"#$%&'()*+,-./0123456789:;<=>?@AZ[\\]^_`az{|}" * 6)[:254] + "x"
    assert len(key) == 255
    first = await create_volume(api, key)
    assert first.status_code == 202, first.text
    assert_replay(first, await create_volume(api, key))


async def test_two_keys_in_one_request_are_a_400(api: Api) -> None:
    response = await api.client.post(
        api.url("/volumes"),
        json={"volume": {"size": 1}},
        headers=[*api.headers().items(), (HEADER, "a"), (HEADER, "b")],
    )
    assert HEADER in fault(response, 400)
    assert await volumes_of(api) == 0


async def test_a_keyed_body_that_is_not_json_is_the_usual_400(api: Api) -> None:
    for content_type in ("application/json", "text/plain"):
        response = await api.client.post(
            api.url("/volumes"), content=b"{not json", headers=api.headers({HEADER: "k", "Content-Type": content_type})
        )
        assert "Malformed request body" in fault(response, 400)
    assert await key_row(api, "k") is None


# -- failures leave no key: the retry runs --------------------------------------------------------------------


async def test_a_refused_request_leaves_no_key(api: Api) -> None:
    key = str(uuid.uuid4())
    fault(await create_attachment(api, key, str(uuid.uuid4())), 404)
    assert await key_row(api, key) is None

    volume = await api.create_volume()
    created = await create_attachment(api, key, volume["id"])  # another body: fine, the key was never used
    assert created.status_code == 200, created.text
    assert "Idempotent-Replayed" not in created.headers


async def test_a_failed_connect_leaves_no_key_and_its_retry_connects(api: Api) -> None:
    volume = await api.create_volume()
    key = str(uuid.uuid4())
    body = {"connector": connector("host-f")}
    target(api).faults.fail("add_initiator")
    assert (await create_attachment(api, key, volume["id"], **body)).status_code == 500
    assert await key_row(api, key) is None
    assert await attachments_of(api, volume["id"]) == []

    retried = await create_attachment(api, key, volume["id"], **body)

    assert retried.status_code == 200, retried.text
    assert "Idempotent-Replayed" not in retried.headers
    assert len(await attachments_of(api, volume["id"])) == 1
    assert target(api).acls(volume["id"]) == {initiator("host-f")}


async def test_a_crash_mid_connect_is_settled_by_reconcile_and_the_retry_connects(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume = await api.create_volume()
    key = str(uuid.uuid4())
    body = {"connector": connector("host-c")}

    def crash(*_args: Any) -> None:
        raise RuntimeError("the process died here")  # not a BackendError: nothing undoes the claim

    monkeypatch.setattr(target(api), "add_initiator", crash)
    assert (await create_attachment(api, key, volume["id"], **body)).status_code == 500
    (stranded,) = await attachments_of(api, volume["id"])
    assert stranded.attach_status == "attaching"
    row = await key_row(api, key)
    assert row is not None
    assert row.status == "in_flight"
    assert row.resource_id == stranded.id
    assert fault(await create_attachment(api, key, volume["id"], **body), 409)
    monkeypatch.undo()

    report = await api.app.state.reconciler.run()

    assert report.attachments_removed == [stranded.id]
    assert report.attachments_rolled_back == []
    assert await key_row(api, key) is None
    assert (await api.volume(volume["id"]))["status"] == "available"
    retried = await create_attachment(api, key, volume["id"], **body)
    assert retried.status_code == 200, retried.text
    assert [a.id for a in await attachments_of(api, volume["id"])] == [retried.json()["attachment"]["id"]]
    assert target(api).acls(volume["id"]) == {initiator("host-c")}


# -- in flight ----------------------------------------------------------------------------------------------


async def test_the_same_key_while_the_first_is_connecting_is_a_409_then_the_answer(api: Api) -> None:
    volume = await api.create_volume()
    key = str(uuid.uuid4())
    body = {"connector": connector("host-s")}
    target(api).faults.delay = 0.5
    first = asyncio.create_task(create_attachment(api, key, volume["id"], **body))
    for _ in range(100):
        row = await key_row(api, key)
        if row is not None:
            break
        await asyncio.sleep(0.01)
    assert row is not None
    assert row.status == "in_flight"

    during = await asyncio.gather(*(create_attachment(api, key, volume["id"], **body) for _ in range(3)))
    for response in during:
        assert "still in progress" in fault(response, 409)
    other = await create_attachment(api, key, volume["id"], connector=connector("host-t"))
    fault(other, 422)  # a different request with that key is refused whether or not the first is done

    done = await first
    assert done.status_code == 200, done.text
    target(api).faults.delay = 0
    assert_replay(done, await create_attachment(api, key, volume["id"], **body))
    assert len(await attachments_of(api, volume["id"])) == 1


async def test_concurrent_first_attempts_make_one_volume(api: Api) -> None:
    key = str(uuid.uuid4())
    responses = await asyncio.gather(*(create_volume(api, key, name="racer") for _ in range(20)))

    codes = Counter(r.status_code for r in responses)
    assert set(codes) <= {202, 409}, codes
    bodies = {r.content for r in responses if r.status_code == 202}
    assert len(bodies) == 1
    assert codes[202] >= 1
    assert sum("Idempotent-Replayed" not in r.headers for r in responses if r.status_code == 202) == 1
    assert await volumes_of(api) == 1


async def test_concurrent_first_attempts_reserve_once(api: Api) -> None:
    volume = await api.create_volume()
    key = str(uuid.uuid4())
    instance = str(uuid.uuid4())
    responses = await asyncio.gather(
        *(create_attachment(api, key, volume["id"], instance_uuid=instance) for _ in range(20))
    )
    codes = Counter(r.status_code for r in responses)
    assert set(codes) <= {200, 409}, codes
    assert len({r.content for r in responses if r.status_code == 200}) == 1
    assert len(await attachments_of(api, volume["id"])) == 1


# -- expiry ---------------------------------------------------------------------------------------------------


@pytest.fixture
def settings_overrides(request: pytest.FixtureRequest) -> dict[str, Any]:
    return dict(getattr(request, "param", {}))


@pytest.mark.parametrize("settings_overrides", [{"idempotency_ttl": 0.5}], indirect=True)
async def test_an_answer_is_forgotten_after_its_ttl_and_the_sweep_removes_it(api: Api) -> None:
    key = str(uuid.uuid4())
    first = await create_volume(api, key, size=1)
    assert first.status_code == 202
    await asyncio.sleep(0.6)

    # past its TTL the key is free, whether or not the sweep has run: the same body runs again ...
    again = await create_volume(api, key, size=1)
    assert again.status_code == 202
    assert "Idempotent-Replayed" not in again.headers
    assert again.json()["volume"]["id"] != first.json()["volume"]["id"]
    await asyncio.sleep(0.6)
    # ... and so does another body
    other = await create_volume(api, key, size=2)
    assert other.status_code == 202
    assert await volumes_of(api) == 3
    assert_replay(other, await create_volume(api, key, size=2))

    await asyncio.sleep(0.6)
    report = await api.app.state.sweeper.sweep()
    assert report.ran
    assert report.keys >= 1
    assert await key_row(api, key) is None


# -- at rest and in the spec ----------------------------------------------------------------------------------


@pytest.mark.parametrize("settings_overrides", [{"secret_key": "a passphrase that is long enough"}], indirect=True)
async def test_a_stored_answer_is_sealed_like_the_chap_secrets(api: Api) -> None:
    volume = await api.create_volume()
    key = str(uuid.uuid4())
    first = await create_attachment(api, key, volume["id"], connector=connector("host-z"))
    password = first.json()["attachment"]["connection_info"]["auth_password"]
    row = await key_row(api, key)
    assert row is not None
    assert row.response_body is not None
    assert row.response_body.startswith("fernet:")
    assert password not in row.response_body
    assert_replay(first, await create_attachment(api, key, volume["id"], connector=connector("host-z")))
    # leave no sealed secret behind in the database the other tests share (they run without the key)
    assert (await api.delete(f"/attachments/{first.json()['attachment']['id']}")).status_code == 200
    assert (await api.delete(f"/volumes/{volume['id']}")).status_code == 202
    await api.settle()


@pytest.mark.parametrize("path", ["/v3/{project_id}/volumes", "/v3/{project_id}/attachments"])
def test_the_spec_documents_the_header_and_its_faults(path: str) -> None:
    operation = SPEC["paths"][path]["post"]
    (parameter,) = [p for p in operation["parameters"] if p["name"] == HEADER]
    assert parameter["in"] == "header"
    assert parameter["required"] is False
    (string,) = [s for s in parameter["schema"]["anyOf"] if s.get("type") == "string"]
    assert string["minLength"] == 1
    assert string["maxLength"] == 255
    assert {"409", "422"} <= set(operation["responses"])
    assert operation["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "UnprocessableEntityFault"
    )
