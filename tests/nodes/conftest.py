"""Fixtures for multi-node tests: whole clusters of `tether node` processes and an API tier, and namespaces.

A missing tool (tgtd, libiscsi, ip, PostgreSQL, `tether node`) or no root fails under CI=true and skips elsewhere.
When a test fails, the tail of every log of its clusters is added to the report ("cluster logs").
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import missing, new_pg_database
from tests.nodes import netns
from tests.nodes.cluster import TETHER, Cluster, NodeSpec, base_env
from tests.nodes.netns import Network

ISCSI_TOOLS = ("tgtd", "tgtadm", "iscsi-readcapacity16", "iscsi-ls")
CLUSTERS = pytest.StashKey[list[Cluster]]()
MODULE_CLUSTERS = pytest.StashKey[list[Cluster]]()


@pytest.fixture(scope="session")
def iscsi_tools() -> None:
    absent = [tool for tool in ISCSI_TOOLS if shutil.which(tool) is None]
    if absent:
        missing(f"needs {', '.join(absent)} (Debian packages tgt, libiscsi-bin)")
    if os.geteuid() != 0:
        missing("tgtd needs root")


@pytest.fixture(scope="session")
def tether_node() -> None:
    """`tether node` exists (the storage agent's entry point)."""
    result = subprocess.run(
        [str(TETHER), "node", "--help"], capture_output=True, text=True, env=base_env(), timeout=60, check=False
    )
    if result.returncode != 0:
        missing(f"`tether node --help` failed ({result.returncode}): {(result.stderr or result.stdout).strip()[-300:]}")


@pytest.fixture
def network() -> Iterator[Network]:
    """A private /24 to plug namespaces into; deleted afterwards (and leftovers of dead runs before)."""
    why = netns.unavailable()
    if why:
        missing(why)
    made = Network().create()
    try:
        yield made
    finally:
        made.destroy()


def cluster_factory(clusters: list[Cluster], directory: Path) -> Callable[..., Cluster]:
    """make(nodes, *, start=True, **Cluster options): a cluster on a fresh database, added to `clusters`."""

    def make(nodes: Sequence[NodeSpec | str] = ("node-a", "node-b"), *, start: bool = True, **options: Any) -> Cluster:
        url = new_pg_database("tether_nodes")
        cluster = Cluster(directory / f"cluster-{len(clusters)}", url, nodes, owns_database=True, **options)
        clusters.append(cluster)
        if start:
            cluster.start()
        return cluster

    return make


@pytest.fixture
def make_cluster(
    request: pytest.FixtureRequest, tmp_path: Path, iscsi_tools: None, tether_node: None
) -> Iterator[Callable[..., Cluster]]:
    """make_cluster(nodes, *, start=True, **Cluster options): a cluster on a fresh database, stopped after the
    test (its database dropped)."""
    clusters: list[Cluster] = []
    request.node.stash[CLUSTERS] = clusters
    try:
        yield cluster_factory(clusters, tmp_path)
    finally:
        for cluster in clusters:
            cluster.stop()


@pytest.fixture(scope="module")
def make_module_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, iscsi_tools: None, tether_node: None
) -> Iterator[Callable[..., Cluster]]:
    """make_cluster for a whole module: its tests share the cluster (each costs ~15 s to start), so each must
    leave it usable for the others (its own projects, zones or volumes; a node it stops, it says so)."""
    clusters: list[Cluster] = []
    request.node.stash[MODULE_CLUSTERS] = clusters
    try:
        yield cluster_factory(clusters, tmp_path_factory.mktemp("clusters"))
    finally:
        for cluster in clusters:
            cluster.stop()


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    """Two storage nodes in zone nova (node-a, node-b) and an API tier with two workers, all up."""
    return make_cluster([NodeSpec("node-a", zone="nova"), NodeSpec("node-b", zone="nova")], api_workers=2)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    module = item.getparent(pytest.Module)
    clusters = item.stash.get(CLUSTERS, []) + (module.stash.get(MODULE_CLUSTERS, []) if module else [])
    if report.failed and clusters:
        for index, cluster in enumerate(clusters):
            report.sections.append((f"cluster logs ({report.when}, cluster {index})", cluster.logs()))
