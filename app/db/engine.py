"""The engine and short transactions: SQLite set up for concurrent use, asyncpg for production."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.util import greenlet_spawn

from app.errors import DatabaseUnavailable, TetherError

# How the next SQLite transaction begins: writers take the write lock up front (BEGIN IMMEDIATE)
# so two writers never deadlock upgrading a shared lock; readers stay deferred and run under WAL.
_sqlite_begin: contextvars.ContextVar[str] = contextvars.ContextVar("sqlite_begin", default="DEFERRED")
# set while a task is inside a write transaction, so a nested one does not wait for an admission slot
_writing: contextvars.ContextVar[bool] = contextvars.ContextVar("writing", default=False)


# SQLSTATEs that say the server cannot be reached now, not that a statement was wrong: the connection exceptions
# (class 08), an administrator's shutdown or a restart (57P01-57P03), no connection slot left (53300)
_UNAVAILABLE_STATES = ("08", "57P01", "57P02", "57P03", "53300")


def database_unavailable(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is the database going away or refusing connections: a PostgreSQL
    restart, a dropped connection; never a statement the database refused."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, ConnectionError):  # refused, reset, aborted, a broken pipe
            return True
        state = getattr(current, "sqlstate", None)
        if isinstance(state, str) and state.startswith(_UNAVAILABLE_STATES):
            return True
        orig = getattr(current, "orig", None)
        current = current.__cause__ or (orig if isinstance(orig, BaseException) else None) or current.__context__
    return False


def _driver_broke(error: BaseException) -> bool:
    """asyncpg's word that an operation was cut off mid-way (the protocol state a server that went away leaves
    behind), which SQLAlchemy's session would have told as a disconnect."""
    import asyncpg

    return isinstance(error, asyncpg.InternalClientError)


@asynccontextmanager
async def _reachable() -> AsyncIterator[None]:
    """A database that went away is a 503 (DatabaseUnavailable), whatever the driver called it."""
    try:
        yield
    except Exception as error:
        if not isinstance(error, TetherError) and database_unavailable(error):
            raise DatabaseUnavailable() from error
        raise


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

    def __init__(self, url: str, pool_size: int = 10, write_concurrency: int = 2) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.engine = build_engine(url, pool_size)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False, autoflush=False)
        # PostgreSQL reads run in autocommit: no BEGIN/COMMIT round trips; each statement sees committed data
        reader = self.engine if self.is_sqlite else self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._readers = async_sessionmaker(reader, expire_on_commit=False, autoflush=False)
        # Admission for write transactions: a burst of state changes queues here, holding nothing, instead of
        # interleaving dozens of transactions on the event loop, which is what made concurrent reads slow.
        # Reads are never held back. A task waits here before BEGIN, so it holds no row lock while it waits.
        self._admission = asyncio.Semaphore(write_concurrency)

    @asynccontextmanager
    async def _admitted(self) -> AsyncIterator[None]:
        """A write slot for the calling task; a write nested in one of its own does not queue for another."""
        if _writing.get():
            yield
            return
        async with self._admission:
            writing = _writing.set(True)
            try:
                yield
            finally:
                _writing.reset(writing)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A transaction that commits on success and rolls back on any error."""
        async with self._admitted():
            token = _sqlite_begin.set("IMMEDIATE")
            try:
                async with _reachable(), self._sessions() as session, session.begin():
                    yield session
            finally:
                _sqlite_begin.reset(token)

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[AsyncSession]:
        """Writes whose statements each stand alone: on PostgreSQL each commits by itself, which saves the
        BEGIN and COMMIT round trips of a one-statement transaction; on SQLite a write transaction."""
        if self.is_sqlite:
            async with self.write() as session:
                yield session
            return
        async with self._admitted(), _reachable(), self._readers() as session, session.begin():
            yield session

    @asynccontextmanager
    async def statements(self, *, write: bool) -> AsyncIterator[AsyncSession | Any]:
        """Where app/db/prepared.py's statements run, each by itself. PostgreSQL: the asyncpg connection of a
        pooled connection, each statement committed on its own (as in autocommit()); a write takes a write slot.
        A connection that failed under it is invalidated, not returned to the pool, and the pool's older ones with
        it. SQLite: a session, in a write transaction or a read."""
        if self.is_sqlite:
            async with self.write() if write else self.read() as session:
                yield session
            return
        async with self._admitted() if write else contextlib.nullcontext(), _reachable():
            # the pool's own connection, no engine Connection around it: no statement of SQLAlchemy's runs on it, so
            # it never begins a transaction, and its checkout and return cost a third as much (~25 µs, not ~80:
            # five per attach cycle, issue 17)
            pooled = await self.engine.raw_connection()
            driver: Any = pooled.driver_connection
            try:
                yield driver
            except Exception as error:
                if database_unavailable(error) or driver.is_closed() or _driver_broke(error):
                    # as SQLAlchemy does on a session's disconnect: this connection now, and every other of its
                    # generation at its next checkout (a restarted database left them all dead: one 503, not one
                    # per pooled connection)
                    self.engine.pool._invalidate(pooled, error)
                    if not isinstance(error, TetherError):
                        raise DatabaseUnavailable() from error
                raise
            finally:
                # in a greenlet, as an engine Connection's return is: a return past the pool's size closes the
                # connection, which the asyncpg adapter awaits
                await greenlet_spawn(pooled.close)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """Reads only: on PostgreSQL each statement runs on its own (no snapshot spans the block)."""
        async with _reachable(), self._readers() as session, session.begin():
            yield session

    async def dispose(self) -> None:
        await self.engine.dispose()
