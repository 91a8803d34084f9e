"""The engine and short transactions: SQLite set up for concurrent use, asyncpg for production."""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

# How the next SQLite transaction begins: writers take the write lock up front (BEGIN IMMEDIATE)
# so two writers never deadlock upgrading a shared lock; readers stay deferred and run under WAL.
_sqlite_begin: contextvars.ContextVar[str] = contextvars.ContextVar("sqlite_begin", default="DEFERRED")


def _ensure_sqlite_dir(url: str) -> None:
    database = make_url(url).database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def build_engine(url: str, pool_size: int = 10) -> AsyncEngine:
    if url.startswith("sqlite"):
        _ensure_sqlite_dir(url)
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # take transaction control away from the driver so our BEGIN (and savepoints) work
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(connection: Any) -> None:
            connection.exec_driver_sql(f"BEGIN {_sqlite_begin.get()}")

        return engine
    return create_async_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=False)


class Database:
    """Owns the engine; services open one short transaction per state change."""

    def __init__(self, url: str, pool_size: int = 10) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.engine = build_engine(url, pool_size)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False, autoflush=False)
        # PostgreSQL reads run in autocommit: no BEGIN/COMMIT round trips; each statement sees committed data
        reader = self.engine if self.is_sqlite else self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._readers = async_sessionmaker(reader, expire_on_commit=False, autoflush=False)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A transaction that commits on success and rolls back on any error."""
        token = _sqlite_begin.set("IMMEDIATE")
        try:
            async with self._sessions() as session, session.begin():
                yield session
        finally:
            _sqlite_begin.reset(token)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """Reads only: on PostgreSQL each statement runs on its own (no snapshot spans the block)."""
        async with self._readers() as session, session.begin():
            yield session

    async def dispose(self) -> None:
        await self.engine.dispose()
