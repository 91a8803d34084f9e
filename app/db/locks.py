"""Per-volume locks that hold across every Tether process sharing one database.

An in-process lock orders the tasks of this process; across processes:
- one host (embedded mode: the server's workers and `tether reconcile`, SQLite or PostgreSQL): a byte of one lock
  file per key, a system call instead of two database round trips per locked request (issue 17).
- several hosts (remote mode: the API tier; a node's own sequences): a PostgreSQL session advisory lock, taken on
  a dedicated connection that is not from the pool, polled with pg_try_advisory_lock so one process's connection
  is never stuck waiting on another process while other volumes need it, and no pooled connection is held while
  backend work runs. PostgreSQL releases a session's locks when its connection drops, so a lost connection
  *loses* every lock taken on it: each holder gets a lease that says so (the dispatcher's Runner checks it before
  every backend call, and the work stops with LockLost), and the connection is watched (asyncpg's termination
  listener, plus a ping while locks are held) so the loss is seen at once, not at the next lock call.

A periodic job that one process at a time should run (the sweep) takes its turn with `sole_turn()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import struct
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url

from app.backends.dispatch import KeyedLocks, Lease, LockLost, LockTimeout
from app.db.engine import Database
from app.errors import DatabaseUnavailable

log = logging.getLogger("tether.locks")

_POLL_START, _POLL_MAX = 0.002, 0.05
_PING_EVERY = 1.0  # seconds between pings of the lock connection while any lock is held


def advisory_key(key: str) -> int:
    """A stable signed 64-bit key for pg_advisory_lock."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


def asyncpg_dsn(url: str) -> str:
    """The database URL as a libpq-style DSN for the connections made without SQLAlchemy (asyncpg's here, psycopg's
    in the job queue). SQLAlchemy's asyncpg dialect spells TLS `?ssl=<mode>`; a DSN says `sslmode` (passed on as
    `ssl`, PostgreSQL took it for a server setting and refused the connection)."""
    parsed = make_url(url).set(drivername="postgresql")
    query = dict(parsed.query)
    if "ssl" in query and "sslmode" not in query:
        query["sslmode"] = query.pop("ssl")
        parsed = parsed.set(query=query)
    return parsed.render_as_string(hide_password=False)


class _SessionLease:
    """Held while the lock connection that took it lives; lost for good once that connection dropped."""

    def __init__(self, locks: AdvisoryLocks, key: str) -> None:
        self._locks = locks
        self._key = key
        self._session = locks.session

    @property
    def lost(self) -> bool:
        return self._session != self._locks.session

    def check(self) -> None:
        if self.lost:
            raise LockLost(self._key)


class AdvisoryLocks:
    def __init__(self, url: str, *, command_timeout: float = 10.0) -> None:
        self._dsn = asyncpg_dsn(url)
        self._local = KeyedLocks()
        self._connection: Any = None
        self._use = asyncio.Lock()
        self._command_timeout = command_timeout
        # which lock connection ("session") the held locks live on: a new one after every drop
        self.session = 0
        self._held = 0
        self._pinger: asyncio.Task[None] | None = None

    def _dropped(self, connection: Any = None) -> None:
        """The lock connection is gone, and PostgreSQL released every lock it held."""
        if connection is not None and connection is not self._connection:
            return  # an old connection's late notice
        if self._connection is not None:
            log.error("the advisory-lock connection dropped: %d held lock(s) are lost", self._held)
        self._connection = None
        self.session += 1

    async def _fetch(self, sql: str, key: int) -> bool:
        import asyncpg

        async with self._use:
            try:
                if self._connection is None or self._connection.is_closed():
                    if self._connection is not None:
                        self._dropped()
                    connection = await asyncpg.connect(self._dsn, timeout=self._command_timeout)
                    connection.add_termination_listener(self._dropped)
                    self._connection = connection
                return bool(await self._connection.fetchval(sql, key, timeout=self._command_timeout))
            except (
                OSError,
                TimeoutError,
                asyncpg.PostgresConnectionError,
                asyncpg.InterfaceError,
                asyncpg.InternalClientError,  # an operation cut off mid-way (the server went away under it)
                asyncpg.exceptions.OperatorInterventionError,  # a shutdown or restart of the server
            ) as error:
                # a lost connection also lost its session locks: whoever holds one learns it from its lease. It
                # is closed for good first: one left open in a state it cannot leave would keep its locks
                if self._connection is not None:
                    self._connection.terminate()
                self._dropped()
                raise DatabaseUnavailable() from error

    async def _ping(self) -> None:
        """While locks are held, notice a dropped connection within a second (a quiet socket says nothing)."""
        while self._held:
            await asyncio.sleep(_PING_EVERY)
            with contextlib.suppress(Exception):
                await self._fetch("SELECT $1::bigint", 0)

    @asynccontextmanager
    async def hold(self, key: str, wait: float | None = None) -> AsyncIterator[Lease]:
        loop = asyncio.get_running_loop()
        deadline = None if wait is None else loop.time() + wait
        async with self._local.hold(key, wait):
            number = advisory_key(key)
            delay = _POLL_START
            while True:
                # shielded: a try-lock cancelled after PostgreSQL granted it would leak the lock
                if await asyncio.shield(self._fetch("SELECT pg_try_advisory_lock($1)", number)):
                    break
                if deadline is not None and loop.time() >= deadline:
                    raise LockTimeout(key, wait or 0)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _POLL_MAX)
            lease = _SessionLease(self, key)
            self._held += 1
            if self._pinger is None or self._pinger.done():
                self._pinger = asyncio.create_task(self._ping())
            try:
                yield lease
            finally:
                self._held -= 1
                if not lease.lost:
                    with contextlib.suppress(Exception):  # a drop now frees it anyway
                        await asyncio.shield(self._fetch("SELECT pg_advisory_unlock($1)", number))

    async def close(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pinger
        if self._connection is not None and not self._connection.is_closed():
            await self._connection.close()
        self._connection = None


def _flock(kind: int, offset: int) -> bytes:
    """Linux's struct flock for one byte at `offset` (l_type, l_whence, l_start, l_len, l_pid: 0 for an OFD lock)."""
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, offset, 1, 0)


class FileLocks:
    """Per-key locks between the processes of one host: an exclusive lock on one byte of one file per key, polled
    without blocking. Linux's open-file-description locks (F_OFD_SETLK): each FileLocks is an owner of its own,
    so two in one process exclude each other as two processes do, and closing one never frees another's locks;
    a process that dies frees its own. The tasks of one FileLocks are ordered by the in-process lock first."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._local = KeyedLocks()
        self._fd: int | None = None

    def open(self) -> None:
        """Open (and create) the lock file now: OSError when this process cannot."""
        self._file()

    def _file(self) -> int:
        if self._fd is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        return self._fd

    @asynccontextmanager
    async def hold(self, key: str, wait: float | None = None) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        deadline = None if wait is None else loop.time() + wait
        async with self._local.hold(key, wait):
            offset = advisory_key(key) & (2**62 - 1)
            delay = _POLL_START
            while True:
                try:
                    fcntl.fcntl(self._file(), fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK, offset))
                    break
                except BlockingIOError:
                    if deadline is not None and loop.time() >= deadline:
                        raise LockTimeout(key, wait or 0) from None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _POLL_MAX)
            try:
                yield None
            finally:
                fcntl.fcntl(self._file(), fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, offset))

    async def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lock_file(url: str, lock_path: str | None = None) -> str | None:
    """Where one host's processes of a deployment meet (embedded mode): `<lock_path>/volumes.lock`; unset, beside
    an SQLite database file (none for an in-memory one), and for PostgreSQL /run/lock/tether/volumes.lock (the
    temporary directory where there is no /run/lock). Deployments sharing the file cost nothing: their keys are
    their own volumes' ids."""
    if lock_path:
        return str(Path(lock_path) / "volumes.lock")
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite"):
        run = Path("/run/lock")
        return str((run / "tether" if run.is_dir() else Path(tempfile.gettempdir()) / "tether") / "volumes.lock")
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return f"{database}.locks"


def cross_process_locks(
    url: str, enabled: bool, *, one_host: bool, lock_path: str | None = None
) -> AdvisoryLocks | FileLocks | None:
    """The volumes' locks across the processes sharing the database at `url`; none when turned off. `one_host`:
    every process that works on these volumes runs on this host (embedded mode): the lock file (lock_file()).
    Else (remote mode's API tier and nodes, PostgreSQL): advisory locks."""
    if not enabled:
        return None
    if not one_host and not make_url(url).drivername.startswith("sqlite"):
        return AdvisoryLocks(url)
    path = lock_file(url, lock_path)
    return FileLocks(path) if path else None


_TRY_TURN = text("SELECT pg_try_advisory_xact_lock(:key)")


@asynccontextmanager
async def sole_turn(db: Database, name: str) -> AsyncIterator[bool]:
    """Whether this process has the turn, for the block, at a job one process at a time runs (a periodic sweep).

    PostgreSQL: a transaction-scoped advisory lock, tried (never waited for) on a connection of its own whose
    transaction stays open for the block; PostgreSQL frees it when that transaction ends or its connection drops,
    so a process that dies mid-turn never keeps it from the others. SQLite has one serving process: always yes.
    """
    if db.is_sqlite:
        yield True
        return
    async with db.engine.connect() as connection, connection.begin():
        yield bool(await connection.scalar(_TRY_TURN, {"key": advisory_key(name)}))
