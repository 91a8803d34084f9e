"""FileVolumeStore on a real filesystem: exact sizes, sparse files, idempotent create and delete."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from app.backends.base import BackendError, VolumeRef
from app.backends.volumes.file import GIB, FileVolumeStore


def new_volume(size_gb: int = 1) -> VolumeRef:
    return VolumeRef(id=str(uuid.uuid4()), size_gb=size_gb)


def test_create_makes_a_sparse_file_of_exactly_the_size(file_store: FileVolumeStore, file_dir: str) -> None:
    volume = new_volume(2)

    path = file_store.create(volume)

    assert path == os.path.join(file_dir, f"volume-{volume.id}")
    st = os.stat(path)
    assert st.st_size == 2 * GIB
    assert st.st_blocks * 512 < 1024 * 1024  # sparse: nothing allocated
    assert st.st_mode & 0o777 == 0o600


def test_create_is_idempotent_and_keeps_data(file_store: FileVolumeStore) -> None:
    volume = new_volume()
    path = file_store.create(volume)
    with open(path, "r+b") as f:
        f.seek(GIB // 2)
        f.write(b"keep me")

    assert file_store.create(volume) == path

    assert os.stat(path).st_size == GIB
    with open(path, "rb") as f:
        f.seek(GIB // 2)
        assert f.read(7) == b"keep me"


def test_create_grows_a_file_left_short_by_a_crash(file_store: FileVolumeStore, file_dir: str) -> None:
    volume = new_volume()
    os.makedirs(file_dir)
    Path(file_store.path(volume)).touch()

    file_store.create(volume)

    assert os.stat(file_store.path(volume)).st_size == GIB


def test_create_never_shrinks_a_volume(file_store: FileVolumeStore) -> None:
    volume = new_volume(2)
    path = file_store.create(volume)

    with pytest.raises(BackendError, match="larger than 1 GiB"):
        file_store.create(VolumeRef(id=volume.id, size_gb=1))

    assert os.stat(path).st_size == 2 * GIB


def test_create_refuses_an_empty_volume(file_store: FileVolumeStore) -> None:
    with pytest.raises(BackendError, match="0 GiB"):
        file_store.create(new_volume(0))


def test_delete_removes_the_file_and_a_missing_file_is_success(file_store: FileVolumeStore) -> None:
    volume = new_volume()
    path = file_store.create(volume)

    file_store.delete(volume)
    file_store.delete(volume)
    file_store.delete(new_volume())

    assert not os.path.exists(path)


def test_a_deleted_and_recreated_volume_reads_all_zeros(file_store: FileVolumeStore) -> None:
    """The next volume with the same id is a new file: none of the old one's data can be read back."""
    volume = new_volume()
    path = file_store.create(volume)
    with open(path, "r+b") as f:
        for offset in (0, 4096, GIB // 2, GIB - 7):
            f.seek(offset)
            f.write(b"tenant!")

    file_store.delete(volume)
    assert file_store.create(volume) == path

    assert os.stat(path).st_size == GIB
    chunk = 4 * 1024 * 1024
    zeros = bytes(chunk)
    with open(path, "rb") as f:
        for offset in range(0, GIB, chunk):
            assert f.read(chunk) == zeros, f"data at offset {offset}"
        assert f.read() == b""


def test_path_does_not_touch_the_host(file_store: FileVolumeStore, file_dir: str) -> None:
    volume = new_volume()

    assert file_store.path(volume) == os.path.join(file_dir, f"volume-{volume.id}")
    assert not os.path.exists(file_dir)


def test_path_refuses_names_that_leave_the_directory(file_store: FileVolumeStore) -> None:
    with pytest.raises(BackendError):
        file_store.path(VolumeRef(id="../../etc/passwd", size_gb=1))


def test_a_relative_directory_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = FileVolumeStore("var/volumes")
    volume = new_volume()

    monkeypatch.chdir("/")  # tgtd and later calls must not depend on the working directory

    assert store.create(volume) == str(tmp_path / "var" / "volumes" / f"volume-{volume.id}")


def test_capacity_is_the_filesystem_of_the_directory(file_store: FileVolumeStore, file_dir: str) -> None:
    capacity = file_store.capacity()

    st = os.statvfs(file_dir)
    assert capacity.total_bytes == st.f_blocks * st.f_frsize
    assert 0 < capacity.free_bytes <= capacity.total_bytes
    # other processes write to the same filesystem, so only a loose bound on free space
    assert abs(capacity.free_bytes - st.f_bavail * st.f_frsize) < 256 * 1024 * 1024


def test_errors_become_backend_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    store = FileVolumeStore(str(blocker))

    with pytest.raises(BackendError, match="cannot create"):
        store.create(new_volume())
    with pytest.raises(BackendError, match="capacity"):
        store.capacity()
