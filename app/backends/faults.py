"""Injectable slowness and failures for the fake backends (tests and benchmarks)."""

from __future__ import annotations

import threading
import time


class Faults:
    """Per-operation delays and failures, safe to change from the event loop while workers read them."""

    def __init__(self, delay: float = 0.0) -> None:
        self._lock = threading.Lock()
        self.delay = delay
        self._fail: dict[str, int] = {}
        self.calls: list[str] = []

    def fail(self, operation: str, times: int = 1) -> None:
        """Make the next `times` calls of `operation` raise (times=-1: until cleared)."""
        with self._lock:
            self._fail[operation] = times

    def clear(self) -> None:
        with self._lock:
            self._fail.clear()

    def hit(self, operation: str) -> bool:
        """Record a call; sleep the configured delay; say whether it must fail."""
        with self._lock:
            self.calls.append(operation)
            left = self._fail.get(operation, 0)
            if left > 0:
                self._fail[operation] = left - 1
            delay = self.delay
        if delay:
            time.sleep(delay)
        return left != 0
