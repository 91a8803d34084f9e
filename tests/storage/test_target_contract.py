"""One contract for every Target: the same scenarios on the fake, on LIO (via the rtslib stand-in) and on a real tgtd.

What the services and reconcile rely on: export, connect two initiators, disconnect, remove, every step repeatable,
exports() keyed by volume id holding exactly the allowed initiators, and validate_connector as the gate no bad
initiator passes. Where a real daemon runs (tgt), a real initiator also logs in with CHAP.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app.backends.base import BackendError, Chap, ExportInfo, ExportState, InvalidConnector, Target, VolumeRef
from app.backends.targets.fake import FakeTarget
from app.backends.targets.lio import LioTarget
from tests.storage.rtslib_standin import RtslibStandIn

PREFIX = "iqn.2010-10.org.openstack:"
A = "iqn.1993-08.org.debian:01:contract-a"
B = "iqn.1994-05.com.redhat:contract-b"

GIB = 1024**3

Login = Callable[[str, Chap, ExportInfo], tuple[int, str]]


@dataclass
class Harness:
    target: Target
    portal: str
    backing: Callable[[VolumeRef], str]
    login: Login | None = None  # None: nothing a real initiator could log in to


@pytest.fixture(params=["fake", "lio", "tgt", "tgt-tgtadm"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    def device(volume: VolumeRef) -> str:
        return f"/dev/tether-contract/{volume.name}"

    if request.param == "fake":
        return Harness(FakeTarget(PREFIX, "127.0.0.1:3260"), "127.0.0.1:3260", device)
    if request.param == "lio":
        return Harness(LioTarget(PREFIX, "127.0.0.1:3260", rtslib=RtslibStandIn()), "127.0.0.1:3260", device)
    return _tgt_harness(request, tmp_path)


def _tgt_harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    from app.backends.targets.tgt import TgtTarget
    from tests.storage.tgtd import IQN_PREFIX, readcapacity

    daemon = request.getfixturevalue("clean_tgtd")  # tests/storage/conftest.py: a private tgtd
    # tgt: tgtadm's requests on tgtd's socket (the default); tgt-tgtadm: the tgtadm command
    control = "tgtadm" if request.param == "tgt-tgtadm" else "socket"
    target = TgtTarget(IQN_PREFIX, daemon.portal, daemon.control_port, control=control)

    def sparse_file(volume: VolumeRef) -> str:
        path = tmp_path / volume.name
        with path.open("wb") as f:
            f.truncate(volume.size_gb * GIB)
        return str(path)

    def login(initiator: str, credentials: Chap, export: ExportInfo) -> tuple[int, str]:
        return readcapacity(
            initiator, credentials.username, credentials.secret, daemon.portal, export.target_iqn, export.target_lun
        )

    return Harness(target, daemon.portal, sparse_file, login)


def volume() -> VolumeRef:
    return VolumeRef(id=str(uuid.uuid4()), size_gb=1)


def chap(vol: VolumeRef) -> Chap:
    """CHAP is per volume (the services generate it on first export); 20 and 16 letters and digits."""
    digits = vol.id.replace("-", "")
    return Chap(f"u{digits[:19]}", f"s{digits[-15:]}")


def ours(h: Harness, *volumes: VolumeRef) -> dict[str, ExportState]:
    """exports() as reconcile reads it, narrowed to this test's volumes (a shared daemon may hold others)."""
    ids = {v.id for v in volumes}
    return {vid: state for vid, state in h.target.exports().items() if vid in ids}


def connect(h: Harness, vol: VolumeRef, initiator: str) -> str:
    """What the attachment service does: validate, export, allow; returns the initiator as stored."""
    checked = h.target.validate_connector({"initiator": initiator, "host": "compute-1", "ip": "10.0.0.7"})
    h.target.create_export(vol, h.backing(vol), chap(vol))
    h.target.add_initiator(vol, checked["initiator"])
    return str(checked["initiator"])


def test_export_says_where_the_volume_is(harness: Harness) -> None:
    vol = volume()

    info = harness.target.create_export(vol, harness.backing(vol), chap(vol))

    assert info.target_iqn == f"{PREFIX}{vol.name}"
    assert info.target_portal == harness.portal
    assert info.target_lun in (0, 1)
    assert re.fullmatch(
        rf"{re.escape(harness.portal)},\d+ {re.escape(info.target_iqn)} {info.target_lun}", info.provider_location
    )
    assert ours(harness, vol) == {vol.id: ExportState(vol.id, info.target_iqn, frozenset())}


def test_two_initiators_then_one_then_none(harness: Harness) -> None:
    vol = volume()
    iqn = f"{PREFIX}{vol.name}"

    a = connect(harness, vol, A)
    b = connect(harness, vol, B)
    assert ours(harness, vol) == {vol.id: ExportState(vol.id, iqn, frozenset({a, b}))}

    harness.target.remove_initiator(vol, a)
    assert ours(harness, vol) == {vol.id: ExportState(vol.id, iqn, frozenset({b}))}

    harness.target.remove_initiator(vol, b)
    harness.target.remove_export(vol)
    assert ours(harness, vol) == {}


def test_every_step_can_be_repeated(harness: Harness) -> None:
    vol = volume()
    first = harness.target.create_export(vol, harness.backing(vol), chap(vol))
    a = connect(harness, vol, A)

    assert harness.target.create_export(vol, harness.backing(vol), chap(vol)) == first
    harness.target.add_initiator(vol, a)
    assert ours(harness, vol)[vol.id].initiators == {a}

    harness.target.remove_initiator(vol, a)
    harness.target.remove_initiator(vol, a)
    harness.target.remove_export(vol)
    harness.target.remove_export(vol)
    harness.target.remove_initiator(vol, a)
    assert ours(harness, vol) == {}


def test_volumes_are_exported_independently(harness: Harness) -> None:
    one, two = volume(), volume()
    a = connect(harness, one, A)
    b = connect(harness, two, B)

    harness.target.remove_export(one)

    assert ours(harness, one, two) == {two.id: ExportState(two.id, f"{PREFIX}{two.name}", frozenset({b}))}
    assert a != b


def test_add_initiator_needs_an_export(harness: Harness) -> None:
    with pytest.raises(BackendError, match="is not exported"):
        harness.target.add_initiator(volume(), A)


@pytest.mark.parametrize(
    "connector",
    [
        {},
        {"initiator": None},
        {"initiator": ""},
        {"initiator": "not-an-iqn"},
        {"initiator": "iqn.2004-10.com.example:host;reboot"},
        {"initiator": "iqn.2004-10.com.example:host name"},
        {"initiator": "iqn.2004-10.com.example:$(id)"},
        {"initiator": "iqn.2004-10.com.example:" + "x" * 220},
        {"initiator": "eui.12345"},
        {"initiator": 42},
    ],
)
def test_validate_connector_rejects_bad_initiators(harness: Harness, connector: dict[str, Any]) -> None:
    with pytest.raises(InvalidConnector) as caught:
        harness.target.validate_connector(connector)

    assert caught.value.key == "initiator"


def test_validate_connector_keeps_other_keys(harness: Harness) -> None:
    checked = harness.target.validate_connector(
        {"initiator": A, "host": "compute-1", "ip": "10.0.0.7", "multipath": False, "platform": "x86_64"}
    )

    assert checked == {"initiator": A, "host": "compute-1", "ip": "10.0.0.7", "multipath": False, "platform": "x86_64"}


def test_only_allowed_initiators_with_the_secret_log_in(harness: Harness) -> None:
    if harness.login is None:
        pytest.skip("no real target to log in to: only tgt runs a daemon here")
    vol = volume()
    a = connect(harness, vol, A)
    credentials = chap(vol)
    export = harness.target.create_export(vol, harness.backing(vol), credentials)

    code, out = harness.login(a, credentials, export)
    assert code == 0, out
    assert f"Total size:{GIB}" in out

    code, out = harness.login(a, Chap(credentials.username, "WrongSecret12345"), export)
    assert code != 0
    assert "Authentication failure" in out
    code, out = harness.login(B, credentials, export)
    assert code != 0
    assert "Target not found" in out

    harness.target.remove_initiator(vol, a)
    code, out = harness.login(a, credentials, export)
    assert code != 0
