"""Tenant isolation on every route: another project's resources do not exist for a caller, admin-only
actions are 403 for members, connection secrets reach only the owner and admins, and none of it changes a row."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlmodel import SQLModel, select

from app.routers.volume_actions import ACTIONS
from tests.conftest import ROOT, Api, fault

try:
    from fastapi.routing import iter_route_contexts
except ImportError:  # older FastAPI kept app.routes flat

    def iter_route_contexts(routes: Any) -> Any:
        return routes


SPEC = json.loads((ROOT / "openapi" / "openapi.json").read_text())
CONNECTOR = {"initiator": "iqn.1993-08.org.debian:01:victim", "host": "victim-host", "ip": "192.0.2.20"}
ATTACKER_CONNECTOR = {"initiator": "iqn.1993-08.org.debian:01:attacker", "host": "attacker", "ip": "192.0.2.66"}
# routes outside the project-scoped API: no project, nothing of a project's in them
UNSCOPED = {
    ("GET", "/"): 300,
    ("GET", "/v3/"): 200,
    ("GET", "/v3"): 200,
    ("GET", "/healthcheck"): 200,
    ("GET", "/metrics"): 200,
    ("GET", "/openapi.json"): 200,
    ("GET", "/docs"): 200,
    ("GET", "/docs/oauth2-redirect"): 200,
    ("GET", "/redoc"): 200,
}
PREFIX = "/v3/{project_id}"


@dataclass
class Victim:
    """What the first project owns (and the volume types an admin made), and what must never leak."""

    project: str
    available: str  # a volume with metadata
    attached: str  # a volume with a connected, completed attachment
    reserved: str  # a volume with a reserved attachment
    connected_attachment: str
    reserved_attachment: str
    public_type: str
    private_type: str
    chap: tuple[str, str]
    secrets: set[str] = field(default_factory=set)


@dataclass
class Probe:
    """One request on a route, and what a caller from another project must get."""

    path: str  # below /v3/{project_id}
    body: Any = None
    params: dict[str, str] = field(default_factory=dict)
    foreign: frozenset[int] = frozenset({404})
    admin_only: bool = False
    action: str | None = None


def ids(*codes: int) -> frozenset[int]:
    return frozenset(codes)


def probes_for(v: Victim) -> dict[tuple[str, str], list[Probe]]:
    """Every project-scoped route (by its template), with the requests that aim at the victim's resources."""
    vol, att, res = v.available, v.attached, v.reserved
    action = "/volumes/{volume_id}/action"
    return {
        ("GET", "/volumes"): [
            Probe("/volumes", foreign=ids(200)),
            Probe("/volumes", params={"all_tenants": "1"}, foreign=ids(200)),
            Probe("/volumes", params={"all_tenants": "1", "project_id": v.project}, foreign=ids(400)),
            Probe("/volumes", params={"marker": vol}, foreign=ids(404)),
        ],
        ("GET", "/volumes/detail"): [
            Probe("/volumes/detail", params={"all_tenants": "true"}, foreign=ids(200)),
            Probe("/volumes/detail", params={"marker": att}, foreign=ids(404)),
        ],
        ("POST", "/volumes"): [
            # the private type is as absent as the victim's volumes; nothing is created
            Probe("/volumes", body={"volume": {"size": 1, "volume_type": v.private_type}}, foreign=ids(404)),
        ],
        ("GET", "/volumes/{volume_id}"): [Probe(f"/volumes/{vol}"), Probe(f"/volumes/{att}")],
        ("PUT", "/volumes/{volume_id}"): [
            Probe(f"/volumes/{vol}", body={"volume": {"name": "pwned", "metadata": {"owned": "yes"}}})
        ],
        ("DELETE", "/volumes/{volume_id}"): [
            Probe(f"/volumes/{vol}"),
            Probe(f"/volumes/{vol}", params={"force": "true"}, foreign=ids(403, 404), admin_only=True),
        ],
        ("GET", "/volumes/{volume_id}/metadata"): [
            Probe(f"/volumes/{vol}/metadata"),
            Probe(f"/volumes/{att}/metadata"),
        ],
        ("POST", "/volumes/{volume_id}/metadata"): [
            Probe(f"/volumes/{vol}/metadata", {"metadata": {"owned": "yes"}}),
            Probe(f"/volumes/{att}/metadata", {"metadata": {"secret": "owned"}}),
        ],
        ("PUT", "/volumes/{volume_id}/metadata"): [Probe(f"/volumes/{vol}/metadata", {"metadata": {}})],
        ("GET", "/volumes/{volume_id}/metadata/{key}"): [Probe(f"/volumes/{vol}/metadata/secret")],
        ("PUT", "/volumes/{volume_id}/metadata/{key}"): [
            Probe(f"/volumes/{vol}/metadata/secret", {"meta": {"secret": "owned"}}),
            Probe(f"/volumes/{att}/metadata/new", {"meta": {"new": "owned"}}),
        ],
        ("DELETE", "/volumes/{volume_id}/metadata/{key}"): [Probe(f"/volumes/{vol}/metadata/secret")],
        ("POST", action): [
            Probe(f"/volumes/{vol}/action", {"os-reserve": None}, action="os-reserve"),
            Probe(f"/volumes/{res}/action", {"os-unreserve": None}, action="os-unreserve"),
            Probe(
                f"/volumes/{att}/action",
                {"os-initialize_connection": {"connector": ATTACKER_CONNECTOR}},
                action="os-initialize_connection",
            ),
            Probe(
                f"/volumes/{vol}/action",
                {"os-attach": {"instance_uuid": str(uuid.uuid4()), "mountpoint": "/dev/vdb"}},
                action="os-attach",
            ),
            Probe(f"/volumes/{att}/action", {"os-begin_detaching": None}, action="os-begin_detaching"),
            Probe(f"/volumes/{att}/action", {"os-roll_detaching": None}, action="os-roll_detaching"),
            Probe(
                f"/volumes/{att}/action",
                {"os-terminate_connection": {"connector": CONNECTOR}},
                action="os-terminate_connection",
            ),
            Probe(
                f"/volumes/{att}/action",
                {"os-detach": {"attachment_id": v.connected_attachment}},
                action="os-detach",
            ),
            Probe(
                f"/volumes/{att}/action",
                {"os-force_detach": {"attachment_id": v.connected_attachment, "connector": CONNECTOR}},
                foreign=ids(403, 404),
                admin_only=True,
                action="os-force_detach",
            ),
            Probe(
                f"/volumes/{vol}/action",
                {"os-reset_status": {"status": "error", "attach_status": "detached"}},
                foreign=ids(403, 404),
                admin_only=True,
                action="os-reset_status",
            ),
        ],
        ("POST", "/types"): [
            Probe("/types", {"volume_type": {"name": f"t-{uuid.uuid4().hex[:8]}"}}, foreign=ids(403), admin_only=True)
        ],
        ("GET", "/types"): [Probe("/types", foreign=ids(200))],
        ("GET", "/types/default"): [Probe("/types/default", foreign=ids(200))],
        ("GET", "/scheduler-stats/get_pools"): [
            Probe("/scheduler-stats/get_pools", params={"detail": "true"}, foreign=ids(403), admin_only=True)
        ],
        ("GET", "/os-services"): [Probe("/os-services", foreign=ids(403), admin_only=True)],
        ("GET", "/types/{type_id}"): [Probe(f"/types/{v.private_type}")],
        ("DELETE", "/types/{type_id}"): [
            Probe(f"/types/{v.public_type}", foreign=ids(403), admin_only=True),
            Probe(f"/types/{v.private_type}", foreign=ids(403), admin_only=True),
        ],
        ("POST", "/types/{type_id}/extra_specs"): [
            Probe(
                f"/types/{v.public_type}/extra_specs",
                {"extra_specs": {"multiattach": "<is> True"}},
                foreign=ids(403),
                admin_only=True,
            )
        ],
        ("GET", "/types/{type_id}/extra_specs"): [Probe(f"/types/{v.private_type}/extra_specs")],
        ("DELETE", "/types/{type_id}/extra_specs/{key}"): [
            Probe(f"/types/{v.public_type}/extra_specs/k", foreign=ids(403), admin_only=True)
        ],
        ("POST", "/attachments"): [
            Probe("/attachments", {"attachment": {"volume_uuid": vol}}),
            Probe("/attachments", {"attachment": {"volume_uuid": vol, "connector": ATTACKER_CONNECTOR}}),
            Probe(
                "/attachments",
                {
                    "attachment": {
                        "volume_uuid": att,
                        "instance_uuid": str(uuid.uuid4()),
                        "connector": ATTACKER_CONNECTOR,
                    }
                },
            ),
        ],
        ("GET", "/attachments"): [
            Probe("/attachments", foreign=ids(200)),
            Probe("/attachments", params={"all_tenants": "1"}, foreign=ids(200)),
            Probe("/attachments", params={"volume_id": att}, foreign=ids(200)),
            Probe("/attachments", params={"marker": v.connected_attachment}, foreign=ids(404)),
        ],
        ("GET", "/attachments/detail"): [
            Probe("/attachments/detail", params={"all_tenants": "1"}, foreign=ids(200)),
            Probe("/attachments/detail", params={"volume_id": att}, foreign=ids(200)),
        ],
        ("GET", "/attachments/{attachment_id}"): [
            Probe(f"/attachments/{v.connected_attachment}"),
            Probe(f"/attachments/{v.reserved_attachment}"),
        ],
        ("PUT", "/attachments/{attachment_id}"): [
            Probe(f"/attachments/{v.reserved_attachment}", {"attachment": {"connector": ATTACKER_CONNECTOR}}),
            Probe(f"/attachments/{v.connected_attachment}", {"attachment": {"connector": ATTACKER_CONNECTOR}}),
        ],
        ("POST", "/attachments/{attachment_id}/action"): [
            Probe(f"/attachments/{v.connected_attachment}/action", {"os-complete": None}),
            Probe(f"/attachments/{v.reserved_attachment}/action", {"os-complete": None}),
        ],
        ("DELETE", "/attachments/{attachment_id}"): [
            Probe(f"/attachments/{v.connected_attachment}"),
            Probe(f"/attachments/{v.reserved_attachment}"),
        ],
    }


def app_routes(app: Any) -> set[tuple[str, str]]:
    found = set()
    for route in iter_route_contexts(app.routes):
        for method in getattr(route, "methods", None) or ():
            if method != "HEAD":
                found.add((method, getattr(route, "path_format", route.path)))
    return found


async def setup_victim(api: Api) -> Victim:
    admin = api.as_(user="admin", project="adminproject")
    public = await admin.post(
        "/types", {"volume_type": {"name": f"pub-{uuid.uuid4().hex[:8]}", "extra_specs": {"k": "v"}}}
    )
    private = await admin.post(
        "/types",
        {
            "volume_type": {
                "name": f"priv-{uuid.uuid4().hex[:8]}",
                "extra_specs": {"k": "v"},
                "os-volume-type-access:is_public": False,
            }
        },
    )
    assert public.status_code == private.status_code == 200, (public.text, private.text)
    available = await api.create_volume(name="victim-available", metadata={"secret": "victim-metadata"})
    attached = await api.create_volume(name="victim-attached")
    reserved = await api.create_volume(name="victim-reserved")
    made = await api.post("/attachments", {"attachment": {"volume_uuid": attached["id"], "connector": CONNECTOR}})
    assert made.status_code == 200, made.text
    connected = made.json()["attachment"]
    assert (await api.post(f"/attachments/{connected['id']}/action", {"os-complete": None})).status_code == 204
    held = await api.post("/attachments", {"attachment": {"volume_uuid": reserved["id"]}})
    assert held.status_code == 200, held.text
    info = connected["connection_info"]
    victim = Victim(
        project=api.project,
        available=available["id"],
        attached=attached["id"],
        reserved=reserved["id"],
        connected_attachment=connected["id"],
        reserved_attachment=held.json()["attachment"]["id"],
        public_type=public.json()["volume_type"]["id"],
        private_type=private.json()["volume_type"]["id"],
        chap=(info["auth_username"], info["auth_password"]),
    )
    victim.secrets = {
        victim.available,
        victim.attached,
        victim.reserved,
        victim.connected_attachment,
        victim.reserved_attachment,
        victim.private_type,
        *victim.chap,
        "victim-metadata",
        "victim-available",
        "victim-host",
        CONNECTOR["initiator"],
        info["target_iqn"],
    }
    return victim


async def snapshot(api: Api) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (the fake target's state too): what no probe may change."""
    tables: dict[str, list[tuple[Any, ...]]] = {}
    async with api.app.state.db.read() as session:
        for table in SQLModel.metadata.sorted_tables:
            result = await session.execute(select(table))
            tables[table.name] = sorted((tuple(map(repr, row)) for row in result.all()), key=repr)
    fake = api.app.state.backends.target
    tables["target"] = sorted((vid, e.target_iqn, tuple(sorted(e.initiators))) for vid, e in fake.exports().items())
    return tables


def assert_no_leak(response: httpx.Response, victim: Victim, what: str) -> None:
    """A successful answer to an outsider names nothing of the victim's; an error may echo the id it was sent."""
    text = response.text
    if response.status_code >= 400:
        assert victim.chap[1] not in text, what
        assert victim.chap[0] not in text, what
        return
    leaked = sorted(s for s in victim.secrets if s in text)
    assert leaked == [], f"{what}: {leaked} in {text[:300]}"


async def send(caller: Api, method: str, url: str, probe: Probe) -> httpx.Response:
    return await caller.client.request(
        method, url, json=probe.body, params=probe.params or None, headers=caller.headers()
    )


# -- the table covers every route ---------------------------------------------------------------------------------


async def test_the_table_covers_every_route_and_action(api: Api) -> None:
    victim = Victim("p", "v", "a", "r", "ca", "ra", "pt", "xt", ("u", "s"))
    table = probes_for(victim)
    routes = app_routes(api.app)
    scoped = {(m, p.removeprefix(PREFIX)) for m, p in routes if p.startswith(PREFIX + "/")}
    mirrored = {(m, p.removeprefix("/v3")) for m, p in routes if p.startswith("/v3/") and not p.startswith(PREFIX)}
    mirrored -= {("GET", "/")}
    assert set(table) == scoped, "a project-scoped route has no row in the isolation table"
    assert mirrored == scoped, "every route answers at /v3/<resource> as at /v3/{project_id}/<resource>"
    unscoped = {r for r in routes if not r[1].startswith("/v3/") or r == ("GET", "/v3/")}
    assert unscoped == set(UNSCOPED), "a route outside the projects' API has no row"
    in_spec = {
        (method.upper(), path.removeprefix(PREFIX))
        for path, operations in SPEC["paths"].items()
        if path.startswith(PREFIX)
        for method in operations
    }
    assert in_spec == scoped
    assert {p.action for p in table[("POST", "/volumes/{volume_id}/action")]} == set(ACTIONS)


# -- (a) another project, (b) members on admin-only actions, and nothing changed --------------------------------


async def test_every_route_isolates_projects_and_admin_actions(api: Api) -> None:
    victim = await setup_victim(api)
    attacker = api.as_(user="mallory", project=f"q{uuid.uuid4().hex[:12]}")
    own = await attacker.create_volume(name="attacker-volume")
    assert (await attacker.post("/attachments", {"attachment": {"volume_uuid": own["id"]}})).status_code == 200
    await api.settle()
    before = await snapshot(api)
    calls = list(api.app.state.backends.target.faults.calls)

    for (method, template), probes in probes_for(victim).items():
        for probe in probes:
            what = f"{method} {template} {probe.path} {probe.params or ''} {json.dumps(probe.body)[:80]}"
            # (a) the attacker through its own project's URL, and through the project-less one
            for url in (attacker.url(probe.path), f"/v3{probe.path}"):
                response = await send(attacker, method, url, probe)
                assert response.status_code in probe.foreign, f"{what} at {url}: {response.status_code} {response.text}"
                if response.status_code >= 400:
                    fault(response, response.status_code)
                assert_no_leak(response, victim, what)
            # (a) the attacker's token on the victim's project URL
            response = await send(attacker, method, f"/v3/{victim.project}{probe.path}", probe)
            assert fault(response, 400) == "Malformed request url", what
            # (b) a member of the victim's own project on an admin-only action
            if probe.admin_only:
                response = await send(api, method, api.url(probe.path), probe)
                fault(response, 403)
    for method, path in UNSCOPED:
        response = await attacker.client.request(method, path, headers=attacker.headers())
        assert response.status_code == UNSCOPED[(method, path)], f"{method} {path}: {response.text[:200]}"
        assert_no_leak(response, victim, f"{method} {path}")

    await api.settle()
    assert await snapshot(api) == before, "an outsider or a member changed the database or the target"
    assert list(api.app.state.backends.target.faults.calls) == calls, "an outsider reached the target"


# -- connection_info and CHAP: the owner and admins only; all_tenants from a non-admin is ignored ----------------


def detail_of(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()["attachment"]  # type: ignore[no-any-return]


async def test_connection_info_reaches_only_the_owner_and_admins(api: Api) -> None:
    victim = await setup_victim(api)
    username, password = victim.chap
    admin = api.as_(user="admin", project="adminproject")
    attacker = api.as_(user="mallory", project=f"q{uuid.uuid4().hex[:12]}")

    owner_view = detail_of(await api.get(f"/attachments/{victim.connected_attachment}"))
    assert (owner_view["connection_info"]["auth_username"], owner_view["connection_info"]["auth_password"]) == (
        username,
        password,
    )
    admin_view = detail_of(await admin.get(f"/attachments/{victim.connected_attachment}"))
    assert admin_view["connection_info"] == owner_view["connection_info"]
    listed = (await admin.get("/attachments/detail", params={"all_tenants": "1"})).json()["attachments"]
    (row,) = [a for a in listed if a["id"] == victim.connected_attachment]
    assert row["connection_info"]["auth_password"] == password
    # an admin's own project lists only its own, like anyone's
    mine = (await admin.get("/attachments/detail")).json()["attachments"]
    assert victim.connected_attachment not in {a["id"] for a in mine}

    # another project never sees the attachment, its volume, or the secret, in any view
    responses = [
        await attacker.get(f"/attachments/{victim.connected_attachment}"),
        await attacker.get(f"/volumes/{victim.attached}"),
        await attacker.get("/attachments/detail", params={"all_tenants": "1"}),
        await attacker.get("/attachments/detail", params={"volume_id": victim.attached}),
        await attacker.get("/volumes/detail", params={"all_tenants": "1"}),
        await attacker.post(
            f"/volumes/{victim.attached}/action", {"os-initialize_connection": {"connector": ATTACKER_CONNECTOR}}
        ),
        await attacker.post("/attachments", {"attachment": {"volume_uuid": victim.attached, "connector": CONNECTOR}}),
    ]
    fault(responses[0], 404)
    fault(responses[1], 404)
    for response in responses:
        assert password not in response.text
        assert username not in response.text
        assert victim.connected_attachment not in response.text or response.status_code == 404
    # nor does the owner's volume view carry it: connection_info lives on the attachment only
    assert password not in (await api.get("/volumes/detail")).text


async def test_all_tenants_from_a_non_admin_lists_only_its_own(api: Api) -> None:
    victim = await setup_victim(api)
    attacker = api.as_(user="mallory", project=f"q{uuid.uuid4().hex[:12]}")
    own = await attacker.create_volume(name="attacker-volume")
    made = await attacker.post("/attachments", {"attachment": {"volume_uuid": own["id"]}})
    assert made.status_code == 200, made.text
    own_attachment = made.json()["attachment"]["id"]

    for value in ("1", "true", "True", "yes"):
        for path in ("/volumes", "/volumes/detail"):
            response = await attacker.get(path, params={"all_tenants": value})
            assert [v["id"] for v in response.json()["volumes"]] == [own["id"]], (path, value)
        for path in ("/attachments", "/attachments/detail"):
            response = await attacker.get(path, params={"all_tenants": value})
            assert [a["id"] for a in response.json()["attachments"]] == [own_attachment], (path, value)
    with_count = await attacker.get("/volumes", params={"all_tenants": "1", "with_count": "true"})
    assert with_count.json()["count"] == 1
    # an admin sees both projects with all_tenants, and narrows to one with project_id
    admin = api.as_(user="admin", project="adminproject")
    everyone = {v["id"] for v in (await admin.get("/volumes", params={"all_tenants": "1"})).json()["volumes"]}
    assert {own["id"], victim.available, victim.attached, victim.reserved} <= everyone
    narrowed = await admin.get("/volumes", params={"all_tenants": "1", "project_id": victim.project})
    assert {v["id"] for v in narrowed.json()["volumes"]} == {victim.available, victim.attached, victim.reserved}
    # the victim's own member, too, sees only its project
    theirs = await api.get("/attachments", params={"all_tenants": "1"})
    assert {a["id"] for a in theirs.json()["attachments"]} == {victim.connected_attachment, victim.reserved_attachment}
