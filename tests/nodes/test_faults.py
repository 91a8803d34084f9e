"""Faults of a real deployment (issue 14): a node killed with jobs in flight, a node hung (holding a volume), a
tgtd restarted empty, a node restarted beside another on one tgtd, a connect whose volume lock drops, a create job
that the node's reconcile overtook, an API worker killed and PostgreSQL restarted under bursts of whole client
cycles. Each checks what users and the storage see: answers (never a 500), database rows, what each tgtd really
exports (equal to what the database wants of its nodes' volumes), real iSCSI logins.

One cluster serves the whole module (a cluster costs ~12-30 s to start here), on a private PostgreSQL server
(tests/nodes/postgres.py: the restart test must not restart the shared one on 5432): node-a and node-b, each with
its own tgtd and file directory, node-c sharing node-a's tgtd (two storage backends on one host, as Cinder allows:
the one way a node sees exports that are not its own), and `tether serve --workers 2`. Each node has its own
volume_backend_name (backend-a, ...); the volume type on-node-<x> pins a volume to it. Each test works in a
project of its own and leaves the cluster healthy: the `fc` fixture resumes or restarts whatever a test left
stopped or dead, and waits until nothing is stranded and every export matches (a failure there names the test
before).

Timings are short so the module runs in about 75 s here, ~15 s of it the cluster's start: heartbeat 1 s,
TETHER_SERVICE_DOWN_TIME 4 s, TETHER_RECONCILE_INTERVAL 2 s, TETHER_NODE_TIMEOUT 5 s (the API's wait for a node's
job). The full-size defaults (10 s, 60 s, 300 s, 60 s) change how long each wait is, not what is asserted: to run
with them, raise SETTLE above the reconcile interval, the wait for a node to go down above 60 s, and the slow
tgtadm steps of the kill and lock tests so they still outlast the moment of the fault (a killed node is then seen
down after about 70 s, a tgtd restarted empty is restored within 300 s).

A slow storage host is a real one here: each node finds `tgtadm` first in a directory of ours whose `tgtadm`
sleeps for what a file says (nothing by default; all commands, or those holding a word such as `-Q`) and then
runs the real tgtadm, so a test can make a node's connects take seconds and strike half-way through them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.backends.targets.tgt import TgtTarget, parse_targets
from app.db.locks import advisory_key, asyncpg_dsn
from tests.conftest import LiveCaller, missing
from tests.nodes import postgres
from tests.nodes.cluster import Cluster, ClusterError, Node, NodeSpec, poll
from tests.nodes.conftest import CLUSTERS
from tests.storage.tgtd import IQN_PREFIX, TgtDaemon, readcapacity

pytestmark = pytest.mark.storage

NODES = ("node-a", "node-b", "node-c")
HEARTBEAT = 1.0
DOWN_TIME = 4.0
RECONCILE = 2.0
NODE_TIMEOUT = 5.0
# the API's cache of who is up (app/services/nodes.py _STATE_TTL) plus a margin
STATE_TTL = 1.2
# how long a settled state may take to show: a restarted node's reconcile, then one periodic pass more
SETTLE = 25.0
GIB = 1024**3
OK_STATUSES = {200, 202, 204, 400, 404, 409}


def backend_of(node: str) -> str:
    return f"backend-{node.rsplit('-', 1)[1]}"


def type_of(node: str) -> str:
    return f"on-{node}"


def pool_host(node: str) -> str:
    return f"{node}@{backend_of(node)}#default"


def connector(initiator: str, host: str = "fault-host") -> dict[str, Any]:
    return {"initiator": initiator, "host": host, "ip": "127.0.0.1", "platform": "x86_64", "os_type": "linux"}


def initiator_name(tag: str) -> str:
    return f"iqn.1994-05.com.example:faults-{tag}"


SLOW_TGTADM = """#!/bin/sh
# a slow storage host: sleep what the delay file says ("<seconds> [<only commands holding this>]"), then the
# real tgtadm
read -r delay only < "$FAULT_TGTADM_DELAY_FILE" 2>/dev/null
case "$*" in *"$only"*) [ -n "$delay" ] && sleep "$delay";; esac
exec {real} "$@"
"""


# -- the database as the test reads it ------------------------------------------------------------------------


class Db:
    """Plain reads of the cluster's database (a new connection each time: the server may have restarted)."""

    def __init__(self, url: str) -> None:
        self.dsn = asyncpg_dsn(url)

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as connection:
            return list(connection.execute(sql, params).fetchall())

    def volumes(self, ids: list[str]) -> dict[str, tuple[Any, ...]]:
        """id -> (status, attach_status, host, provider_auth)."""
        found = self.rows(
            "SELECT id, status, attach_status, host, provider_auth FROM volumes WHERE id = ANY(%s)", list(ids)
        )
        return {row[0]: tuple(row[1:]) for row in found}

    def attachments(self, volume_ids: list[str]) -> dict[str, tuple[Any, ...]]:
        """id -> (volume_id, attach_status, connection_info is set, terminated, initiator)."""
        found = self.rows(
            "SELECT a.id, a.volume_id, a.attach_status, a.connection_info IS NOT NULL, a.terminated, s.value"
            " FROM attachments a LEFT JOIN attachment_specs s ON s.attachment_id = a.id AND s.key = 'initiator'"
            " WHERE a.volume_id = ANY(%s)",
            list(volume_ids),
        )
        return {row[0]: (*row[1:5], json.loads(row[5]) if row[5] else None) for row in found}

    def snapshot(self, volume_ids: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.volumes(volume_ids), self.attachments(volume_ids)

    def wanted_exports(self, hosts: list[str]) -> dict[str, frozenset[str]]:
        """What the nodes' reconciles want: each volume with a connected attachment, and the initiators of the
        connected attachments whose ACL os-terminate_connection did not end."""
        found = self.rows(
            "SELECT v.id, s.value, a.terminated FROM volumes v JOIN attachments a ON a.volume_id = v.id"
            " JOIN attachment_specs s ON s.attachment_id = a.id AND s.key = 'initiator'"
            " WHERE a.attach_status IN ('attaching', 'attached') AND v.host = ANY(%s)",
            hosts,
        )
        wanted: dict[str, set[str]] = {}
        for volume_id, initiator, terminated in found:
            initiators = wanted.setdefault(volume_id, set())
            if not terminated:
                initiators.add(json.loads(initiator).lower())
        return {volume_id: frozenset(initiators) for volume_id, initiators in wanted.items()}

    def jobs(self, queue: str | None = None) -> dict[tuple[str, str], int]:
        """Unfinished jobs: (queue, status) -> count."""
        found = self.rows(
            "SELECT queue_name, status::text, count(*) FROM procrastinate_jobs"
            " WHERE status IN ('todo', 'doing') AND (%s::text IS NULL OR queue_name = %s::text)"
            " GROUP BY queue_name, status",
            queue,
            queue,
        )
        return {(row[0], row[1]): int(row[2]) for row in found}

    def unsettled(self) -> list[str]:
        """Everything a crash may strand that must not stay: creating/deleting volumes, attaching attachments
        that never recorded a connection, jobs not done."""
        problems = [
            f"volume {vid} is {status}"
            for vid, status in self.rows("SELECT id, status FROM volumes WHERE status IN ('creating', 'deleting')")
        ]
        problems += [
            f"attachment {aid} of volume {vid} is attaching with no connection_info"
            for aid, vid in self.rows(
                "SELECT id, volume_id FROM attachments WHERE attach_status = 'attaching' AND connection_info IS NULL"
            )
        ]
        problems += [f"{count} job(s) {status} on {queue}" for (queue, status), count in self.jobs().items()]
        return problems


# -- the cluster of this module --------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one request got: a status (and body) or a transport error."""

    what: str
    status: int | None
    body: Any = None
    error: str | None = None

    @property
    def fault(self) -> str:
        return json.dumps(self.body)[:300] if self.body is not None else str(self.error)


def request(http: httpx.Client, what: str, method: str, path: str, body: Any = None) -> Outcome:
    try:
        response = http.request(method, path, json=body)
    except httpx.TransportError as error:
        return Outcome(what, None, error=type(error).__name__)
    try:
        parsed = response.json() if response.content else None
    except ValueError:
        parsed = response.text
    return Outcome(what, response.status_code, parsed)


@dataclass
class FaultCluster:
    cluster: Cluster
    pg: postgres.PrivatePostgres
    db: Db
    delay_files: dict[str, Path]
    callers: list[LiveCaller] = field(default_factory=list)

    def node(self, name: str) -> Node:
        return self.cluster.node(name)

    def caller(self, project: str) -> LiveCaller:
        caller = LiveCaller(self.cluster._server(), project, timeout=30)
        self.callers.append(caller)
        return caller

    def slow_tgtadm(self, node: str, seconds: float, only: str = "") -> None:
        """Each tgtadm of `node` (or each whose arguments hold `only`) sleeps `seconds` first."""
        self.delay_files[node].write_text(f"{seconds:g} {only}\n" if seconds else "")

    def tgtds(self) -> dict[int, tuple[TgtDaemon, list[str]]]:
        """Each tgtd once, with the nodes that use it."""
        seen: dict[int, tuple[TgtDaemon, list[str]]] = {}
        for name, node in self.cluster.nodes.items():
            seen.setdefault(id(node.tgtd), (node.tgtd, []))[1].append(name)
        return seen

    def exports(self, tgtd: TgtDaemon) -> dict[str, tuple[bool, frozenset[str]]]:
        """What the tgtd really exports: volume id -> (complete, initiators)."""
        target = TgtTarget(IQN_PREFIX, tgtd.portal, tgtd.control_port)
        return {
            vid: (state.complete, frozenset(i.lower() for i in state.initiators))
            for vid, state in target.exports().items()
        }

    def export_mismatches(self) -> list[str]:
        """Where a tgtd's exports differ from what the database wants of its nodes' volumes."""
        problems = []
        for tgtd, names in self.tgtds().values():
            wanted = self.db.wanted_exports([pool_host(name) for name in names])
            actual = self.exports(tgtd)
            for vid in sorted(wanted.keys() | actual.keys()):
                want, have = wanted.get(vid), actual.get(vid)
                if want is None:
                    problems.append(f"tgtd of {names} exports {vid} {have}, which nothing wants")
                elif have is None:
                    problems.append(f"tgtd of {names} lacks the export of {vid} for {sorted(want)}")
                elif not have[0] or have[1] != want:
                    problems.append(f"tgtd of {names}: {vid} is {have}, the database wants {sorted(want)}")
        return problems

    def wait_settled(self, timeout: float = SETTLE) -> float:
        """Until nothing is stranded and every tgtd exports exactly what the database says; the seconds it took."""
        started = time.monotonic()
        last: list[list[str]] = [[]]

        def probe() -> bool | None:
            last[0] = self.db.unsettled() + self.export_mismatches()
            return True if not last[0] else None

        try:
            poll("the cluster to settle", probe, timeout=timeout, interval=0.25)
        except ClusterError as error:
            raise AssertionError(f"{error}: still {last[0]}") from None
        return time.monotonic() - started

    def create_volumes(self, caller: LiveCaller, count: int, volume_type: str | None = None) -> list[str]:
        """`count` volumes at once, then wait until each is available."""
        body: dict[str, Any] = {"size": 1}
        if volume_type:
            body["volume_type"] = volume_type
        ids = [
            caller.ok("POST", "/volumes", {"volume": {**body, "name": f"f-{uuid.uuid4().hex[:6]}"}}, status=202)[
                "volume"
            ]["id"]
            for _ in range(count)
        ]
        for vid in ids:
            caller.wait_volume(vid, "available")
        return ids

    def attach(self, caller: LiveCaller, volume_id: str, initiator: str, *, complete: bool = True) -> dict[str, Any]:
        body = {"attachment": {"volume_uuid": volume_id, "connector": connector(initiator)}}
        attachment = caller.ok("POST", "/attachments", body)["attachment"]
        if complete:
            caller.ok("POST", f"/attachments/{attachment['id']}/action", {"os-complete": None}, status=204)
        return attachment  # type: ignore[no-any-return]

    def parallel(
        self, project: str, calls: list[tuple[str, str, str, Any, float]], meanwhile: Callable[[], None]
    ) -> dict[str, Outcome]:
        """Each (key, method, path, body, after seconds) at once, one client per thread; `meanwhile()` runs while
        they do."""
        server = self.cluster._server()
        outcomes: dict[str, Outcome] = {}

        def one(key: str, method: str, path: str, body: Any, after: float) -> None:
            client = LiveCaller(server, project, timeout=30)
            try:
                time.sleep(after)
                outcomes[key] = request(client.http, key, method, path, body)
            finally:
                client.close()

        with ThreadPoolExecutor(len(calls)) as pool:
            futures = [pool.submit(one, *call) for call in calls]
            meanwhile()
            for future in futures:
                future.result()
        return outcomes

    def heal(self) -> None:
        """Whatever a test left stopped or dead runs again, every node is up and no tgtadm is slow."""
        for name, node in self.cluster.nodes.items():
            self.slow_tgtadm(name, 0)
            if node.alive():
                send(node, signal.SIGCONT)
        if self.cluster.api is None or self.cluster.api.process.poll() is not None:
            self.cluster.stop_api()
            self.cluster.start_api()
        for node in self.cluster.nodes.values():
            if not node.tgtd.alive():
                node.tgtd.start()
            if not node.alive():
                node.start()
        for name in self.cluster.nodes:
            self.cluster.wait_up(name, timeout=30)
        self.wait_settled()


@contextlib.contextmanager
def fault_cluster_in(directory: Path, bin_dir: Path) -> Iterator[FaultCluster]:
    """The module's cluster, on a private PostgreSQL server, in `directory`; everything stopped on exit."""
    pg = postgres.PrivatePostgres(bin_dir)
    cluster: Cluster | None = None
    try:
        pg.start()
        url = pg.create_database("tether_faults")
        tools = directory / "bin"
        tools.mkdir()
        wrapper = tools / "tgtadm"
        wrapper.write_text(SLOW_TGTADM.format(real=shutil.which("tgtadm")))
        wrapper.chmod(0o755)
        delays = {name: directory / f"tgtadm-delay-{name}" for name in NODES}
        specs = [
            NodeSpec(
                name,
                env={
                    "TETHER_BACKEND_NAME": backend_of(name),
                    "PATH": f"{tools}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
                    "FAULT_TGTADM_DELAY_FILE": str(delays[name]),
                    # the faults are timed through the tgtadm wrapper (slow_tgtadm): the command, not the socket
                    "TETHER_TGT_CONTROL": "tgtadm",
                },
            )
            for name in NODES
        ]
        cluster = Cluster(
            directory,
            url,
            specs,
            api_workers=2,
            heartbeat=HEARTBEAT,
            service_down_time=DOWN_TIME,
            reconcile_interval=RECONCILE,
            api_env={"TETHER_NODE_TIMEOUT": f"{NODE_TIMEOUT:g}"},
        )
        # node-c is a second backend on node-a's host: one tgtd for both (started by node-a, which starts first)
        cluster.node("node-c").tgtd = cluster.node("node-a").tgtd
        cluster.start()
        for name in NODES:
            made = cluster.admin.post(
                "/types",
                json={"volume_type": {"name": type_of(name), "extra_specs": {"volume_backend_name": backend_of(name)}}},
            )
            assert made.status_code == 200, made.text
        yield FaultCluster(cluster, pg, Db(url), delays)
    finally:
        if cluster is not None:
            cluster.stop()
        pg.stop()


@pytest.fixture(scope="module")
def fault_cluster(
    iscsi_tools: None, tether_node: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FaultCluster]:
    bin_dir = postgres.binaries()
    if bin_dir is None:
        missing("needs a PostgreSQL server's binaries (/usr/lib/postgresql/<ver>/bin)")
    if shutil.which("runuser") is None and os.geteuid() == 0:
        missing("needs runuser to run initdb as postgres")
    assert bin_dir is not None
    with fault_cluster_in(tmp_path_factory.mktemp("faults"), bin_dir) as made:
        yield made


@pytest.fixture
def fc(fault_cluster: FaultCluster, request: pytest.FixtureRequest) -> Iterator[FaultCluster]:
    """The module's cluster, healthy, with its logs in the report when the test fails."""
    request.node.stash[CLUSTERS] = [fault_cluster.cluster]
    fault_cluster.heal()
    yield fault_cluster
    for caller in fault_cluster.callers:
        caller.close()
    fault_cluster.callers.clear()
    fault_cluster.heal()


@pytest.fixture
def project() -> str:
    return f"p{uuid.uuid4().hex[:12]}"


def tid_of(tgtd: TgtDaemon, volume_id: str) -> int:
    (target,) = [t for t in parse_targets(tgtd.show()) if t.iqn == f"{IQN_PREFIX}volume-{volume_id}"]
    return target.tid


def tgtadm_ok(tgtd: TgtDaemon, *args: str) -> None:
    result = tgtd.tgtadm(*args)
    assert result.returncode == 0, f"tgtadm {' '.join(args)}: {result.stderr}"


def lock_holders(fc: FaultCluster, volume_id: str) -> list[int]:
    """The backends holding the volume's lock (a session advisory lock on its id's key)."""
    high, low = divmod(advisory_key(volume_id) % 2**64, 2**32)
    rows = fc.db.rows(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND objid = %s AND granted",
        high,
        low,
    )
    return [int(row[0]) for row in rows]


def send(node: Node, sig: signal.Signals) -> None:
    assert node.pid is not None, f"node {node.name} was never started"
    os.kill(node.pid, sig)


def is_unavailable(outcome: Outcome, node: str) -> bool:
    body = outcome.body if isinstance(outcome.body, dict) else {}
    fault = body.get("serviceUnavailable", {})
    return outcome.status == 503 and fault.get("code") == 503 and f"Storage node {node} " in fault.get("message", "")


def files_of(node: Node, volume_id: str) -> list[Path]:
    return [path for path in node.file_dir.glob("*") if volume_id in path.name]


def login(info: dict[str, Any], initiator: str) -> tuple[int, str]:
    return readcapacity(
        initiator,
        info["auth_username"],
        info["auth_password"],
        info["target_portal"],
        info["target_iqn"],
        info["target_lun"],
    )


def assert_login(info: dict[str, Any], initiator: str) -> None:
    code, out = login(info, initiator)
    assert code == 0, f"{initiator} could not log in to {info['target_iqn']}: {out}"
    assert f"Total size:{GIB}" in out, out


# -- 1. a node killed with jobs in flight ------------------------------------------------------------------------


def test_a_node_killed_mid_jobs_restarts_and_settles_each_job_exactly_once(fc: FaultCluster, project: str) -> None:
    name = "node-b"
    node = fc.node(name)
    alice = fc.caller(project)
    to_connect = fc.create_volumes(alice, 6, type_of(name))
    to_delete = fc.create_volumes(alice, 3, type_of(name))
    new_names = [f"new-{uuid.uuid4().hex[:6]}" for _ in range(3)]
    initiator = initiator_name("killed")

    # each connect now takes ~7 tgtadm calls of 0.4 s: four run at once on the node (its workers), the rest of
    # the jobs wait in its queue behind them
    fc.slow_tgtadm(name, 0.4)
    # the creates and deletes come just after the connects: their jobs queue behind the connects' (the node runs
    # four jobs at a time)
    calls = [
        *((f"connect {v}", "POST", "/attachments",
           {"attachment": {"volume_uuid": v, "connector": connector(initiator)}}, 0.0) for v in to_connect),
        *((f"create {n}", "POST", "/volumes",
           {"volume": {"size": 1, "name": n, "volume_type": type_of(name)}}, 0.4) for n in new_names),
        *((f"delete {v}", "DELETE", f"/volumes/{v}", None, 0.4) for v in to_delete),
    ]  # fmt: skip
    in_flight: dict[tuple[str, str], int] = {}

    def kill_mid_way() -> None:
        # once the node runs connects and has more jobs waiting, and its connects are some steps in
        def busy() -> bool | None:
            jobs = fc.db.jobs(f"node.{name}")
            return True if jobs.get((f"node.{name}", "doing"), 0) >= 2 and jobs.get((f"node.{name}", "todo")) else None

        poll("node-b to run jobs and queue more", busy, timeout=20, interval=0.05)
        time.sleep(0.8)
        in_flight.update(fc.db.jobs(f"node.{name}"))
        node.kill()

    outcomes = fc.parallel(project, calls, kill_mid_way)
    fc.slow_tgtadm(name, 0)
    assert in_flight.get((f"node.{name}", "doing"), 0) >= 1, f"no job was running when the node was killed: {in_flight}"
    assert in_flight.get((f"node.{name}", "todo"), 0) >= 1, f"no job was queued when the node was killed: {in_flight}"

    connects = {k: o for k, o in outcomes.items() if k.startswith("connect")}
    for key, outcome in outcomes.items():
        if key.startswith("connect"):
            assert outcome.status == 200 or is_unavailable(outcome, name), f"{key}: {outcome}"
        else:
            assert outcome.status == 202, f"{key}: {outcome}"
    unavailable = [k for k, o in connects.items() if o.status == 503]
    assert unavailable, f"every connect finished before the kill: {connects}"
    created = {n: outcomes[f"create {n}"].body["volume"]["id"] for n in new_names}
    before_restart = {
        "jobs": fc.db.jobs(f"node.{name}"),
        "exports": fc.exports(node.tgtd),
        "unsettled": fc.db.unsettled(),
    }

    node.start()
    settle = fc.wait_settled()

    # exactly once: one attachment per connect, rolled back to reserved when its caller got a 503
    attachments = fc.db.attachments(to_connect)
    per_volume = {v: [a for a, row in attachments.items() if row[0] == v] for v in to_connect}
    assert all(len(rows) == 1 for rows in per_volume.values()), per_volume
    for vid in to_connect:
        (aid,) = per_volume[vid]
        _, status, has_info, _, _ = attachments[aid]
        if outcomes[f"connect {vid}"].status == 503:
            assert (status, has_info) == ("reserved", False), (vid, attachments[aid], before_restart)
        else:
            assert status == "attaching", (vid, attachments[aid])
            assert has_info, (vid, attachments[aid])
    # each create ran once (one volume of that name, one file); each delete once (no row, no file)
    volumes = alice.ok("GET", "/volumes/detail")["volumes"]
    assert sorted(v["name"] for v in volumes if v["name"] in new_names) == sorted(new_names)
    assert len(volumes) == len(to_connect) + len(new_names), [v["id"] for v in volumes]
    for volume_name, vid in created.items():
        assert alice.volume(vid)["status"] == "available", volume_name
        assert len(files_of(node, vid)) == 1
    for vid in to_delete:
        assert alice.http.get(f"/volumes/{vid}").status_code == 404
        assert files_of(node, vid) == []

    # and what was rolled back connects again, for real
    for vid in to_connect:
        (aid,) = per_volume[vid]
        if attachments[aid][1] == "reserved":
            body = {"attachment": {"connector": connector(initiator)}}
            info = alice.ok("PUT", f"/attachments/{aid}", body)["attachment"]["connection_info"]
        else:
            info = alice.attachment(aid)["connection_info"]
        alice.ok("POST", f"/attachments/{aid}/action", {"os-complete": None}, status=204)
        assert alice.volume(vid)["status"] == "in-use"
    assert_login(info, initiator)
    assert fc.export_mismatches() == []
    half_made = [vid for vid, (complete, _) in before_restart["exports"].items() if not complete]
    print(
        f"\nkilled with {in_flight}; before the restart {len(before_restart['unsettled'])} things unsettled and"
        f" {len(half_made)} half-made export(s); settled {settle:.1f} s after the node's start"
    )


# -- 5. a node that is down fails fast and changes nothing -------------------------------------------------------


def test_a_hung_node_is_a_503_naming_it_and_changes_nothing_and_what_needs_no_storage_still_works(
    fc: FaultCluster, project: str
) -> None:
    name = "node-b"
    node = fc.node(name)
    alice = fc.caller(project)
    free, reserved, legacy, attached = fc.create_volumes(alice, 4, type_of(name))
    reservation = alice.ok("POST", "/attachments", {"attachment": {"volume_uuid": reserved}})["attachment"]
    on_host = initiator_name("down")
    connected = fc.attach(alice, attached, on_host)
    alice.ok("POST", f"/volumes/{legacy}/action", {"os-reserve": None}, status=202)
    ids = [free, reserved, legacy, attached]
    fc.wait_settled()
    # hung mid-work: its reconcile puts back an ACL that went missing (slowly) and holds `attached`'s lock when the
    # node stops; a stopped process keeps its connections, so PostgreSQL keeps that lock for it
    fc.slow_tgtadm(name, 2.0, only="-Q")
    tgtadm_ok(node.tgtd, "--op", "unbind", "--mode", "target", "--tid", str(tid_of(node.tgtd, attached)), "-Q", on_host)
    poll("node-b's reconcile to hold the volume", lambda: True if lock_holders(fc, attached) else None, timeout=10)

    send(node, signal.SIGSTOP)
    fc.slow_tgtadm(name, 0)
    try:
        fc.cluster.wait_down(name, timeout=DOWN_TIME + 10)
        time.sleep(STATE_TTL)  # every API worker's view of who is up is at most this old
        # taken now: a command the node had running when it stopped (its reconcile's tgtadm) has finished
        exports_before = fc.exports(node.tgtd)
        before = fc.db.snapshot(ids)
        conn = connector(initiator_name("new"))
        quick = fc.caller(project)
        quick.http.timeout = httpx.Timeout(10.0)
        started = time.monotonic()
        refused = [
            request(quick.http, "create with a connector", "POST", "/attachments",
                    {"attachment": {"volume_uuid": free, "connector": conn}}),
            request(quick.http, "update (connect)", "PUT", f"/attachments/{reservation['id']}",
                    {"attachment": {"connector": conn}}),
            request(quick.http, "update (re-connect)", "PUT", f"/attachments/{connected['id']}",
                    {"attachment": {"connector": conn}}),
            request(quick.http, "os-initialize_connection", "POST", f"/volumes/{legacy}/action",
                    {"os-initialize_connection": {"connector": conn}}),
            request(quick.http, "delete a connected attachment", "DELETE", f"/attachments/{connected['id']}"),
            request(quick.http, "os-terminate_connection", "POST", f"/volumes/{attached}/action",
                    {"os-terminate_connection": {"connector": connector(on_host)}}),
            request(quick.http, "volume delete", "DELETE", f"/volumes/{free}"),
        ]  # fmt: skip
        took = time.monotonic() - started
        for outcome in refused:
            assert is_unavailable(outcome, name), f"{outcome.what}: {outcome.status} {outcome.fault}"
            assert outcome.body["serviceUnavailable"]["message"] == f"Storage node {name} is down; try again later."
            assert fc.db.snapshot(ids) == before, f"{outcome.what} changed the database"
        assert fc.db.jobs(f"node.{name}") == {}, "a refused call left a job for the node"
        assert lock_holders(fc, attached), "the hung node no longer holds the volume: the test proved less"
        assert took < 3 * len(refused), f"{len(refused)} refusals took {took:.1f} s"

        # what needs no storage work
        reads = [
            request(alice.http, "show", "GET", f"/volumes/{attached}"),
            request(alice.http, "list", "GET", "/volumes/detail"),
            request(alice.http, "show attachment", "GET", f"/attachments/{connected['id']}"),
            request(alice.http, "list attachments", "GET", "/attachments/detail"),
        ]
        assert [o.status for o in reads] == [200] * len(reads), [(o.what, o.status, o.fault) for o in reads]
        assert alice.volume(attached)["status"] == "in-use"
        reserve = request(alice.http, "reserve", "POST", "/attachments", {"attachment": {"volume_uuid": free}})
        assert reserve.status == 200, reserve.fault
        assert reserve.body["attachment"]["status"] == "reserved"
        assert alice.volume(free)["status"] == "reserved"
        unreserve = request(alice.http, "remove it", "DELETE", f"/attachments/{reserve.body['attachment']['id']}")
        assert unreserve.status == 200, unreserve.fault
        assert alice.volume(free)["status"] == "available"
        # a new volume that only the down node could hold: accepted, then error (never stuck in creating)
        made = alice.ok("POST", "/volumes", {"volume": {"size": 1, "volume_type": type_of(name)}}, status=202)
        orphan = made["volume"]["id"]
        deadline = time.monotonic() + 10
        while alice.volume(orphan)["status"] == "creating" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert alice.volume(orphan)["status"] == "error"
        pools = fc.cluster.admin.get("/scheduler-stats/get_pools").json()["pools"]
        assert pool_host(name) in {p["name"] for p in pools}, pools
        assert fc.db.snapshot(ids) == before
        assert fc.exports(node.tgtd) == exports_before
    finally:
        send(node, signal.SIGCONT)
    fc.cluster.wait_up(name, timeout=30)
    alice.ok("DELETE", f"/volumes/{orphan}", status=202)
    # back up, the same calls work (and the node had nothing queued to replay)
    time.sleep(STATE_TTL)
    assert fc.db.snapshot(ids) == before
    alice.ok("DELETE", f"/attachments/{connected['id']}")
    fc.wait_settled()


# -- 4. a tgtd restarted empty ---------------------------------------------------------------------------------


def test_a_tgtd_restarted_empty_gets_its_exports_back_from_its_nodes_periodic_reconcile(
    fc: FaultCluster, project: str
) -> None:
    name = "node-b"
    node = fc.node(name)
    alice = fc.caller(project)
    (vid,) = fc.create_volumes(alice, 1, type_of(name))
    initiator = initiator_name("tgtd")
    info = fc.attach(alice, vid, initiator)["connection_info"]
    assert_login(info, initiator)

    node.tgtd.restart_empty()
    restarted = time.monotonic()

    def restored() -> bool | None:
        return True if fc.exports(node.tgtd).get(vid) == (True, frozenset({initiator.lower()})) else None

    poll("the export and its ACL to come back", restored, timeout=3 * RECONCILE + 10, interval=0.1)
    took = time.monotonic() - restarted
    assert_login(info, initiator)
    fc.wait_settled()  # and every other export of that tgtd (earlier tests' volumes) is back too
    everything = time.monotonic() - restarted
    reports = [line for line in node.log_since_start().splitlines() if "exports_restored" in line and vid in line]
    assert reports, "no reconcile of node-b said it restored the export"
    assert alice.volume(vid)["status"] == "in-use"
    print(f"\nexport and ACL back {took:.1f} s after tgtd restarted empty, all {everything:.1f} s")


# -- 6. a node never touches another node's volumes ----------------------------------------------------------------


def test_a_restarted_node_reconciles_its_own_exports_and_leaves_another_nodes_alone_on_a_shared_tgtd(
    fc: FaultCluster, project: str
) -> None:
    a, c = fc.node("node-a"), fc.node("node-c")
    tgtd = a.tgtd
    assert c.tgtd is tgtd, "node-a and node-c are two backends of one host: one tgtd"
    alice = fc.caller(project)
    (a_vol,) = fc.create_volumes(alice, 1, type_of("node-a"))
    c_vol, c_reserved = fc.create_volumes(alice, 2, type_of("node-c"))
    on_a, on_c, stray = initiator_name("host-a"), initiator_name("host-c"), initiator_name("stray")
    fc.attach(alice, a_vol, on_a)
    c_info = fc.attach(alice, c_vol, on_c)["connection_info"]
    alice.ok("POST", "/attachments", {"attachment": {"volume_uuid": c_reserved}})  # reserved: no export wanted

    def tgtadm(*args: str) -> None:
        tgtadm_ok(tgtd, *args)

    fc.wait_settled()
    send(c, signal.SIGSTOP)  # node-c's own reconcile would repair what follows at once
    try:
        # node-c's exports as any reconcile of this tgtd would find them stale: an ACL that no attachment of
        # c_vol has, and a half-made export of a volume that is only reserved
        tgtadm("--op", "bind", "--mode", "target", "--tid", str(tid_of(tgtd, c_vol)), "-Q", stray)
        tgtadm("--op", "new", "--mode", "target", "--tid", "900", "-T", f"{IQN_PREFIX}volume-{c_reserved}")
        # and node-a's own export damaged, to see node-a's reconcile at work
        tgtadm("--op", "unbind", "--mode", "target", "--tid", str(tid_of(tgtd, a_vol)), "-Q", on_a)
        c_exports = {v: s for v, s in fc.exports(tgtd).items() if v in (c_vol, c_reserved)}
        assert c_exports == {c_vol: (True, frozenset({on_c.lower(), stray.lower()})), c_reserved: (False, frozenset())}
        c_rows = fc.db.snapshot([c_vol, c_reserved])

        a.kill()
        a.start()

        def a_repaired() -> bool | None:
            return True if fc.exports(tgtd).get(a_vol) == (True, frozenset({on_a.lower()})) else None

        poll("node-a's reconcile to restore its ACL", a_repaired, timeout=3 * RECONCILE + 10)
        time.sleep(RECONCILE + 0.5)  # and one periodic reconcile of node-a more
        assert {v: s for v, s in fc.exports(tgtd).items() if v in (c_vol, c_reserved)} == c_exports
        assert fc.db.snapshot([c_vol, c_reserved]) == c_rows
        assert_login(c_info, on_c)
        a_log = a.log_since_start()
        assert c_vol not in a_log
        assert c_reserved not in a_log
    finally:
        send(c, signal.SIGCONT)
    # node-c, running again, repairs its own
    fc.wait_settled()
    assert fc.exports(tgtd).get(c_vol) == (True, frozenset({on_c.lower()}))
    assert c_reserved not in fc.exports(tgtd)
    assert_login(c_info, on_c)


# -- a connect that loses its volume's lock ----------------------------------------------------------------------


def test_a_connect_that_lost_its_volumes_lock_mid_way_answers_503_and_records_nothing(
    fc: FaultCluster, project: str
) -> None:
    """The API holds a volume's lock (a session advisory lock on a connection of its own) from a connect's claim
    to its record. When that connection drops while the node works (a database restart, a network blip; here
    its backend is terminated), the lock is gone and another process may take the volume: the node's reconcile
    does, and rolls the claim back. The connect must then not record its connection onto what is no longer its
    claim nor answer 200 (it did: the client got connection_info for an attachment that was `reserved`, and
    its os-complete was a 400)."""
    name = "node-b"
    alice = fc.caller(project)
    (vid,) = fc.create_volumes(alice, 1, type_of(name))
    initiator = initiator_name("lock-lost")
    fc.slow_tgtadm(name, 2.5, only="-Q")  # the connect's last step, the ACL, takes 2.5 s (of NODE_TIMEOUT)
    outcomes: dict[str, Outcome] = {}
    rolled_back: list[bool] = []

    def meanwhile() -> None:
        def exported() -> bool | None:  # the connect is in its slow ACL step
            return True if fc.exports(fc.node(name).tgtd).get(vid, (False,))[0] else None

        poll("the connect to reach its ACL step", exported, timeout=10, interval=0.05)
        holders = lock_holders(fc, vid)
        assert len(holders) == 1, f"who holds volume {vid}'s lock: {holders}"
        fc.db.rows("SELECT pg_terminate_backend(%s)", holders[0])
        # the node's reconcile, now (as `tether reconcile` asks for it)
        job = {"job": {"op": "reconcile", "args": [], "request_id": "req-faults", "deadline": None}}
        fc.db.rows(
            "SELECT procrastinate_defer_jobs_v1(ARRAY[ROW(%s, 'tether.node_op', 0, NULL, NULL, %s::jsonb, NULL)]"
            "::procrastinate_job_to_defer_v1[])",
            f"node.{name}",
            json.dumps(job),
        )

        def reserved() -> bool | None:
            rows = fc.db.attachments([vid])
            return True if [r[1] for r in rows.values()] == ["reserved"] else None

        poll("the reconcile to roll the claim back", reserved, timeout=10, interval=0.05)
        rolled_back.append("connect" not in outcomes)  # while the connect still waited for the node

    body = {"attachment": {"volume_uuid": vid, "connector": connector(initiator)}}
    outcomes.update(fc.parallel(project, [("connect", "POST", "/attachments", body, 0.0)], meanwhile))
    fc.slow_tgtadm(name, 0)

    assert rolled_back == [True], "the reconcile came after the connect's answer: the test proved nothing"
    answer = outcomes["connect"]
    fault = answer.body.get("serviceUnavailable", {}) if isinstance(answer.body, dict) else {}
    assert answer.status == 503, f"{answer.status} {answer.fault}"
    assert fault.get("message") == f"The lock on volume {vid} was lost; try again.", answer.fault
    ((_, status, has_info, _, _),) = fc.db.attachments([vid]).values()
    assert (status, has_info) == ("reserved", False)
    fc.wait_settled()  # and the export the node made for it is gone
    assert vid not in fc.exports(fc.node(name).tgtd)


# -- a create that the reconcile finished before its job ran -----------------------------------------------------


def test_a_connect_right_after_the_reconcile_finished_a_create_does_not_wait_for_the_create_job(
    fc: FaultCluster, project: str
) -> None:
    """A busy (or just restarted) node may reach a volume's create job after its reconcile has finished that create
    (available). A client connecting then holds the volume's lock while it waits for its connect job, and that job
    waits in the queue behind the create job (one volume's jobs run in order): the create job must not wait for
    the volume's lock (the connect's) to find that it has nothing left to do. It did: neither could go on until
    the connect's TETHER_NODE_TIMEOUT, and the connect answered 503 (seen after PostgreSQL restarts).

    The create job is kept from the node's worker by a row lock on it (procrastinate fetches FOR UPDATE SKIP
    LOCKED), taken while the node is stopped for a moment so that the worker cannot reach it first."""
    import psycopg

    name = "node-b"
    node = fc.node(name)
    alice = fc.caller(project)
    fc.wait_settled()
    send(node, signal.SIGSTOP)  # well within TETHER_SERVICE_DOWN_TIME: the node stays up for the API
    try:
        created = alice.ok("POST", "/volumes", {"volume": {"size": 1, "volume_type": type_of(name)}}, status=202)
        vid = created["volume"]["id"]
        jobs = fc.db.rows("SELECT id FROM procrastinate_jobs WHERE lock = %s AND status = 'todo'", vid)
        assert len(jobs) == 1, jobs
        holder = psycopg.connect(fc.db.dsn)  # a transaction holding the create job's row
        holder.execute("SELECT id FROM procrastinate_jobs WHERE id = %s FOR UPDATE", (jobs[0][0],))
    finally:
        send(node, signal.SIGCONT)
    outcomes: dict[str, Outcome] = {}
    try:
        alice.wait_volume(vid, "available")  # the node's reconcile finished the create; its job still waits
        assert fc.db.rows("SELECT status::text FROM procrastinate_jobs WHERE id = %s", jobs[0][0]) == [("todo",)]

        def meanwhile() -> None:
            def queued() -> bool | None:  # the connect's job, behind the create's
                return True if len(fc.db.rows("SELECT 1 FROM procrastinate_jobs WHERE lock = %s", vid)) == 2 else None

            poll("the connect's job", queued, timeout=10, interval=0.05)
            holder.rollback()  # the worker may take the create job now

        body = {"attachment": {"volume_uuid": vid, "connector": connector(initiator_name("after-create"))}}
        outcomes.update(fc.parallel(project, [("connect", "POST", "/attachments", body, 0.0)], meanwhile))
    finally:
        holder.close()
    answer = outcomes["connect"]
    assert answer.status == 200, f"{answer.status} {answer.fault}"
    fc.wait_settled()


# -- bursts of whole client cycles (tests 2 and 3) -----------------------------------------------------------------


class Burst:
    """Clients running whole cycles until stopped, recording every answer: per volume of `volumes`, create an
    attachment with a connector, complete it, delete it (cleaning up whatever a failed call left); volume creates
    and deletes by unique name; reads."""

    def __init__(self, fc: FaultCluster, project: str, volumes: list[str], *, creators: int = 2) -> None:
        self.fc = fc
        self.project = project
        self.stopping = threading.Event()
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        # name -> what the create was answered, and whether a delete of it was accepted
        self.created: dict[str, Outcome] = {}
        self.deleted: set[str] = set()
        # answers that a later answer contradicts
        self.contradictions: list[str] = []
        self.threads = [
            *(threading.Thread(target=self._attacher, args=(v, i), daemon=True) for i, v in enumerate(volumes)),
            *(threading.Thread(target=self._creator, daemon=True) for _ in range(creators)),
            threading.Thread(target=self._reader, daemon=True),
        ]

    def _client(self) -> httpx.Client:
        return LiveCaller(self.fc.cluster._server(), self.project, timeout=30).http

    def _call(self, http: httpx.Client, what: str, method: str, path: str, body: Any = None) -> Outcome:
        outcome = request(http, what, method, path, body)
        with self.lock:
            self.outcomes.append(outcome)
        if outcome.status is None or outcome.status == 503:
            time.sleep(0.1)  # as a client would before trying again
        return outcome

    def start(self) -> Burst:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> list[Outcome]:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)
        assert not [t for t in self.threads if t.is_alive()], "a client of the burst is stuck"
        return self.outcomes

    def _attacher(self, volume_id: str, index: int) -> None:
        http = self._client()
        initiator = initiator_name(f"burst-{index}")
        try:
            while not self.stopping.is_set():
                body = {"attachment": {"volume_uuid": volume_id, "connector": connector(initiator)}}
                made = self._call(http, "attach", "POST", "/attachments", body)
                if made.status == 200:
                    attachment_id = made.body["attachment"]["id"]
                    path = f"/attachments/{attachment_id}/action"
                    done = self._call(http, "complete", "POST", path, {"os-complete": None})
                    if done.status == 400:  # only this client touches this volume: what it was told is not so
                        with self.lock:
                            self.contradictions.append(f"{attachment_id} connected (200), then {done.fault}")
                self._clean(http, volume_id)
        finally:
            http.close()

    def _clean(self, http: httpx.Client, volume_id: str) -> None:
        """Delete every attachment of the volume (what a failed call may have left), trying again for a while."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            listed = self._call(http, "list", "GET", f"/attachments?volume_id={volume_id}")
            if listed.status != 200:
                continue
            if not listed.body["attachments"]:
                return
            for attachment in listed.body["attachments"]:
                self._call(http, "detach", "DELETE", f"/attachments/{attachment['id']}")

    def _creator(self) -> None:
        http = self._client()
        try:
            while not self.stopping.is_set():
                name = f"burst-{uuid.uuid4().hex[:8]}"
                made = self._call(http, "create", "POST", "/volumes", {"volume": {"size": 1, "name": name}})
                with self.lock:
                    self.created[name] = made
                if made.status != 202:
                    continue
                volume_id = made.body["volume"]["id"]
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    shown = self._call(http, "show", "GET", f"/volumes/{volume_id}")
                    if shown.status == 200 and shown.body["volume"]["status"] != "creating":
                        break
                    time.sleep(0.05)
                while time.monotonic() < deadline:
                    gone = self._call(http, "delete", "DELETE", f"/volumes/{volume_id}")
                    if gone.status in (202, 404):
                        with self.lock:
                            self.deleted.add(name)
                        break
        finally:
            http.close()

    def _reader(self) -> None:
        http = self._client()
        try:
            while not self.stopping.is_set():
                self._call(http, "list volumes", "GET", "/volumes/detail")
                self._call(http, "list attachments", "GET", "/attachments/detail")
        finally:
            http.close()


def server_errors(outcomes: list[Outcome]) -> list[str]:
    """Answers no fault may produce: any 5xx but a well-formed 503."""
    bad = []
    for outcome in outcomes:
        if outcome.status is None or outcome.status < 500:
            continue
        body = outcome.body if isinstance(outcome.body, dict) else {}
        if outcome.status == 503 and body.get("serviceUnavailable", {}).get("code") == 503:
            continue
        bad.append(f"{outcome.what}: {outcome.status} {outcome.fault}")
    return bad


def tally(outcomes: list[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        key = str(outcome.status) if outcome.status is not None else outcome.error or "error"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def assert_nothing_lost_or_duplicated(fc: FaultCluster, alice: LiveCaller, burst: Burst, volumes: list[str]) -> None:
    """Each volume create answered 202 made exactly one volume (gone once its delete was accepted); one whose
    answer was lost made at most one; the attachers' volumes have no attachment left and are available."""
    listed = alice.ok("GET", "/volumes/detail")["volumes"]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for volume in listed:
        by_name.setdefault(volume["name"], []).append(volume)
    for name, made in burst.created.items():
        present = by_name.get(name, [])
        if made.status == 202 and name in burst.deleted:
            assert present == [], f"{name} was deleted (202) but is still there: {present}"
        elif made.status == 202:
            assert [v["status"] for v in present] == ["available"], f"{name} was created (202): {present}"
        else:
            assert len(present) <= 1, f"{name} ({made.status or made.error}) made {len(present)} volumes"
            assert all(v["status"] == "available" for v in present), present
    for volume_id in volumes:
        assert alice.ok("GET", f"/attachments?volume_id={volume_id}")["attachments"] == []
        assert alice.volume(volume_id)["status"] == "available"
    assert fc.db.attachments(volumes) == {}


def full_cycle(fc: FaultCluster, alice: LiveCaller, node: str) -> None:
    """A new volume on `node`, attached (a real login), completed, detached, deleted."""
    (vid,) = fc.create_volumes(alice, 1, type_of(node))
    initiator = initiator_name(f"cycle-{node}")
    attachment = fc.attach(alice, vid, initiator)
    assert_login(attachment["connection_info"], initiator)
    alice.ok("DELETE", f"/attachments/{attachment['id']}")
    alice.ok("DELETE", f"/volumes/{vid}", status=202)
    deadline = time.monotonic() + 20
    while alice.http.get(f"/volumes/{vid}").status_code != 404:
        assert time.monotonic() < deadline, f"volume {vid} on {node} was never deleted"
        time.sleep(0.05)


def connect_soon(alice: LiveCaller, volume_ids: list[str]) -> tuple[int | None, str, float]:
    """(status, fault, seconds) of a connect on the first of `volume_ids` that the API's database answers for."""
    outcome = Outcome("connect", None, error="no volume left")
    took = 0.0
    for volume_id in volume_ids:
        started = time.monotonic()
        body = {"attachment": {"volume_uuid": volume_id, "connector": connector(initiator_name("soon"))}}
        outcome = request(alice.http, "connect", "POST", "/attachments", body)
        took = round(time.monotonic() - started, 1)
        if not (outcome.status == 503 and "database is unavailable" in outcome.fault):
            break
    return outcome.status, outcome.fault if outcome.status != 200 else "", took


def wait_all_up(fc: FaultCluster, timeout: float) -> None:
    """Every node up in os-services; an answer other than 200 (a 503 while the API's pool reconnects) is a
    not yet."""

    def probe() -> bool | None:
        answer = fc.cluster.admin.get("/os-services")
        if answer.status_code != 200:
            return None
        states = {
            r["host"].split("@")[0]: r["state"] for r in answer.json()["services"] if r["binary"] == "cinder-volume"
        }
        return True if all(states.get(name) == "up" for name in NODES) else None

    poll("every node up after the restart", probe, timeout=timeout, interval=0.2)


def process_ids(fc: FaultCluster) -> dict[str, Any]:
    api = fc.cluster._server()
    return {
        **{name: node.pid for name, node in fc.cluster.nodes.items()},
        "api": api.process.pid,
        "api workers": fc.cluster.api_worker_pids(),
    }


def requests_crashed(fc: FaultCluster, since: int) -> list[str]:
    """The API log's requests that ended in the last-resort 500 (an exception no handler knew), since `since`."""
    with fc.cluster._server().log.open("rb") as log:
        log.seek(since)
        lines = log.read().decode(errors="replace").splitlines()
    return [line[:400] for line in lines if "unexpected error serving" in line]


# -- 2. an API worker killed mid-burst -------------------------------------------------------------------------------


def test_an_api_worker_killed_mid_burst_costs_clients_at_most_a_connection_and_state_settles(
    fc: FaultCluster, project: str
) -> None:
    alice = fc.caller(project)
    volumes = fc.create_volumes(alice, 4)
    burst = Burst(fc, project, volumes).start()
    time.sleep(1.5)
    victim = fc.cluster.api_kill_one_worker(wait_replaced=False)
    time.sleep(2.0)
    outcomes = burst.stop()
    fc.cluster.wait_api_workers(2, not_pid=victim)

    assert server_errors(outcomes) == [], tally(outcomes)
    assert burst.contradictions == []
    errors = {o.error for o in outcomes if o.status is None}
    assert errors <= {"RemoteProtocolError", "ReadError", "ConnectError", "WriteError", "ConnectTimeout"}, errors
    settle = fc.wait_settled()
    assert_nothing_lost_or_duplicated(fc, alice, burst, volumes)
    for node in NODES:
        full_cycle(fc, alice, node)
    print(f"\nworker {victim} killed mid-burst: {tally(outcomes)}; settled in {settle:.1f} s")


# -- 3. PostgreSQL restarted under load -----------------------------------------------------------------------------


def test_postgresql_restarted_mid_burst_is_a_clean_503_at_worst_and_everything_serves_again_unrestarted(
    fc: FaultCluster, project: str
) -> None:
    alice = fc.caller(project)
    volumes = fc.create_volumes(alice, 4)
    # two volumes per node for a connect right after the restart (the second if the first met the API's own
    # reconnect: a clean 503 the database's, not the node's)
    spares = {node: fc.create_volumes(alice, 2, type_of(node)) for node in NODES}
    before = process_ids(fc)
    log_start = fc.cluster._server().log.stat().st_size
    burst = Burst(fc, project, volumes).start()
    time.sleep(1.5)
    gap = fc.pg.restart("fast", slow=1.5)
    restarted = time.monotonic()
    # every node runs jobs again at once: a connect on each answers within TETHER_NODE_TIMEOUT (procrastinate's
    # pool checked its dead connections one at a time, 1, 2, 4, 8 s apart: no job ran for 7 to 15 s)
    with ThreadPoolExecutor(len(NODES)) as pool:
        soon = {node: pool.submit(connect_soon, fc.caller(project), vids) for node, vids in spares.items()}
        first = {node: future.result() for node, future in soon.items()}
    time.sleep(max(0.0, 3.0 - (time.monotonic() - restarted)))
    outcomes = burst.stop()

    assert server_errors(outcomes) == [], tally(outcomes)
    assert burst.contradictions == []
    assert requests_crashed(fc, log_start) == []
    assert {node: status for node, (status, _, _) in first.items()} == dict.fromkeys(NODES, 200), (
        f"{first}; the restart took {gap:.1f} s{': ' if fc.pg.slow_restarts else ''}{fc.pg.slow_restarts}"
    )
    # no Tether process needed a restart: the same processes, every node up again
    wait_all_up(fc, timeout=DOWN_TIME + 10)
    assert process_ids(fc) == before
    settle = fc.wait_settled()
    assert_nothing_lost_or_duplicated(fc, alice, burst, volumes)
    for node in NODES:
        full_cycle(fc, alice, node)
    assert process_ids(fc) == before
    connects = {node: took for node, (_, _, took) in first.items()}
    print(f"\nPostgreSQL restarted ({gap:.2f} s) mid-burst: {tally(outcomes)}; a connect per node right after took")
    print(f"{connects} s; settled in {settle:.1f} s")
    for slow in fc.pg.slow_restarts:  # a backend waiting for a client's startup packet (postgres.py)
        print(f"the restart was slow; the server's processes and sockets meanwhile:\n{slow}")
