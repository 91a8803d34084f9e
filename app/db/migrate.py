"""Running Alembic from code: `tether db upgrade`, the embedded SQLite upgrade at start-up, and tests."""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config

ROOT = Path(__file__).resolve().parents[2]


def database_url() -> str:
    from app.config import Settings

    return os.environ.get("TETHER_DATABASE_URL") or Settings().database_url


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["url"] = url
    return config


def include_name(name: str | None, type_: str, _parent_names: object) -> bool:
    """What migrations compare: not the job queue's own tables (procrastinate's, installed beside ours on
    PostgreSQL by `upgrade`, not migrated by us)."""
    return not (type_ == "table" and name is not None and name.startswith("procrastinate_"))


def upgrade(url: str, revision: str = "head") -> None:
    """Blocking: run from a thread or before the event loop starts. On PostgreSQL it also installs the job
    queue's schema (procrastinate's tables and functions; SPEC 10)."""
    command.upgrade(alembic_config(url), revision)
    if url.startswith("postgresql"):
        from app.queue import install_schema

        install_schema(url)
