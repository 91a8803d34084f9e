"""Builds the configured volume store and target."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from app.backends.base import Backends, Target, VolumeStore
from app.backends.connectors import validate_iscsi_connector
from app.backends.targets.fake import FakeTarget
from app.backends.volumes.fake import FakeVolumeStore
from app.config import Settings


def build_backends(settings: Settings) -> Backends:
    volumes: VolumeStore
    target: Target
    if settings.volume_backend == "fake":
        volumes = FakeVolumeStore(delay=settings.fake_delay)
    elif settings.volume_backend == "file":
        from app.backends.volumes.file import FileVolumeStore

        volumes = FileVolumeStore(settings.file_dir)
    else:
        from app.backends.volumes.lvm import LvmVolumeStore

        volumes = LvmVolumeStore(
            vg=settings.lvm_vg,
            lvm_type=settings.lvm_type,
            thin_pool=settings.lvm_thin_pool,
            extra_config=settings.lvm_config,
            volume_clear=settings.volume_clear,
            volume_clear_size_mib=settings.volume_clear_size,
        )

    if settings.target == "fake":
        target = FakeTarget(settings.target_iqn_prefix, settings.target_portal, delay=settings.fake_delay)
    elif settings.target == "tgt":
        from app.backends.targets.tgt import TgtTarget

        target = TgtTarget(
            iqn_prefix=settings.target_iqn_prefix,
            portal=settings.target_portal,
            control_port=settings.tgt_control_port,
            control=settings.tgt_control,
        )
    else:
        from app.backends.targets.lio import LioTarget

        target = LioTarget(settings.target_iqn_prefix, settings.target_portal)
    return Backends(volumes=volumes, target=target)


def connector_validator(targets: Callable[[], set[str]]) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """The connector check of the targets the storage nodes run, without a target (an API tier in front of remote
    nodes): LIO's stricter names whenever one of `targets()` is LIO (so a connector no node would refuse)."""

    def check(connector: Mapping[str, Any]) -> dict[str, Any]:
        if "lio" in targets():
            from app.backends.targets.lio import validate_lio_connector

            return validate_lio_connector(connector)
        return validate_iscsi_connector(connector)

    return check
