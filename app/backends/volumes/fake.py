"""In-memory volume store: the embedded default, with injectable faults."""

from __future__ import annotations

import threading

from app.backends.base import BackendError, Capacity, VolumeRef
from app.backends.faults import Faults

GIB = 1024**3


class FakeVolumeStore:
    name = "fake"

    def __init__(self, total_gb: int = 10_000, delay: float = 0.0) -> None:
        self.total_gb = total_gb
        self.faults = Faults(delay)
        self._lock = threading.Lock()
        self.volumes: dict[str, int] = {}

    def path(self, volume: VolumeRef) -> str:
        return f"/dev/fake/{volume.name}"

    def create(self, volume: VolumeRef) -> str:
        if self.faults.hit("create"):
            raise BackendError(f"injected failure creating {volume.name}")
        with self._lock:
            if volume.id not in self.volumes:
                used = sum(self.volumes.values())
                if used + volume.size_gb > self.total_gb:
                    raise BackendError(f"not enough space for {volume.name}")
                self.volumes[volume.id] = volume.size_gb
        return self.path(volume)

    def delete(self, volume: VolumeRef) -> None:
        if self.faults.hit("delete"):
            raise BackendError(f"injected failure deleting {volume.name}")
        with self._lock:
            self.volumes.pop(volume.id, None)

    def capacity(self) -> Capacity:
        with self._lock:
            used = sum(self.volumes.values())
        return Capacity(total_bytes=self.total_gb * GIB, free_bytes=(self.total_gb - used) * GIB)
