"""Response bodies as the OpenAPI spec documents them (views build plain dicts of this shape)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Link(BaseModel):
    href: str
    rel: str
    type: str | None = None


class Fault(BaseModel):
    code: int
    message: str


def fault_model(name: str) -> type[BaseModel]:
    model = type(
        f"{name[0].upper()}{name[1:]}" + ("" if name.endswith("Fault") else "Fault"),
        (BaseModel,),
        {"__annotations__": {name: Fault}, "__module__": __name__},
    )
    return model


class VolumeAttachmentItem(BaseModel):
    id: str = Field(description="The volume id (Cinder's historical shape).")
    attachment_id: str
    volume_id: str
    server_id: str | None
    host_name: str | None
    device: str | None
    attached_at: str | None


class VolumeSummary(BaseModel):
    id: str
    name: str | None
    links: list[Link]


class VolumeDetail(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: str
    name: str | None
    description: str | None
    status: str
    size: int
    availability_zone: str
    created_at: str
    updated_at: str | None
    volume_type: str | None
    snapshot_id: str | None
    source_volid: str | None
    metadata: dict[str, str]
    links: list[Link]
    user_id: str
    bootable: str
    encrypted: bool
    replication_status: str | None
    consistencygroup_id: str | None
    multiattach: bool
    attachments: list[VolumeAttachmentItem]
    tenant_id: str = Field(alias="os-vol-tenant-attr:tenant_id")
    host: str | None = Field(default=None, alias="os-vol-host-attr:host", description="Admins only.")
    migration_status: str | None = Field(default=None, description="Admins only.")
    shared_targets: bool | None = Field(default=None, description="3.48 and later.")
    service_uuid: str | None = Field(default=None, description="3.48 and later.")
    volume_type_id: str | None = Field(default=None, description="3.63 and later.")
    consumes_quota: bool | None = Field(default=None, description="3.65 and later.")


class VolumeEnvelope(BaseModel):
    volume: VolumeDetail


class VolumeList(BaseModel):
    volumes: list[VolumeSummary]
    volumes_links: list[Link] | None = None
    count: int | None = Field(default=None, description="With with_count=true, 3.45 and later.")


class VolumeDetailList(BaseModel):
    volumes: list[VolumeDetail]
    volumes_links: list[Link] | None = None
    count: int | None = None


class VolumeTypeView(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: str
    name: str
    description: str | None
    is_public: bool
    type_is_public: bool = Field(alias="os-volume-type-access:is_public")
    extra_specs: dict[str, str]
    qos_specs_id: str | None


class VolumeTypeEnvelope(BaseModel):
    volume_type: VolumeTypeView


class VolumeTypeList(BaseModel):
    volume_types: list[VolumeTypeView]


class ExtraSpecs(BaseModel):
    extra_specs: dict[str, str]


class AttachmentSummary(BaseModel):
    id: str
    status: str
    instance: str | None
    volume_id: str


class ConnectionInfo(BaseModel):
    """iSCSI connection data; empty until the attachment is connected."""

    model_config = ConfigDict(extra="allow")

    driver_volume_type: str | None = None
    target_discovered: bool | None = None
    target_iqn: str | None = None
    target_portal: str | None = None
    target_lun: int | None = None
    volume_id: str | None = None
    auth_method: str | None = None
    auth_username: str | None = None
    auth_password: str | None = None
    access_mode: str | None = None
    encrypted: bool | None = None
    qos_specs: dict[str, Any] | None = None
    discard: bool | None = None
    attachment_id: str | None = None
    enforce_multipath: bool | None = None
    target_iqns: list[str] | None = None
    target_portals: list[str] | None = None
    target_luns: list[int] | None = None


class AttachmentDetail(AttachmentSummary):
    attached_at: str
    detached_at: str
    attach_mode: str
    connection_info: ConnectionInfo
    shared_connections_by_attachment: list[str]


class AttachmentEnvelope(BaseModel):
    attachment: AttachmentDetail


class AttachmentList(BaseModel):
    attachments: list[AttachmentSummary]
    attachments_links: list[Link] | None = None


class AttachmentDetailList(BaseModel):
    attachments: list[AttachmentDetail]
    attachments_links: list[Link] | None = None


class LegacyConnectionInfo(BaseModel):
    driver_volume_type: str
    data: ConnectionInfo
    enforce_multipath: bool


class LegacyConnectionEnvelope(BaseModel):
    connection_info: LegacyConnectionInfo


class Pool(BaseModel):
    name: str
    capabilities: dict[str, Any] | None = Field(default=None, description="With detail=true.")


class PoolList(BaseModel):
    pools: list[Pool]


class ServiceView(BaseModel):
    binary: str
    host: str
    zone: str
    status: str
    state: str
    updated_at: str | None
    disabled_reason: str | None = None


class ServiceList(BaseModel):
    services: list[ServiceView]


class VersionView(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: str
    status: str
    version: str
    min_version: str
    updated: str
    links: list[Link]
    media_types: list[dict[str, str]] = Field(alias="media-types")


class Versions(BaseModel):
    versions: list[VersionView]


class VolumeMetadataEnvelope(BaseModel):
    metadata: dict[str, str]


class VolumeMetadataItemEnvelope(BaseModel):
    meta: dict[str, str] = Field(description="One key and its value.")
