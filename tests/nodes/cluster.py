"""A whole Tether deployment as processes: storage nodes (`tether node`, each with its own tgtd and files) and one
API tier (`tether serve --workers N`), sharing one fresh PostgreSQL database.

Each process has its own log file (JSON lines) under the cluster's directory; `Cluster.logs()` tails them all.
With a `Network` (tests/nodes/netns.py) every node and its tgtd run in a namespace of their own, on the node's own
address; the API tier, pytest and the initiator stay in the root namespace.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from sqlalchemy.engine import make_url

from tests.conftest import ROOT, LiveCaller, Server, drop_pg_database, start_server, stop_server
from tests.nodes.netns import Namespace, Network
from tests.storage.tgtd import IQN_PREFIX, TgtDaemon

TETHER = Path(sys.executable).parent / "tether"
ADMIN = "admin"
# os-services exists since 3.0; 3.27 is where attachments begin, and 3.71 what LiveCaller speaks
API_VERSION = "3.71"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
LOG_TAIL = 40

T = TypeVar("T")


class ClusterError(AssertionError):
    """Something in the cluster did not do what the contract says; the message carries the relevant logs."""


def base_env() -> dict[str, str]:
    """The caller's environment without any TETHER_* setting, so only what a cluster sets counts."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TETHER_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def tail(path: Path, lines: int = LOG_TAIL) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def poll(what: str, probe: Callable[[], T | None], *, timeout: float, interval: float = 0.1) -> T:
    """probe() until it returns something other than None; ClusterError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() >= deadline:
            raise ClusterError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@dataclass
class NodeSpec:
    """What one storage node is: a name, a zone, an optional capacity cap, extra TETHER_* settings."""

    name: str
    zone: str = "nova"
    capacity_gb: int | None = None
    env: dict[str, str] = field(default_factory=dict)


class Node:
    """One `tether node` process and its private tgtd; stop, kill and start it as often as a test likes."""

    def __init__(self, cluster: Cluster, spec: NodeSpec, directory: Path, namespace: Namespace | None) -> None:
        self.cluster = cluster
        self.spec = spec
        self.dir = directory
        self.namespace = namespace
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file_dir = self.dir / "volumes"
        self.log = self.dir / "node.log"
        host = namespace.ip if namespace else "127.0.0.1"
        self.tgtd = TgtDaemon(log_dir=self.dir, host=host, prefix=namespace.argv([]) if namespace else ())
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._log_offset = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def zone(self) -> str:
        return self.spec.zone

    @property
    def env(self) -> dict[str, str]:
        env = {
            "TETHER_NODES": "remote",
            "TETHER_DATABASE_URL": self.cluster.database_url_from(self.namespace),
            "TETHER_NODE_NAME": self.name,
            "TETHER_AVAILABILITY_ZONE": self.zone,
            "TETHER_VOLUME_BACKEND": "file",
            "TETHER_FILE_DIR": str(self.file_dir),
            "TETHER_TARGET": "tgt",
            "TETHER_TARGET_PORTAL": self.tgtd.portal,
            "TETHER_TGT_CONTROL_PORT": str(self.tgtd.control_port),
            "TETHER_TARGET_IQN_PREFIX": IQN_PREFIX,
            **self.cluster.timing_env,
            "TETHER_LOG_JSON": "true",
            "TETHER_LOG_LEVEL": "INFO",
        }
        if self.spec.capacity_gb is not None:
            env["TETHER_POOL_CAPACITY_GB"] = str(self.spec.capacity_gb)
        env.update(self.cluster.extra_env)
        env.update(self.spec.env)
        return env

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, *, wait: bool = True) -> Node:
        """Start `tether node` (and its tgtd, if that is not running); by default wait until it is ready."""
        if self.alive():
            raise ClusterError(f"node {self.name} is already running (pid {self.pid})")
        if not self.tgtd.alive():
            self.tgtd.start()
        self.starts += 1
        with self.log.open("ab") as log:
            log.write(f"----- cluster: start {self.starts} of node {self.name} -----\n".encode())
            log.flush()
            self._log_offset = log.tell()
            command = list(self.cluster.node_command)
            self.process = subprocess.Popen(
                self.namespace.argv(command) if self.namespace else command,
                cwd=self.dir,
                env={**base_env(), **self.env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Ready: its log says `node <name> ready` (since this start) and os-services says it is up."""
        marker = f"node {self.name} ready"
        self.wait_log(marker, timeout=timeout)
        if self.cluster.api is not None:
            self.cluster.wait_up(self.name, timeout=timeout)

    def log_since_start(self) -> str:
        try:
            with self.log.open("rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def wait_log(self, text: str, *, timeout: float = START_TIMEOUT) -> str:
        """The first line (of this start's log) holding `text`; fails at once if the process ends first."""

        def probe() -> str | None:
            for line in self.log_since_start().splitlines():
                if text in line:
                    return line
            if not self.alive():
                code = self.process.returncode if self.process else None
                raise ClusterError(f"node {self.name} exited ({code}) before logging {text!r}:\n{tail(self.log)}")
            return None

        try:
            return poll(f"{text!r} in {self.log}", probe, timeout=timeout)
        except ClusterError as error:
            raise ClusterError(f"{error}\n{tail(self.log)}") from None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM and wait; the exit status (the contract says 0), or None if it had to be killed."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL: the process dies mid-whatever; its tgtd (the host's kernel target, in real life) stays up."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)

    def restart(self, *, wait: bool = True) -> Node:
        self.stop()
        return self.start(wait=wait)

    def shutdown(self) -> None:
        """Everything of this node: the process, then its tgtd."""
        self.stop()
        self.tgtd.stop()


class Cluster:
    """Storage nodes and an API tier over one PostgreSQL database; `stop()` ends everything (and drops the
    database when the cluster made it)."""

    def __init__(
        self,
        directory: Path,
        database_url: str,
        nodes: Sequence[NodeSpec | str] = ("node-a", "node-b"),
        *,
        api_workers: int = 2,
        heartbeat: float = 1,
        service_down_time: float = 3,
        reconcile_interval: float = 300,
        env: dict[str, str] | None = None,
        api_env: dict[str, str] | None = None,
        network: Network | None = None,
        owns_database: bool = False,
        node_command: Sequence[str] = (str(TETHER), "node"),
    ) -> None:
        self.dir = directory
        self.node_command = list(node_command)  # a stand-in for `tether node` in the harness's own tests
        self.database_url = database_url
        self.api_workers = api_workers
        self.timing_env = {
            "TETHER_NODE_HEARTBEAT": f"{heartbeat:g}",
            "TETHER_SERVICE_DOWN_TIME": f"{service_down_time:g}",
            "TETHER_RECONCILE_INTERVAL": f"{reconcile_interval:g}",
        }
        self.extra_env = dict(env or {})
        self.api_env = dict(api_env or {})
        self.network = network
        self.owns_database = owns_database
        self.api: Server | None = None
        self._callers: list[LiveCaller] = []
        self._admin: httpx.Client | None = None
        self.nodes: dict[str, Node] = {}
        for spec in nodes:
            spec = NodeSpec(spec) if isinstance(spec, str) else spec
            if spec.name in self.nodes:
                raise ValueError(f"two nodes named {spec.name}")
            namespace = network.add_host() if network is not None else None
            self.nodes[spec.name] = Node(self, spec, self.dir / spec.name, namespace)
        if network is not None:
            url = make_url(database_url)
            network.forward(url.port or 5432, (url.host or "127.0.0.1", url.port or 5432))

    # -- the processes -------------------------------------------------------------------------------------

    def database_url_from(self, namespace: Namespace | None) -> str:
        """The database URL as seen from a namespace: through the network's relay on its gateway."""
        if namespace is None or self.network is None:
            return self.database_url
        return make_url(self.database_url).set(host=self.network.gateway).render_as_string(hide_password=False)

    @property
    def api_environment(self) -> dict[str, str]:
        return {
            "TETHER_NODES": "remote",
            "TETHER_DATABASE_URL": self.database_url,
            **self.timing_env,
            "TETHER_LOG_JSON": "true",
            "TETHER_LOG_LEVEL": "INFO",
            **self.extra_env,
            **self.api_env,
        }

    def start(self, *, api: bool = True) -> Cluster:
        """Migrate, start every node (at once), start the API tier, then wait until every node is ready."""
        self.dir.mkdir(parents=True, exist_ok=True)
        upgraded = self.cli("db", "upgrade")
        if upgraded.returncode != 0:
            raise ClusterError(f"tether db upgrade: exit {upgraded.returncode}: {upgraded.stdout}{upgraded.stderr}")
        for node in self.nodes.values():
            node.start(wait=False)
        if api:
            self.start_api()
        for node in self.nodes.values():
            node.wait_ready()
        return self

    def start_api(self) -> Server:
        api_dir = self.dir / "api"
        api_dir.mkdir(parents=True, exist_ok=True)
        self.api = start_server(api_dir, self.api_environment, workers=self.api_workers)
        return self.api

    def stop_api(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        for caller in self._callers:
            caller.close()
        self._callers.clear()
        if self.api is not None:
            stop_server(self.api)
            self.api = None

    def stop(self) -> None:
        """Stop everything, whatever state it is in; safe to call twice."""
        with contextlib.suppress(Exception):
            self.stop_api()
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                node.shutdown()
        if self.owns_database:
            self.owns_database = False
            drop_pg_database(self.database_url)

    def node(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise KeyError(f"no node {name!r}; the cluster has {sorted(self.nodes)}") from None

    def cli(self, *args: str, node: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`tether <args>` with the API tier's environment (or a node's, with `node=`), e.g. status, reconcile."""
        env = self.node(node).env if node else self.api_environment
        return subprocess.run(
            [str(TETHER), *args],
            cwd=self.dir,
            env={**base_env(), **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    # -- talking to the API --------------------------------------------------------------------------------

    def _server(self) -> Server:
        if self.api is None:
            raise ClusterError("the API tier is not running")
        return self.api

    def caller(self, project: str, user: str = "alice") -> LiveCaller:
        caller = LiveCaller(self._server(), project, user)
        self._callers.append(caller)
        return caller

    @property
    def admin(self) -> httpx.Client:
        """An admin client on /v3/admin (`X-Auth-Token: admin:admin`)."""
        if self._admin is None:
            self._admin = httpx.Client(
                base_url=f"{self._server().endpoint}/{ADMIN}",
                headers={"X-Auth-Token": f"{ADMIN}:{ADMIN}", "OpenStack-API-Version": f"volume {API_VERSION}"},
                timeout=30,
            )
        return self._admin

    def services(self) -> list[dict[str, Any]]:
        response = self.admin.get("/os-services")
        if response.status_code != 200:
            raise ClusterError(f"GET /os-services: {response.status_code} {response.text}")
        return response.json()["services"]  # type: ignore[no-any-return]

    def service(self, name: str) -> dict[str, Any] | None:
        """The cinder-volume row of node `name` (its host is `<name>@<backend>`), or None."""
        for row in self.services():
            if row.get("binary") == "cinder-volume" and str(row.get("host", "")).split("@")[0] == name:
                return row
        return None

    def wait_state(self, name: str, state: str, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        node = self.node(name)
        last: list[dict[str, Any] | None] = [None]

        def probe() -> dict[str, Any] | None:
            row = last[0] = self.service(name)
            if row is not None and row.get("state") == state:
                return row
            if state == "up" and not node.alive():
                raise ClusterError(f"node {name} is not running (wanted state up); last row {row}\n{tail(node.log)}")
            return None

        try:
            return poll(f"node {name} to be {state} in os-services", probe, timeout=timeout)
        except ClusterError as error:
            raise ClusterError(f"{error}; last row: {last[0]}\n{tail(node.log)}") from None

    def wait_up(self, name: str, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        return self.wait_state(name, "up", timeout)

    def wait_down(self, name: str, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        return self.wait_state(name, "down", timeout)

    # -- the API tier's workers ----------------------------------------------------------------------------

    def api_worker_pids(self) -> list[int]:
        """uvicorn's worker processes: the supervisor's children that run multiprocessing's spawn_main."""
        supervisor = self._server().process.pid
        workers = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            # the comm field (2nd) is in parentheses and may hold spaces: the ppid is the 2nd field after it
            ppid = int(stat.rpartition(")")[2].split()[1])
            if ppid == supervisor and "spawn_main" in cmdline and "resource_tracker" not in cmdline:
                workers.append(int(entry.name))
        return sorted(workers)

    def api_kill_one_worker(self, *, wait_replaced: bool = True, timeout: float = START_TIMEOUT) -> int:
        """SIGKILL one API worker; by default wait until the supervisor has started its replacement."""
        before = self.api_worker_pids()
        if not before:
            raise ClusterError(f"no API workers found under pid {self._server().process.pid}")
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        if wait_replaced:
            self.wait_api_workers(self.api_workers, not_pid=victim, timeout=timeout)
        return victim

    def wait_api_workers(self, count: int, *, not_pid: int | None = None, timeout: float = START_TIMEOUT) -> list[int]:
        def probe() -> list[int] | None:
            pids = self.api_worker_pids()
            ready = len(pids) == count and not_pid not in pids
            return pids if ready and self._healthy() else None

        return poll(f"{count} API workers", probe, timeout=timeout, interval=0.2)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self._server().base}/healthcheck", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    # -- logs ----------------------------------------------------------------------------------------------

    def log_paths(self) -> dict[str, Path]:
        paths = {f"node {name}": node.log for name, node in self.nodes.items()}
        paths.update({f"tgtd {name}": node.tgtd.log_path for name, node in self.nodes.items()})
        if self.api is not None:
            paths["api"] = self.api.log
        else:
            paths.update({f"api {path.name}": path for path in sorted((self.dir / "api").glob("server-*.log"))})
        return paths

    def logs(self, lines: int = LOG_TAIL) -> str:
        """The tail of every process's log, for a failure report."""
        return "\n".join(f"===== {what} ({path}) =====\n{tail(path, lines)}" for what, path in self.log_paths().items())


@contextlib.contextmanager
def running(cluster: Cluster, *, api: bool = True) -> Iterator[Cluster]:
    """Start the cluster and stop it on exit, also when starting fails half way."""
    try:
        yield cluster.start(api=api)
    finally:
        cluster.stop()
