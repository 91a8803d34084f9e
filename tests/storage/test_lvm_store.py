"""LvmVolumeStore against real lvm2 on a loop device: sizes, idempotency, a full group, capacity, thin pools, wipes."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pydantic
import pytest

from app.backends import cmd
from app.backends.base import BackendError, VolumeRef
from app.backends.factory import build_backends
from app.backends.volumes.lvm import LvmVolumeStore, activation_disabled
from app.config import Settings
from tests.storage.lvm import CommandSpy, LoopVG, active_loop_vg, device_mapper_available, loop_vg

__all__ = ["active_loop_vg", "loop_vg"]  # fixtures, imported for pytest to find

GIB = 1024**3
MIB = 1024**2


def volume(size_gb: int = 1) -> VolumeRef:
    return VolumeRef(id=str(uuid.uuid4()), size_gb=size_gb)


def thick(vg: LoopVG, **options: Any) -> LvmVolumeStore:
    # the loop VG's LVs are never activated, so they have no device to wipe: the wipe has tests of its own below
    options.setdefault("volume_clear", "none")
    return LvmVolumeStore(vg.name, "thick", extra_config=vg.config, **options)


def spy(monkeypatch: pytest.MonkeyPatch, **options: Any) -> CommandSpy:
    commands = CommandSpy(**options)
    monkeypatch.setattr(cmd, "run", commands)
    return commands


def wipe(path: str, count: int) -> list[str]:
    return ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={count}", "oflag=direct", "conv=fsync,nocreat,notrunc"]


def volume_lvs(vg: LoopVG) -> dict[str, list[str]]:
    return {name: fields for name, fields in vg.lvs("lv_size").items() if name.startswith("volume-")}


def test_thick_volume_has_exactly_the_size_asked(loop_vg: LoopVG) -> None:
    store = thick(loop_vg)
    vol = volume(1)

    path = store.create(vol)

    assert path == f"/dev/{loop_vg.name}/volume-{vol.id}" == store.path(vol)
    assert volume_lvs(loop_vg) == {vol.name: ["1073741824"]}


def test_create_twice_is_one_volume(loop_vg: LoopVG) -> None:
    store = thick(loop_vg)
    vol = volume(1)

    first = store.create(vol)
    second = store.create(vol)

    assert first == second
    assert volume_lvs(loop_vg) == {vol.name: [str(GIB)]}


def test_create_never_accepts_a_smaller_existing_volume(loop_vg: LoopVG) -> None:
    store = thick(loop_vg)
    vol = volume(1)
    store.create(vol)

    with pytest.raises(BackendError, match="smaller than the 2 GiB asked for"):
        store.create(VolumeRef(id=vol.id, size_gb=2))
    assert volume_lvs(loop_vg) == {vol.name: [str(GIB)]}


def test_delete_removes_the_volume_and_repeats_are_fine(loop_vg: LoopVG) -> None:
    store = thick(loop_vg)
    kept, gone = volume(1), volume(1)
    store.create(kept)
    store.create(gone)

    store.delete(gone)
    store.delete(gone)

    assert volume_lvs(loop_vg) == {kept.name: [str(GIB)]}


def test_deleting_a_volume_never_created_is_success(loop_vg: LoopVG) -> None:
    thick(loop_vg).delete(volume(1))

    assert volume_lvs(loop_vg) == {}


def test_full_volume_group_is_a_clear_error_and_leaves_nothing(loop_vg: LoopVG) -> None:
    store = thick(loop_vg)

    with pytest.raises(BackendError) as caught:
        store.create(volume(100))

    assert str(caught.value) == f"volume group {loop_vg.name} has not enough free space for 100 GiB"
    assert volume_lvs(loop_vg) == {}


def test_capacity_is_what_vgs_reports(loop_vg: LoopVG) -> None:
    store = thick(loop_vg)
    before = store.capacity()
    size, free = (int(v) for v in loop_vg.vgs("vg_size", "vg_free"))
    assert (before.total_bytes, before.free_bytes) == (size, free)

    store.create(volume(1))

    after = store.capacity()
    size, free = (int(v) for v in loop_vg.vgs("vg_size", "vg_free"))
    assert (after.total_bytes, after.free_bytes) == (size, free)
    assert after.free_bytes == before.free_bytes - GIB


def test_a_missing_volume_group_is_named(loop_vg: LoopVG) -> None:
    store = LvmVolumeStore("tether-no-such-vg", "thick", extra_config=loop_vg.config)

    with pytest.raises(BackendError, match="volume group tether-no-such-vg does not exist"):
        store.create(volume(1))
    with pytest.raises(BackendError, match="volume group tether-no-such-vg does not exist"):
        store.capacity()


@pytest.mark.skipif(device_mapper_available(), reason="device-mapper present: test_thin_volumes runs for real")
def test_thin_commands_are_accepted_up_to_device_mapper(loop_vg: LoopVG) -> None:
    """Without device-mapper lvm2 cannot make a thin pool; it must still parse our command and leave nothing."""
    store = LvmVolumeStore(loop_vg.name, "thin", "tether-pool", extra_config=loop_vg.config)

    with pytest.raises(BackendError, match="Can't create thin-pool without using device-mapper"):
        store.create(volume(1))

    assert loop_vg.lvs() == {}


def test_thin_volumes(active_loop_vg: LoopVG) -> None:
    vg = active_loop_vg
    store = LvmVolumeStore(vg.name, "thin", "tether-pool", extra_config=vg.config)
    assert store.activate
    free = int(vg.vgs("vg_free")[0])
    one, two = volume(1), volume(5)  # thin: 5 GiB fits in a pool of under 3 GiB

    store.create(one)
    store.create(two)
    store.create(one)

    rows = vg.lvs("lv_size", "pool_lv", "segtype")
    pool_size = int(rows["tether-pool"][0])
    assert rows["tether-pool"][2] == "thin-pool"
    # the pool was made on first use from 90% of the free space, rounded by LVM to whole extents
    assert free * 0.85 <= pool_size <= free * 0.9
    assert rows[one.name] == [str(GIB), "tether-pool", "thin"]
    assert rows[two.name] == [str(5 * GIB), "tether-pool", "thin"]
    capacity = store.capacity()
    assert capacity.total_bytes == pool_size
    assert 0 < capacity.free_bytes <= pool_size

    store.delete(one)
    store.delete(one)
    assert one.name not in vg.lvs()
    assert two.name in vg.lvs()


def test_activation_follows_the_extra_config() -> None:
    assert not activation_disabled(None)
    assert activation_disabled("global{activation=0} devices{filter=[]}")
    assert activation_disabled("global/activation = 0")
    assert not activation_disabled("global{activation=1}")
    assert not activation_disabled("activation{auto_activation_volume_list=[]}")
    assert LvmVolumeStore("vg", extra_config="global{activation=0}").activate is False
    assert LvmVolumeStore("vg").activate is True
    assert LvmVolumeStore("vg", extra_config="global{activation=0}", activate=True).activate is True


@pytest.mark.parametrize(
    ("vg", "pool"),
    [("bad vg", "pool"), ("-vg", "pool"), ("vg", "bad/pool")],
)
def test_unsafe_names_are_refused_at_construction(vg: str, pool: str) -> None:
    with pytest.raises(ValueError, match="invalid LVM"):
        LvmVolumeStore(vg, "thin", pool)


# -- wiping on delete (volume_clear) -------------------------------------------------------------------


def test_delete_zeroes_a_thick_volume_before_removing_it(
    loop_vg: LoopVG, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = thick(loop_vg, volume_clear="zero", volume_clear_size_mib=4)
    vol = volume(1)
    store.create(vol)
    device = tmp_path / "device"  # stands in for the LV's device node, which this kernel cannot make
    device.write_bytes(b"\xab" * 8 * MIB)  # the tenant's data, also past the part to wipe
    commands = spy(monkeypatch, stand_ins={store.path(vol): str(device)})

    store.delete(vol)

    assert commands.commands() == ["lvs", "dd", "lvremove"]
    assert commands.dd() == [wipe(f"/dev/{loop_vg.name}/{vol.name}", 4)]
    data = device.read_bytes()
    assert data[: 4 * MIB] == bytes(4 * MIB)
    assert data[4 * MIB :] == b"\xab" * 4 * MIB
    assert volume_lvs(loop_vg) == {}


@pytest.mark.parametrize(
    ("options", "count"),
    [
        ({}, 1024),
        ({"volume_clear_size_mib": 0}, 1024),
        ({"volume_clear_size_mib": 1}, 1),
        ({"volume_clear_size_mib": 4096}, 1024),
    ],
    ids=["default", "zero-is-all", "one-mib", "more-than-the-volume"],
)
def test_how_much_is_wiped(
    loop_vg: LoopVG, monkeypatch: pytest.MonkeyPatch, options: dict[str, int], count: int
) -> None:
    store = LvmVolumeStore(loop_vg.name, "thick", extra_config=loop_vg.config, **options)
    vol = volume(1)
    store.create(vol)
    commands = spy(monkeypatch, answers={"dd": ""})  # 1 GiB is too much to write in a test: checked as argv

    store.delete(vol)

    assert commands.dd() == [wipe(store.path(vol), count)]
    (dd_options,) = [kw for argv, kw in commands.calls if argv[0] == "dd"]
    assert dd_options["timeout"] >= store.timeout + count / 10  # a whole volume takes longer than an lvm2 call
    assert volume_lvs(loop_vg) == {}


def test_a_wipe_that_fails_keeps_the_volume_and_a_retry_wipes_it(
    loop_vg: LoopVG, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = thick(loop_vg, volume_clear="zero", volume_clear_size_mib=1)
    vol = volume(1)
    store.create(vol)
    device = tmp_path / "device"
    commands = spy(monkeypatch, stand_ins={store.path(vol): str(device)})

    with pytest.raises(BackendError, match=rf"cannot wipe {loop_vg.name}/{vol.name}, so it is kept: dd exited with 1"):
        store.delete(vol)

    assert not device.exists()  # conv=nocreat: a missing device never becomes a file of zeros
    assert commands.commands() == ["lvs", "dd"]
    assert volume_lvs(loop_vg) == {vol.name: [str(GIB)]}

    device.write_bytes(b"\xab" * MIB)
    store.delete(vol)
    assert device.read_bytes() == bytes(MIB)
    assert volume_lvs(loop_vg) == {}


def test_without_a_device_node_the_delete_fails_and_says_why(loop_vg: LoopVG) -> None:
    """No seam: the real dd meets the real missing node of an LV that LVM may not activate."""
    store = LvmVolumeStore(loop_vg.name, "thick", extra_config=loop_vg.config)
    vol = volume(1)
    store.create(vol)
    assert not os.path.exists(store.path(vol))

    with pytest.raises(BackendError) as caught:
        store.delete(vol)

    assert str(caught.value).startswith(f"cannot wipe {loop_vg.name}/{vol.name}, so it is kept: dd exited with 1: ")
    assert str(caught.value).endswith("LVs are not activated here, so none has a device: set volume_clear none")
    assert not os.path.exists(f"/dev/{loop_vg.name}")
    assert volume_lvs(loop_vg) == {vol.name: [str(GIB)]}


def test_volume_clear_none_removes_without_a_wipe(loop_vg: LoopVG, monkeypatch: pytest.MonkeyPatch) -> None:
    store = thick(loop_vg, volume_clear="none")
    vol = volume(1)
    store.create(vol)
    commands = spy(monkeypatch)

    store.delete(vol)

    assert commands.commands() == ["lvremove"]
    assert volume_lvs(loop_vg) == {}


def test_deleting_a_missing_volume_wipes_nothing(loop_vg: LoopVG, monkeypatch: pytest.MonkeyPatch) -> None:
    store = thick(loop_vg, volume_clear="zero")
    commands = spy(monkeypatch)

    store.delete(volume(1))

    assert commands.commands() == ["lvs"]


def test_a_thin_lv_is_removed_without_a_wipe(monkeypatch: pytest.MonkeyPatch) -> None:
    """lvm2 cannot make a thin LV without device-mapper, so lvs is answered here (test_thin_volumes_are_never_wiped
    checks the same with real thin LVs where the kernel has device-mapper)."""
    vol = volume(1)
    store = LvmVolumeStore("tether-vg", "thin")
    commands = spy(monkeypatch, answers={"lvs": f"  {vol.name}|{GIB}|tether-pool|thin\n", "lvremove": ""})

    store.delete(vol)

    assert commands.commands() == ["lvs", "lvremove"]


def test_thin_volumes_are_never_wiped(active_loop_vg: LoopVG, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LvmVolumeStore(active_loop_vg.name, "thin", extra_config=active_loop_vg.config)
    vol = volume(1)
    store.create(vol)
    commands = spy(monkeypatch)

    store.delete(vol)

    assert "dd" not in commands.commands()
    assert vol.name not in active_loop_vg.lvs()


def test_a_deleted_thick_volume_leaves_no_data_for_the_next_one(active_loop_vg: LoopVG) -> None:
    """Where LVs get device nodes: the real wipe, and a new LV on the same extents reads zeros."""
    store = LvmVolumeStore(active_loop_vg.name, "thick", extra_config=active_loop_vg.config)
    first = volume(1)
    path = store.create(first)
    # lvcreate zeroes only the first 4 KiB of a new LV, so data further in would survive a bare lvremove
    offsets = (MIB, GIB // 2, GIB - MIB)
    with open(path, "r+b") as device:
        for offset in offsets:
            device.seek(offset)
            device.write(b"\xab" * 4096)
        os.fsync(device.fileno())

    store.delete(first)
    second = volume(1)
    path = store.create(second)  # the group is empty again: LVM hands out the same first extents

    with open(path, "rb") as device:
        for offset in offsets:
            device.seek(offset)
            assert device.read(4096) == bytes(4096)


def test_wipe_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="volume_clear must be zero or none"):
        LvmVolumeStore("vg", volume_clear="shred")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="volume_clear_size_mib"):
        LvmVolumeStore("vg", volume_clear_size_mib=-1)
    for bad in ({"volume_clear": "shred"}, {"volume_clear_size": -1}):
        with pytest.raises(pydantic.ValidationError):
            Settings(_env_file=None, **bad)  # type: ignore[call-arg, arg-type]


def test_factory_passes_the_wipe_settings() -> None:
    default = build_backends(Settings(_env_file=None, volume_backend="lvm")).volumes  # type: ignore[call-arg]
    assert isinstance(default, LvmVolumeStore)
    assert (default.volume_clear, default.volume_clear_size_mib) == ("zero", 0)

    settings = Settings(_env_file=None, volume_backend="lvm", volume_clear="none", volume_clear_size=100)  # type: ignore[call-arg]
    store = build_backends(settings).volumes

    assert isinstance(store, LvmVolumeStore)
    assert (store.volume_clear, store.volume_clear_size_mib) == ("none", 100)


def test_factory_builds_the_lvm_store() -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        volume_backend="lvm",
        lvm_vg="tether-vg",
        lvm_type="thin",
        lvm_thin_pool="pool0",
        lvm_config="global{activation=0}",
    )

    store = build_backends(settings).volumes

    assert isinstance(store, LvmVolumeStore)
    assert (store.vg, store.lvm_type, store.thin_pool, store.extra_config) == (
        "tether-vg",
        "thin",
        "pool0",
        "global{activation=0}",
    )
    assert store.activate is False
    assert store.path(VolumeRef(id="abc", size_gb=1)) == "/dev/tether-vg/volume-abc"
