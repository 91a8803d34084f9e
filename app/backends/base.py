"""The storage seam: what services hand to backends and what backends hand back.

Backends are plain synchronous code run only through the dispatcher. They know
nothing of the database, HTTP or services: dataclasses in, dataclasses out.
Every operation is idempotent, so a retry after a crash is always safe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class BackendError(Exception):
    """A storage operation failed. The message is safe to log, never to return."""


class InvalidConnector(ValueError):
    """A connector value was rejected before any backend work."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"Invalid connector {key}: {reason}")
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class VolumeRef:
    """A volume as the storage host sees it."""

    id: str
    size_gb: int

    @property
    def name(self) -> str:
        return f"volume-{self.id}"


@dataclass(frozen=True)
class Chap:
    username: str
    secret: str

    def __repr__(self) -> str:  # never leak the secret through a log line
        return f"Chap(username={self.username!r}, secret='***')"


@dataclass(frozen=True)
class ExportInfo:
    """Where an initiator finds an exported volume."""

    target_iqn: str
    target_portal: str
    target_lun: int
    provider_location: str


@dataclass(frozen=True)
class ExportState:
    """What a target really holds for one volume (for reconciling)."""

    volume_id: str
    target_iqn: str
    initiators: frozenset[str] = field(default_factory=frozenset)
    # False when the target exists but cannot serve the volume yet (no LUN or no CHAP account bound:
    # a create_export cut short); reconcile then runs create_export again before adding any ACL
    complete: bool = True


@dataclass(frozen=True)
class Capacity:
    total_bytes: int
    free_bytes: int


class VolumeStore(Protocol):
    name: str

    def create(self, volume: VolumeRef) -> str:
        """Create the volume (idempotent) and return the block path a target exports."""
        ...

    def delete(self, volume: VolumeRef) -> None:
        """Delete the volume; a volume that is already gone is success."""
        ...

    def path(self, volume: VolumeRef) -> str:
        """The block path of a volume, without touching the host."""
        ...

    def capacity(self) -> Capacity: ...


class Target(Protocol):
    name: str

    def validate_connector(self, connector: Mapping[str, Any]) -> dict[str, Any]:
        """Return the connector as it will be stored, or raise InvalidConnector."""
        ...

    def create_export(self, volume: VolumeRef, path: str, chap: Chap) -> ExportInfo: ...

    def add_initiator(self, volume: VolumeRef, initiator: str) -> None: ...

    def remove_initiator(self, volume: VolumeRef, initiator: str) -> None: ...

    def remove_export(self, volume: VolumeRef) -> None: ...

    def exports(self) -> dict[str, ExportState]:
        """Every volume export the target really has, keyed by volume id."""
        ...


@runtime_checkable
class ConnectingTarget(Target, Protocol):
    """A Target that also runs a node's connect and disconnect as one call each, in fewer round trips to its
    daemon than the separate calls (StorageOps uses them when the target has them). Each must leave what the
    separate calls leave: create_export then add_initiator; remove_initiator of each, then remove_export."""

    def connect(self, volume: VolumeRef, path: str, chap: Chap, initiator: str) -> ExportInfo: ...

    def disconnect(self, volume: VolumeRef, initiators: Sequence[str], export: bool) -> None: ...


@dataclass(frozen=True)
class Backends:
    """The storage objects one Tether process drives."""

    volumes: VolumeStore
    target: Target
