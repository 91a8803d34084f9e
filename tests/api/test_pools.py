"""Capacity for operators: GET /scheduler-stats/get_pools, as cinderclient's get-pools reads it."""

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import Api, Server, fault

GIB = 1024**3


async def test_admin_sees_the_pool_and_its_free_space_shrink(api: Api) -> None:
    admin = api.as_(user="admin")
    before = await admin.get("/scheduler-stats/get_pools?detail=true")
    assert before.status_code == 200, before.text
    (pool,) = before.json()["pools"]
    assert pool["name"] == "tether@default#default"
    capabilities = pool["capabilities"]
    assert capabilities["storage_protocol"] == "iSCSI"
    assert capabilities["total_capacity_gb"] == 10000
    await api.create_volume(7)
    # the node's heartbeat reports the new capacity as soon as the create is done
    deadline = time.monotonic() + 10
    while True:
        (after,) = (await admin.get("/scheduler-stats/get_pools?detail=true")).json()["pools"]
        if after["capabilities"]["free_capacity_gb"] != capabilities["free_capacity_gb"] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert after["capabilities"]["free_capacity_gb"] == capabilities["free_capacity_gb"] - 7


async def test_without_detail_only_names(api: Api) -> None:
    response = await api.as_(user="admin").get("/scheduler-stats/get_pools")
    assert response.json() == {"pools": [{"name": "tether@default#default"}]}


async def test_members_are_refused(api: Api) -> None:
    fault(await api.get("/scheduler-stats/get_pools?detail=true"), 403)


def test_cinderclient_get_pools(server: Server) -> None:
    cinder = str(Path(sys.executable).parent / "cinder")
    result = subprocess.run(
        [
            cinder,
            "--os-auth-type",
            "noauth",
            "--os-user-id",
            "admin",
            "--os-project-id",
            "admin",
            "--os-endpoint",
            server.endpoint,
            "--os-volume-api-version",
            "3.71",
            "get-pools",
            "--detail",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "tether@default#default" in result.stdout
    assert "total_capacity_gb" in result.stdout
    assert "10000" in result.stdout
