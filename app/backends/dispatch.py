"""The one gateway for blocking storage work: a bounded thread pool, one operation per volume at a time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread

T = TypeVar("T")


class KeyedLocks:
    """asyncio locks created on demand per key and dropped when nobody holds or waits for them."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


class Locks(Protocol):
    def hold(self, key: str) -> AbstractAsyncContextManager[None]: ...


class Runner:
    """Runs blocking calls in the pool while the caller holds a volume's lock."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._dispatcher._call(fn, *args)


class Dispatcher:
    def __init__(self, workers: int = 4, locks: Locks | None = None) -> None:
        self.workers = workers
        self._limiter = anyio.CapacityLimiter(workers)
        # in-process by default; several processes sharing a database pass locks that span them
        self._locks: Locks = locks or KeyedLocks()
        # observers for metrics: fn(operation name, seconds, failed)
        self.observers: list[Callable[[str, float, bool], None]] = []

    @property
    def busy(self) -> int:
        return int(self._limiter.borrowed_tokens)

    @property
    def waiting(self) -> int:
        return self._limiter.statistics().tasks_waiting

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        started = time.perf_counter()
        failed = True
        try:
            result = await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
            failed = False
            return result
        finally:
            name = getattr(fn, "__name__", "call")
            for observe in self.observers:
                observe(name, time.perf_counter() - started, failed)

    @asynccontextmanager
    async def exclusive(self, key: str) -> AsyncIterator[Runner]:
        """Hold `key` (a volume id) for a whole sequence of backend calls and state changes."""
        async with self._locks.hold(key):
            yield Runner(self)

    async def run(self, key: str, fn: Callable[..., T], *args: Any) -> T:
        async with self.exclusive(key) as run:
            return await run(fn, *args)
