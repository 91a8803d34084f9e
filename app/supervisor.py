"""uvicorn's multi-worker supervisor, with a health check that also ends when the worker dies.

uvicorn pings each worker every half second and waits up to `timeout_worker_healthcheck` for the answer
(60 s here: a busy 2-core host misses 5 s). The worker's end of that pipe stays open in the supervisor too,
so a worker killed between ping and answer gives no end-of-file: uvicorn would wait the whole timeout
before it replaced the worker. This check looks at the worker process every 0.1 s while it waits.
"""

from __future__ import annotations

import pickle
import time

from uvicorn.supervisors import multiprocess


class _Worker(multiprocess.Process):
    def _healthcheck(self, timeout: float) -> bool | None:
        """The worker's startup flag, or None if it does not answer in time or dies first."""
        deadline = time.monotonic() + timeout
        try:
            self.parent_conn.send(b"ping")
            while not self.parent_conn.poll(0.1):
                if not self.process.is_alive() or time.monotonic() >= deadline:
                    return None
            started: bool = self.parent_conn.recv()
            return started
        except (OSError, EOFError, pickle.UnpicklingError):
            return None


def watch_workers_closely() -> None:
    """Make uvicorn's supervisor (in this process) start its workers as `_Worker`s."""
    multiprocess.Process = _Worker  # type: ignore[misc]
