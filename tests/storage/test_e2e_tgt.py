"""Real iSCSI export end to end: `tether serve` on file volumes and a private tgtd, checked with a real initiator.

Every test talks HTTP to the real server process and proves each claim by logging in (or failing to) with
libiscsi's `iscsi-readcapacity16`, and by reading what tgtd itself reports.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app.backends.targets.tgt import TgtTargetView, parse_targets
from tests.conftest import ROOT, LiveCaller, Server, start_server, stop_server
from tests.storage.tgtd import IQN_PREFIX, TgtDaemon, readcapacity

pytestmark = pytest.mark.storage

A = "iqn.1994-05.com.example:e2e-host-a"
B = "iqn.1994-05.com.example:e2e-host-b"
C = "iqn.1994-05.com.example:e2e-host-c"
D = "iqn.1994-05.com.example:e2e-host-d"
GIB = 1024**3
ONE_GIB = f"Total size:{GIB}"
TARGET_NOT_FOUND = "Target not found"
AUTH_FAILURE = "Authentication failure"
# libiscsi's words for a login to a target tgtd does not have
NO_TARGET = "Login Failed"
TETHER = Path(sys.executable).parent / "tether"
TIMING_ROUNDS = 20


def connector(initiator: str, host: str) -> dict[str, Any]:
    return {"initiator": initiator, "host": host, "ip": "127.0.0.1", "platform": "x86_64", "os_type": "linux"}


# -- the stack: a server on file volumes exported by the private tgtd -----------------------------------


class Caller(LiveCaller):
    """One user in one project speaking 3.71 to the server."""

    name_prefix = "e2e"

    def attach(self, volume_id: str, conn: dict[str, Any], instance: str | None = None) -> dict[str, Any]:
        body = {"volume_uuid": volume_id, "instance_uuid": instance or str(uuid.uuid4()), "connector": conn}
        attachment = self.ok("POST", "/attachments", {"attachment": body})["attachment"]
        assert attachment["status"] == "attaching", attachment
        return attachment  # type: ignore[no-any-return]

    def complete(self, attachment_id: str) -> None:
        self.ok("POST", f"/attachments/{attachment_id}/action", {"os-complete": None}, status=204)

    def detach(self, attachment_id: str) -> list[dict[str, Any]]:
        return self.ok("DELETE", f"/attachments/{attachment_id}")["attachments"]  # type: ignore[no-any-return]

    def action(self, volume_id: str, name: str, value: Any = None, *, status: int = 202) -> Any:
        return self.ok(
            "POST", f"/volumes/{volume_id}/action", {name: value if value is not None else {}}, status=status
        )


@dataclass
class Stack:
    """One `tether serve` (and its SQLite database) in `tmp`, on file volumes exported by the private tgtd."""

    tmp: Path
    tgtd: TgtDaemon
    extra_env: dict[str, str] = field(default_factory=dict)
    server: Server | None = None
    server_env: dict[str, str] = field(default_factory=dict)
    callers: list[Caller] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {
            "TETHER_VOLUME_BACKEND": "file",
            "TETHER_TARGET": "tgt",
            "TETHER_TGT_CONTROL_PORT": str(self.tgtd.control_port),
            "TETHER_TARGET_PORTAL": self.tgtd.portal,
            "TETHER_TARGET_IQN_PREFIX": IQN_PREFIX,
            "TETHER_FILE_DIR": str(self.file_dir),
            **self.extra_env,
        }

    @property
    def file_dir(self) -> Path:
        return self.tmp / "volumes"

    def start(self) -> None:
        self.server = start_server(self.tmp, self.env)
        self.server_env = self.server.env  # what `tether reconcile` needs to reach the same database and tgtd

    def stop(self) -> None:
        for caller in self.callers:
            caller.close()
        self.callers.clear()
        if self.server is not None:
            stop_server(self.server)
            self.server = None

    def caller(self, project: str, user: str = "alice") -> Caller:
        assert self.server is not None, "the server is not running"
        caller = Caller(self.server, project, user)
        self.callers.append(caller)
        return caller

    def multiattach_type(self) -> str:
        name = f"multi-{uuid.uuid4().hex[:8]}"
        admin = self.caller("admin", user="admin")
        admin.ok("POST", "/types", {"volume_type": {"name": name, "extra_specs": {"multiattach": "<is> True"}}})
        return name

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(TETHER), *args],
            cwd=self.tmp,
            env={**self.server_env, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def new_project() -> str:
    return f"p{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def shared_stack(tgtd: TgtDaemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One server for the tests that neither restart it nor change its settings: starting one takes seconds."""
    stack = Stack(tmp_path_factory.mktemp("e2e-tgt"), tgtd)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def stack(shared_stack: Stack, clean_tgtd: TgtDaemon) -> Iterator[Stack]:
    """The shared server, with tgtd emptied after the test; each test works in a project of its own."""
    if shared_stack.server is None or shared_stack.server.process.poll() is not None:
        shared_stack.stop()
        shared_stack.start()
    yield shared_stack
    for caller in shared_stack.callers:
        caller.close()
    shared_stack.callers.clear()


@pytest.fixture
def api(stack: Stack) -> Caller:
    return stack.caller(new_project())


@pytest.fixture
def launch(clean_tgtd: TgtDaemon, tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """A server of the test's own (its own database and settings); stopped even when the test fails."""
    stacks: list[Stack] = []

    def go(**env: str) -> Stack:
        stack = Stack(tmp_path, clean_tgtd, env)
        stacks.append(stack)
        stack.start()
        return stack

    try:
        yield go
    finally:
        for stack in stacks:
            stack.stop()


# -- what tgtd has and who can log in ------------------------------------------------------------------


def login(info: dict[str, Any], initiator: str, secret: str | None = None) -> tuple[int, str]:
    return readcapacity(
        initiator,
        info["auth_username"],
        secret or info["auth_password"],
        info["target_portal"],
        info["target_iqn"],
        info["target_lun"],
    )


def assert_admits(info: dict[str, Any], initiator: str) -> None:
    code, out = login(info, initiator)
    assert code == 0, f"{initiator} could not log in to {info['target_iqn']}: {out}"
    assert ONE_GIB in out, out


def assert_refuses(
    info: dict[str, Any], initiator: str, why: str = TARGET_NOT_FOUND, secret: str | None = None
) -> None:
    code, out = login(info, initiator, secret)
    assert code != 0, f"{initiator} logged in to {info['target_iqn']}: {out}"
    assert why in out, out


def tgtadm_ok(tgtd: TgtDaemon, *args: str) -> None:
    result = tgtd.tgtadm(*args)
    assert result.returncode == 0, f"tgtadm {' '.join(args)}: {result.stderr}"


def targets(tgtd: TgtDaemon) -> dict[str, TgtTargetView]:
    return {t.iqn: t for t in parse_targets(tgtd.show())}


def iqn_of(volume_id: str) -> str:
    return f"{IQN_PREFIX}volume-{volume_id}"


# -- 1. one volume, one host ----------------------------------------------------------------------------


def test_attach_exports_to_exactly_the_connected_initiator_and_detach_takes_it_away(
    stack: Stack, api: Caller, tgtd: TgtDaemon
) -> None:
    volume = api.create_volume()
    path = stack.file_dir / f"volume-{volume['id']}"
    st = path.stat()
    assert st.st_size == GIB
    assert st.st_blocks * 512 < GIB  # sparse: nothing allocated up front

    attachment = api.attach(volume["id"], connector(A, "host-a"))
    info = attachment["connection_info"]

    assert info["driver_volume_type"] == "iscsi"
    assert info["target_iqn"] == iqn_of(volume["id"])
    assert info["target_portal"] == tgtd.portal
    assert info["target_lun"] == 1
    assert info["auth_method"] == "CHAP"
    assert_admits(info, A)
    assert_refuses(info, B)
    assert_refuses(info, A, AUTH_FAILURE, secret="wrong0secret0123")
    target = targets(tgtd)[info["target_iqn"]]
    assert target.acls == {A}
    assert target.accounts == [info["auth_username"]]
    assert target.luns[1] == str(path)  # LUN 0 is the controller tgtd adds itself

    api.complete(attachment["id"])
    assert api.attachment(attachment["id"])["status"] == "attached"
    assert api.volume(volume["id"])["status"] == "in-use"
    assert_admits(info, A)

    assert api.detach(attachment["id"]) == []

    assert_refuses(info, A, NO_TARGET)
    assert info["target_iqn"] not in targets(tgtd)
    assert api.volume(volume["id"])["status"] == "available"


# -- 2. multiattach: two hosts, and two attachments from one host -------------------------------------------


def test_multiattach_hosts_and_shared_connections(stack: Stack, api: Caller, tgtd: TgtDaemon) -> None:
    kind = stack.multiattach_type()
    volume = api.create_volume(kind)
    assert volume["multiattach"] is True

    on_a = api.attach(volume["id"], connector(A, "host-a"))
    api.complete(on_a["id"])
    on_b = api.attach(volume["id"], connector(B, "host-b"))
    api.complete(on_b["id"])
    info = on_b["connection_info"]
    assert on_a["connection_info"]["auth_password"] == info["auth_password"]  # one CHAP per volume
    assert_admits(info, A)
    assert_admits(info, B)
    assert targets(tgtd)[info["target_iqn"]].acls == {A, B}

    api.detach(on_a["id"])

    assert_admits(info, B)
    assert_refuses(info, A)
    assert targets(tgtd)[info["target_iqn"]].acls == {B}

    # two instances on host C: one host connection, one ACL
    # (a connect puts the volume in attaching, where it takes no new reservation until os-complete: SPEC 5)
    first = api.attach(volume["id"], connector(C, "host-c"), instance=str(uuid.uuid4()))
    api.complete(first["id"])
    second = api.attach(volume["id"], connector(C, "host-c"), instance=str(uuid.uuid4()))
    api.complete(second["id"])
    assert second["shared_connections_by_attachment"] == [first["id"]]
    assert api.attachment(first["id"])["shared_connections_by_attachment"] == [second["id"]]
    assert api.attachment(on_b["id"])["shared_connections_by_attachment"] == []
    assert targets(tgtd)[info["target_iqn"]].acls == {B, C}
    assert_admits(info, C)

    api.detach(on_b["id"])
    remaining = api.detach(first["id"])

    assert [a["id"] for a in remaining] == [second["id"]]
    assert api.attachment(second["id"])["shared_connections_by_attachment"] == []
    assert targets(tgtd)[info["target_iqn"]].acls == {C}
    assert_admits(info, C)
    assert_refuses(info, B)

    assert api.detach(second["id"]) == []

    assert info["target_iqn"] not in targets(tgtd)
    assert_refuses(info, C, NO_TARGET)
    assert api.volume(volume["id"])["status"] == "available"


# -- 3. reconcile after tgtd lost everything: the CLI, and on start-up ----------------------------------------


def test_reconcile_restores_exports_after_tgtd_restarts_and_removes_orphans(
    launch: Callable[..., Stack], tgtd: TgtDaemon
) -> None:
    # a server of its own: this test restarts it, and reconcile must see exactly this database
    stack = launch()
    api = stack.caller(new_project())
    single = api.create_volume()
    on_a = api.attach(single["id"], connector(A, "host-a"))
    api.complete(on_a["id"])
    multi = api.create_volume(stack.multiattach_type())
    on_c = api.attach(multi["id"], connector(C, "host-c"))
    api.complete(on_c["id"])
    on_b = api.attach(multi["id"], connector(B, "host-b"))  # left attaching: connected all the same
    reserved = api.create_volume()
    api.ok("POST", "/attachments", {"attachment": {"volume_uuid": reserved["id"]}})  # reserved only: no export
    logins = [(on_a["connection_info"], A), (on_b["connection_info"], B), (on_c["connection_info"], C)]
    for info, initiator in logins:
        assert_admits(info, initiator)
    expected = {iqn_of(single["id"]): {A}, iqn_of(multi["id"]): {B, C}}
    assert {iqn: t.acls for iqn, t in targets(tgtd).items()} == expected

    tgtd.restart_empty()

    for info, initiator in logins:
        assert_refuses(info, initiator, NO_TARGET)
    # what reconcile must take away: a target of ours that nothing in the database wants
    orphan = iqn_of(str(uuid.uuid4()))
    tgtadm_ok(tgtd, "--op", "new", "--mode", "target", "--tid", "7", "-T", orphan)
    tgtadm_ok(tgtd, "--op", "bind", "--mode", "target", "--tid", "7", "-Q", A)
    # what it must complete: a target left half-made (no LUN, no CHAP) with an ACL no attachment has
    tgtadm_ok(tgtd, "--op", "new", "--mode", "target", "--tid", "8", "-T", iqn_of(single["id"]))
    tgtadm_ok(tgtd, "--op", "bind", "--mode", "target", "--tid", "8", "-Q", D)
    # and what it must leave alone: a target that is not ours
    foreign = "iqn.2003-01.org.example:not-tether"
    tgtadm_ok(tgtd, "--op", "new", "--mode", "target", "--tid", "9", "-T", foreign)

    result = stack.cli("reconcile")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "errors: 0" in result.stdout, result.stdout
    for info, initiator in logins:
        assert_admits(info, initiator)  # with the same CHAP secret as before the restart
    assert_refuses(on_a["connection_info"], D)
    assert_refuses(on_a["connection_info"], B)
    have = targets(tgtd)
    assert orphan not in have
    assert foreign in have
    assert {iqn: t.acls for iqn, t in have.items() if iqn != foreign} == expected

    # on start-up the server reconciles by itself (TETHER_RECONCILE_ON_START defaults to true)
    stack.stop()
    tgtd.restart_empty()
    for info, initiator in logins:
        assert_refuses(info, initiator, NO_TARGET)

    stack.start()

    for info, initiator in logins:
        assert_admits(info, initiator)
    assert {iqn: t.acls for iqn, t in targets(tgtd).items()} == expected
    # the restored exports come apart as usual
    api = stack.caller(api.project)
    api.detach(on_a["id"])
    api.detach(on_b["id"])
    assert_admits(on_c["connection_info"], C)
    assert_refuses(on_c["connection_info"], B)
    api.detach(on_c["id"])
    assert targets(tgtd) == {}
    assert_refuses(on_a["connection_info"], A, NO_TARGET)


# -- 4. the legacy actions on tgt ---------------------------------------------------------------------------


def test_legacy_attach_and_detach_on_tgt(api: Caller, tgtd: TgtDaemon) -> None:
    volume = api.create_volume()
    conn = connector(A, "host-a")
    instance = str(uuid.uuid4())

    api.action(volume["id"], "os-reserve")
    assert api.volume(volume["id"])["status"] == "attaching"
    reply = api.action(volume["id"], "os-initialize_connection", {"connector": conn}, status=200)
    info = reply["connection_info"]["data"]
    assert reply["connection_info"]["driver_volume_type"] == "iscsi"
    assert_admits(info, A)
    assert_refuses(info, B)
    api.action(volume["id"], "os-attach", {"instance_uuid": instance, "mountpoint": "/dev/vdb"})
    assert api.volume(volume["id"])["status"] == "in-use"
    assert_admits(info, A)

    api.action(volume["id"], "os-begin_detaching")
    assert api.volume(volume["id"])["status"] == "detaching"
    api.action(volume["id"], "os-terminate_connection", {"connector": conn})
    assert_refuses(info, A)
    assert targets(tgtd)[info["target_iqn"]].acls == set()
    api.action(volume["id"], "os-detach", {})

    assert info["target_iqn"] not in targets(tgtd)
    assert_refuses(info, A, NO_TARGET)
    shown = api.volume(volume["id"])
    assert shown["status"] == "available"
    assert shown["attachments"] == []


# -- 5. secrets never in the logs -----------------------------------------------------------------------------


@pytest.mark.parametrize("control", ["socket", "tgtadm"])
def test_the_chap_secret_never_reaches_the_server_log(launch: Callable[..., Stack], control: str) -> None:
    stack = launch(TETHER_LOG_LEVEL="DEBUG", TETHER_LOG_JSON="1", TETHER_TGT_CONTROL=control)
    assert stack.server is not None
    api, log = stack.caller(new_project()), stack.server.log
    volume = api.create_volume()

    attachment = api.attach(volume["id"], connector(A, "host-a"))
    secret = attachment["connection_info"]["auth_password"]
    assert_admits(attachment["connection_info"], A)
    api.complete(attachment["id"])
    api.detach(attachment["id"])
    stack.stop()  # flush everything the server had to say

    text = log.read_text(errors="replace")
    assert secret not in text
    # ...and the log is one that would have shown it: every tgtadm request (its command line, run or sent on tgtd's
    # socket), as JSON records
    said = {"socket": ("app.backends.targets.tgt_socket", "sending "), "tgtadm": ("app.backends.cmd", "running ")}
    logger, verb = said[control]
    commands = [
        entry["message"].removeprefix(verb)
        for entry in (json.loads(line) for line in text.splitlines() if line.startswith("{"))
        if entry["logger"] == logger and entry["message"].startswith(f"{verb}tgtadm ")
    ]
    assert any("--op new --mode account" in c and c.endswith("--password ***") for c in commands), commands
    assert any("--op bind --mode target" in c and c.endswith(f"-Q {A}") for c in commands), commands
    # the last detach deletes the target, its ACLs with it
    assert any("--op delete --mode target --tid" in c and c.endswith("--force") for c in commands), commands


# -- 6. timing (reported, not asserted) -------------------------------------------------------------------------


def test_timing_of_attach_and_detach_on_file_and_tgt(api: Caller, capsys: pytest.CaptureFixture[str]) -> None:
    volume = api.create_volume()
    attach_times: list[float] = []
    detach_times: list[float] = []
    for n in range(TIMING_ROUNDS):
        started = time.perf_counter()
        attachment = api.attach(volume["id"], connector(A, f"host-{n}"))
        attach_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        api.detach(attachment["id"])
        detach_times.append(time.perf_counter() - started)

    assert api.volume(volume["id"])["status"] == "available"
    with capsys.disabled():
        print(
            f"\nfile+tgt over {TIMING_ROUNDS} rounds: attach (POST /attachments with connector) median "
            f"{statistics.median(attach_times) * 1000:.1f} ms (min {min(attach_times) * 1000:.1f}, "
            f"max {max(attach_times) * 1000:.1f}); detach (DELETE) median "
            f"{statistics.median(detach_times) * 1000:.1f} ms (min {min(detach_times) * 1000:.1f}, "
            f"max {max(detach_times) * 1000:.1f})"
        )
