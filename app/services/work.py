"""Background work that outlives a request (volume create and delete), tracked so shutdown can wait for it;
and `every()`, the loop of periodic work (heartbeats, reconciles, sweeps)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger("tether.work")


class BackgroundWork:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    async def idle(self) -> None:
        """Wait until every task spawned so far (and any they spawn) has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def __len__(self) -> int:
        return len(self._tasks)


async def every(seconds: float, work: Callable[[], Awaitable[Any]], name: str, *, first: bool = True) -> None:
    """Run `work` every `seconds` until cancelled; a failure is logged, never the end of the loop."""
    if not first:
        await asyncio.sleep(seconds)
    while True:
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed; the next one, in %g s, retries", name, seconds)
        await asyncio.sleep(seconds)
