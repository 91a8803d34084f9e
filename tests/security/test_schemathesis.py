"""Schemathesis against the checked-in spec and the live `tether serve` process: no 5xx, every answer documented.

Cases are derandomized from a fixed seed, so CI repeats the same requests. Most carry a valid token for the
project in the path and a valid microversion, and path ids often name resources the server really holds, so
the generated bodies reach the services instead of stopping at authentication; the rest probe those refusals.
"""

from __future__ import annotations

import random
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, seed, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core import NotSet

from tests.conftest import ROOT, Server, start_server, stop_server

SEED = 20261121
# per operation, for the fuzzing phase; schemathesis' coverage phase adds its boundary cases on top
EXAMPLES_PER_OPERATION = 8
SPEC = ROOT / "openapi" / "openapi.json"
PROJECT = "fuzzproject"
OTHER = "otherproject"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    response_schema_conformance,
    content_type_conformance,
    response_headers_conformance,
]
# who calls and at which microversion, by weight; "generated" keeps what schemathesis generated
AUTH = ["user"] * 7 + ["admin"] * 2 + ["none", "other"]
VERSIONS = ["3.71"] * 4 + ["latest", "3.0", "3.27", "3.44", "3.53", "3.60", "generated"]
# now and then in a path id or a query value: what the databases or the shell would choke on
HOSTILE = ["x\x00y", "$(reboot)", "a; rm -rf /", "\u202e💾", "A" * 10240, "9" * 30, "-1", "%00"]

schema = schemathesis.openapi.from_path(SPEC, config=schemathesis.Config(seed=SEED))

# what the live server holds for generated path ids to name (filled by the `live` fixture)
KNOWN: dict[str, list[str]] = {"volume_id": [], "attachment_id": [], "type_id": [], "key": []}
STATUSES: list[int] = []
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _client(base: str, user: str) -> httpx.Client:
    headers = {"X-Auth-Token": f"{user}:{PROJECT}", "OpenStack-API-Version": "volume 3.71"}
    return httpx.Client(base_url=f"{base}/v3/{PROJECT}", headers=headers, timeout=10)


def _seed_resources(base: str) -> None:
    """A multiattach type, four volumes, a reserved and a connected attachment."""
    with _client(base, "alice") as api, _client(base, "admin") as admin:
        specs = {"multiattach": "<is> True", "k": "v"}
        name = f"fuzz-multi-{uuid.uuid4().hex[:8]}"  # type names are unique in a database other tests share
        made = admin.post("/types", json={"volume_type": {"name": name, "extra_specs": specs}})
        assert made.status_code == 200, made.text
        KNOWN["type_id"] += [made.json()["volume_type"]["id"], name, "__DEFAULT__"]
        KNOWN["key"] += ["k", "multiattach", "m"]  # extra spec keys, and the volumes' metadata key below
        for i in range(4):
            body: dict[str, Any] = {"size": 1, "name": f"v{i}", "metadata": {"m": str(i)}}
            if i == 3:
                body["volume_type"] = name
            created = api.post("/volumes", json={"volume": body})
            assert created.status_code == 202, created.text
            KNOWN["volume_id"].append(created.json()["volume"]["id"])
        deadline = time.monotonic() + 10
        for volume_id in KNOWN["volume_id"]:
            while api.get(f"/volumes/{volume_id}").json()["volume"]["status"] != "available":
                assert time.monotonic() < deadline, f"volume {volume_id} never became available"
                time.sleep(0.05)
        connector = {"initiator": "iqn.1993-08.org.debian:01:fuzz", "host": "fuzz", "ip": "192.0.2.7"}
        for volume_id, conn in ((KNOWN["volume_id"][0], None), (KNOWN["volume_id"][1], connector)):
            made = api.post("/attachments", json={"attachment": {"volume_uuid": volume_id, "connector": conn}})
            assert made.status_code == 200, made.text
            KNOWN["attachment_id"].append(made.json()["attachment"]["id"])


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real server on each database: PostgreSQL refuses what SQLite stores (NUL, over-long text)."""
    env = {"TETHER_LOG_LEVEL": "WARNING"}
    if request.param == "postgres":
        env["TETHER_DATABASE_URL"] = str(request.getfixturevalue("postgres_url"))
    server = start_server(tmp_path_factory.mktemp("schemathesis"), env)
    for known in KNOWN.values():
        known.clear()
    try:
        _seed_resources(server.base)
        yield server
    finally:
        stop_server(server)
        print(f"\nschemathesis on {request.param}: {len(STATUSES)} cases so far, seed {SEED}")


def adjust(case: Any) -> None:
    """Mostly a caller the server accepts (own project, valid token and microversion), sometimes not.

    The choices come from a generator seeded with the case itself, so a derandomized run repeats them.
    """
    body = None if isinstance(case.body, NotSet) else case.body  # NotSet's repr holds an address
    key = f"{SEED}|{case.method}|{case.path}|{case.path_parameters}|{case.query}|{case.headers}|{body!r}"
    # ids the server made (schemathesis reuses those it saw in responses) differ from run to run
    rng = random.Random(UUID.sub("<id>", key))
    headers = dict(case.headers or {})
    auth = rng.choice(AUTH)
    if auth != "none":
        user = {"user": "alice", "admin": "admin", "other": "mallory"}[auth]
        headers["X-Auth-Token"] = f"{user}:{OTHER if auth == 'other' else PROJECT}"
    version = rng.choice(VERSIONS)
    if version != "generated":
        headers["OpenStack-API-Version"] = f"volume {version}"
    case.headers = headers
    params = case.path_parameters
    if params:
        if "project_id" in params and rng.random() < 0.9:
            params["project_id"] = PROJECT
        for name in params:
            draw = rng.random()
            if KNOWN.get(name) and draw < 0.7:
                params[name] = rng.choice(KNOWN[name])
            elif name != "project_id" and draw > 0.9:
                params[name] = rng.choice(HOSTILE)
    if case.query and rng.random() < 0.3:
        case.query[rng.choice(sorted(case.query))] = rng.choice(HOSTILE)


@schema.parametrize()
@seed(SEED)
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_spec(case: Any, live: Server) -> None:
    adjust(case)
    response = case.call_and_validate(base_url=live.base, checks=CHECKS, timeout=10)
    STATUSES.append(response.status_code)
