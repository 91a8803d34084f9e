"""The named storage operations a node runs: what crosses from the API tier to a storage host (SPEC 10).

Each is an idempotent "ensure" over the node's volume store and target, so running one twice (a job delivered
again after a crash) is harmless. Plain synchronous code, run only through the dispatcher's pool; the arguments
and results are the backends' dataclasses, which the queue carries as JSON.
"""

from __future__ import annotations

from collections.abc import Sequence

from app.backends.base import Backends, Capacity, Chap, ConnectingTarget, ExportInfo, ExportState, VolumeRef

# the operations a job may name; anything else is refused before it reaches a backend
NAMES = frozenset(
    {
        "create_volume",
        "delete_volume",
        "connect",
        "create_export",
        "add_initiator",
        "remove_initiator",
        "remove_export",
        "disconnect",
        "drop_export",
        "exports",
        "capacity",
        "check",
    }
)


class StorageOps:
    def __init__(self, backends: Backends, capacity_cap_bytes: int | None = None) -> None:
        self.backends = backends
        self.capacity_cap_bytes = capacity_cap_bytes
        # asked once: isinstance() against a runtime-checkable Protocol walks all its members each time (~0.8% of
        # an embedded worker's py-spy samples when it was asked on every connect and disconnect, issue 17)
        self._connecting = backends.target if isinstance(backends.target, ConnectingTarget) else None

    def create_volume(self, volume: VolumeRef) -> None:
        self.backends.volumes.create(volume)

    def delete_volume(self, volume: VolumeRef) -> None:
        self.backends.volumes.delete(volume)

    def create_export(self, volume: VolumeRef, chap: Chap) -> ExportInfo:
        return self.backends.target.create_export(volume, self.backends.volumes.path(volume), chap)

    def connect(self, volume: VolumeRef, chap: Chap, initiator: str) -> ExportInfo:
        """The export (made on the first connect) and this initiator's ACL."""
        if self._connecting is not None:
            return self._connecting.connect(volume, self.backends.volumes.path(volume), chap, initiator)
        export = self.create_export(volume, chap)
        self.backends.target.add_initiator(volume, initiator)
        return export

    def add_initiator(self, volume: VolumeRef, initiator: str) -> None:
        self.backends.target.add_initiator(volume, initiator)

    def remove_initiator(self, volume: VolumeRef, initiator: str) -> None:
        self.backends.target.remove_initiator(volume, initiator)

    def remove_export(self, volume: VolumeRef) -> None:
        self.backends.target.remove_export(volume)

    def disconnect(self, volume: VolumeRef, initiators: Sequence[str], export: bool) -> None:
        """The ACLs nothing uses any more, then the export when no attachment is left."""
        if self._connecting is not None:
            self._connecting.disconnect(volume, initiators, export)
            return
        target = self.backends.target
        for initiator in initiators:
            target.remove_initiator(volume, initiator)
        if export:
            target.remove_export(volume)

    def drop_export(self, volume: VolumeRef) -> None:
        """Every ACL the target really has for the volume, then its export (an admin's reset to detached)."""
        exported = self.backends.target.exports().get(volume.id)
        self.disconnect(volume, sorted(exported.initiators if exported else ()), export=True)

    def exports(self) -> dict[str, ExportState]:
        return self.backends.target.exports()

    def capacity(self) -> Capacity:
        """The store's capacity; with a cap (TETHER_POOL_CAPACITY_GB) no more than the cap, total and free: a
        file store shares its filesystem, so what else is on it says nothing of the pool (the scheduler takes
        the allocated sizes off the total itself)."""
        real = self.backends.volumes.capacity()
        cap = self.capacity_cap_bytes
        if cap is None or cap >= real.total_bytes:
            return real
        return Capacity(total_bytes=cap, free_bytes=min(real.free_bytes, cap))

    def check(self) -> None:
        """Both halves of the storage answer (tether status, a node's start)."""
        self.backends.volumes.capacity()
        self.backends.target.exports()
