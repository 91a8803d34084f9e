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


class LockTimeout(Exception):
    """Another operation held the key (a volume) for longer than the dispatcher waits."""

    def __init__(self, key: str, seconds: float) -> None:
        super().__init__(f"{key} is busy with another operation (waited {seconds:g} s); try again")
        self.key = key


class LockLost(Exception):
    """A lock that spans processes was lost while held (its connection dropped): the work holding it stops."""

    def __init__(self, key: str) -> None:
        super().__init__(f"the lock on {key} was lost; the operation stopped and can be retried")
        self.key = key


class Lease(Protocol):
    """A held lock that can be lost; `check()` raises LockLost once it is."""

    def check(self) -> None: ...


class KeyedLocks:
    """asyncio locks created on demand per key and dropped when nobody holds or waits for them."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str, wait: float | None = None) -> AsyncIterator[Lease | None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            try:
                async with asyncio.timeout(wait):
                    await lock.acquire()
            except TimeoutError:
                raise LockTimeout(key, wait or 0) from None
            try:
                yield None
            finally:
                lock.release()
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


class Locks(Protocol):
    def hold(self, key: str, wait: float | None = None) -> AbstractAsyncContextManager[Lease | None]: ...


class Runner:
    """Runs blocking calls in the pool while the caller holds a volume's lock; none once the lock is lost."""

    def __init__(self, dispatcher: Dispatcher, lease: Lease | None = None) -> None:
        self._dispatcher = dispatcher
        self._lease = lease

    def check(self) -> None:
        """Raise LockLost if the lock this sequence holds was lost (another process may hold it now)."""
        if self._lease is not None:
            self._lease.check()

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        self.check()
        return await self._dispatcher.call(fn, *args)


class Dispatcher:
    def __init__(self, workers: int = 4, locks: Locks | None = None, lock_timeout: float | None = 120.0) -> None:
        self.workers = workers
        # how long a sequence waits for its volume before it gives up (LockTimeout): nothing waits forever
        self.lock_timeout = lock_timeout
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

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one blocking call in the pool (the caller serialises per volume)."""
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

    def hold(self, key: str, wait: float | None = None) -> AbstractAsyncContextManager[Lease | None]:
        """Hold `key` (a volume id), waiting at most `wait` s (lock_timeout by default); the lease says whether it
        is still held."""
        return self._locks.hold(key, self.lock_timeout if wait is None else wait)

    @asynccontextmanager
    async def exclusive(self, key: str) -> AsyncIterator[Runner]:
        """Hold `key` (a volume id) for a whole sequence of backend calls and state changes."""
        async with self._locks.hold(key, self.lock_timeout) as lease:
            yield Runner(self, lease)

    async def run(self, key: str, fn: Callable[..., T], *args: Any) -> T:
        async with self.exclusive(key) as run:
            return await run(fn, *args)
