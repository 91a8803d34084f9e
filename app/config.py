"""Settings: every knob an operator turns, read from TETHER_* variables or a .env file."""

from __future__ import annotations

import re
import socket
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _hostname() -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64]
    return name or "tether"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TETHER_", env_file=".env", extra="ignore")

    database_url: str = "sqlite+aiosqlite:///./var/tether.db"
    database_pool_size: int = Field(default=10, ge=1)
    # write transactions in flight per process; a burst of state changes queues for a slot (reads never do)
    write_concurrency: int = Field(default=2, ge=1, le=1000)
    volume_backend: Literal["fake", "file", "lvm"] = "fake"
    target: Literal["fake", "tgt", "lio"] = "fake"
    backend_workers: int = Field(default=4, ge=1, le=256)
    admin_users: str = "admin"
    target_portal: str = "127.0.0.1:3260"
    target_iqn_prefix: str = "iqn.2010-10.org.openstack:"
    tgt_control_port: int | None = None
    # how the tgt target talks to tgtd: its control socket from this process, or a tgtadm process per request
    tgt_control: Literal["socket", "tgtadm"] = "socket"
    lvm_vg: str = "cinder-volumes"
    lvm_type: Literal["thick", "thin"] = "thick"
    lvm_thin_pool: str = "tether-pool"
    lvm_config: str | None = None
    # thick LVs are overwritten with zeros before lvremove (Cinder's volume_clear): the first N MiB, 0 = all of it
    volume_clear: Literal["zero", "none"] = "zero"
    volume_clear_size: int = Field(default=0, ge=0)
    file_dir: str = "./var/volumes"
    log_level: str = "INFO"
    log_json: bool = False
    # one line per request (method, path, status, duration, request id), logged at INFO by tether.access
    access_log: bool = True
    # fake backends only: seconds each call sleeps (tests and benchmarks)
    fake_delay: float = Field(default=0.0, ge=0)
    # SPEC 10: storage nodes. embedded: `tether serve` runs one node in-process (SQLite or PostgreSQL);
    # remote: `tether serve` is a pure API tier and `tether node` processes do the storage work (PostgreSQL)
    nodes: Literal["embedded", "remote"] = "embedded"
    node_name: str = Field(default_factory=_hostname, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    availability_zone: str = "nova"
    # the pool's volume_backend_name (a volume type's extra spec of that name picks it) and its pool name
    backend_name: str = Field(default="default", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    pool_name: str = Field(default="default", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    # caps the pool's reported total capacity (GiB); the scheduler's free space is that minus what is allocated
    pool_capacity_gb: int | None = Field(default=None, ge=0)
    # seconds between two heartbeats of a node (and of an API host); older than service_down_time: down
    node_heartbeat: float = Field(default=10.0, gt=0)
    service_down_time: float = Field(default=60.0, gt=0)
    # seconds between two reconciles of a node's own volumes (a node also reconciles when it starts)
    reconcile_interval: float = Field(default=300.0, gt=0)
    # seconds the API tier waits for a node's job before it answers 503
    node_timeout: float = Field(default=60.0, gt=0)
    # `tether node` serves Prometheus metrics (its jobs by operation, its pool, its thread pool) on this port
    node_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    node_metrics_host: str = "127.0.0.1"
    reconcile_on_start: bool = True
    # Fernet key or passphrase: CHAP secrets are stored sealed (reconcile seals the ones stored before)
    secret_key: str | None = None
    # serialise each volume's backend work across every process sharing the database: embedded mode, a lock file
    # in lock_path shared with `tether reconcile`; remote mode, PostgreSQL advisory locks
    distributed_locks: bool = True
    # embedded mode: the directory of the lock file (volumes.lock) every process of this host shares; unset,
    # beside an SQLite database, /run/lock/tether on PostgreSQL (app/db/locks.py's lock_file)
    lock_path: str | None = None
    # seconds a request waits for a volume another operation holds before it answers 409
    lock_timeout: float = Field(default=120.0, gt=0)
    # SPEC 12: seconds a keyed POST's answer is kept for its retries (then swept, and the key is free again)
    idempotency_ttl: float = Field(default=86400.0, gt=0)
    # seconds after which a reservation nobody connected is removed; 0 = never (Nova keeps a shelved-offloaded
    # server's attachments reserved for as long as it is shelved)
    reservation_ttl: float = Field(default=0.0, ge=0)
    # seconds between two sweeps (expired reservations and idempotency keys); at most 10, the lease's promise
    sweep_interval: float = Field(default=5.0, gt=0, le=10)

    # SPEC 11: who the caller is. noauth believes `X-Auth-Token: user:project`; keystone validates the token
    auth: Literal["noauth", "keystone"] = "noauth"
    # noauth only: users who get the role reader alone (everyone not in admin_users gets member and reader)
    reader_users: str = ""
    # a Cinder policy.yaml whose rules override the defaults (app/policy.py); read once at start-up
    policy_file: str | None = None
    # keystone mode, named after keystonemiddleware's [keystone_authtoken] options: the service's own user
    # (keystoneauth1 password auth), which validates callers' tokens
    keystone_auth_url: str | None = None
    keystone_username: str | None = None
    keystone_password: SecretStr | None = None
    keystone_project_name: str = "service"
    keystone_user_domain_name: str = "Default"
    keystone_project_domain_name: str = "Default"
    # where a 401 sends clients for a token (WWW-Authenticate); default: the auth URL
    keystone_www_authenticate_uri: str | None = None
    # an X-Service-Token needs one of these roles (comma-separated), as keystonemiddleware requires
    keystone_service_token_roles: str = "service"  # noqa: S105 (role names, not a secret)
    # seconds a validated token is believed without asking Keystone again (never past its expiry); <= 0: never
    keystone_token_cache_time: int = Field(default=300, ge=-1)
    # seconds to wait for Keystone before answering 503
    keystone_http_connect_timeout: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _keystone_complete(self) -> Settings:
        if self.auth == "keystone":
            missing = [
                f"TETHER_KEYSTONE_{name.upper()}"
                for name in ("auth_url", "username", "password")
                if not getattr(self, f"keystone_{name}")
            ]
            if missing:
                raise ValueError(f"TETHER_AUTH=keystone needs {', '.join(missing)}")
        return self

    @property
    def admin_user_set(self) -> frozenset[str]:
        return frozenset(u.strip() for u in self.admin_users.split(",") if u.strip())

    @property
    def reader_user_set(self) -> frozenset[str]:
        return frozenset(u.strip() for u in self.reader_users.split(",") if u.strip())

    @property
    def service_token_role_set(self) -> frozenset[str]:
        return frozenset(r.strip() for r in self.keystone_service_token_roles.split(",") if r.strip())

    @property
    def pool_host(self) -> str:
        """This node's pool as Cinder names it: `<node>@<backend>#<pool>` (a volume's os-vol-host-attr:host)."""
        return f"{self.node_name}@{self.backend_name}#{self.pool_name}"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")
