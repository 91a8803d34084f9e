"""Creating a volume from something (snapshot, clone, image, backup) or into a group: refused, never a blank disk."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Api, fault

SOURCE = "6f7c1a9e-2b3d-4c5e-8f90-a1b2c3d4e5f6"
REFUSED = {
    "snapshot_id": "creating a volume from a snapshot is not supported",
    "source_volid": "cloning a volume is not supported",
    "imageRef": "creating a volume from an image is not supported",
    "image_id": "creating a volume from an image is not supported",
    "backup_id": "restoring a backup to a new volume is not supported",
    "consistencygroup_id": "consistency groups are not supported",
    "group_id": "volume groups are not supported",
}


async def volume_ids(api: Api) -> list[str]:
    await api.settle()
    response = await api.get("/volumes")
    assert response.status_code == 200, response.text
    return [v["id"] for v in response.json()["volumes"]]


@pytest.mark.parametrize("field", REFUSED)
@pytest.mark.parametrize("version", ["3.0", "3.52", "3.53", "3.71"])
async def test_a_source_or_group_is_refused_and_names_the_field(api: Api, field: str, version: str) -> None:
    response = await api.as_(version=version).post("/volumes", {"volume": {"size": 1, field: SOURCE}})

    assert fault(response, 400) == (
        f"Invalid input for field/attribute volume.{field}: {REFUSED[field]}; leave it out or send null."
    )
    assert await volume_ids(api) == []


async def test_an_existing_volume_is_not_cloned_either(api: Api) -> None:
    source = await api.create_volume()

    response = await api.post("/volumes", {"volume": {"size": 1, "source_volid": source["id"]}})

    assert "volume.source_volid" in fault(response, 400)
    assert await volume_ids(api) == [source["id"]]


async def test_cinderclients_body_with_every_source_null_creates_a_volume(api: Api) -> None:
    # python-cinderclient's create at 3.71 sends every one of these keys, null when unused
    body: dict[str, Any] = {
        "size": 1,
        "consistencygroup_id": None,
        "snapshot_id": None,
        "name": "plain",
        "description": None,
        "volume_type": None,
        "availability_zone": None,
        "metadata": {},
        "imageRef": None,
        "source_volid": None,
        "backup_id": None,
        "group_id": None,
        "image_id": None,
    }

    response = await api.post("/volumes", {"volume": body})

    assert response.status_code == 202, response.text
    await api.settle()
    volume = await api.volume(response.json()["volume"]["id"])
    assert volume["status"] == "available"
    assert (volume["snapshot_id"], volume["source_volid"], volume["consistencygroup_id"]) == (None, None, None)


@pytest.mark.parametrize("field", REFUSED)
async def test_an_empty_string_is_unset(api: Api, field: str) -> None:
    response = await api.post("/volumes", {"volume": {"size": 1, field: ""}})

    assert response.status_code == 202, response.text
    await api.settle()
    assert (await api.volume(response.json()["volume"]["id"]))["status"] == "available"


@pytest.mark.parametrize("value", [5, True, {"id": SOURCE}, [SOURCE]])
async def test_a_source_that_is_not_a_string_is_refused(api: Api, value: Any) -> None:
    response = await api.post("/volumes", {"volume": {"size": 1, "snapshot_id": value}})

    assert "volume.snapshot_id" in fault(response, 400)
    assert await volume_ids(api) == []
