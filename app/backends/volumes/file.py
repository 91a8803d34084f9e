"""File volume store: one sparse file per volume under a directory, exported by a target like a disk."""

from __future__ import annotations

import logging
import os

from app.backends.base import BackendError, Capacity, VolumeRef

log = logging.getLogger(__name__)

GIB = 1024**3


class FileVolumeStore:
    name = "file"

    def __init__(self, directory: str) -> None:
        # tgtd resolves a relative backing path against its own working directory, not ours
        self.directory = os.path.abspath(directory)

    def path(self, volume: VolumeRef) -> str:
        name = volume.name
        if "/" in name or "\0" in name or name.startswith("."):
            raise BackendError(f"refusing volume name {name!r}")
        return os.path.join(self.directory, name)

    def create(self, volume: VolumeRef) -> str:
        path = self.path(volume)
        if volume.size_gb < 1:
            raise BackendError(f"refusing to create {volume.name} with {volume.size_gb} GiB")
        size = volume.size_gb * GIB
        try:
            os.makedirs(self.directory, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                current = os.fstat(fd).st_size
                if current > size:
                    # a retry must never shrink a volume: that would destroy data
                    raise BackendError(f"{volume.name} is already {current} bytes, larger than {volume.size_gb} GiB")
                if current < size:
                    # ftruncate allocates nothing, so the file stays sparse; a file left short by a
                    # crash between open and here is simply grown on the retry
                    os.ftruncate(fd, size)
                    log.info("created %s (%d GiB) at %s", volume.name, volume.size_gb, path)
            finally:
                os.close(fd)
        except OSError as exc:
            raise BackendError(f"cannot create {volume.name}: {exc.strerror}") from None
        return path

    def delete(self, volume: VolumeRef) -> None:
        path = self.path(volume)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise BackendError(f"cannot delete {volume.name}: {exc.strerror}") from None
        log.info("deleted %s", volume.name)

    def capacity(self) -> Capacity:
        try:
            os.makedirs(self.directory, exist_ok=True)
            st = os.statvfs(self.directory)
        except OSError as exc:
            raise BackendError(f"cannot read the capacity of {self.directory}: {exc.strerror}") from None
        # f_bavail, not f_bfree: blocks reserved for root are not ours to promise
        return Capacity(total_bytes=st.f_blocks * st.f_frsize, free_bytes=st.f_bavail * st.f_frsize)
