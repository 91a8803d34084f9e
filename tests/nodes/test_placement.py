"""Where the scheduler puts a volume and who serves it, on a real cluster (SPEC 10): four `tether node`
processes, each with its own file directory and a private tgtd on its own portal, a two-worker API tier and
PostgreSQL; the operator's view through the real `cinder` CLI and `tether status`.

One cluster serves the whole module (a cluster costs ~20 s to start). Its nodes are laid out so that each test
has a part of it to itself:
- az1: node-a (5 GiB) and node-b (20 GiB), volume_backend_name default: only the capacity test creates there;
- az2: node-c (12 GiB), volume_backend_name gold: zone, type, attach, race and pool tests, a few GiB each;
- az3: node-d, volume_backend_name bronze, uncapped: killed for the tests of a down node (`node_d_down`); the
  service-list test starts it again when it finds it dead, and leaves it killed.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import LiveCaller
from tests.nodes.cluster import TETHER, Cluster, Node, NodeSpec
from tests.storage.tgtd import readcapacity

pytestmark = pytest.mark.storage

GIB = 1024**3
CINDER = TETHER.parent / "cinder"
NODES = [
    NodeSpec("node-a", zone="az1", capacity_gb=5),
    NodeSpec("node-b", zone="az1", capacity_gb=20),
    NodeSpec("node-c", zone="az2", capacity_gb=12, env={"TETHER_BACKEND_NAME": "gold"}),
    NodeSpec("node-d", zone="az3", env={"TETHER_BACKEND_NAME": "bronze"}),
]
HOSTS = {
    "node-a": "node-a@default#default",
    "node-b": "node-b@default#default",
    "node-c": "node-c@gold#default",
    "node-d": "node-d@bronze#default",
}
SPECS = {spec.name: spec for spec in NODES}
CAPPED = {"node-a": 5, "node-b": 20, "node-c": 12}
INITIATOR = "iqn.1994-05.com.example:placement-host"
OTHER_INITIATOR = "iqn.1994-05.com.example:placement-intruder"
# libiscsi's words for tgtd's answer to an initiator the target's ACL lacks
NOT_ADMITTED = "Target not found"
SETTLE = 20.0


@pytest.fixture(scope="module")
def cloud(make_module_cluster: Callable[..., Cluster]) -> Cluster:
    return make_module_cluster(NODES, api_workers=2)


@pytest.fixture
def node_d_down(cloud: Cluster) -> Node:
    """node-d killed (SIGKILL) and down in os-services: az3 and volume_backend_name bronze have no up node."""
    node = cloud.node("node-d")
    node.kill()
    cloud.wait_down(node.name, timeout=30)
    return node


@pytest.fixture
def alice(cloud: Cluster) -> Iterator[LiveCaller]:
    """A member of a project of her own (so a project's volume list is this test's alone)."""
    caller = cloud.caller(f"p{uuid.uuid4().hex[:12]}")
    yield caller
    caller.close()


# -- helpers: what a user and an admin see ---------------------------------------------------------------


def post_volume(caller: LiveCaller, size: int, **fields: Any) -> httpx.Response:
    body = {"size": size, "name": f"placement-{uuid.uuid4().hex[:6]}", **fields}
    return caller.http.post("/volumes", json={"volume": body})


def created(caller: LiveCaller, size: int, **fields: Any) -> dict[str, Any]:
    response = post_volume(caller, size, **fields)
    assert response.status_code == 202, response.text
    return response.json()["volume"]  # type: ignore[no-any-return]


def settled(caller: LiveCaller, volume_id: str) -> dict[str, Any]:
    """The volume once it has left `creating` (available or error); failing if it stays there."""
    deadline = time.monotonic() + SETTLE
    while True:
        volume = caller.volume(volume_id)
        if volume["status"] != "creating":
            return volume
        assert time.monotonic() < deadline, f"volume {volume_id} still creating after {SETTLE:g} s"
        time.sleep(0.05)


def admin_view(cloud: Cluster, volume_id: str) -> dict[str, Any]:
    response = cloud.admin.get(f"/volumes/{volume_id}")
    assert response.status_code == 200, response.text
    return response.json()["volume"]  # type: ignore[no-any-return]


def host_of(cloud: Cluster, volume_id: str) -> str | None:
    return admin_view(cloud, volume_id)["os-vol-host-attr:host"]  # type: ignore[no-any-return]


def files_of(cloud: Cluster, volume_id: str) -> dict[str, list[int]]:
    """node -> sizes of the files in its directory that the file backend made for this volume."""
    found: dict[str, list[int]] = {}
    for node in cloud.nodes.values():
        sizes = [path.stat().st_size for path in node.file_dir.glob(f"*{volume_id}*")]
        if sizes:
            found[node.name] = sizes
    return found


def all_files(cloud: Cluster) -> set[str]:
    return {f"{node.name}/{path.name}" for node in cloud.nodes.values() for path in node.file_dir.glob("*")}


def allocated_gb(cloud: Cluster) -> dict[str, int]:
    """GiB of volumes on each host, as an admin's volume list (every project) shows them."""
    response = cloud.admin.get("/volumes/detail", params={"all_tenants": "1", "limit": "1000"})
    assert response.status_code == 200, response.text
    sizes: dict[str, int] = {}
    for volume in response.json()["volumes"]:
        host = volume["os-vol-host-attr:host"]
        if host:
            sizes[host] = sizes.get(host, 0) + volume["size"]
    return sizes


def api_log_line(cloud: Cluster, text: str, timeout: float = 5.0) -> str:
    """The API tier's log line holding `text` (its workers log JSON lines to one file)."""
    assert cloud.api is not None
    deadline = time.monotonic() + timeout
    while True:
        for line in cloud.api.log.read_text(errors="replace").splitlines():
            if text in line:
                return line
        assert time.monotonic() < deadline, f"no API log line holds {text!r}"
        time.sleep(0.1)


def make_type(cloud: Cluster, backend_name: str) -> str:
    """A public volume type with extra spec volume_backend_name, created by the admin through the API."""
    name = f"{backend_name}-{uuid.uuid4().hex[:6]}"
    body = {"volume_type": {"name": name, "extra_specs": {"volume_backend_name": backend_name}}}
    response = cloud.admin.post("/types", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["volume_type"]["extra_specs"] == {"volume_backend_name": backend_name}
    return name


def login(info: dict[str, Any], initiator: str = INITIATOR, portal: str | None = None) -> tuple[int, str]:
    return readcapacity(
        initiator,
        info["auth_username"],
        info["auth_password"],
        portal or info["target_portal"],
        info["target_iqn"],
        info["target_lun"],
    )


def connector(initiator: str = INITIATOR) -> dict[str, Any]:
    return {"initiator": initiator, "host": "placement", "ip": "127.0.0.1", "platform": "x86_64", "os_type": "linux"}


# -- the cluster as operators see it ----------------------------------------------------------------------


def cinder(cloud: Cluster, *args: str) -> str:
    """The real python-cinderclient CLI against the API tier (noauth, as the admin); its stdout."""
    assert cloud.api is not None
    argv = [str(CINDER), "--os-auth-type", "noauth", "--os-user-id", "admin", "--os-project-id", "admin"]
    argv += ["--os-endpoint", cloud.api.endpoint, "--os-volume-api-version", "3.71", *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"cinder {' '.join(args)}: {result.returncode}\n{result.stdout}{result.stderr}"
    return result.stdout


def table_rows(text: str) -> list[list[str]]:
    """The cells of every row of the PrettyTable(s) the CLI printed, header rows included."""
    return [[cell.strip() for cell in line.strip()[1:-1].split("|")] for line in text.splitlines() if line[:1] == "|"]


def service_list(cloud: Cluster) -> dict[str, dict[str, str]]:
    """`cinder service-list`, by host."""
    header, *rows = table_rows(cinder(cloud, "service-list"))
    return {row[header.index("Host")]: dict(zip(header, row, strict=True)) for row in rows}


def get_pools(cloud: Cluster) -> dict[str, dict[str, str]]:
    """`cinder get-pools --detail`: one Property/Value table per pool, by pool name."""
    pools: list[dict[str, str]] = []
    for row in table_rows(cinder(cloud, "get-pools", "--detail")):
        if row == ["Property", "Value"]:
            pools.append({})
        else:
            pools[-1][row[0]] = row[1]
    return {pool["name"]: pool for pool in pools}


def operator_view(cloud: Cluster) -> tuple[dict[str, dict[str, str]], subprocess.CompletedProcess[str]]:
    """`cinder service-list` and `tether status`, run side by side (each is a second or two of imports)."""
    with ThreadPoolExecutor(2) as pool:
        listed = pool.submit(service_list, cloud)
        status = pool.submit(cloud.cli, "status")
        return listed.result(), status.result()


def status_shows(printed: str, cloud: Cluster, name: str, state: str) -> bool:
    """`tether status` has the node's line: state, pool, zone, and (capped pools) what it can still take."""
    capacity = ""
    if name in CAPPED:
        free = CAPPED[name] - allocated_gb(cloud).get(HOSTS[name], 0)
        capacity = f", {free:.1f} of {CAPPED[name]:.1f} GiB free"
    start = f"  {name}: {state}, host {HOSTS[name]}, zone {SPECS[name].zone}, heartbeat "
    return any(line.startswith(start) and capacity in line for line in printed.splitlines())


def test_cinder_service_list_and_tether_status_show_every_node_and_a_killed_one_as_down(cloud: Cluster) -> None:
    node_d = cloud.node("node-d")
    if not node_d.alive():  # a test of a down node ran first
        node_d.start()

    listed, status = operator_view(cloud)
    volume_rows = {host: row for host, row in listed.items() if row["Binary"] == "cinder-volume"}
    assert {host: row["Zone"] for host, row in volume_rows.items()} == {
        "node-a@default": "az1",
        "node-b@default": "az1",
        "node-c@gold": "az2",
        "node-d@bronze": "az3",
    }, listed
    assert {(row["Status"], row["State"]) for row in volume_rows.values()} == {("enabled", "up")}, listed
    schedulers = [row for row in listed.values() if row["Binary"] == "cinder-scheduler"]
    assert schedulers, listed
    assert {row["State"] for row in schedulers} == {"up"}, listed

    assert status.returncode == 0, status.stdout + status.stderr
    assert "nodes (remote): 4" in status.stdout, status.stdout
    for name in HOSTS:
        assert status_shows(status.stdout, cloud, name, "up"), status.stdout

    node_d.kill()
    cloud.wait_down("node-d", timeout=30)
    listed, status = operator_view(cloud)
    assert listed["node-d@bronze"]["State"] == "down", listed
    assert {listed[host]["State"] for host in ("node-a@default", "node-b@default", "node-c@gold")} == {"up"}, listed

    assert status.returncode == 1, "tether status exits 1 while a node is down:\n" + status.stdout + status.stderr
    for name in HOSTS:
        assert status_shows(status.stdout, cloud, name, "DOWN" if name == "node-d" else "up"), status.stdout


def test_cinder_get_pools_lists_every_nodes_pool_with_its_capacity(cloud: Cluster) -> None:
    pools = get_pools(cloud)
    assert set(pools) == set(HOSTS.values()), pools  # a down node's pool stays, with its last capacities
    allocated = allocated_gb(cloud)
    for name, host in HOSTS.items():
        pool = pools[host]
        assert pool["availability_zone"] == SPECS[name].zone, pool
        assert pool["volume_backend_name"] == host.split("@")[1].split("#")[0], pool
        assert pool["pool_name"] == "default", pool
        assert pool["storage_protocol"] == "iSCSI", pool
        if name in CAPPED:
            assert float(pool["total_capacity_gb"]) == CAPPED[name], pool
            # what the pool can still take: its size less the volumes it holds (sparse files use no disk)
            assert float(pool["free_capacity_gb"]) == CAPPED[name] - allocated.get(host, 0), (pool, allocated)
            assert float(pool["allocated_capacity_gb"]) == allocated.get(host, 0), (pool, allocated)
        else:
            assert 0 < float(pool["free_capacity_gb"]) <= float(pool["total_capacity_gb"]), pool


def test_get_pools_free_space_shrinks_by_what_a_new_volume_takes(cloud: Cluster, alice: LiveCaller) -> None:
    def node_c_pool() -> dict[str, Any]:
        response = cloud.admin.get("/scheduler-stats/get_pools", params={"detail": "true"})
        assert response.status_code == 200, response.text
        (pool,) = [pool for pool in response.json()["pools"] if pool["name"] == HOSTS["node-c"]]
        return pool["capabilities"]  # type: ignore[no-any-return]

    before = node_c_pool()
    volume = alice.wait_volume(created(alice, 2, availability_zone="az2")["id"], "available")
    assert host_of(cloud, volume["id"]) == HOSTS["node-c"]
    after = node_c_pool()
    assert after["total_capacity_gb"] == before["total_capacity_gb"] == CAPPED["node-c"]
    assert after["free_capacity_gb"] == before["free_capacity_gb"] - 2, (before, after)
    assert after["allocated_capacity_gb"] == before["allocated_capacity_gb"] + 2, (before, after)


# -- placement by zone ------------------------------------------------------------------------------------


def test_a_volume_asked_for_in_az2_lands_on_the_az2_node_and_its_file_only_there(
    cloud: Cluster, alice: LiveCaller
) -> None:
    volume = alice.wait_volume(created(alice, 1, availability_zone="az2")["id"], "available")
    assert volume["availability_zone"] == "az2"
    assert host_of(cloud, volume["id"]) == HOSTS["node-c"]
    assert files_of(cloud, volume["id"]) == {"node-c": [GIB]}


def test_an_unknown_zone_is_refused_and_nothing_is_created(cloud: Cluster, alice: LiveCaller) -> None:
    files = all_files(cloud)
    response = post_volume(alice, 1, availability_zone="x")
    assert response.status_code == 400, response.text
    assert response.json() == {"badRequest": {"code": 400, "message": "Availability zone 'x' is invalid."}}
    assert alice.ok("GET", "/volumes") == {"volumes": []}
    assert all_files(cloud) == files


def test_a_zone_whose_only_node_is_down_takes_the_volume_as_error_and_the_api_log_says_why(
    cloud: Cluster, alice: LiveCaller, node_d_down: Node
) -> None:
    volume = created(alice, 1, availability_zone="az3")
    shown = settled(alice, volume["id"])
    assert shown["status"] == "error", shown
    assert shown["availability_zone"] == "az3"
    assert host_of(cloud, volume["id"]) is None
    assert files_of(cloud, volume["id"]) == {}
    line = api_log_line(cloud, f"volume {volume['id']} could not be placed")
    assert "every storage node is down in zone az3" in line, line


# -- placement by capacity --------------------------------------------------------------------------------


def test_new_volumes_go_to_the_node_with_most_free_space_counting_what_is_allocated(
    cloud: Cluster, alice: LiveCaller
) -> None:
    """az1: node-a holds 5 GiB, node-b 20 GiB; each create sees what the ones before it took."""
    too_big = created(alice, 21, availability_zone="az1")
    assert settled(alice, too_big["id"])["status"] == "error"
    line = api_log_line(cloud, f"volume {too_big['id']} could not be placed")
    assert "no up storage node in zone az1 has 21 GiB free" in line, line

    # (size, where it goes): free before each create is a 5/b 20, a 5/b 10, a 5/b 4, a 2/b 4, a 2/b 1
    steps = [(10, "node-b"), (6, "node-b"), (3, "node-a"), (3, "node-b"), (3, None)]
    for size, expected in steps:
        volume = settled(alice, created(alice, size, availability_zone="az1")["id"])
        placed = host_of(cloud, volume["id"])
        if expected is None:
            assert volume["status"] == "error", (size, volume)
            assert placed is None
            assert files_of(cloud, volume["id"]) == {}
            line = api_log_line(cloud, f"volume {volume['id']} could not be placed")
            assert f"no up storage node in zone az1 has {size} GiB free" in line, line
        else:
            assert volume["status"] == "available", (size, volume)
            assert placed == HOSTS[expected], (size, placed)
            assert files_of(cloud, volume["id"]) == {expected: [size * GIB]}


def test_concurrent_creates_never_promise_more_than_a_pool_holds(cloud: Cluster) -> None:
    """Creates racing on both API workers for the last of node-c's space: the pool takes what fits, no more."""
    free = CAPPED["node-c"] - allocated_gb(cloud).get(HOSTS["node-c"], 0)
    assert free >= 2, f"node-c has only {free} GiB left for this test"
    size = free // 2 + 1  # one fits, two do not
    racers = 8
    project = f"p{uuid.uuid4().hex[:12]}"
    start = threading.Barrier(racers)

    def create(_: int) -> str:
        caller = cloud.caller(project)
        try:
            start.wait(timeout=30)
            return str(created(caller, size, availability_zone="az2")["id"])
        finally:
            caller.close()

    with ThreadPoolExecutor(racers) as pool:
        ids = list(pool.map(create, range(racers)))
    owner = cloud.caller(project)
    outcomes = {volume_id: settled(owner, volume_id)["status"] for volume_id in ids}
    landed = [volume_id for volume_id, status in outcomes.items() if status == "available"]
    try:
        assert len(landed) == 1, f"{size} GiB volumes on a pool with {free} GiB free: {outcomes}"
        assert sorted(outcomes.values()) == ["available"] + ["error"] * (racers - 1), outcomes
    finally:  # leave node-c's space to the other tests
        for volume_id in landed:
            deleted = owner.http.delete(f"/volumes/{volume_id}")
            assert deleted.status_code == 202, deleted.text
        deadline = time.monotonic() + SETTLE
        for volume_id in landed:
            while owner.http.get(f"/volumes/{volume_id}").status_code != 404:
                assert time.monotonic() < deadline, f"volume {volume_id} not deleted after {SETTLE:g} s"
                time.sleep(0.05)
            assert files_of(cloud, volume_id) == {}
        owner.close()


# -- placement by volume_backend_name ---------------------------------------------------------------------


def test_a_type_with_volume_backend_name_lands_only_on_that_backends_node(cloud: Cluster, alice: LiveCaller) -> None:
    gold = make_type(cloud, "gold")
    volume = alice.wait_volume(created(alice, 1, volume_type=gold)["id"], "available")
    assert volume["volume_type"] == gold
    assert volume["availability_zone"] == "az2"  # the zone of the node it went to
    assert host_of(cloud, volume["id"]) == HOSTS["node-c"]
    assert files_of(cloud, volume["id"]) == {"node-c": [GIB]}

    # az1 has room, but no gold node
    elsewhere = settled(alice, created(alice, 1, volume_type=gold, availability_zone="az1")["id"])
    assert elsewhere["status"] == "error", elsewhere
    line = api_log_line(cloud, f"volume {elsewhere['id']} could not be placed")
    assert "no storage node in zone az1 with volume_backend_name gold" in line, line


@pytest.mark.parametrize(
    ("backend_name", "why"),
    [
        ("bronze", "every storage node is down in zone (any) with volume_backend_name bronze"),
        ("platinum", "no storage node in zone (any) with volume_backend_name platinum"),
    ],
    ids=["its-only-node-is-down", "no-node-has-it"],
)
def test_a_type_whose_backend_has_no_up_node_gives_an_error_volume(
    cloud: Cluster, alice: LiveCaller, node_d_down: Node, backend_name: str, why: str
) -> None:
    volume = created(alice, 1, volume_type=make_type(cloud, backend_name))
    shown = settled(alice, volume["id"])
    assert shown["status"] == "error", shown
    assert host_of(cloud, volume["id"]) is None
    assert files_of(cloud, volume["id"]) == {}
    line = api_log_line(cloud, f"volume {volume['id']} could not be placed")
    assert why in line, line


# -- attach: the node's own portal ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["create-with-connector", "reserve-then-update"])
def test_an_attachment_is_served_by_its_volumes_node_portal_and_no_other(
    cloud: Cluster, alice: LiveCaller, how: str
) -> None:
    volume = alice.wait_volume(created(alice, 2, availability_zone="az2")["id"], "available")
    assert host_of(cloud, volume["id"]) == HOSTS["node-c"]
    body: dict[str, Any] = {"volume_uuid": volume["id"], "instance_uuid": str(uuid.uuid4())}
    if how == "create-with-connector":
        attachment = alice.ok("POST", "/attachments", {"attachment": {**body, "connector": connector()}})
    else:
        reserved = alice.ok("POST", "/attachments", {"attachment": body})["attachment"]
        assert reserved["connection_info"] in (None, {}), reserved
        update = {"attachment": {"connector": connector()}}
        attachment = alice.ok("PUT", f"/attachments/{reserved['id']}", update)
    info = attachment["attachment"]["connection_info"]

    owner = cloud.node("node-c")
    assert info["target_portal"] == owner.env["TETHER_TARGET_PORTAL"], info
    assert info["auth_method"] == "CHAP", info
    exported = owner.tgtd.show()
    assert info["target_iqn"] in exported
    assert INITIATOR in exported  # the ACL

    code, out = login(info)
    assert code == 0, out
    assert f"Total size:{2 * GIB}" in out, out
    code, out = login(info, OTHER_INITIATOR)
    assert code != 0, f"{OTHER_INITIATOR} logged in: {out}"
    assert NOT_ADMITTED in out, out
    for other in (cloud.node(name) for name in ("node-a", "node-b")):
        assert info["target_iqn"] not in other.tgtd.show()
        code, out = login(info, portal=other.env["TETHER_TARGET_PORTAL"])
        assert code != 0, f"node {other.name}'s portal served {info['target_iqn']}: {out}"
