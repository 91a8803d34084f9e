"""LvmVolumeStore against real lvm2 on a loop device: sizes, idempotency, a full group, capacity, thin pools."""

from __future__ import annotations

import uuid

import pytest

from app.backends.base import BackendError, VolumeRef
from app.backends.factory import build_backends
from app.backends.volumes.lvm import LvmVolumeStore, activation_disabled
from app.config import Settings
from tests.storage.lvm import LoopVG, active_loop_vg, device_mapper_available, loop_vg

__all__ = ["active_loop_vg", "loop_vg"]  # fixtures, imported for pytest to find

GIB = 1024**3


def volume(size_gb: int = 1) -> VolumeRef:
    return VolumeRef(id=str(uuid.uuid4()), size_gb=size_gb)


def thick(vg: LoopVG) -> LvmVolumeStore:
    return LvmVolumeStore(vg.name, "thick", extra_config=vg.config)


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
