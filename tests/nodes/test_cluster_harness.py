"""The cluster harness itself, with a stand-in for `tether node` (tests/nodes/stub_node.py): what each node is
given, stop/kill/restart, readiness per start, nodes inside namespaces, killing an API worker, teardown."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PG_ADMIN_DSN, new_pg_database
from tests.nodes.cluster import Cluster, ClusterError, NodeSpec, running
from tests.nodes.netns import Network

pytestmark = pytest.mark.storage

STUB = [sys.executable, str(Path(__file__).with_name("stub_node.py"))]


def stub_env(cluster: Cluster, name: str, start: int = 1) -> dict[str, str]:
    return json.loads((cluster.node(name).dir / f"stub-env-{start}.json").read_text())  # type: ignore[no-any-return]


@pytest.fixture
def stub_cluster(tmp_path: Path, iscsi_tools: None) -> Iterator[Callable[..., Cluster]]:
    """A cluster whose nodes are the stub, on a fresh database; nothing started yet."""
    made: list[Cluster] = []

    def make(nodes: Any = ("node-a", "node-b"), **options: Any) -> Cluster:
        cluster = Cluster(
            tmp_path / f"c{len(made)}",
            new_pg_database("tether_harness"),
            nodes,
            owns_database=True,
            node_command=STUB,
            **options,
        )
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.stop()


def test_each_node_gets_its_own_settings_tgtd_and_files(stub_cluster: Callable[..., Cluster]) -> None:
    cluster = stub_cluster(
        [NodeSpec("node-a", zone="nova"), NodeSpec("node-b", zone="east", capacity_gb=5)], reconcile_interval=7
    )
    with running(cluster, api=False):
        a, b = cluster.node("node-a"), cluster.node("node-b")
        env_a, env_b = stub_env(cluster, "node-a"), stub_env(cluster, "node-b")
        for node, env in ((a, env_a), (b, env_b)):
            assert env["TETHER_NODES"] == "remote"
            assert env["TETHER_DATABASE_URL"] == cluster.database_url
            assert env["TETHER_NODE_NAME"] == node.name
            assert env["TETHER_AVAILABILITY_ZONE"] == node.zone
            assert env["TETHER_VOLUME_BACKEND"] == "file"
            assert env["TETHER_FILE_DIR"] == str(node.file_dir)
            assert env["TETHER_TARGET"] == "tgt"
            assert env["TETHER_TARGET_PORTAL"] == node.tgtd.portal
            assert env["TETHER_TGT_CONTROL_PORT"] == str(node.tgtd.control_port)
            assert env["TETHER_NODE_HEARTBEAT"] == "1"
            assert env["TETHER_SERVICE_DOWN_TIME"] == "3"
            assert env["TETHER_RECONCILE_INTERVAL"] == "7"
            assert env["TETHER_LOG_JSON"] == "true"
            assert node.tgtd.alive()
            assert node.tgtd.tgtadm("--op", "show", "--mode", "sys").returncode == 0
            assert (node.dir / "stub-db-1").read_text() == "42"
        assert "TETHER_POOL_CAPACITY_GB" not in env_a
        assert env_b["TETHER_POOL_CAPACITY_GB"] == "5"
        assert a.tgtd.port != b.tgtd.port
        assert a.tgtd.control_port != b.tgtd.control_port
        assert a.file_dir != b.file_dir
        assert a.log != b.log


def test_stop_kill_and_start_again(stub_cluster: Callable[..., Cluster]) -> None:
    cluster = stub_cluster(["node-a"])
    with running(cluster, api=False):
        node = cluster.node("node-a")
        assert node.stop() == 0  # SIGTERM
        assert not node.alive()
        assert node.tgtd.alive(), "stopping the node leaves its tgtd"
        node.start()
        assert node.starts == 2
        first = node.pid
        node.kill()
        assert node.process is not None
        assert node.process.returncode == -9
        node.restart()
        assert node.alive()
        assert node.pid != first
        assert node.starts == 3
        assert node.log.read_text().count("node node-a ready") == 3


def test_ready_is_judged_on_this_start_only(stub_cluster: Callable[..., Cluster]) -> None:
    cluster = stub_cluster([NodeSpec("node-a", env={"STUB_READY_STARTS": "1"})])
    with running(cluster, api=False):
        node = cluster.node("node-a")
        node.stop()
        node.start(wait=False)
        with pytest.raises(ClusterError, match="node node-a ready"):
            node.wait_ready(timeout=3)


def test_a_node_that_exits_at_start_is_reported_at_once(stub_cluster: Callable[..., Cluster]) -> None:
    cluster = stub_cluster([NodeSpec("node-a", env={"TETHER_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/x"})])
    with pytest.raises(ClusterError, match=r"exited \(1\) before logging"), running(cluster, api=False):
        pass


def test_nodes_in_namespaces_have_their_own_address_and_reach_the_database(
    stub_cluster: Callable[..., Cluster], network: Network
) -> None:
    cluster = stub_cluster(network=network)
    with running(cluster, api=False):
        for node in cluster.nodes.values():
            assert node.namespace is not None
            env = stub_env(cluster, node.name)
            assert f"@{network.gateway}:" in env["TETHER_DATABASE_URL"]
            assert env["TETHER_TARGET_PORTAL"] == f"{node.namespace.ip}:{node.tgtd.port}"
            assert (node.dir / "stub-db-1").read_text() == "42", "the node reached PostgreSQL through the relay"
            pids = node.namespace.pids()
            assert node.pid in pids
            assert node.tgtd.proc is not None
            assert node.tgtd.proc.pid in pids


def test_killing_an_api_worker_is_survived(stub_cluster: Callable[..., Cluster]) -> None:
    # an API tier alone (no nodes); embedded, so this runs before `tether node` exists
    cluster = stub_cluster([], api_env={"TETHER_NODES": "embedded"})
    with running(cluster):
        before = cluster.api_worker_pids()
        assert len(before) == 2
        victim = cluster.api_kill_one_worker()
        after = cluster.api_worker_pids()
        assert victim in before
        assert victim not in after
        assert len(after) == 2
        answered = cluster.admin.get("/volumes")
        assert answered.status_code == 200, answered.text


def test_stop_drops_the_database_and_may_be_called_twice(stub_cluster: Callable[..., Cluster]) -> None:
    cluster = stub_cluster(["node-a"])
    name = cluster.database_url.rsplit("/", 1)[1]
    cluster.start(api=False)
    cluster.stop()
    cluster.stop()
    assert not cluster.node("node-a").alive()
    assert not cluster.node("node-a").tgtd.alive()

    async def exists() -> bool:
        import asyncpg

        connection = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
        try:
            return bool(await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
        finally:
            await connection.close()

    assert not asyncio.run(exists())
