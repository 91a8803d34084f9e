"""What the stress tests share: a private PostgreSQL database, `tether serve` in a process group of its own
(so SIGKILL reaches every worker at once), and the at-rest invariants read straight from the database,
tgtd and the volume directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.backends.targets.tgt import TgtTargetView, parse_targets
from tests.conftest import PG_ADMIN_DSN, ROOT, Server, free_port, missing
from tests.storage.tgtd import IQN_PREFIX, TgtDaemon

TETHER = Path(sys.executable).parent / "tether"
VERSION = "volume 3.71"
# codes a well-behaved server gives racing clients; anything else (a 5xx above all) is a failure
EXPECTED_CODES = frozenset({200, 202, 204, 400, 404, 409})
LIVE = ("reserved", "attaching", "attached")
# volume statuses of work in progress (create, delete): at rest, nothing may be left in them
TRANSIENT = ("creating", "deleting")
CONNECTED = ("attaching", "attached")
# what the volume status and attach_status are when the recompute rule of SPEC §5 picks each
RECOMPUTED = {
    "attached": ("in-use", "attached"),
    "attaching": ("attaching", "attaching"),
    "reserved": ("reserved", "reserved"),
    None: ("available", "detached"),
}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def connector(initiator: str, host: str, *, multipath: bool = False) -> dict[str, Any]:
    return {
        "initiator": initiator,
        "host": host,
        "ip": "127.0.0.1",
        "platform": "x86_64",
        "os_type": "linux",
        "multipath": multipath,
    }


# -- a private PostgreSQL database -----------------------------------------------------------------


@dataclass(frozen=True)
class PgDatabase:
    url: str  # for Tether (postgresql+asyncpg://)
    dsn: str  # for asyncpg


async def _admin(sql: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def create_database(prefix: str) -> PgDatabase:
    from app.db.migrate import upgrade

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    except Exception as error:
        missing(f"PostgreSQL is not reachable at {PG_ADMIN_DSN}: {error}")
    dsn = f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{name}"
    database = PgDatabase(url=dsn.replace("postgresql://", "postgresql+asyncpg://", 1), dsn=dsn)
    upgrade(database.url)
    return database


def drop_database(database: PgDatabase) -> None:
    name = database.dsn.rsplit("/", 1)[1]
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# -- the server in a process group of its own ----------------------------------------------------------


def spawn_server(tmp: Path, env_overrides: dict[str, str], workers: int, *, all_workers: bool = True) -> Server:
    """`tether serve` like tests.conftest.start_server, but as a session leader: killpg reaches every worker.

    all_workers: wait until every worker has finished its start-up (and its reconcile), not just the first.
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update({"TETHER_LOG_LEVEL": "INFO", **env_overrides})
    log = tmp / f"server-{port}.log"
    process = subprocess.Popen(
        [str(TETHER), "serve", "--port", str(port), "--workers", str(workers)],
        cwd=tmp,
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = Server(f"http://127.0.0.1:{port}", process, env, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tether serve exited: {log.read_text(errors='replace')[-3000:]}")
        started = log.read_text(errors="replace").count("Application startup complete")
        if started >= (workers if all_workers else 1):
            try:
                if httpx.get(f"{server.base}/healthcheck", timeout=1).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
        time.sleep(0.05)
    kill_server(server)
    raise RuntimeError(f"tether serve did not start: {log.read_text(errors='replace')[-3000:]}")


def kill_server(server: Server) -> None:
    """SIGKILL the whole process group: the supervisor and every worker die at the same instant."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=10)


def stop_server(server: Server) -> None:
    """A clean stop (SIGTERM to the supervisor); whatever is left of the group is then killed."""
    if server.process.poll() is None:
        server.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(timeout=15)
    kill_server(server)


def server_log_problems(server: Server) -> list[str]:
    """Tracebacks in the server log: each is an error the server did not expect."""
    return log_problems(server.log, "server")


def log_problems(log: Path, what: str) -> list[str]:
    """Tracebacks in a process's log (plain or JSON lines): each is an error the process did not expect."""
    text = log.read_text(errors="replace")
    return [f"{what} log has a traceback: {chunk[:600]}" for chunk in text.split("Traceback")[1:]]


def server_events(server: Server, last: int = 40) -> str:
    """The end of the server log without the backends' routine lines: uvicorn's starts and deaths, reconciles,
    warnings, errors and tracebacks."""
    lines = [
        line
        for line in server.log.read_text(errors="replace").splitlines()
        if not line[:2].isdigit() or any(word in line for word in (" WARNING ", " ERROR ", " tether."))
    ]
    return "\n".join(lines[-last:])


def wait_for_commands(control_port: int, timeout: float = 10) -> None:
    """Wait until no tgtadm of this tgtd is running: a killed server does not take its children with it."""
    needle = ["tgtadm", "-C", str(control_port)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = False
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            words = [a.decode(errors="replace") for a in argv]
            if words and words[0].endswith("tgtadm") and words[1:3] == needle[1:]:
                running = True
                break
        if not running:
            return
        time.sleep(0.02)
    raise AssertionError(f"tgtadm -C {control_port} still running after {timeout} s")


# -- clients ------------------------------------------------------------------------------------------


def http_client(server: Server, project: str, user: str = "alice", timeout: float = 60) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"{server.endpoint}/{project}",
        headers={"X-Auth-Token": f"{user}:{project}", "OpenStack-API-Version": VERSION},
        timeout=timeout,
        limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
    )


async def create_volumes(
    http: httpx.AsyncClient, count: int, volume_type: str | None = None, *, wait: bool = True
) -> list[str]:
    ids = []
    for n in range(count):
        body: dict[str, Any] = {"size": 1, "name": f"stress-{n}"}
        if volume_type:
            body["volume_type"] = volume_type
        response = await http.post("/volumes", json={"volume": body})
        assert response.status_code == 202, response.text
        ids.append(response.json()["volume"]["id"])
    if wait:
        for volume_id in ids:
            await wait_volume(http, volume_id, "available")
    return ids


async def wait_volume(http: httpx.AsyncClient, volume_id: str, status: str | None, timeout: float = 30) -> None:
    """Wait for a status; None: until the volume is gone."""
    deadline = time.monotonic() + timeout
    while True:
        response = await http.get(f"/volumes/{volume_id}")
        if status is None and response.status_code == 404:
            return
        if response.status_code == 200 and response.json()["volume"]["status"] == status:
            return
        assert time.monotonic() < deadline, f"volume {volume_id}: waited for {status}, have {response.text[:300]}"
        await asyncio.sleep(0.05)


async def multiattach_type(server: Server) -> str:
    name = f"multi-{uuid.uuid4().hex[:8]}"
    async with http_client(server, "admin", "admin") as admin:
        response = await admin.post(
            "/types", json={"volume_type": {"name": name, "extra_specs": {"multiattach": "<is> True"}}}
        )
        assert response.status_code == 200, response.text
    return name


# -- what the database says ----------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeRow:
    id: str
    status: str
    attach_status: str
    multiattach: bool
    chap_user: str | None
    host: str | None = None  # `<node>@<backend>#<pool>`: the storage node that holds it

    @property
    def node(self) -> str | None:
        return self.host.split("@", 1)[0] if self.host else None


@dataclass(frozen=True)
class AttachmentRow:
    id: str
    volume_id: str
    status: str
    instance: str | None
    has_info: bool
    terminated: bool = False  # os-terminate_connection ended its ACL; it keeps the export until os-detach


@dataclass
class Snapshot:
    volumes: dict[str, VolumeRow]
    attachments: dict[str, AttachmentRow]
    initiators: dict[str, str]  # attachment id -> the initiator of its stored connector

    def attachments_of(self, volume_id: str) -> list[AttachmentRow]:
        return [a for a in self.attachments.values() if a.volume_id == volume_id]

    def wanted_initiators(self, volume_id: str) -> set[str]:
        """The initiators tgtd must admit to this volume: those of its connected, not terminated attachments."""
        return {
            self.initiators[a.id]
            for a in self.attachments_of(volume_id)
            if a.status in CONNECTED and a.id in self.initiators and not a.terminated
        }

    def wants_export(self, volume_id: str) -> bool:
        """tgtd exports a volume while it has a connected attachment (a terminated one too, until os-detach)."""
        return any(a.status in CONNECTED for a in self.attachments_of(volume_id))

    def volumes_on(self, node: str | None) -> set[str]:
        """The volumes a storage node holds (None: every volume, one host as in embedded mode)."""
        return {v.id for v in self.volumes.values() if node is None or v.node == node}

    def counts(self) -> tuple[Counter[str], Counter[str]]:
        return Counter(v.status for v in self.volumes.values()), Counter(a.status for a in self.attachments.values())


async def snapshot(database: PgDatabase, project: str | None = None) -> Snapshot:
    import asyncpg

    connection = await asyncpg.connect(database.dsn, timeout=10)
    try:
        where, args = ("WHERE project_id = $1", [project]) if project else ("", [])
        volumes = await connection.fetch(
            f"SELECT id, status, attach_status, multiattach, provider_auth, host FROM volumes {where}",
            *args,
        )
        attachments = await connection.fetch(
            "SELECT id, volume_id, attach_status, instance_uuid, connection_info IS NOT NULL AS has_info, "
            f"terminated FROM attachments {where}",
            *args,
        )
        specs = await connection.fetch(
            "SELECT attachment_id, value FROM attachment_specs WHERE key = 'initiator'",
        )
    finally:
        await connection.close()
    return Snapshot(
        volumes={
            r["id"]: VolumeRow(
                r["id"],
                r["status"],
                r["attach_status"],
                r["multiattach"],
                r["provider_auth"].split(" ")[1] if r["provider_auth"] else None,
                r["host"],
            )
            for r in volumes
        },
        attachments={
            r["id"]: AttachmentRow(
                r["id"], r["volume_id"], r["attach_status"], r["instance_uuid"], r["has_info"], r["terminated"]
            )
            for r in attachments
        },
        initiators={r["attachment_id"]: json.loads(r["value"]) for r in specs},
    )


def allowed_statuses(volume: VolumeRow, attachments: Iterable[AttachmentRow]) -> set[tuple[str, str]]:
    """(status, attach_status) a volume may show at rest, given its live attachments.

    SPEC §5's recompute rule: any attached -> in-use; else attaching; else reserved; none -> available. Two
    more are legal, as in Cinder: reserving a multiattach volume moves it (from in-use too) to `reserved`, and
    connecting an attachment that is not attached yet moves the volume to `attaching` (beside an attached one
    too: a multiattach volume's second host, or Nova's live migration); only a later recompute (os-complete,
    delete) moves it back. So a volume with a reserved (multiattach) or attaching attachment may show those.
    """
    statuses = {a.status for a in attachments}
    top = next((s for s in ("attached", "attaching") if s in statuses), "reserved" if statuses else None)
    allowed = {RECOMPUTED[top]}
    if volume.multiattach and "reserved" in statuses:
        allowed.add(RECOMPUTED["reserved"])
    if "attaching" in statuses:
        allowed.add(RECOMPUTED["attaching"])
    return allowed


def check_at_rest(snap: Snapshot) -> list[str]:
    """Nothing transitional, nothing stuck, every volume status agreeing with its attachments."""
    problems = []
    for attachment in snap.attachments.values():
        if attachment.status not in LIVE:
            problems.append(f"attachment {attachment.id} is {attachment.status}")
        if attachment.status in CONNECTED and not attachment.has_info:
            problems.append(f"attachment {attachment.id} is {attachment.status} without connection_info (stranded)")
        if attachment.status == "reserved" and attachment.has_info:
            problems.append(f"attachment {attachment.id} is reserved yet has connection_info (recorded late)")
        if attachment.status in CONNECTED and attachment.id not in snap.initiators:
            problems.append(f"attachment {attachment.id} is {attachment.status} but has no stored initiator")
        if attachment.volume_id not in snap.volumes:
            problems.append(f"attachment {attachment.id} of a volume that does not exist")
    for volume in snap.volumes.values():
        mine = snap.attachments_of(volume.id)
        if volume.status in TRANSIENT:
            problems.append(f"volume {volume.id} is {volume.status}: work on it never finished")
            continue
        allowed = allowed_statuses(volume, mine)
        if (volume.status, volume.attach_status) not in allowed:
            problems.append(
                f"volume {volume.id} is {volume.status}/{volume.attach_status} with attachments "
                f"{sorted(a.status for a in mine)}; allowed {sorted(allowed)}"
            )
        if not volume.multiattach and len(mine) > 1:
            problems.append(f"volume {volume.id} is not multiattach but has {len(mine)} live attachments")
    return problems


# -- what tgtd has --------------------------------------------------------------------------------------


@dataclass
class TargetState:
    targets: list[TgtTargetView]
    accounts: set[str]


def read_tgtd(tgtd: TgtDaemon) -> TargetState:
    shown = tgtd.tgtadm("--op", "show", "--mode", "target")
    assert shown.returncode == 0, f"tgtadm show target: {shown.stderr}"
    listed = tgtd.tgtadm("--op", "show", "--mode", "account")
    assert listed.returncode == 0, f"tgtadm show account: {listed.stderr}"
    accounts = {line.strip() for line in listed.stdout.splitlines() if line.startswith((" ", "\t")) and line.strip()}
    return TargetState(parse_targets(shown.stdout), accounts)


def volume_of(iqn: str) -> str | None:
    prefix = f"{IQN_PREFIX}volume-"
    return iqn[len(prefix) :] if iqn.startswith(prefix) else None


def check_target(snap: Snapshot, state: TargetState, file_dir: Path, volume_ids: Iterable[str]) -> list[str]:
    """tgtd exports exactly the volumes with a connected attachment, to exactly their initiators, with CHAP.

    volume_ids: the volumes this check owns (the database may hold others, tgtd only ours); with several
    storage nodes, the volumes of this tgtd's node: it must export no other node's volume.
    """
    problems = []
    ours = set(volume_ids)
    exported = {volume_of(t.iqn): t for t in state.targets if volume_of(t.iqn) is not None}
    for volume_id in sorted(ours | {v for v in exported if v is not None}):
        if volume_id not in ours and volume_id in snap.volumes:
            problems.append(
                f"volume {volume_id} of {snap.volumes[volume_id].host}: exported here, by a node that does not hold it"
            )
            continue
        volume = snap.volumes.get(volume_id)
        want = snap.wanted_initiators(volume_id) if volume else set()
        target = exported.get(volume_id)
        if not (volume and snap.wants_export(volume_id)):
            if target is not None:
                problems.append(f"volume {volume_id}: no connected attachment, yet tgtd exports it to {target.acls}")
            continue
        if target is None:
            problems.append(f"volume {volume_id}: connected initiators {sorted(want)} but tgtd has no target")
            continue
        assert volume is not None
        if target.acls != want:
            problems.append(f"volume {volume_id}: tgtd ACL {sorted(target.acls)} != database {sorted(want)}")
        if target.luns.get(1) != str(file_dir / f"volume-{volume_id}"):
            problems.append(f"volume {volume_id}: LUN 1 is {target.luns.get(1)}")
        if target.accounts != [volume.chap_user]:
            problems.append(f"volume {volume_id}: bound accounts {target.accounts} != [{volume.chap_user}]")
        if target.state != "ready":
            problems.append(f"volume {volume_id}: target state {target.state}")
    bound = {a for t in state.targets for a in t.accounts}
    if state.accounts != bound:
        problems.append(f"tgtd accounts bound to no target: {sorted(state.accounts - bound)}")
    return problems


def check_files(snap: Snapshot, file_dir: Path, volume_ids: Iterable[str] | None = None) -> list[str]:
    """The directory holds exactly one file per volume (of `volume_ids`, this directory's node's; default all)."""
    have = {p.name for p in file_dir.iterdir()} if file_dir.exists() else set()
    want = {f"volume-{v}" for v in (snap.volumes if volume_ids is None else volume_ids)}
    problems = [f"volume file without a volume: {name}" for name in sorted(have - want)]
    problems += [f"volume without its file: {name}" for name in sorted(want - have)]
    return problems


@dataclass
class Tally:
    """Every request by kind and status code; transport errors by kind; anything a client did not expect."""

    codes: dict[str, Counter[int]] = field(default_factory=dict)
    transport: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    # an answer outside EXPECTED_CODES that the API documents (a storage node's 503): kept here, not a failure
    tolerate: Callable[[httpx.Response], bool] | None = None
    tolerated: list[str] = field(default_factory=list)

    def record(self, kind: str, response: httpx.Response) -> None:
        self.codes.setdefault(kind, Counter())[response.status_code] += 1
        if response.status_code not in EXPECTED_CODES:
            request = response.request
            what = (
                f"{kind}: {request.method} {request.url.path} -> {response.status_code} "
                f"{response.text[:300]} ({response.headers.get('x-openstack-request-id')})"
            )
            tolerated = self.tolerate is not None and self.tolerate(response)
            (self.tolerated if tolerated else self.failures).append(what)

    def total(self) -> int:
        return sum(sum(c.values()) for c in self.codes.values())

    def by_code(self) -> Counter[int]:
        return sum(self.codes.values(), Counter())

    def table(self) -> str:
        lines = [f"  {'operation':<26}{'calls':>7}  status codes"]
        for kind in sorted(self.codes):
            codes = self.codes[kind]
            shown = ", ".join(f"{code}: {n}" for code, n in sorted(codes.items()))
            lines.append(f"  {kind:<26}{sum(codes.values()):>7}  {shown}")
        for kind, n in sorted(self.transport.items()):
            lines.append(f"  {kind:<26}{n:>7}  (no response: abandoned or interrupted)")
        return "\n".join(lines)


class Phases:
    """Wall time of each phase of a test, for its summary."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self.seconds: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name] = now - self._last
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.seconds.items())
