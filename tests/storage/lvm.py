"""A throw-away LVM volume group on a loop device for storage tests, seen only through its own `--config` filter.

Import the fixtures into a test module (`from tests.storage.lvm import loop_vg`); they clean up (vgremove,
pvremove, losetup -d) whatever the test did. Missing tools fail the test when CI=true and skip it elsewhere.
`CommandSpy` stands in for the command runner to see, and where needed redirect, what the store runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app.backends import cmd

IN_CI = os.environ.get("CI") == "true"
PV_SIZE = 3 * 1024**3
TOOLS = ("losetup", "pvcreate", "vgcreate", "lvcreate", "lvs", "vgs", "lvremove", "vgremove", "pvremove")
REPORT = ("--noheadings", "--units", "b", "--nosuffix", "--separator", "|")
NO_DEVICE_MAPPER = "no device-mapper: LVM cannot create thin pools or activate LVs on this kernel"


def missing(reason: str) -> None:
    """A component the tests need is absent: a failure in CI, a skip elsewhere."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: required)")
    pytest.skip(reason)


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "LC_ALL": "C", "LVM_SUPPRESS_FD_WARNINGS": "1"},
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def device_mapper_available() -> bool:
    """True when the kernel has device-mapper (`dmsetup version` reaches the driver), so LVs can be activated."""
    if shutil.which("dmsetup") is None:
        return False
    try:
        return _run("dmsetup", "version", check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def lvm_config(device: str, *, activation: bool) -> str:
    """An LVM `--config` that sees only `device` and leaves the host's devices file alone."""
    devices = f'devices{{filter=["a|^{device}$|","r|.*|"] use_devicesfile=0}}'
    return devices if activation else f"global{{activation=0}} {devices}"


@dataclass(frozen=True)
class LoopVG:
    name: str
    device: str
    config: str

    def lvm(self, command: str, *args: str) -> str:
        return _run(command, "--config", self.config, *args).stdout

    def lvs(self, *fields: str) -> dict[str, list[str]]:
        """Every LV of the group (hidden ones too) by name: the other requested fields, as printed."""
        out = self.lvm("lvs", "-a", *REPORT, "-o", ",".join(("lv_name", *fields)), self.name)
        rows = [line.strip().split("|") for line in out.splitlines() if line.strip()]
        return {row[0]: row[1:] for row in rows}

    def vgs(self, *fields: str) -> list[str]:
        out = self.lvm("vgs", *REPORT, "-o", ",".join(fields), self.name)
        return out.strip().split("|")


@contextlib.contextmanager
def make_loop_vg(directory: Path, *, activation: bool = False) -> Iterator[LoopVG]:
    """A 3 GiB sparse file on a loop device holding a uniquely named VG; everything is undone on exit."""
    if os.geteuid() != 0:
        missing("LVM on a loop device needs root")
    absent = [tool for tool in TOOLS if shutil.which(tool) is None]
    if absent:
        missing(f"lvm2/losetup not installed: {', '.join(absent)} not found")
    image = directory / "pv.img"
    with image.open("wb") as f:
        f.truncate(PV_SIZE)
    attach = _run("losetup", "-f", "--show", str(image), check=False)
    if attach.returncode != 0:
        missing(f"cannot attach a loop device: {attach.stderr.strip()}")
    device = attach.stdout.strip()
    config = lvm_config(device, activation=activation)
    vg = LoopVG(name=f"tether-test-{uuid.uuid4().hex[:10]}", device=device, config=config)
    try:
        _run("pvcreate", "--config", config, device)
        _run("vgcreate", "--config", config, vg.name, device)
        yield vg
    finally:
        # each step runs whatever the one before did, so a half-made group is still taken apart
        _run("vgremove", "--config", config, "-f", vg.name, check=False)
        _run("pvremove", "--config", config, "-ff", "-y", device, check=False)
        _run("losetup", "-d", device, check=False)
        image.unlink(missing_ok=True)


@pytest.fixture
def loop_vg(tmp_path: Path) -> Iterator[LoopVG]:
    """A VG that LVM never activates (`global{activation=0}`): works on kernels without device-mapper."""
    with make_loop_vg(tmp_path, activation=False) as vg:
        yield vg


@pytest.fixture
def active_loop_vg(tmp_path: Path) -> Iterator[LoopVG]:
    """A VG whose LVs are activated, for thin provisioning; skipped where the kernel has no device-mapper."""
    if not device_mapper_available():
        pytest.skip(NO_DEVICE_MAPPER)
    with make_loop_vg(tmp_path, activation=True) as vg:
        yield vg


@dataclass
class CommandSpy:
    """Stands in for `cmd.run` (monkeypatched) under the LVM store: records every argv, then runs it for real.

    LVs here have no device node (no device-mapper), so `stand_ins` maps an LV's path to a file that dd writes
    instead: the store's own argv runs with only `of=` changed. A command named in `answers` is not run: it
    succeeds with that output (dd for wipes too large to write in a test, lvs to report what lvm2 cannot make here).
    """

    stand_ins: dict[str, str] = field(default_factory=dict)
    answers: dict[str, str] = field(default_factory=dict)
    calls: list[tuple[list[str], dict[str, Any]]] = field(default_factory=list)
    real_run: Any = cmd.run

    def __call__(self, argv: Sequence[str], **kw: Any) -> cmd.Completed:
        assert isinstance(argv, list), argv
        assert all(isinstance(a, str) for a in argv), argv
        self.calls.append((list(argv), kw))
        if argv[0] in self.answers:
            return cmd.Completed(0, self.answers[argv[0]], "")
        return self.real_run([self._stand_in(a) for a in argv], **kw)  # type: ignore[no-any-return]

    def _stand_in(self, arg: str) -> str:
        if arg.startswith("of=") and arg[3:] in self.stand_ins:
            return f"of={self.stand_ins[arg[3:]]}"
        return arg

    def commands(self) -> list[str]:
        return [argv[0] for argv, _ in self.calls]

    def dd(self) -> list[list[str]]:
        return [argv for argv, _ in self.calls if argv[0] == "dd"]
