"""A real cluster, end to end: two `tether node` processes and a two-worker API tier on one PostgreSQL database."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import LiveCaller
from tests.nodes.cluster import Cluster, NodeSpec
from tests.nodes.netns import Network
from tests.storage.tgtd import readcapacity

pytestmark = pytest.mark.storage

HOST = re.compile(r"^(?P<node>node-[ab])@default#default$")
GIB = 1024**3


def test_both_nodes_are_up_and_a_volume_lands_on_one_and_becomes_available(cluster: Cluster) -> None:
    services = cluster.services()
    volume_services = {row["host"]: row for row in services if row["binary"] == "cinder-volume"}
    assert set(volume_services) == {"node-a@default", "node-b@default"}, services
    for row in volume_services.values():
        assert row["state"] == "up", row
        assert row["status"] == "enabled", row
        assert row["zone"] == "nova", row
    assert [row for row in services if row["binary"] == "cinder-scheduler"], services

    alice = cluster.caller(f"p{uuid.uuid4().hex[:12]}")
    volume = alice.create_volume(size=1)  # waits for "available"
    assert volume["status"] == "available"
    assert volume["availability_zone"] == "nova"

    shown = cluster.admin.get(f"/volumes/{volume['id']}")
    assert shown.status_code == 200, shown.text
    host = shown.json()["volume"]["os-vol-host-attr:host"]
    placed = HOST.match(host or "")
    assert placed, f"os-vol-host-attr:host {host!r}"
    owner = cluster.node(placed["node"])
    other = cluster.node("node-b" if owner.name == "node-a" else "node-a")
    # the file backend names each volume's file after the volume's id
    assert [path for path in owner.file_dir.glob("*") if volume["id"] in path.name], list(owner.file_dir.glob("*"))
    assert not [path for path in other.file_dir.glob("*") if volume["id"] in path.name]


INITIATOR = "iqn.1994-05.com.example:smoke"


def attach(caller: LiveCaller, volume_id: str) -> dict[str, Any]:
    """Reserve and connect in one call; the connection info."""
    connector = {"initiator": INITIATOR, "host": "smoke", "ip": "127.0.0.1", "platform": "x86_64", "os_type": "linux"}
    body = {"volume_uuid": volume_id, "instance_uuid": str(uuid.uuid4()), "connector": connector}
    return caller.ok("POST", "/attachments", {"attachment": body})["attachment"]["connection_info"]  # type: ignore[no-any-return]


def login(info: dict[str, Any]) -> tuple[int, str]:
    return readcapacity(
        INITIATOR, info["auth_username"], info["auth_password"], info["target_portal"], info["target_iqn"]
    )


def owner_of(cluster: Cluster, volume_id: str) -> str:
    return str(cluster.admin.get(f"/volumes/{volume_id}").json()["volume"]["os-vol-host-attr:host"]).split("@")[0]


def test_an_attached_volume_is_exported_by_its_own_nodes_tgtd(cluster: Cluster) -> None:
    alice = cluster.caller(f"p{uuid.uuid4().hex[:12]}")
    volume = alice.create_volume(size=1)
    owner = cluster.node(owner_of(cluster, volume["id"]))

    info = attach(alice, volume["id"])
    assert info["target_portal"] == owner.tgtd.portal, info
    assert info["target_iqn"] in owner.tgtd.show()
    code, out = login(info)
    assert code == 0, out
    assert f"Total size:{GIB}" in out


def test_a_second_connect_of_an_attached_volume_is_refused_and_leaves_the_first_and_its_export_as_they_were(
    cluster: Cluster,
) -> None:
    """Remote mode's create claims in one statement inside a transaction with its job; one that does not apply
    commits nothing (no row, no job) and the full claim says why, as in embedded mode."""
    alice = cluster.caller(f"p{uuid.uuid4().hex[:12]}")
    volume = alice.create_volume(size=1)
    info = attach(alice, volume["id"])
    assert info["auth_method"] == "CHAP", info
    other = {"initiator": "iqn.1994-05.com.example:other", "host": "other", "ip": "127.0.0.2"}
    body = {"attachment": {"volume_uuid": volume["id"], "instance_uuid": str(uuid.uuid4()), "connector": other}}
    refused = alice.http.post("/attachments", json=body)
    assert refused.status_code == 400, refused.text
    assert refused.json()["badRequest"]["message"] == (
        f"Volume {volume['id']} status must be available to reserve, but the current status is attaching."
    )
    listed = alice.ok("GET", f"/attachments?volume_id={volume['id']}")["attachments"]
    assert [a["status"] for a in listed] == ["attaching"], listed
    code, out = login(info)  # the first host's export and CHAP are untouched
    assert code == 0, out


def test_a_volume_whose_row_lost_its_chap_gets_new_credentials_inside_the_claims_transaction(cluster: Cluster) -> None:
    """Remote mode: the API remembers the volume as having CHAP; its row has none (restored from before its first
    connect), so the claim, in a transaction that holds the volume's row, stores new credentials on that same
    connection, and the node exports with them."""
    import psycopg

    from app.db.locks import asyncpg_dsn

    alice = cluster.caller(f"p{uuid.uuid4().hex[:12]}")
    volume = alice.create_volume(size=1)
    users = [attach(alice, volume["id"])["auth_username"]]
    # each API worker remembers the volume once it has connected it: after a few rounds both do
    for _ in range(5):
        listed = alice.ok("GET", f"/attachments?volume_id={volume['id']}")["attachments"]
        alice.ok("DELETE", f"/attachments/{listed[0]['id']}")
        with psycopg.connect(asyncpg_dsn(cluster.database_url), autocommit=True) as connection:
            connection.execute("UPDATE volumes SET provider_auth = NULL WHERE id = %s", (volume["id"],))

        info = attach(alice, volume["id"])

        assert info["auth_username"] not in users
        users.append(info["auth_username"])
        code, out = login(info)
        assert code == 0, out


def test_a_killed_node_goes_down_and_comes_back_up_and_the_api_survives_a_worker_kill(cluster: Cluster) -> None:
    node = cluster.node("node-b")
    node.kill()
    cluster.wait_down("node-b", timeout=30)
    assert cluster.service("node-a")["state"] == "up"  # type: ignore[index]
    node.start()  # waits for its `ready` line and for os-services to say up
    assert cluster.service("node-b")["state"] == "up"  # type: ignore[index]
    assert node.stop() == 0, "SIGTERM ends a node with exit status 0"
    node.start()

    cluster.api_kill_one_worker()
    rows = cluster.services()
    assert {row["state"] for row in rows if row["binary"] == "cinder-volume"} == {"up"}, rows


def test_nodes_in_namespaces_export_on_their_own_address_and_a_cut_off_node_goes_down(
    make_cluster: Callable[..., Cluster], network: Network
) -> None:
    cluster = make_cluster(network=network)
    alice = cluster.caller(f"p{uuid.uuid4().hex[:12]}")
    volume = alice.create_volume(size=1)
    owner = cluster.node(owner_of(cluster, volume["id"]))
    assert owner.namespace is not None

    info = attach(alice, volume["id"])
    assert info["target_portal"] == f"{owner.namespace.ip}:{owner.tgtd.port}", info
    code, out = login(info)  # from the root namespace, across the veth
    assert code == 0, out

    owner.namespace.disconnect()  # its heartbeats no longer reach the database
    cluster.wait_down(owner.name, timeout=30)
    assert owner.alive()
    owner.namespace.reconnect()
    cluster.wait_up(owner.name, timeout=60)
    code, out = login(info)
    assert code == 0, out


def test_a_capped_pool_reports_its_cap_free_when_empty_and_takes_a_volume(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster([NodeSpec("node-a", capacity_gb=3)])
    pools = cluster.admin.get("/scheduler-stats/get_pools", params={"detail": "true"}).json()["pools"]
    (pool,) = pools
    assert pool["capabilities"]["total_capacity_gb"] == 3.0
    assert pool["capabilities"]["free_capacity_gb"] == 3.0, pool
    alice = cluster.caller(f"p{uuid.uuid4().hex[:12]}")
    assert alice.create_volume(size=1)["status"] == "available"
