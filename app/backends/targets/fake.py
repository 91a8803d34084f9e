"""In-memory iSCSI target that enforces the real rules: exports, CHAP, one ACL per initiator."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from app.backends.base import BackendError, Chap, ExportInfo, ExportState, VolumeRef
from app.backends.connectors import validate_iscsi_connector
from app.backends.faults import Faults


@dataclass
class FakeExport:
    iqn: str
    path: str
    chap: Chap
    acls: set[str] = field(default_factory=set)


class FakeTarget:
    name = "fake"

    def __init__(self, iqn_prefix: str, portal: str, delay: float = 0.0) -> None:
        self.iqn_prefix = iqn_prefix
        self.portal = portal
        self.faults = Faults(delay)
        self._lock = threading.Lock()
        self.targets: dict[str, FakeExport] = {}

    def iqn(self, volume: VolumeRef) -> str:
        return f"{self.iqn_prefix}{volume.name}"

    def validate_connector(self, connector: Mapping[str, Any]) -> dict[str, Any]:
        return validate_iscsi_connector(connector)

    def create_export(self, volume: VolumeRef, path: str, chap: Chap) -> ExportInfo:
        if self.faults.hit("create_export"):
            raise BackendError(f"injected failure exporting {volume.name}")
        iqn = self.iqn(volume)
        with self._lock:
            existing = self.targets.get(volume.id)
            if existing is None:
                self.targets[volume.id] = FakeExport(iqn=iqn, path=path, chap=chap)
            else:
                existing.chap = chap
        return ExportInfo(iqn, self.portal, 1, f"{self.portal},1 {iqn} 1")

    def add_initiator(self, volume: VolumeRef, initiator: str) -> None:
        if self.faults.hit("add_initiator"):
            raise BackendError(f"injected failure adding an initiator to {volume.name}")
        with self._lock:
            export = self.targets.get(volume.id)
            if export is None:
                raise BackendError(f"{volume.name} is not exported")
            export.acls.add(initiator)

    def remove_initiator(self, volume: VolumeRef, initiator: str) -> None:
        if self.faults.hit("remove_initiator"):
            raise BackendError(f"injected failure removing an initiator from {volume.name}")
        with self._lock:
            export = self.targets.get(volume.id)
            if export is not None:
                export.acls.discard(initiator)

    def remove_export(self, volume: VolumeRef) -> None:
        if self.faults.hit("remove_export"):
            raise BackendError(f"injected failure removing the export of {volume.name}")
        with self._lock:
            self.targets.pop(volume.id, None)

    def exports(self) -> dict[str, ExportState]:
        with self._lock:
            return {
                vid: ExportState(volume_id=vid, target_iqn=e.iqn, initiators=frozenset(e.acls))
                for vid, e in self.targets.items()
            }

    def acls(self, volume_id: str) -> set[str]:
        """Test helper: the initiators allowed on a volume's target (empty when not exported)."""
        with self._lock:
            export = self.targets.get(volume_id)
            return set(export.acls) if export else set()
