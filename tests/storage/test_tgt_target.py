"""TgtTarget against a real tgtd, checked by logging in with the real libiscsi initiator; and cmd.run."""

from __future__ import annotations

import logging
import secrets
import string
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from app.backends import cmd
from app.backends.base import BackendError, Backends, Chap, ExportState, VolumeRef
from app.backends.operations import StorageOps
from app.backends.targets import tgt_socket
from app.backends.targets.tgt import TgtTarget, TgtTargetView, parse_targets
from app.backends.volumes.file import FileVolumeStore
from tests.storage.tgtd import IQN_PREFIX, TgtDaemon, readcapacity

# the cmd.run tests at the end need no tgtd; everything else does
pytestmark = pytest.mark.storage

A = "iqn.1994-05.com.example:host-a"
B = "iqn.1994-05.com.example:host-b"
C = "iqn.1994-05.com.example:host-c"
ONE_GIB = "Total size:1073741824"
TARGET_NOT_FOUND = "Target not found"
AUTH_FAILURE = "Authentication failure"

_ALNUM = string.ascii_letters + string.digits


def new_chap() -> Chap:
    # the shape the service generates: 20-char user, 16-char secret, letters and digits
    return Chap(
        username="".join(secrets.choice(_ALNUM) for _ in range(20)),
        secret="".join(secrets.choice(_ALNUM) for _ in range(16)),
    )


class Exported:
    """One file volume exported through tgt, with what an initiator needs to log in."""

    def __init__(self, tgt: TgtTarget, store: FileVolumeStore, size_gb: int = 1) -> None:
        self.tgt = tgt
        self.volume = VolumeRef(id=str(uuid.uuid4()), size_gb=size_gb)
        self.path = store.create(self.volume)
        self.chap = new_chap()
        self.info = tgt.create_export(self.volume, self.path, self.chap)

    def login(self, initiator: str, secret: str | None = None, user: str | None = None) -> tuple[int, str]:
        return readcapacity(
            initiator,
            user or self.chap.username,
            secret or self.chap.secret,
            self.tgt.portal,
            self.info.target_iqn,
            self.info.target_lun,
        )

    def assert_admits(self, initiator: str) -> None:
        code, out = self.login(initiator)
        assert code == 0, out
        assert ONE_GIB in out

    def assert_refuses(self, initiator: str, why: str = TARGET_NOT_FOUND, **kw: Any) -> None:
        code, out = self.login(initiator, **kw)
        assert code != 0, out
        assert why in out


@pytest.fixture
def export(tgt: TgtTarget, file_store: FileVolumeStore) -> Exported:
    return Exported(tgt, file_store)


def view(tgtd: TgtDaemon, iqn: str) -> TgtTargetView | None:
    return next((t for t in parse_targets(tgtd.show()) if t.iqn == iqn), None)


def accounts(tgtd: TgtDaemon) -> set[str]:
    out = tgtd.tgtadm("--op", "show", "--mode", "account").stdout
    return {line.strip() for line in out.splitlines()[1:] if line.strip()}


# -- exporting and logging in ------------------------------------------------------------------------


def test_export_describes_the_target_tgtd_made(export: Exported, tgtd: TgtDaemon) -> None:
    target = view(tgtd, export.info.target_iqn)

    assert target is not None
    assert export.info.target_iqn == f"{IQN_PREFIX}volume-{export.volume.id}"
    assert export.info.target_portal == tgtd.portal
    assert export.info.target_lun == 1
    assert export.info.provider_location == f"{tgtd.portal},{target.tid} {export.info.target_iqn} 1"
    assert target.luns[1] == export.path
    assert target.accounts == [export.chap.username]
    assert target.acls == set()
    assert target.state == "ready"


def test_a_new_export_admits_nobody(export: Exported) -> None:
    export.assert_refuses(A)


def test_an_added_initiator_logs_in_with_the_secret_and_no_one_else(export: Exported) -> None:
    export.tgt.add_initiator(export.volume, A)

    export.assert_admits(A)
    export.assert_refuses(B)
    export.assert_refuses(A, AUTH_FAILURE, secret="wrong-secret-1234")
    export.assert_refuses(A, AUTH_FAILURE, user="someone-else")


def test_two_initiators_then_one_removed(export: Exported) -> None:
    export.tgt.add_initiator(export.volume, A)
    export.tgt.add_initiator(export.volume, B)
    export.assert_admits(A)
    export.assert_admits(B)

    export.tgt.remove_initiator(export.volume, A)

    export.assert_refuses(A)
    export.assert_admits(B)
    assert export.tgt.exports()[export.volume.id].initiators == {B}


def test_remove_export_takes_the_target_and_its_account(export: Exported, tgtd: TgtDaemon) -> None:
    export.tgt.add_initiator(export.volume, A)

    export.tgt.remove_export(export.volume)

    assert export.volume.id not in export.tgt.exports()
    assert view(tgtd, export.info.target_iqn) is None
    assert export.chap.username not in accounts(tgtd)
    # libiscsi words a login to a target that does not exist as "Can not reconnect right now"
    export.assert_refuses(A, "Login Failed")


def test_after_remove_export_initiator_calls_behave(export: Exported) -> None:
    export.tgt.remove_export(export.volume)

    export.tgt.remove_initiator(export.volume, A)  # nothing to remove is success
    with pytest.raises(BackendError, match="not exported"):
        export.tgt.add_initiator(export.volume, A)


# -- idempotency -------------------------------------------------------------------------------------


def test_every_operation_repeated_leaves_the_same_state(export: Exported, tgtd: TgtDaemon) -> None:
    tgt, volume = export.tgt, export.volume

    again = tgt.create_export(volume, export.path, export.chap)
    assert again == export.info
    tgt.add_initiator(volume, A)
    tgt.add_initiator(volume, B)
    before = tgtd.show()
    tgt.add_initiator(volume, A)
    tgt.create_export(volume, export.path, export.chap)
    assert tgtd.show() == before

    tgt.remove_initiator(volume, B)
    tgt.remove_initiator(volume, B)
    assert tgt.exports()[volume.id].initiators == {A}
    export.assert_admits(A)

    tgt.remove_export(volume)
    tgt.remove_export(volume)
    assert volume.id not in tgt.exports()


def test_a_new_process_reexporting_keeps_the_secret_working(export: Exported, tgtd: TgtDaemon) -> None:
    export.tgt.add_initiator(export.volume, A)
    fresh = TgtTarget(
        iqn_prefix=IQN_PREFIX, portal=tgtd.portal, control_port=tgtd.control_port, control=export.tgt.control
    )

    assert fresh.create_export(export.volume, export.path, export.chap) == export.info

    export.assert_admits(A)
    target = view(tgtd, export.info.target_iqn)
    assert target is not None
    assert target.accounts == [export.chap.username]
    assert target.state == "ready"
    assert accounts(tgtd) == {export.chap.username}


@pytest.mark.parametrize("fresh_process", [False, True])
def test_an_existing_account_with_another_password_is_fixed(
    export: Exported, tgtd: TgtDaemon, fresh_process: bool
) -> None:
    export.tgt.add_initiator(export.volume, A)
    old_secret = export.chap.secret
    tgt = export.tgt
    if fresh_process:
        tgt = TgtTarget(
            iqn_prefix=IQN_PREFIX, portal=tgtd.portal, control_port=tgtd.control_port, control=export.tgt.control
        )
    export.chap = Chap(username=export.chap.username, secret=new_chap().secret)

    tgt.create_export(export.volume, export.path, export.chap)

    export.assert_admits(A)
    export.assert_refuses(A, AUTH_FAILURE, secret=old_secret)
    assert accounts(tgtd) == {export.chap.username}


def test_a_new_chap_user_replaces_the_old_one(export: Exported, tgtd: TgtDaemon) -> None:
    export.tgt.add_initiator(export.volume, A)
    old = export.chap
    export.chap = new_chap()

    export.tgt.create_export(export.volume, export.path, export.chap)

    export.assert_admits(A)
    export.assert_refuses(A, AUTH_FAILURE, user=old.username, secret=old.secret)
    assert accounts(tgtd) == {export.chap.username}


def test_extra_accounts_are_removed_without_crashing_tgtd(export: Exported, tgtd: TgtDaemon) -> None:
    # tgtd crashes on the next show if an account other than the last bound is unbound; the target
    # ends up as [ours, extra-1, extra-2] and each must go, last first
    export.tgt.add_initiator(export.volume, A)
    target = view(tgtd, export.info.target_iqn)
    assert target is not None
    for extra in ("extra-1", "extra-2"):
        assert tgtd.tgtadm("--op", "new", "--mode", "account", "--user", extra, "--password", "pw").returncode == 0
        assert (
            tgtd.tgtadm("--op", "bind", "--mode", "account", "--tid", str(target.tid), "--user", extra).returncode == 0
        )

    export.tgt.create_export(export.volume, export.path, export.chap)

    target = view(tgtd, export.info.target_iqn)
    assert target is not None
    assert target.accounts == [export.chap.username]
    assert accounts(tgtd) == {export.chap.username}
    assert tgtd.proc is not None
    assert tgtd.proc.poll() is None
    export.assert_admits(A)
    export.assert_refuses(A, AUTH_FAILURE, user="extra-1", secret="pw")


def test_an_account_shared_with_another_target_is_left_alone(export: Exported, tgtd: TgtDaemon) -> None:
    assert (
        tgtd.tgtadm("--op", "new", "--mode", "target", "--tid", "90", "-T", "iqn.2000-01.com.other:x").returncode == 0
    )
    assert (
        tgtd.tgtadm("--op", "bind", "--mode", "account", "--tid", "90", "--user", export.chap.username).returncode == 0
    )
    fresh = TgtTarget(
        iqn_prefix=IQN_PREFIX, portal=tgtd.portal, control_port=tgtd.control_port, control=export.tgt.control
    )

    with pytest.raises(BackendError, match="also bound to tid"):
        fresh.create_export(export.volume, export.path, export.chap)

    other = view(tgtd, "iqn.2000-01.com.other:x")
    assert other is not None
    assert other.accounts == [export.chap.username]


def test_a_target_left_offline_is_made_ready(export: Exported, tgtd: TgtDaemon) -> None:
    export.tgt.add_initiator(export.volume, A)
    target = view(tgtd, export.info.target_iqn)
    assert target is not None
    update = ["--op", "update", "--mode", "target", "--tid", str(target.tid), "--name", "state", "--value", "offline"]
    assert tgtd.tgtadm(*update).returncode == 0
    export.assert_refuses(A, "Target error")

    export.tgt.create_export(export.volume, export.path, export.chap)

    export.assert_admits(A)


def test_a_lun_on_another_path_is_repointed(export: Exported, file_store: FileVolumeStore, tgtd: TgtDaemon) -> None:
    other = file_store.create(VolumeRef(id=str(uuid.uuid4()), size_gb=2))
    export.tgt.add_initiator(export.volume, A)

    export.tgt.create_export(export.volume, other, export.chap)

    target = view(tgtd, export.info.target_iqn)
    assert target is not None
    assert target.luns[1] == other
    code, out = export.login(A)
    assert code == 0, out
    assert "Total size:2147483648" in out


def test_create_export_after_tgtd_restarted_empty_recreates(export: Exported, tgtd: TgtDaemon) -> None:
    export.tgt.add_initiator(export.volume, A)

    tgtd.restart_empty()
    assert export.tgt.exports() == {}
    info = export.tgt.create_export(export.volume, export.path, export.chap)
    export.tgt.add_initiator(export.volume, A)

    assert info.target_iqn == export.info.target_iqn
    export.assert_admits(A)


def test_parallel_exports_get_distinct_target_ids(tgt: TgtTarget, file_store: FileVolumeStore, tgtd: TgtDaemon) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        exported = list(pool.map(lambda _: Exported(tgt, file_store), range(8)))

    targets = parse_targets(tgtd.show())
    assert len({t.tid for t in targets}) == len(targets) == 8
    assert set(tgt.exports()) == {e.volume.id for e in exported}
    for e in exported:
        assert e.info.provider_location.split(" ")[0].split(",")[1] in {str(t.tid) for t in targets}


# -- a node's connect and disconnect: the fewest tgtadm processes, the same end state -----------------------


@pytest.fixture
def tgtadm_ops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """ "<op> <mode>" of every tgtadm request the code under test makes from now on (the real one still runs)."""
    ops: list[str] = []

    def record(words: list[str]) -> None:
        if words and words[0] == "tgtadm":
            ops.append(f"{words[words.index('--op') + 1]} {words[words.index('--mode') + 1]}")

    spy_on_tgtadm(monkeypatch, record)
    return ops


def spy_on_tgtadm(monkeypatch: pytest.MonkeyPatch, record: Callable[[list[str]], None]) -> None:
    """record(argv) for every command run and every tgtadm request sent on tgtd's socket from now on."""
    for module in (cmd, tgt_socket):

        def spy(argv: Sequence[str], real: Any = module.run, **kw: Any) -> cmd.Completed:
            record([str(a) for a in argv])
            return real(argv, **kw)  # type: ignore[no-any-return]

        monkeypatch.setattr(module, "run", spy)


class Node:
    """One volume on a node's StorageOps (file store + tgt), as the connect and disconnect jobs drive it."""

    def __init__(self, tgt: TgtTarget, store: FileVolumeStore) -> None:
        self.tgt = tgt
        self.ops = StorageOps(Backends(volumes=store, target=tgt))
        self.volume = VolumeRef(id=str(uuid.uuid4()), size_gb=1)
        store.create(self.volume)
        self.chap = new_chap()

    def connect(self, initiator: str, tgt: TgtTarget | None = None) -> Exported:
        ops = self.ops if tgt is None else StorageOps(Backends(volumes=self.ops.backends.volumes, target=tgt))
        info = ops.connect(self.volume, self.chap, initiator)
        exported = Exported.__new__(Exported)
        exported.tgt, exported.volume, exported.chap, exported.info = self.tgt, self.volume, self.chap, info
        exported.path = self.ops.backends.volumes.path(self.volume)
        return exported


@pytest.fixture
def node(tgt: TgtTarget, file_store: FileVolumeStore) -> Node:
    return Node(tgt, file_store)


def test_connect_of_a_new_volume_reads_nothing_and_opens_the_acl_last(
    node: Node, tgtd: TgtDaemon, tgtadm_ops: list[str]
) -> None:
    exported = node.connect(A)

    # the ACL comes after the CHAP account is bound: never open without CHAP
    assert tgtadm_ops == ["new target", "new logicalunit", "new account", "bind account", "bind target"]
    target = view(tgtd, exported.info.target_iqn)
    assert target is not None
    assert (target.luns[1], target.accounts, target.acls, target.state) == (
        exported.path,
        [node.chap.username],
        {A},
        "ready",
    )
    assert exported.info.provider_location == f"{tgtd.portal},{target.tid} {exported.info.target_iqn} 1"
    exported.assert_admits(A)
    exported.assert_refuses(B)
    exported.assert_refuses(A, AUTH_FAILURE, secret="wrong-secret-1234")


def test_a_second_connect_reads_the_targets_once(node: Node, tgtd: TgtDaemon, tgtadm_ops: list[str]) -> None:
    first = node.connect(A)
    tgtadm_ops.clear()

    second = node.connect(B)

    assert tgtadm_ops == ["show target", "bind target"]
    assert second.info == first.info
    second.assert_admits(A)
    second.assert_admits(B)


def test_the_last_disconnect_deletes_the_target_and_its_account(
    node: Node, tgtd: TgtDaemon, tgtadm_ops: list[str]
) -> None:
    exported = node.connect(A)
    node.connect(B)
    tgtadm_ops.clear()

    node.ops.disconnect(node.volume, [A, B], export=True)

    # deleting the target takes its ACLs with it
    assert tgtadm_ops == ["show target", "delete target", "delete account"]
    assert view(tgtd, exported.info.target_iqn) is None
    assert node.chap.username not in accounts(tgtd)
    exported.assert_refuses(A, "Login Failed")
    tgtadm_ops.clear()

    node.ops.disconnect(node.volume, [A, B], export=True)  # again: nothing left to do

    assert tgtadm_ops == ["show target"]


def test_a_disconnect_that_keeps_the_export_unbinds_only_its_initiators(
    node: Node, tgtd: TgtDaemon, tgtadm_ops: list[str]
) -> None:
    exported = node.connect(A)
    node.connect(B)
    tgtadm_ops.clear()

    node.ops.disconnect(node.volume, [A, C], export=False)  # C was never allowed: nothing to unbind

    assert tgtadm_ops == ["show target", "unbind target"]
    exported.assert_refuses(A)
    exported.assert_admits(B)
    assert node.tgt.exports()[node.volume.id].initiators == {B}


def test_connect_after_a_disconnect_exports_again(node: Node, tgtd: TgtDaemon) -> None:
    node.connect(A)
    node.ops.disconnect(node.volume, [A], export=True)

    exported = node.connect(A)

    exported.assert_admits(A)
    assert accounts(tgtd) == {node.chap.username}


def test_connect_when_the_tid_it_tries_is_taken(node: Node, tgtd: TgtDaemon, tgtadm_ops: list[str]) -> None:
    # a target made behind this process's back holds tid 1, the one a process that has seen nothing tries first
    foreign = "iqn.2000-01.com.other:disk"
    assert tgtd.tgtadm("--op", "new", "--mode", "target", "--tid", "1", "-T", foreign).returncode == 0

    exported = node.connect(A)

    assert tgtadm_ops[:3] == ["new target", "show target", "new target"]
    mine, other = view(tgtd, exported.info.target_iqn), view(tgtd, foreign)
    assert mine is not None
    assert other is not None
    assert (mine.tid, other.tid) == (2, 1)
    assert (other.luns.get(1), other.accounts, other.acls) == (None, [], set())
    exported.assert_admits(A)


def test_connect_from_a_process_that_has_not_seen_the_target(
    node: Node, file_store: FileVolumeStore, tgtd: TgtDaemon
) -> None:
    # the fresh process's guess is a free tid, so tgtd refuses its `new target` for the name alone
    for tid, iqn in ((1, "iqn.2000-01.com.other:one"), (2, "iqn.2000-01.com.other:two")):
        assert tgtd.tgtadm("--op", "new", "--mode", "target", "--tid", str(tid), "-T", iqn).returncode == 0
    fresh = TgtTarget(
        iqn_prefix=IQN_PREFIX, portal=tgtd.portal, control_port=tgtd.control_port, control=node.tgt.control
    )
    fresh.exports()  # it has seen tids 1 and 2 only
    exported = node.connect(A)
    assert tgtd.tgtadm("--op", "delete", "--mode", "target", "--tid", "2").returncode == 0

    again = node.connect(B, tgt=fresh)

    assert again.info == exported.info
    iqns = [t.iqn for t in parse_targets(tgtd.show())]
    assert sorted(iqns) == sorted(["iqn.2000-01.com.other:one", exported.info.target_iqn])
    target = view(tgtd, exported.info.target_iqn)
    assert target is not None
    assert (target.tid, target.acls, target.accounts) == (3, {A, B}, [node.chap.username])
    again.assert_admits(A)
    again.assert_admits(B)


def test_a_leftover_account_is_made_again_for_a_new_target(node: Node, tgtd: TgtDaemon) -> None:
    # left by a crash between `new account` and the end of a connect: the password it holds is unknown
    made = tgtd.tgtadm("--op", "new", "--mode", "account", "--user", node.chap.username, "--password", "OldSecret1")
    assert made.returncode == 0

    exported = node.connect(A)

    exported.assert_admits(A)
    exported.assert_refuses(A, AUTH_FAILURE, secret="OldSecret1")
    assert accounts(tgtd) == {node.chap.username}


def test_a_leftover_account_bound_elsewhere_is_not_touched(node: Node, tgtd: TgtDaemon) -> None:
    foreign = "iqn.2000-01.com.other:x"
    for args in (
        ("--op", "new", "--mode", "account", "--user", node.chap.username, "--password", "OldSecret1"),
        ("--op", "new", "--mode", "target", "--tid", "90", "-T", foreign),
        ("--op", "bind", "--mode", "account", "--tid", "90", "--user", node.chap.username),
    ):
        assert tgtd.tgtadm(*args).returncode == 0

    with pytest.raises(BackendError, match="also bound to tid"):
        node.connect(A)

    other = view(tgtd, foreign)
    assert other is not None
    assert other.accounts == [node.chap.username]
    mine = view(tgtd, node.tgt.iqn(node.volume))
    assert mine is not None
    assert (mine.accounts, mine.acls) == ([], set())  # made, but open to no one


def test_drop_export_removes_every_acl_and_the_export(node: Node, tgtd: TgtDaemon) -> None:
    exported = node.connect(A)
    node.connect(B)

    node.ops.drop_export(node.volume)

    assert view(tgtd, exported.info.target_iqn) is None
    assert accounts(tgtd) == set()
    exported.assert_refuses(B, "Login Failed")


# -- what exports() reports ----------------------------------------------------------------------------


def test_exports_reports_exactly_the_initiators(tgt: TgtTarget, file_store: FileVolumeStore, tgtd: TgtDaemon) -> None:
    one, two, bare = (Exported(tgt, file_store) for _ in range(3))
    tgt.add_initiator(one.volume, A)
    tgt.add_initiator(one.volume, B)
    tgt.add_initiator(two.volume, C)
    # what tgtd holds that is not Tether's: another prefix, and an address ACL
    assert (
        tgtd.tgtadm("--op", "new", "--mode", "target", "--tid", "99", "-T", "iqn.2000-01.com.other:disk").returncode
        == 0
    )
    assert tgtd.tgtadm("--op", "bind", "--mode", "target", "--tid", "99", "-I", "ALL").returncode == 0
    two_tid = view(tgtd, two.info.target_iqn)
    assert two_tid is not None
    assert tgtd.tgtadm("--op", "bind", "--mode", "target", "--tid", str(two_tid.tid), "-I", "10.0.0.1").returncode == 0

    assert tgt.exports() == {
        one.volume.id: ExportState(one.volume.id, one.info.target_iqn, frozenset({A, B})),
        two.volume.id: ExportState(two.volume.id, two.info.target_iqn, frozenset({C})),
        bare.volume.id: ExportState(bare.volume.id, bare.info.target_iqn, frozenset()),
    }


# -- refusing what must never reach tgtadm ---------------------------------------------------------------

BAD_INITIATORS = [
    "iqn.1994-05.com.example:host a",
    "iqn.1994-05.com.example:host-a\n",
    "iqn.1994-05.com.example:a;reboot",
    "iqn.1994-05.com.example:$(reboot)",
    "iqn.1994-05.com.example:a`id`",
    "iqn.1994-05.com.example:a|b",
    "-Q",
    "ALL",
    "",
]


@pytest.mark.parametrize("initiator", BAD_INITIATORS)
def test_unsafe_initiators_never_reach_tgtadm(
    export: Exported, initiator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    export.tgt.add_initiator(export.volume, A)
    calls: list[list[str]] = []
    spy_on_tgtadm(monkeypatch, calls.append)

    with pytest.raises(BackendError, match="refusing initiator"):
        export.tgt.add_initiator(export.volume, initiator)
    with pytest.raises(BackendError, match="refusing initiator"):
        export.tgt.remove_initiator(export.volume, initiator)

    assert calls == []
    assert export.tgt.exports()[export.volume.id].initiators == {A}


def test_add_initiator_refuses_a_target_without_chap(tgt: TgtTarget, tgtd: TgtDaemon) -> None:
    volume = VolumeRef(id=str(uuid.uuid4()), size_gb=1)
    iqn = tgt.iqn(volume)
    assert tgtd.tgtadm("--op", "new", "--mode", "target", "--tid", "7", "-T", iqn).returncode == 0

    with pytest.raises(BackendError, match="no CHAP account"):
        tgt.add_initiator(volume, A)

    assert tgt.exports()[volume.id].initiators == frozenset()


def test_create_export_refuses_odd_chap_values(tgt: TgtTarget, file_store: FileVolumeStore) -> None:
    volume = VolumeRef(id=str(uuid.uuid4()), size_gb=1)
    path = file_store.create(volume)

    for chap in (Chap("user name", "secretsecret1234"), Chap("user", ""), Chap("user", "a b")):
        with pytest.raises(BackendError, match="refusing the CHAP"):
            tgt.create_export(volume, path, chap)
    assert tgt.exports() == {}


def test_the_chap_secret_is_never_logged(export: Exported, tgtd: TgtDaemon, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fresh = TgtTarget(
        iqn_prefix=IQN_PREFIX, portal=tgtd.portal, control_port=tgtd.control_port, control=export.tgt.control
    )

    fresh.create_export(export.volume, export.path, export.chap)  # re-keys: every account command runs

    assert "--password ***" in caplog.text
    assert export.chap.secret not in caplog.text


# -- ping -------------------------------------------------------------------------------------------------


def test_ping_answers_when_tgtd_runs(tgt: TgtTarget) -> None:
    tgt.ping()


def test_ping_names_an_unreachable_tgtd_in_one_line(tgtd: TgtDaemon) -> None:
    unused = 1 + (tgtd.control_port + 1) % 32767
    target = TgtTarget(iqn_prefix=IQN_PREFIX, portal="127.0.0.1:1", control_port=unused)

    with pytest.raises(BackendError, match=f"tgtd is not reachable on control port {unused}") as caught:
        target.ping()

    assert "\n" not in str(caught.value)


# -- cmd.run ----------------------------------------------------------------------------------------------

FAIL_WITH_SECRET = "import sys; print('pw-SECRET in use', file=sys.stderr); sys.exit(3)"


def test_run_masks_secrets_in_errors_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="app.backends.cmd")

    with pytest.raises(cmd.CommandFailed) as caught:
        cmd.run([sys.executable, "-c", FAIL_WITH_SECRET, "--password", "pw-SECRET"], secrets=["pw-SECRET"])

    message = str(caught.value)
    assert message.startswith(f"{sys.executable.rsplit('/', 1)[-1]} exited with 3: ")
    assert message.endswith("*** in use")
    assert caught.value.returncode == 3
    assert "pw-SECRET" not in caught.value.stderr
    assert "pw-SECRET" not in caplog.text
    assert "--password ***" in caplog.text


def test_run_without_check_returns_the_raw_result() -> None:
    result = cmd.run([sys.executable, "-c", FAIL_WITH_SECRET], check=False, secrets=["pw-SECRET"])

    assert result.returncode == 3
    assert result.stderr == "pw-SECRET in use\n"


def test_run_passes_arguments_literally_in_the_c_locale() -> None:
    script = "import os, sys; print(sys.argv[1]); print(os.environ['LC_ALL'], os.environ['EXTRA'])"

    result = cmd.run([sys.executable, "-c", script, "$(echo hi); `id`"], env={"LC_ALL": "fr_FR.UTF-8", "EXTRA": "x"})

    assert result.stdout.splitlines() == ["$(echo hi); `id`", "C x"]


def test_run_survives_output_that_is_not_utf8() -> None:
    result = cmd.run([sys.executable, "-c", "import sys; sys.stdout.buffer.write(b'ok \\xff')"])

    assert result.stdout == "ok \ufffd"


def test_run_times_out_and_kills_what_the_command_started() -> None:
    # the child starts a grandchild that holds the output pipe: killing only the child would hang
    script = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    )
    started = time.monotonic()

    with pytest.raises(BackendError, match=r"timed out after 0\.5 s"):
        cmd.run([sys.executable, "-c", script], timeout=0.5)

    assert time.monotonic() - started < 5


def test_run_reports_a_missing_command() -> None:
    with pytest.raises(BackendError, match="no-such-command-here could not be started"):
        cmd.run(["no-such-command-here"])


def test_run_is_safe_from_many_threads() -> None:
    results: list[str] = []
    lock = threading.Lock()

    def one(n: int) -> None:
        out = cmd.run([sys.executable, "-c", f"print({n})"]).stdout.strip()
        with lock:
            results.append(out)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(results, key=int) == [str(n) for n in range(8)]
