"""Tables: volumes, their metadata and types, attachments, the connector rows of each attachment, and the
Idempotency-Key answers; the storage nodes and API hosts (services) and their jobs' results."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar
from uuid import uuid4

from pydantic_core import PydanticUndefined
from sqlalchemy import BigInteger, Boolean, Column, ForeignKey, Index, String, Text, false, text
from sqlalchemy.orm import configure_mappers
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    # stored as timestamptz (SQLModel's UTCDateTime); views render naive UTC as Cinder does
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid4())


M = TypeVar("M", bound=SQLModel)
# each table model's fields: (name, default, default factory), read once (pydantic inspects a factory's signature
# each time it is asked for a default)
_DEFAULTS: dict[type[SQLModel], list[tuple[str, Any, Callable[[], Any] | None]]] = {}


def made(model: type[M], **values: Any) -> M:
    """A new instance of a table model as SQLAlchemy makes one it loads: `values` and the other fields' defaults
    straight into its dict, its attributes tracked from then on. SQLModel's own constructor sets each field through
    the ORM's instrumentation and costs several times as much (~72-90 µs against ~6-11 µs an attachment on this
    project's machine: issue 17)."""
    defaults = _DEFAULTS.get(model)
    if defaults is None:
        configure_mappers()  # as the constructor would
        defaults = _DEFAULTS[model] = [
            (name, field.default, field.default_factory)  # type: ignore[misc]
            for name, field in model.model_fields.items()
        ]
    instance = model.__mapper__.class_manager.new_instance()  # type: ignore[attr-defined]
    fields = instance.__dict__
    for name, default, factory in defaults:
        if name in values:
            fields[name] = values[name]
        elif factory is not None:
            fields[name] = factory()
        elif default is not PydanticUndefined:  # a required field not given is left unset, as the constructor does
            fields[name] = default
    return instance  # type: ignore[no-any-return]


class VolumeStatus(StrEnum):
    CREATING = "creating"
    AVAILABLE = "available"
    RESERVED = "reserved"
    ATTACHING = "attaching"
    IN_USE = "in-use"
    DETACHING = "detaching"
    DELETING = "deleting"
    ERROR = "error"
    ERROR_DELETING = "error_deleting"
    ERROR_RESTORING = "error_restoring"
    ERROR_EXTENDING = "error_extending"
    MAINTENANCE = "maintenance"


class AttachStatus(StrEnum):
    """Both the volume's attach_status and an attachment's status."""

    DETACHED = "detached"
    RESERVED = "reserved"
    ATTACHING = "attaching"
    ATTACHED = "attached"
    DETACHING = "detaching"
    ERROR_ATTACHING = "error_attaching"
    ERROR_DETACHING = "error_detaching"


class VolumeType(SQLModel, table=True):
    __tablename__ = "volume_types"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    name: str = Field(max_length=255, unique=True)
    description: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    is_public: bool = True
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime | None = None


class VolumeTypeExtraSpec(SQLModel, table=True):
    __tablename__ = "volume_type_extra_specs"

    volume_type_id: str = Field(
        sa_column=Column(String(36), ForeignKey("volume_types.id", ondelete="CASCADE"), primary_key=True)
    )
    key: str = Field(primary_key=True, max_length=255)
    value: str = Field(max_length=255)


class Volume(SQLModel, table=True):
    __tablename__ = "volumes"
    __table_args__ = (
        Index("ix_volumes_project_created", "project_id", "created_at", "id"),
        Index("ix_volumes_created", "created_at", "id"),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    project_id: str = Field(max_length=255)
    user_id: str = Field(max_length=255)
    name: str | None = Field(default=None, max_length=255)
    description: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    size: int
    status: str = Field(default=VolumeStatus.CREATING, max_length=32)
    attach_status: str = Field(default=AttachStatus.DETACHED, max_length=32)
    availability_zone: str = Field(default="nova", max_length=255)
    volume_type_id: str | None = Field(
        default=None, sa_column=Column(String(36), ForeignKey("volume_types.id"), nullable=True, index=True)
    )
    multiattach: bool = False
    bootable: bool = False
    # `<node>@<backend>#<pool>`: the storage node that holds it (SPEC 10); every job of the volume goes there
    host: str | None = Field(default=None, max_length=255, index=True)
    migration_status: str | None = Field(default=None, max_length=255)
    replication_status: str | None = Field(default=None, max_length=255)
    # where the target exports it, and the volume's CHAP credentials ("CHAP <user> <secret>")
    provider_location: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    provider_auth: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime | None = None


class VolumeMetadata(SQLModel, table=True):
    __tablename__ = "volume_metadata"
    __table_args__ = (Index("ix_volume_metadata_key_value", "key", "value"),)

    volume_id: str = Field(sa_column=Column(String(36), ForeignKey("volumes.id", ondelete="CASCADE"), primary_key=True))
    key: str = Field(primary_key=True, max_length=255)
    value: str = Field(max_length=255)


class Attachment(SQLModel, table=True):
    __tablename__ = "attachments"
    __table_args__ = (
        Index("ix_attachments_project_created", "project_id", "created_at", "id"),
        Index("ix_attachments_created", "created_at", "id"),
        Index("ix_attachments_volume_status", "volume_id", "attach_status"),
        # the reservation lease's sweep (SPEC 12): only the reserved rows, oldest first
        Index(
            "ix_attachments_reserved_created",
            "created_at",
            postgresql_where=text("attach_status = 'reserved'"),
            sqlite_where=text("attach_status = 'reserved'"),
        ),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    volume_id: str = Field(sa_column=Column(String(36), ForeignKey("volumes.id"), nullable=False))
    # the volume's project, copied so project-scoped lists need no join
    project_id: str = Field(max_length=255)
    instance_uuid: str | None = Field(default=None, max_length=36, index=True)
    attached_host: str | None = Field(default=None, max_length=255)
    mountpoint: str | None = Field(default=None, max_length=255)
    attach_time: datetime | None = None
    detach_time: datetime | None = None
    attach_mode: str = Field(default="null", max_length=36)
    attach_status: str = Field(default=AttachStatus.RESERVED, max_length=32)
    connection_info: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # os-terminate_connection removed this attachment's ACL (it stays attached until os-detach): reconcile
    # must not give the initiator its access back
    terminated: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, server_default=false()))
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime | None = None


class AttachmentSpec(SQLModel, table=True):
    """One connector key of an attachment; the value is JSON text of any length."""

    __tablename__ = "attachment_specs"

    attachment_id: str = Field(
        sa_column=Column(String(36), ForeignKey("attachments.id", ondelete="CASCADE"), primary_key=True)
    )
    key: str = Field(primary_key=True, max_length=255)
    value: str = Field(sa_column=Column(Text, nullable=False))


class KeyStatus(StrEnum):
    IN_FLIGHT = "in_flight"
    DONE = "done"


class IdempotencyKey(SQLModel, table=True):
    """A keyed POST of one project (SPEC 12): what it asked (the fingerprint) and the answer it got.

    Written in the transaction of the state change it answers; `in_flight` while a connect spans transactions.
    """

    __tablename__ = "idempotency_keys"

    project_id: str = Field(primary_key=True, max_length=255)
    key: str = Field(primary_key=True, max_length=255)
    # sha256 of the operation, the microversion, the user and the canonical JSON body
    fingerprint: str = Field(max_length=64)
    status: str = Field(default=KeyStatus.IN_FLIGHT, max_length=16)
    # the volume or attachment the request made
    resource_id: str | None = Field(default=None, max_length=36)
    response_status: int | None = None
    # the response's JSON body, sealed like the CHAP secrets when TETHER_SECRET_KEY is set
    response_body: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime = Field(index=True)


class Service(SQLModel, table=True):
    """A storage node (binary cinder-volume) or an API host (cinder-scheduler), as `os-services` lists them.

    A node's row carries its pool's capacity from its last heartbeat; a restarted node reuses its row.
    """

    __tablename__ = "services"

    binary: str = Field(primary_key=True, max_length=64)
    name: str = Field(primary_key=True, max_length=64)
    backend_name: str | None = Field(default=None, max_length=64)
    pool_name: str | None = Field(default=None, max_length=64)
    availability_zone: str = Field(max_length=255)
    portal: str | None = Field(default=None, max_length=255)
    volume_backend: str | None = Field(default=None, max_length=32)
    target: str | None = Field(default=None, max_length=32)
    thin: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, server_default=false()))
    total_bytes: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    free_bytes: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    created_at: datetime = Field(default_factory=utcnow)
    heartbeat_at: datetime = Field(default_factory=utcnow)

    @property
    def host(self) -> str:
        """What os-services shows: `<node>@<backend>` for a node, the host name for an API host."""
        return f"{self.name}@{self.backend_name}" if self.backend_name else self.name

    @property
    def pool_host(self) -> str:
        return f"{self.name}@{self.backend_name}#{self.pool_name}"


class NodeJobResult(SQLModel, table=True):
    """What a node's job answered (procrastinate keeps no results): written by the node, read once by the API."""

    __tablename__ = "node_job_results"

    job_id: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    ok: bool
    result: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = Field(default_factory=utcnow)
