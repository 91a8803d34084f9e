"""Request bodies as they arrive on the wire; never tables."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema


def _strict_int(value: Any) -> Any:
    # Cinder accepts a numeric string for size, but never a bool or a float with a fraction
    if isinstance(value, bool):
        raise ValueError("must be an integer")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("must be an integer")
    if isinstance(value, str) and not value.strip().isdigit():
        raise ValueError("must be an integer")
    return value


def _not_null(value: Any) -> Any:
    # a key that may be left out, but whose schema in Cinder has no null among its values
    if value is None:
        raise ValueError("must not be null")
    return value


Size = Annotated[int, BeforeValidator(_strict_int), Field(ge=1, le=2**31 - 1)]
Text255 = Annotated[str, Field(max_length=255)]
# what Cinder creates a volume from, or puts it in; Tether makes empty volumes in no group, so the router refuses
# any value but null or "" (Cinder's clients send null for each one they do not use)
Unsupported = Annotated[
    str | None,
    Field(
        description="Unsupported: Tether creates empty volumes only, so anything but null or an empty string is a 400."
    ),
]


class VolumeCreate(BaseModel):
    # unknown keys are kept so the router can refuse them from 3.53 on (Cinder's strict schema)
    model_config = ConfigDict(extra="allow")

    size: Size
    name: Text255 | None = None
    description: Annotated[str, Field(max_length=65535)] | None = None
    display_name: Text255 | None = None
    display_description: Annotated[str, Field(max_length=65535)] | None = None
    volume_type: Text255 | None = None
    metadata: dict[str, str] | None = None
    availability_zone: Text255 | None = None
    snapshot_id: Unsupported = None
    source_volid: Unsupported = None
    imageRef: Unsupported = None
    image_id: Unsupported = None  # Cinder's other name for imageRef
    consistencygroup_id: Unsupported = None
    group_id: Unsupported = None
    backup_id: Unsupported = None
    # accepted and ignored: hints are advice to a scheduler, and a single pool has nothing to choose
    scheduler_hints: dict[str, Any] | None = None


class VolumeCreateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    volume: VolumeCreate
    # python-cinderclient's `create --hint`; Cinder's schema allows it next to `volume` (accepted and ignored)
    scheduler_hints: dict[str, Any] | None = Field(default=None, alias="OS-SCH-HNT:scheduler_hints")


class VolumeUpdate(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: Text255 | None = None
    description: Annotated[str, Field(max_length=65535)] | None = None
    display_name: Text255 | None = None
    display_description: Annotated[str, Field(max_length=65535)] | None = None
    metadata: dict[str, str] | None = None


class VolumeUpdateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    volume: VolumeUpdate


class VolumeTypeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=255)]
    description: Annotated[str, Field(max_length=255)] | None = None
    extra_specs: dict[str, str] | None = None
    is_public: bool = Field(default=True, alias="os-volume-type-access:is_public")


class VolumeTypeCreateRequest(BaseModel):
    volume_type: VolumeTypeCreate


class ExtraSpecsRequest(BaseModel):
    extra_specs: dict[str, str]


def _uuid_text(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("must be a UUID string")
    try:
        # the canonical form: uuid.UUID also takes braces, urn:uuid: and no hyphens, longer than the 36-character column
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError("must be a UUID") from None


class AttachmentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    volume_uuid: Annotated[str, BeforeValidator(_uuid_text)]
    # None means "left out": Cinder's schema refuses null for these two, and so does the spec (SkipJsonSchema)
    instance_uuid: Annotated[str | SkipJsonSchema[None], BeforeValidator(_uuid_text), BeforeValidator(_not_null)] = None
    connector: dict[str, Any] | None = None
    mode: Annotated[Literal["rw", "ro"] | SkipJsonSchema[None], BeforeValidator(_not_null)] = None


class AttachmentCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    attachment: AttachmentCreate


class AttachmentActionRequest(BaseModel):
    """`{"os-complete": null}`: exactly one action key (the value is ignored)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    os_complete: Any = Field(default=None, alias="os-complete")

    @model_validator(mode="before")
    @classmethod
    def _no_action_outside_an_object(cls, data: Any) -> Any:
        # a list, a string or a number names no action: the route answers "Malformed request body" for a body
        # without exactly one action key, as Cinder's action_peek does, instead of a validation error about types
        return data if isinstance(data, dict) else {}

    def actions(self) -> list[str]:
        given = ["os-complete"] if "os_complete" in self.model_fields_set else []
        return given + list(self.model_extra or {})


class AttachmentUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    connector: dict[str, Any]

    @field_validator("connector")
    @classmethod
    def _not_empty(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            raise ValueError("must not be empty")
        return value


class AttachmentUpdateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    attachment: AttachmentUpdate


MetadataKey = Annotated[str, Field(min_length=1, max_length=255)]


class VolumeMetadataRequest(BaseModel):
    """`{"metadata": {key: value}}`: POST merges it into the volume's metadata, PUT makes it the whole of it."""

    model_config = ConfigDict(extra="forbid")

    metadata: dict[MetadataKey, Text255]


class VolumeMetadataItemRequest(BaseModel):
    """`{"meta": {key: value}}`: one item, whose key is the one in the URL."""

    model_config = ConfigDict(extra="forbid")

    meta: dict[MetadataKey, Text255]
