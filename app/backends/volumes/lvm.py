"""LVM volume store: one logical volume `volume-<id>` per volume in a volume group, thick or thin, via lvm2's commands.

LVM itself is the only record: every call asks `lvs`/`vgs` (or reads lvm2's refusal) instead of remembering, so
create and delete are idempotent and safe to repeat after a crash. A thick LV is overwritten with zeros before
`lvremove` (Cinder's `volume_clear`), because its extents go back to the group with the tenant's data still on them.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from app.backends import cmd
from app.backends.base import BackendError, Capacity, VolumeRef

log = logging.getLogger(__name__)

GIB = 1024**3
MIB = 1024**2
TIMEOUT = 60.0
DEFAULT_THIN_POOL_PERCENT = 90

# exact bytes, one row per object, fields split on a character no LVM name may hold
_REPORT = ("--noheadings", "--units", "b", "--nosuffix", "--separator", "|")
# lvm2's own rule for VG and LV names; checking it here keeps odd names out of `-S` selections
_LVM_NAME = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}$")
# `global{activation=0}` (or `global/activation=0`); \b keeps `auto_activation...` from matching
_ACTIVATION_OFF = re.compile(r"\bactivation\s*=\s*0\b")

# lvm2 exits 5 for nearly every refusal, so these texts (LC_ALL=C) are the only way to tell them apart
_NO_SPACE = ("insufficient free space", "insufficient suitable")
_EXISTS = "already exists"
_NO_LV = "Failed to find logical volume"

VolumeClear = Literal["zero", "none"]
# a wipe writes the whole volume (minutes for a large one), so its timeout grows with the size at a rate any
# working disk beats: the bound only catches a device that stopped answering
WIPE_MIB_PER_SECOND = 10


@dataclass(frozen=True)
class LogicalVolume:
    name: str
    size_bytes: int
    pool: str  # the thin pool it lives in; empty for a thick LV
    segtype: str


def activation_disabled(extra_config: str | None) -> bool:
    """Whether an extra `--config` string turns LVM activation off (tests on kernels without device-mapper)."""
    return bool(extra_config and _ACTIVATION_OFF.search(extra_config))


class LvmVolumeStore:
    """Volumes as LVs of `vg`: thick (`lvcreate -L`) or thin in `thin_pool` (`lvcreate -T -V`).

    `extra_config` is passed as `--config` to every command. `activate` says whether new LVs are
    activated (and so get a /dev node to export); left as None it is true unless `extra_config` turns
    activation off, in which case `-an -Zn` are added, because lvcreate cannot zero an LV it may not activate.
    A missing thin pool is created on first use with `thin_pool_percent` % of the VG's free extents, leaving
    the rest for the pool's metadata to grow and for thick LVs.

    `volume_clear` "zero" overwrites a thick LV with zeros before removing it: its first `volume_clear_size_mib`
    MiB, or all of it when that is 0. Thin LVs are never wiped: the pool hands out zeroed chunks to the next LV.
    A wipe that fails (no device node, an I/O error) fails the delete and keeps the LV, so a retry wipes again;
    where LVs are never activated, there is no device to wipe and `volume_clear` must be "none".
    """

    name = "lvm"

    def __init__(
        self,
        vg: str,
        lvm_type: Literal["thick", "thin"] = "thick",
        thin_pool: str = "tether-pool",
        extra_config: str | None = None,
        *,
        activate: bool | None = None,
        thin_pool_percent: int = DEFAULT_THIN_POOL_PERCENT,
        timeout: float = TIMEOUT,
        volume_clear: VolumeClear = "zero",
        volume_clear_size_mib: int = 0,
    ) -> None:
        if not _LVM_NAME.match(vg):
            raise ValueError(f"invalid LVM volume group name {vg!r}")
        if lvm_type not in ("thick", "thin"):
            raise ValueError(f"lvm_type must be thick or thin, not {lvm_type!r}")
        if lvm_type == "thin" and not _LVM_NAME.match(thin_pool):
            raise ValueError(f"invalid LVM thin pool name {thin_pool!r}")
        if not 1 <= thin_pool_percent <= 100:
            raise ValueError("thin_pool_percent must be between 1 and 100")
        if volume_clear not in ("zero", "none"):
            raise ValueError(f"volume_clear must be zero or none, not {volume_clear!r}")
        if volume_clear_size_mib < 0:
            raise ValueError("volume_clear_size_mib must be 0 (all) or more")
        self.vg = vg
        self.lvm_type = lvm_type
        self.thin_pool = thin_pool
        self.extra_config = extra_config
        self.activate = not activation_disabled(extra_config) if activate is None else activate
        self.thin_pool_percent = thin_pool_percent
        self.timeout = timeout
        self.volume_clear = volume_clear
        self.volume_clear_size_mib = volume_clear_size_mib
        # two first volumes created at once would both try to make the pool; one lvcreate is enough
        self._pool_lock = threading.Lock()

    # -- VolumeStore protocol ----------------------------------------------------------------------

    def path(self, volume: VolumeRef) -> str:
        return f"/dev/{self.vg}/{self._lv_name(volume)}"

    def create(self, volume: VolumeRef) -> str:
        lv = self._lv_name(volume)
        if volume.size_gb < 1:
            raise BackendError(f"refusing to create {lv} with {volume.size_gb} GiB")
        existing = self._find(lv)
        if existing is not None:
            return self._accept_existing(volume, existing)
        if self.lvm_type == "thin":
            self._ensure_pool()
            args = ["-T", "-V", f"{volume.size_gb}g", "-n", lv, f"{self.vg}/{self.thin_pool}"]
            # -Zn is refused for thin volumes: zeroing belongs to the pool
            flags = [] if self.activate else ["-an"]
        else:
            args = ["-L", f"{volume.size_gb}g", "-n", lv, self.vg]
            flags = [] if self.activate else ["-an", "-Zn"]
        try:
            # --yes: lvcreate asks before wiping an old signature found where the new LV lands, and with
            # no terminal to answer it would abort; wiping it is what we want for a fresh volume
            self._lvm("lvcreate", "--yes", *flags, *args)
        except cmd.CommandFailed as exc:
            if any(text in exc.stderr for text in _NO_SPACE):
                where = (
                    f"thin pool {self.vg}/{self.thin_pool}" if self.lvm_type == "thin" else f"volume group {self.vg}"
                )
                raise BackendError(f"{where} has not enough free space for {volume.size_gb} GiB") from None
            if _EXISTS in exc.stderr:
                # created by a call that raced ours (or that timed out after lvcreate finished)
                existing = self._find(lv)
                if existing is not None:
                    return self._accept_existing(volume, existing)
            raise
        log.info("created %s LV %s/%s (%d GiB)", self.lvm_type, self.vg, lv, volume.size_gb)
        return self.path(volume)

    def delete(self, volume: VolumeRef) -> None:
        lv = self._lv_name(volume)
        if self.volume_clear == "zero":
            existing = self._find(lv)
            if existing is None:
                return
            # the LV's own segment type, not the store's setting: a VG may hold both kinds
            if existing.segtype != "thin":
                self._wipe(volume, existing)
        try:
            self._lvm("lvremove", "-f", f"{self.vg}/{lv}")
        except cmd.CommandFailed as exc:
            if _NO_LV in exc.stderr:
                return
            raise
        log.info("deleted LV %s/%s", self.vg, lv)

    def capacity(self) -> Capacity:
        if self.lvm_type == "thin":
            pool = self._report("lvs", ["lv_size", "data_percent", "segtype"], self.thin_pool)
            if pool:
                size, percent, _ = pool[0]
                # an inactive pool reports no usage; nothing better is known than "all free"
                used = int(int(size) * float(percent) / 100) if percent else 0
                return Capacity(total_bytes=int(size), free_bytes=int(size) - used)
        rows = self._report("vgs", ["vg_size", "vg_free"])
        if not rows:
            raise BackendError(f"volume group {self.vg} reports no size")
        total, free = (int(value) for value in rows[0][:2])
        if self.lvm_type == "thin":
            # no pool yet: what the pool will get when the first volume creates it
            pool_bytes = free * self.thin_pool_percent // 100
            return Capacity(total_bytes=pool_bytes, free_bytes=pool_bytes)
        return Capacity(total_bytes=total, free_bytes=free)

    # -- helpers -----------------------------------------------------------------------------------

    def _wipe(self, volume: VolumeRef, lv: LogicalVolume) -> None:
        size_mib = lv.size_bytes // MIB  # Tether's LVs are whole GiB, so nothing is left past the last MiB
        count = min(self.volume_clear_size_mib, size_mib) if self.volume_clear_size_mib else size_mib
        argv = [
            "dd",
            "if=/dev/zero",
            f"of={self.path(volume)}",
            "bs=1M",
            f"count={count}",
            # direct and fsync: the zeros are on the disk, not in a cache, before lvremove frees the extents
            "oflag=direct",
            # nocreat: a missing device node must fail the wipe, not become a file of zeros on /dev's tmpfs;
            # notrunc: overwrite in place (a device ignores O_TRUNC anyway, a file standing in for one must not)
            "conv=fsync,nocreat,notrunc",
        ]
        try:
            cmd.run(argv, timeout=self.timeout + count / WIPE_MIB_PER_SECOND)
        except BackendError as exc:
            # the one setup where this is expected: activation off, so no LV ever had a device to write through
            hint = "" if self.activate else "; LVs are not activated here, so none has a device: set volume_clear none"
            raise BackendError(f"cannot wipe {self.vg}/{lv.name}, so it is kept: {exc}{hint}") from None
        log.info("wiped %d MiB of LV %s/%s", count, self.vg, lv.name)

    def _lv_name(self, volume: VolumeRef) -> str:
        lv = volume.name
        if not _LVM_NAME.match(lv):
            raise BackendError(f"refusing LV name {lv[:80]!r}")
        return lv

    def _lvm(self, command: str, *args: str) -> cmd.Completed:
        argv = [command]
        if self.extra_config:
            argv += ["--config", self.extra_config]
        argv += args
        try:
            # lvm2 warns on stderr about every inherited descriptor; cmd.run closes them, this keeps it quiet
            return cmd.run(argv, timeout=self.timeout, env={"LVM_SUPPRESS_FD_WARNINGS": "1"})
        except cmd.CommandFailed as exc:
            if f'Volume group "{self.vg}" not found' in exc.stderr:
                raise BackendError(f"volume group {self.vg} does not exist") from None
            raise

    def _report(self, command: str, fields: Sequence[str], lv: str | None = None) -> list[list[str]]:
        """Rows of `lvs`/`vgs` for this VG (for `lv`, only that LV; none when it is missing)."""
        args = [*_REPORT, "-o", ",".join(fields)]
        if lv is not None:
            # a selection answers "no rows" for a missing LV, where `lvs vg/lv` fails like a missing VG would
            args += ["-S", f"lv_name={lv}"]
        out = self._lvm(command, *args, self.vg).stdout
        rows = [line.strip().split("|") for line in out.splitlines() if line.strip()]
        for row in rows:
            if len(row) != len(fields):
                raise BackendError(f"{command} printed an unexpected row: {'|'.join(row)[:200]!r}")
        return rows

    def _find(self, lv: str) -> LogicalVolume | None:
        rows = self._report("lvs", ["lv_name", "lv_size", "pool_lv", "segtype"], lv)
        for name, size, pool, segtype in rows:
            if name == lv:
                return LogicalVolume(name=name, size_bytes=int(size), pool=pool, segtype=segtype)
        return None

    def _accept_existing(self, volume: VolumeRef, existing: LogicalVolume) -> str:
        # a retry must never resize: shrinking destroys data, and a smaller LV is not what was asked for
        if existing.size_bytes < volume.size_gb * GIB:
            raise BackendError(
                f"{self.vg}/{existing.name} already exists with {existing.size_bytes} bytes, "
                f"smaller than the {volume.size_gb} GiB asked for"
            )
        return self.path(volume)

    def _ensure_pool(self) -> None:
        with self._pool_lock:
            pool = self._find(self.thin_pool)
            if pool is not None:
                if pool.segtype != "thin-pool":
                    raise BackendError(f"{self.vg}/{self.thin_pool} exists but is not a thin pool ({pool.segtype})")
                return
            flags = [] if self.activate else ["-an"]
            try:
                self._lvm(
                    "lvcreate",
                    "--yes",
                    *flags,
                    "-T",
                    "-l",
                    f"{self.thin_pool_percent}%FREE",
                    f"{self.vg}/{self.thin_pool}",
                )
            except cmd.CommandFailed as exc:
                if _EXISTS in exc.stderr:
                    return  # another Tether process made it first
                if any(text in exc.stderr for text in _NO_SPACE):
                    raise BackendError(
                        f"volume group {self.vg} has no free space for thin pool {self.thin_pool}"
                    ) from None
                raise
            log.info(
                "created thin pool %s/%s with %d%% of the free space", self.vg, self.thin_pool, self.thin_pool_percent
            )
