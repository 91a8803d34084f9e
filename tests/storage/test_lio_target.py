"""LioTarget driven through the rtslib stand-in (what it builds in configfs), and one run on real LIO if present."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from app.backends.base import BackendError, Chap, ExportInfo, ExportState, InvalidConnector, VolumeRef
from app.backends.targets.lio import LioTarget, lio_initiator, parse_portal
from tests.storage.rtslib_standin import RtslibStandIn

PREFIX = "iqn.2010-10.org.openstack:"
PORTAL = "127.0.0.1:3260"
A = "iqn.1993-08.org.debian:01:aaaa1111"
B = "iqn.1994-05.com.redhat:bbbb2222"
CHAP = Chap("u" * 20, "s" * 16)
CONFIGFS = Path("/sys/kernel/config/target")


def volume() -> VolumeRef:
    return VolumeRef(id=str(uuid.uuid4()), size_gb=1)


def dev(vol: VolumeRef) -> str:
    return f"/dev/tether-vg/{vol.name}"


def tpg_path(vol: VolumeRef) -> str:
    return f"target/iscsi/{PREFIX}{vol.name}/tpgt_1"


@pytest.fixture
def rts() -> RtslibStandIn:
    return RtslibStandIn()


@pytest.fixture
def lio(rts: RtslibStandIn) -> LioTarget:
    return LioTarget(PREFIX, PORTAL, rtslib=rts)


def test_export_builds_backstore_target_tpg_portal_and_lun_0(rts: RtslibStandIn, lio: LioTarget) -> None:
    vol = volume()
    iqn = f"{PREFIX}{vol.name}"

    info = lio.create_export(vol, dev(vol), CHAP)

    assert info == ExportInfo(iqn, PORTAL, 0, f"{PORTAL},1 {iqn} 0")
    tpg = tpg_path(vol)
    store = f"target/core/block/{vol.name}"
    assert rts.names() == sorted(
        [
            "target",
            "target/core",
            "target/core/block",
            store,
            "target/iscsi",
            f"target/iscsi/{iqn}",
            tpg,
            f"{tpg}/acls",
            f"{tpg}/lun",
            f"{tpg}/lun/lun_0",
            f"{tpg}/np",
            f"{tpg}/np/127.0.0.1:3260",
        ]
    )
    assert rts.file(store, "udev_path") == dev(vol)
    assert rts.link(f"{tpg}/lun/lun_0") == store
    assert rts.file(tpg, "attrib/authentication") == "1"
    assert rts.file(tpg, "attrib/generate_node_acls") == "0"
    assert rts.file(tpg, "enable") == "1"
    # the volume's CHAP is kept where a restarted Tether (and the saved config) can read it back
    assert (rts.file(tpg, "auth/userid"), rts.file(tpg, "auth/password")) == (CHAP.username, CHAP.secret)
    assert len(rts.saves) == 1
    assert rts.saves[0][1][tpg].files["auth/userid"] == CHAP.username


def test_export_enables_the_tpg_only_after_chap_lun_and_portal(rts: RtslibStandIn, lio: LioTarget) -> None:
    lio.create_export(volume(), "/dev/tether-vg/x", CHAP)

    order = [name for name, _ in rts.calls]
    enabled = order.index("TPG.enable")
    for earlier in ("TPG.set_attribute", "TPG.chap_password", "LUN.__init__", "NetworkPortal.__init__"):
        assert order.index(earlier) < enabled


def test_two_initiators_each_get_the_volume_chap_and_lun_0(rts: RtslibStandIn, lio: LioTarget) -> None:
    vol = volume()
    lio.create_export(vol, dev(vol), CHAP)

    lio.add_initiator(vol, A)
    lio.add_initiator(vol, B)

    tpg = tpg_path(vol)
    for initiator in (A, B):
        acl = f"{tpg}/acls/{initiator}"
        assert (rts.file(acl, "auth/userid"), rts.file(acl, "auth/password")) == (CHAP.username, CHAP.secret)
        assert rts.link(f"{acl}/lun_0") == f"{tpg}/lun/lun_0"
    assert lio.exports() == {vol.id: ExportState(vol.id, f"{PREFIX}{vol.name}", frozenset({A, B}))}
    assert len(rts.saves) == 3


def test_repeats_change_nothing_and_save_nothing(rts: RtslibStandIn, lio: LioTarget) -> None:
    vol = volume()
    lio.create_export(vol, dev(vol), CHAP)
    lio.add_initiator(vol, A)
    before = {path: (dict(node.files), node.link) for path, node in rts.tree.items()}
    saves = len(rts.saves)

    again = lio.create_export(vol, dev(vol), CHAP)
    lio.add_initiator(vol, A)

    assert again.target_lun == 0
    assert {path: (dict(node.files), node.link) for path, node in rts.tree.items()} == before
    assert len(rts.saves) == saves


def test_remove_initiator_removes_only_that_acl(rts: RtslibStandIn, lio: LioTarget) -> None:
    vol = volume()
    lio.create_export(vol, dev(vol), CHAP)
    lio.add_initiator(vol, A)
    lio.add_initiator(vol, B)

    lio.remove_initiator(vol, A)
    saves = len(rts.saves)
    lio.remove_initiator(vol, A)
    lio.remove_initiator(volume(), A)

    assert lio.exports()[vol.id].initiators == {B}
    assert not any(A in path for path in rts.tree)
    assert len(rts.saves) == saves


def test_remove_export_leaves_nothing(rts: RtslibStandIn, lio: LioTarget) -> None:
    vol, other = volume(), volume()
    lio.create_export(vol, dev(vol), CHAP)
    lio.create_export(other, dev(other), CHAP)
    lio.add_initiator(vol, A)

    lio.remove_export(vol)
    lio.remove_export(vol)
    lio.remove_initiator(vol, A)

    assert not any(vol.id in path for path in rts.tree)
    assert set(lio.exports()) == {other.id}
    with pytest.raises(BackendError, match="is not exported"):
        lio.add_initiator(vol, A)


def test_remove_export_also_frees_a_backstore_left_without_target(rts: RtslibStandIn, lio: LioTarget) -> None:
    vol = volume()
    rts.RTSRoot()
    rts.BlockStorageObject(vol.name, dev=dev(vol))  # a crash between the two deletes of an earlier call

    lio.remove_export(vol)

    assert not any(vol.id in path for path in rts.tree)


def test_add_initiator_needs_an_export(lio: LioTarget) -> None:
    with pytest.raises(BackendError, match="is not exported"):
        lio.add_initiator(volume(), A)


def test_chap_is_read_back_after_a_restart(rts: RtslibStandIn, lio: LioTarget) -> None:
    vol = volume()
    lio.create_export(vol, dev(vol), CHAP)

    restarted = LioTarget(PREFIX, PORTAL, rtslib=rts)
    restarted.add_initiator(vol, A)

    acl = f"{tpg_path(vol)}/acls/{A}"
    assert (rts.file(acl, "auth/userid"), rts.file(acl, "auth/password")) == (CHAP.username, CHAP.secret)


def test_without_tpg_auth_the_chap_comes_from_memory_then_from_an_acl() -> None:
    rts = RtslibStandIn(tpg_auth=False)
    lio = LioTarget(PREFIX, PORTAL, rtslib=rts)
    vol = volume()
    lio.create_export(vol, dev(vol), CHAP)
    lio.add_initiator(vol, A)

    restarted = LioTarget(PREFIX, PORTAL, rtslib=rts)
    restarted.add_initiator(vol, B)

    acl = f"{tpg_path(vol)}/acls/{B}"
    assert (rts.file(acl, "auth/userid"), rts.file(acl, "auth/password")) == (CHAP.username, CHAP.secret)
    # a restarted process with no ACL to copy from refuses rather than open a volume without CHAP
    lonely = volume()
    lio.create_export(lonely, dev(lonely), CHAP)
    with pytest.raises(BackendError, match="no CHAP is recorded"):
        LioTarget(PREFIX, PORTAL, rtslib=rts).add_initiator(lonely, A)


def test_export_with_a_new_secret_rekeys_every_acl(rts: RtslibStandIn, lio: LioTarget) -> None:
    vol = volume()
    lio.create_export(vol, dev(vol), CHAP)
    lio.add_initiator(vol, A)
    new = Chap("v" * 20, "t" * 16)

    lio.create_export(vol, dev(vol), new)

    tpg = tpg_path(vol)
    assert rts.file(tpg, "auth/password") == new.secret
    assert rts.file(f"{tpg}/acls/{A}", "auth/password") == new.secret
    assert rts.file(f"{tpg}/acls/{A}", "auth/userid") == new.username


def test_export_at_a_new_path_repoints_the_lun_and_keeps_the_acls(rts: RtslibStandIn, lio: LioTarget) -> None:
    vol = volume()
    lio.create_export(vol, "/dev/old/x", CHAP)
    lio.add_initiator(vol, A)

    lio.create_export(vol, "/dev/new/x", CHAP)

    tpg = tpg_path(vol)
    assert rts.file(f"target/core/block/{vol.name}", "udev_path") == "/dev/new/x"
    assert rts.link(f"{tpg}/lun/lun_0") == f"target/core/block/{vol.name}"
    assert rts.link(f"{tpg}/acls/{A}/lun_0") == f"{tpg}/lun/lun_0"


def test_only_exports_walks_the_tree(rts: RtslibStandIn, lio: LioTarget) -> None:
    vol = volume()
    lio.create_export(vol, dev(vol), CHAP)
    lio.add_initiator(vol, A)
    lio.remove_initiator(vol, A)
    lio.remove_export(vol)
    assert rts.called("FabricModule.targets") == 0

    lio.exports()

    assert rts.called("FabricModule.targets") == 1


def test_exports_lists_only_our_targets(rts: RtslibStandIn, lio: LioTarget) -> None:
    vol = volume()
    lio.create_export(vol, dev(vol), CHAP)
    rts.Target(rts.FabricModule("iscsi"), "iqn.2003-01.org.linux-iscsi.host:sn.1234", mode="create")
    rts.Target(rts.FabricModule("iscsi"), f"{PREFIX}other-thing", mode="create")

    assert set(lio.exports()) == {vol.id}


@pytest.mark.parametrize(
    "bad",
    [
        "iqn.2004-10.com.example:host_1",  # rtslib refuses underscores
        "iqn.2004-10.localhost",  # rtslib wants a second dot
        "naa.6001405a1b2c3d4e",  # rtslib only takes naa. types 1, 2, 5, c-f
        "iqn.2004-10.com.example:host;reboot",
        "not an iqn",
        "",
    ],
)
def test_bad_initiators_never_reach_rtslib(rts: RtslibStandIn, lio: LioTarget, bad: str) -> None:
    vol = volume()
    lio.create_export(vol, dev(vol), CHAP)

    with pytest.raises(InvalidConnector) as caught:
        lio.validate_connector({"initiator": bad, "host": "compute-1"})
    assert caught.value.key == "initiator"
    with pytest.raises(BackendError, match="refusing initiator name"):
        lio.add_initiator(vol, bad)
    with pytest.raises(BackendError, match="refusing initiator name"):
        lio.remove_initiator(vol, bad)

    assert rts.called("NodeACL.__init__") == 0


def test_validate_connector_stores_the_initiator_as_lio_lists_it(lio: LioTarget) -> None:
    checked = lio.validate_connector({"initiator": "iqn.1991-05.com.microsoft:WIN-HOST", "ip": "10.0.0.5", "x": 1})

    assert checked == {"initiator": "iqn.1991-05.com.microsoft:win-host", "ip": "10.0.0.5", "x": 1}
    assert lio_initiator("eui.0123456789ABCDEF") == "eui.0123456789abcdef"


def test_save_can_be_turned_off_or_pointed_elsewhere(rts: RtslibStandIn) -> None:
    LioTarget(PREFIX, PORTAL, rtslib=rts, save=False).create_export(volume(), "/dev/vg/a", CHAP)
    assert rts.saves == []

    LioTarget(PREFIX, PORTAL, rtslib=rts, save_file="/tmp/lio.json").create_export(volume(), "/dev/vg/b", CHAP)
    assert [name for name, _ in rts.saves] == ["/tmp/lio.json"]


def test_rtslib_failures_become_backend_errors(rts: RtslibStandIn, lio: LioTarget) -> None:
    vol = volume()
    rts.fail_save = True
    with pytest.raises(BackendError, match=f"LIO failed exporting {vol.name}: Could not open"):
        lio.create_export(vol, dev(vol), CHAP)

    with pytest.raises(BackendError, match="LIO failed listing exports: configfs is not mounted"):
        LioTarget(PREFIX, PORTAL, rtslib=RtslibStandIn(configfs=False)).exports()


def test_unsafe_chap_and_paths_are_refused_before_rtslib(rts: RtslibStandIn, lio: LioTarget) -> None:
    for chap, path in ((Chap("user", "a secret"), "/dev/x"), (Chap("NULL", "s"), "/dev/x"), (CHAP, "relative")):
        with pytest.raises(BackendError, match="refusing"):
            lio.create_export(volume(), path, chap)
    assert rts.calls == []


def test_a_missing_rtslib_package_is_a_backend_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "rtslib_fb", None)

    with pytest.raises(BackendError, match="needs the rtslib-fb package"):
        LioTarget(PREFIX, PORTAL).exports()


@pytest.mark.parametrize(
    ("portal", "parsed"),
    [
        ("127.0.0.1:3260", ("127.0.0.1", 3260)),
        ("10.1.2.3", ("10.1.2.3", 3260)),
        ("[::1]:3261", ("[::1]", 3261)),
        ("[fe80::1]", ("[fe80::1]", 3260)),
    ],
)
def test_portals(portal: str, parsed: tuple[str, int]) -> None:
    assert parse_portal(portal) == parsed


@pytest.mark.parametrize("portal", ["host:3260", "1.2.3.4:0", "[::1", "[::1]3260", "1.2.3.4:x"])
def test_bad_portals(portal: str) -> None:
    with pytest.raises(ValueError, match="invalid portal"):
        LioTarget(PREFIX, portal)


@pytest.mark.skipif(not CONFIGFS.is_dir(), reason="no configfs: LIO cannot run on this kernel")
def test_real_lio(tmp_path: Path) -> None:
    """The same flow against the kernel: a loop device exported, two ACLs, a CHAP login, all removed."""
    from tests.storage.tgtd import readcapacity

    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(1024**3)
    device = subprocess.run(
        ["losetup", "-f", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    prefix = f"iqn.2010-10.org.tether-test-{uuid.uuid4().hex[:8]}:"
    lio = LioTarget(prefix, "127.0.0.1:3260", save=False)
    vol = volume()
    try:
        info = lio.create_export(vol, device, CHAP)
        lio.add_initiator(vol, A)
        lio.add_initiator(vol, B)
        assert lio.exports() == {vol.id: ExportState(vol.id, info.target_iqn, frozenset({A, B}))}
        if shutil.which("iscsi-readcapacity16"):
            code, out = readcapacity(A, CHAP.username, CHAP.secret, "127.0.0.1:3260", info.target_iqn, lun=0)
            assert code == 0, out
            assert "Total size:1073741824" in out
        lio.remove_initiator(vol, A)
        assert lio.exports()[vol.id].initiators == {B}
    finally:
        lio.remove_export(vol)
        subprocess.run(["losetup", "-d", device], check=False)
    assert vol.id not in lio.exports()
