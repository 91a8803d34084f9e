"""OpenStack's own client code in its own venv (made by scripts/client-venvs) against a live `tether serve`.

A driver script (tests/clients/drivers/) runs inside .venvs/<name> and answers one JSON line per request;
`Driver` speaks to it. `Tether` is the test's own view of the server over plain HTTP: it makes what the
clients use (volumes, a multiattach type through an admin) and reads back what they did.
"""

from __future__ import annotations

import json
import select
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, LiveCaller, Server, missing, start_server, stop_server
from tests.storage.conftest import private_tgtd
from tests.storage.tgtd import IQN_PREFIX, TgtDaemon, readcapacity

DRIVERS = Path(__file__).resolve().parent / "drivers"
CALL_TIMEOUT = 60.0
GIB = 1024**3


def venv_python(name: str) -> Path:
    python = ROOT / ".venvs" / name / "bin" / "python"
    if not python.exists():
        missing(f"{python} is missing: run scripts/client-venvs")
    return python


class DriverError(Exception):
    """The client code raised: `kind` is its exception class, `cause` the HTTP error underneath (if any)."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error['type']}: {error['message']}")
        self.kind: str = error["type"]
        self.message: str = error["message"]
        self.cause: dict[str, Any] | None = error.get("cause")

    @property
    def code(self) -> int | None:
        return None if self.cause is None else self.cause["code"]


class Driver:
    """A driver script in a client venv, started once and asked one request at a time."""

    def __init__(self, venv: str, script: str, args: list[str], log: Path) -> None:
        self.log = log
        python = venv_python(venv)
        with log.open("wb") as stderr:
            self.process = subprocess.Popen(
                [str(python), str(DRIVERS / script), *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        hello = self._read()
        assert hello.get("ready"), hello
        self.version: str = hello["version"]

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], CALL_TIMEOUT)
        line = self.process.stdout.readline() if ready else b""
        if not line:
            self.process.kill()
            code = self.process.wait()
            why = f"exited with {code}" if ready else f"gave no answer within {CALL_TIMEOUT} s"
            raise AssertionError(f"the driver {why}; its log ends:\n{self.log_tail()}")
        return json.loads(line)  # type: ignore[no-any-return]

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        self.process.stdin.flush()
        return self._read()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        """End of input: the driver exits."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


class Tether(LiveCaller):
    """One user in one project speaking 3.71 to the server over plain HTTP."""

    name_prefix = "clients"

    def __init__(self, server: Server, project: str, user: str = "alice") -> None:
        super().__init__(server, project, user, timeout=30)

    def volume_as_admin(self, volume_id: str) -> dict[str, Any]:
        """The volume as an admin sees it (with `host_name` in its attachments)."""
        admin = Tether(self.server, "admin", user="admin")
        try:
            return admin.volume(volume_id)
        finally:
            admin.close()

    def attachments(self, volume_id: str) -> dict[str, dict[str, Any]]:
        """The volume's attachments in detail, by id."""
        found = self.ok("GET", f"/attachments/detail?volume_id={volume_id}")["attachments"]
        return {a["id"]: a for a in found}

    def multiattach_type(self) -> str:
        """A volume type whose volumes are multiattach, made by an admin."""
        name = f"multi-{uuid.uuid4().hex[:8]}"
        admin = Tether(self.server, "admin", user="admin")
        try:
            spec = {"multiattach": "<is> True"}
            admin.ok("POST", "/types", {"volume_type": {"name": name, "extra_specs": spec}})
        finally:
            admin.close()
        return name


@pytest.fixture
def tether(live_server: Server, project: str) -> Iterator[Tether]:
    """Tether's own view of the test's project on the fake-backend server."""
    view = Tether(live_server, project)
    yield view
    view.close()


@pytest.fixture
def tgt_tether(tgt_server: Server, project: str) -> Iterator[Tether]:
    """Tether's own view of the test's project on the file+tgt server."""
    view = Tether(tgt_server, project)
    yield view
    view.close()


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `tether serve` (SQLite, fake backend) for the module: every test works in a project of its own."""
    running = start_server(tmp_path_factory.mktemp("clients-live"))
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def clients_tgtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TgtDaemon]:
    with private_tgtd(tmp_path_factory.mktemp("clients-tgtd")) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def tgt_server(clients_tgtd: TgtDaemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `tether serve` on file volumes exported by the private tgtd, for real initiator logins."""
    tmp = tmp_path_factory.mktemp("clients-tgt")
    env = {
        "TETHER_VOLUME_BACKEND": "file",
        "TETHER_TARGET": "tgt",
        "TETHER_TGT_CONTROL_PORT": str(clients_tgtd.control_port),
        "TETHER_TARGET_PORTAL": clients_tgtd.portal,
        "TETHER_TARGET_IQN_PREFIX": IQN_PREFIX,
        "TETHER_FILE_DIR": str(tmp / "volumes"),
    }
    running = start_server(tmp, env)
    yield running
    stop_server(running)


def login(data: dict[str, Any], initiator: str) -> tuple[int, str]:
    """Log in as `initiator` with the CHAP account of a connection_info's data and read the LUN's size."""
    return readcapacity(
        initiator,
        data["auth_username"],
        data["auth_password"],
        data["target_portal"],
        data["target_iqn"],
        data["target_lun"],
    )


def assert_logs_in(data: dict[str, Any], initiator: str, size_gib: int = 1) -> None:
    code, out = login(data, initiator)
    assert code == 0, f"{initiator} could not log in to {data['target_iqn']}: {out}"
    assert f"Total size:{size_gib * GIB}" in out, out


def assert_refused(data: dict[str, Any], initiator: str) -> None:
    code, out = login(data, initiator)
    assert code != 0, f"{initiator} logged in to {data['target_iqn']}: {out}"
