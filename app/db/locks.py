"""Per-volume locks that hold across every Tether process sharing one PostgreSQL database.

An in-process lock orders the tasks of this process; a PostgreSQL session advisory lock, taken on a
dedicated connection that is not from the pool, orders the processes. The lock is taken with
pg_try_advisory_lock and polled, so one process's connection is never stuck waiting on another
process while other volumes need it, and no pooled connection is held while backend work runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.engine import make_url

from app.backends.dispatch import KeyedLocks
from app.db.engine import Database

log = logging.getLogger("tether.locks")


def advisory_key(key: str) -> int:
    """A stable signed 64-bit key for pg_advisory_lock."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


def asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class AdvisoryLocks:
    def __init__(self, url: str) -> None:
        self._dsn = asyncpg_dsn(url)
        self._local = KeyedLocks()
        self._connection: Any = None
        self._use = asyncio.Lock()

    async def _fetch(self, sql: str, key: int) -> bool:
        import asyncpg

        async with self._use:
            for attempt in (1, 2):
                try:
                    if self._connection is None or self._connection.is_closed():
                        self._connection = await asyncpg.connect(self._dsn, timeout=10)
                    return bool(await self._connection.fetchval(sql, key))
                except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError):
                    # a lost connection also lost its session locks; reconnect once and retry
                    self._connection = None
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        async with self._local.hold(key):
            number = advisory_key(key)
            delay = 0.002
            while not await self._fetch("SELECT pg_try_advisory_lock($1)", number):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
            try:
                yield
            finally:
                await asyncio.shield(self._fetch("SELECT pg_advisory_unlock($1)", number))

    async def close(self) -> None:
        if self._connection is not None and not self._connection.is_closed():
            await self._connection.close()
        self._connection = None


def cross_process_locks(db: Database, enabled: bool) -> AdvisoryLocks | None:
    """The volumes' locks across processes: none on SQLite (one process) or when turned off."""
    return None if db.is_sqlite or not enabled else AdvisoryLocks(db.url)
