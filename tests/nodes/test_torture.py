"""Torture across storage nodes: the load of tests/stress/test_torture.py against an API tier of two workers
(TETHER_NODES=remote) in front of two `tether node` processes, each with its own file directory and its own
private tgtd; once the clients stop, every node's tgtd and directory must agree with the database about that
node's volumes, and only those.

The same clients, mix and checks as the one-host torture (tests/stress/load.py, tests/stress/harness.py): the
attachments API and the legacy actions on shared volumes, volume deletes and replacements, an admin's
os-reset_status, `tether reconcile` (in remote mode: a reconcile job for every up node, run by the nodes while
the load goes on), a few requests abandoned mid-flight. Every storage operation crosses the job queue: an API
worker defers it in its own transaction and waits for the node's answer. A 5xx is a failure, except the 503s
the API documents (`serviceUnavailable`: a node down or too slow, a volume lock lost), which are counted and
printed; the nodes are never stopped here, so with the CI settings none is expected.

Invariants at rest (PostgreSQL, each node's `tgtadm --op show`, each node's directory):
- every attachment reserved, attaching or attached, nothing stranded; no volume left creating or deleting;
  every volume's status follows SPEC 5's recompute rule from its live attachments (harness.allowed_statuses);
- every volume is placed on one of the two nodes, and both nodes hold some;
- each node's tgtd exports exactly its own volumes that have a connected attachment, each with an ACL equal
  to their initiators, LUN 1 on the file in that node's directory, the volume's one CHAP account bound; it
  exports no other node's volume and keeps no account bound to nothing; each node's directory holds exactly
  one file per volume of that node; a real initiator in the ACL logs in at the portal the API gave, one
  outside is refused;
- no traceback in the API's or the nodes' logs.
Mid-load, a node is stopped (SIGTERM) and started again (TETHER_NODES_TORTURE_RESTARTS): it finishes its jobs in
flight and exits 0, the jobs deferred meanwhile wait in its queue (the API's callers wait for them), and the
restarted node's reconcile runs under the load without undoing anything the database still wants.

Settings (environment variables), CI defaults in brackets (sized for a 2-core machine, 32-68 s in all as
measured, load and checks 13-22 s of it: the cluster's start and stop take the rest):
  TETHER_NODES_TORTURE_SECONDS [10]   seconds of load
  TETHER_NODES_TORTURE_CLIENTS [6]    concurrent clients
  TETHER_NODES_TORTURE_VOLUMES [14]   volumes, of which TETHER_NODES_TORTURE_MULTIATTACH [6] are multiattach
  TETHER_NODES_TORTURE_WORKERS [2]    API processes (`tether serve --workers`)
  TETHER_NODES_TORTURE_HOSTS   [5]    initiators the clients connect from
  TETHER_NODES_TORTURE_ABANDON [0.03] share of mutating requests the client abandons mid-flight
  TETHER_NODES_TORTURE_SEED    [20261214]
  TETHER_NODES_TORTURE_RESTARTS [1]   node restarts under the load (node-a, node-b, node-a, ...)
Full size, e.g.:
  TETHER_NODES_TORTURE_SECONDS=300 TETHER_NODES_TORTURE_CLIENTS=24 TETHER_NODES_TORTURE_VOLUMES=60 \\
      TETHER_NODES_TORTURE_RESTARTS=6 .venv/bin/pytest tests/nodes/test_torture.py -q
(One run of 120 s with 16 clients, 40 volumes and TETHER_NODES_TORTURE_RESTARTS=4 on the busy 2-core machine:
1103 operations, 1268 requests answered, 15 abandoned, 0 5xx, 0 503, each restart exit 0 and up again in
4-13 s, invariants held; 161 s in all.)
Needs PostgreSQL, tgtd and libiscsi, as root: skipped without them, failed under CI=true.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable

import httpx
import pytest

from tests.nodes.cluster import Cluster, NodeSpec, base_env, tail
from tests.stress.harness import (
    PgDatabase,
    Tally,
    create_volumes,
    env_float,
    env_int,
    http_client,
    log_problems,
    multiattach_type,
    snapshot,
)
from tests.stress.load import TORTURE_MIX, Client, Store, World, load_lines, verify_stores

pytestmark = [pytest.mark.storage, pytest.mark.postgres]

SECONDS = env_float("TETHER_NODES_TORTURE_SECONDS", 10)
CLIENTS = env_int("TETHER_NODES_TORTURE_CLIENTS", 6)
VOLUMES = env_int("TETHER_NODES_TORTURE_VOLUMES", 14)
MULTIATTACH = env_int("TETHER_NODES_TORTURE_MULTIATTACH", VOLUMES * 3 // 7)
WORKERS = env_int("TETHER_NODES_TORTURE_WORKERS", 2)
HOSTS = env_int("TETHER_NODES_TORTURE_HOSTS", 5)
ABANDON = env_float("TETHER_NODES_TORTURE_ABANDON", 0.03)
SEED = env_int("TETHER_NODES_TORTURE_SEED", 20261214)
RESTARTS = env_int("TETHER_NODES_TORTURE_RESTARTS", 1)

NODES = ("node-a", "node-b")
INITIATORS = [f"iqn.1994-05.com.example:nodes-torture-host-{n}" for n in range(HOSTS)]


async def restart_nodes(cluster: Cluster, load_started: float) -> list[tuple[str, int | None, float]]:
    """RESTARTS times, evenly spread over the load, one node after the other: SIGTERM (it finishes the jobs it
    runs and exits 0), then start it again (it recovers and reconciles while the load goes on). Jobs deferred
    meanwhile wait in its queue; the API's callers wait for them (TETHER_NODE_TIMEOUT)."""
    done = []
    names = sorted(cluster.nodes)
    for n in range(RESTARTS):
        await asyncio.sleep(max(0.0, load_started + SECONDS * (n + 1) / (RESTARTS + 1) - time.monotonic()))
        node = cluster.node(names[n % len(names)])
        began = time.monotonic()
        code = await asyncio.to_thread(node.stop)
        await asyncio.to_thread(node.start)  # until its `ready` line, and os-services says up
        done.append((node.name, code, time.monotonic() - began))
    return done


def documented_503(response: httpx.Response) -> bool:
    """A 503 in Cinder's fault format: a node down or past TETHER_NODE_TIMEOUT, or a volume's lock lost."""
    try:
        fault = response.json().get("serviceUnavailable")
    except ValueError:
        return False
    return response.status_code == 503 and isinstance(fault, dict) and fault.get("code") == 503


@pytest.fixture
def two_nodes(make_cluster: Callable[..., Cluster]) -> Cluster:
    # both nodes' files share one filesystem, whose free space moves with whatever else runs: a capped pool makes
    # the scheduler's choice its own (the most free = the fewest allocated GiB), so each node gets half
    capacity = 2 * VOLUMES + 10
    # a generous down time: this test is about the load, not about a node missing heartbeats on a busy machine
    return make_cluster(
        [NodeSpec(name, capacity_gb=capacity) for name in NODES],
        api_workers=WORKERS,
        service_down_time=15,
        env={"TETHER_DATABASE_POOL_SIZE": "4"},
    )


async def test_torture_across_two_nodes(two_nodes: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    cluster = two_nodes
    assert cluster.api is not None
    server = cluster.api
    pg = PgDatabase(url=cluster.database_url, dsn=cluster.database_url.replace("+asyncpg", "", 1))
    project = f"torture{uuid.uuid4().hex[:8]}"

    multi_type = await multiattach_type(server)
    async with http_client(server, project) as setup:
        single = await create_volumes(setup, VOLUMES - MULTIATTACH)
        multi = await create_volumes(setup, MULTIATTACH, multi_type)
    placed = Counter(v.node for v in (await snapshot(pg, project)).volumes.values())
    world = World(
        deadline=time.monotonic() + SECONDS,
        multi_type=multi_type,
        volumes={**dict.fromkeys(single, False), **dict.fromkeys(multi, True)},
        seed=SEED,
        weights=TORTURE_MIX,
        initiators=INITIATORS,
        abandon=ABANDON,
        admin=http_client(server, "admin", "admin"),
        reconcile_env={**base_env(), **cluster.api_environment},
        tally=Tally(tolerate=documented_503),
    )
    https = [http_client(server, project) for _ in range(CLIENTS)]
    load_started = time.monotonic()
    restarter = asyncio.create_task(restart_nodes(cluster, load_started))
    try:
        await asyncio.gather(*(Client(n, world, http).run() for n, http in enumerate(https)))
        restarts = await restarter
    finally:
        restarter.cancel()
        for http in [*https, world.admin]:
            if http is not None:
                await http.aclose()
    load_seconds = time.monotonic() - load_started

    stores: dict[str | None, Store] = {name: Store(node.tgtd, node.file_dir) for name, node in cluster.nodes.items()}
    verdict = await verify_stores(server, pg, project, stores)
    problems = log_problems(server.log, "API") + [
        problem for name, node in cluster.nodes.items() for problem in log_problems(node.log, f"node {name}")
    ]
    tolerated = world.tally.tolerated

    summary = [
        "",
        f"torture across nodes: API tier of {WORKERS} workers (remote), nodes {', '.join(NODES)} (file + own tgtd); "
        f"{CLIENTS} clients for {load_seconds:.1f} s (seed {SEED}); {VOLUMES} volumes ({MULTIATTACH} multiattach) "
        f"placed {dict(sorted(placed.items()))}, {HOSTS} hosts",
        *load_lines(world, load_seconds),
        *(
            f"node {name} restarted under the load: SIGTERM -> exit {code}, up again {s:.1f} s later"
            for name, code, s in restarts
        ),
        f"documented 503s: {len(tolerated)} {tolerated[:5]}",
        *verdict.lines(),
        f"  logs: {problems[:3] or 'no traceback'}",
        f"load and checks {time.monotonic() - started:.1f} s (the cluster's start and stop: pytest --durations)",
    ]
    with capsys.disabled():
        print("\n".join(summary))
    # a failed run keeps what the nodes logged last: their logs go with the cluster's directory
    logs = "".join(f"\n--- node {name}, last lines:\n{tail(node.log)}" for name, node in cluster.nodes.items())
    assert not world.tally.failures, f"{world.tally.failures[:20]}{logs}"
    assert [code for _name, code, _s in restarts] == [0] * RESTARTS, f"a node did not stop cleanly: {restarts}{logs}"
    assert not verdict.problems, verdict.problems
    assert not verdict.login_problems, verdict.login_problems
    assert not problems, problems[:3]
    assert set(placed) == set(NODES), f"the volumes were placed {placed}: not a test of two nodes"
    assert world.tally.codes.get("create+connect", Counter())[200] > 0, "no attach ever succeeded: not a test"
