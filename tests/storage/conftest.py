"""Fixtures for tests against real storage: a private tgtd, the real initiator, real files."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from app.backends.targets.tgt import TgtTarget
from app.backends.volumes.file import FileVolumeStore
from tests.conftest import missing
from tests.storage.tgtd import IQN_PREFIX, TgtDaemon

ISCSI_TOOLS = ("tgtd", "tgtadm", "iscsi-readcapacity16")


@contextmanager
def private_tgtd(log_dir: Path) -> Iterator[TgtDaemon]:
    """A started private tgtd, stopped on exit; missing tools or no root fail in CI and skip elsewhere."""
    absent = [tool for tool in ISCSI_TOOLS if shutil.which(tool) is None]
    if absent:
        missing(f"needs {', '.join(absent)} (Debian packages tgt, libiscsi-bin)")
    if os.geteuid() != 0:
        missing("tgtd needs root")
    daemon = TgtDaemon(log_dir=log_dir)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def tgtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TgtDaemon]:
    with private_tgtd(tmp_path_factory.mktemp("tgtd")) as daemon:
        yield daemon


@pytest.fixture
def clean_tgtd(tgtd: TgtDaemon) -> Iterator[TgtDaemon]:
    """The private daemon, emptied after the test (and started again if the test left it stopped)."""
    yield tgtd
    if tgtd.proc is not None and not tgtd.alive():
        # tgtd has crashed on sequences of tgtadm calls before: that is a failure of the test that did it
        why = f"exit status {tgtd.proc.returncode} (negative: killed by that signal); log: {tgtd.log_tail(2)}"
        tgtd.restart_empty()
        pytest.fail(f"tgtd died during the test: {why}")
    if tgtd.proc is None:
        tgtd.start()  # a test stopped it and failed before starting it again
    tgtd.clear()


@pytest.fixture(params=["socket", "tgtadm"])
def tgt(clean_tgtd: TgtDaemon, request: pytest.FixtureRequest) -> TgtTarget:
    """A TgtTarget on the private daemon, which is emptied after each test; each test runs with tgtadm's
    requests sent on tgtd's socket by the target itself (the default) and with the tgtadm command."""
    return TgtTarget(IQN_PREFIX, clean_tgtd.portal, clean_tgtd.control_port, control=request.param)


@pytest.fixture
def file_dir(tmp_path: os.PathLike[str]) -> str:
    """A volume directory that does not exist yet: the store must create it."""
    return os.path.join(tmp_path, "volumes")


@pytest.fixture
def file_store(file_dir: str) -> FileVolumeStore:
    return FileVolumeStore(file_dir)
