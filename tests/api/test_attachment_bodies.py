"""Attachment bodies Cinder 29's schema refuses: null mode or instance_uuid, and action bodies that are not objects."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.attaching import attachment_rows, connector, new_uuid, reserve, show, volume_state
from tests.conftest import Api, fault


@pytest.mark.parametrize("field", ["mode", "instance_uuid"])
@pytest.mark.parametrize("version", ["3.27", "3.54", "3.71"])
async def test_null_mode_or_instance_uuid_is_refused(api: Api, field: str, version: str) -> None:
    caller = api.as_(version=version)
    volume = await caller.create_volume()

    response = await caller.post("/attachments", {"attachment": {"volume_uuid": volume["id"], field: None}})

    assert (
        fault(response, 400) == f"Invalid input for field/attribute attachment.{field}. Value error, must not be null."
    )
    assert await attachment_rows(api, volume["id"]) == []
    assert await volume_state(api, volume["id"]) == ("available", "detached")


async def test_both_keys_left_out_are_fine(api: Api) -> None:
    volume = await api.create_volume()

    attachment = await reserve(api, volume["id"])

    assert attachment["instance"] is None
    assert attachment["attach_mode"] == "null"


async def test_both_keys_given_are_fine(api: Api) -> None:
    volume = await api.create_volume()
    instance = new_uuid()

    response = await api.post(
        "/attachments", {"attachment": {"volume_uuid": volume["id"], "instance_uuid": instance, "mode": "ro"}}
    )

    assert response.status_code == 200, response.text
    assert response.json()["attachment"]["instance"] == instance
    assert response.json()["attachment"]["attach_mode"] == "ro"


async def test_a_null_connector_is_still_a_reservation(api: Api) -> None:
    # Cinder's schema allows null for the connector alone
    volume = await api.create_volume()

    response = await api.post("/attachments", {"attachment": {"volume_uuid": volume["id"], "connector": None}})

    assert response.status_code == 200, response.text
    assert response.json()["attachment"]["status"] == "reserved"


@pytest.mark.parametrize(
    "body",
    [["os-complete"], [{"os-complete": None}], [], "os-complete", 1, True, 0.5],
    ids=["list-of-name", "list-of-object", "empty-list", "string", "number", "true", "float"],
)
async def test_an_action_body_that_is_not_an_object_is_malformed(api: Api, body: Any) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"], connector=connector())

    response = await api.post(f"/attachments/{attachment['id']}/action", body)

    assert fault(response, 400) == "Malformed request body"
    assert (await show(api, attachment["id"]))["status"] == "attaching"


async def test_a_json_null_action_body_is_malformed(api: Api) -> None:
    volume = await api.create_volume()
    attachment = await reserve(api, volume["id"], connector=connector())

    response = await api.client.post(
        api.url(f"/attachments/{attachment['id']}/action"),
        content=b"null",
        headers=api.headers({"Content-Type": "application/json"}),
    )

    assert fault(response, 400) == "Malformed request body"
    assert (await show(api, attachment["id"]))["status"] == "attaching"


async def test_a_non_object_body_of_an_unknown_attachment_is_malformed_too(api: Api) -> None:
    # the body is judged before the attachment is looked up, as in Cinder
    assert fault(await api.post(f"/attachments/{new_uuid()}/action", ["os-complete"]), 400) == "Malformed request body"
