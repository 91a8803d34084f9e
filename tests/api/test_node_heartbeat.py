"""The node's heartbeat: it stops promptly even when a volume's work ends just as the server stops (that end tells
it to beat at once; on Python 3.11 `asyncio.wait_for` lost a cancel that came together with that news, so the
heartbeat task never ended and the server's shutdown waited for it for good: it hung the test suite twice), and
it beats while the storage's thread pool is full."""

import asyncio
import threading
from typing import Any

import pytest
from sqlalchemy import select

from app.db.models import Service
from app.node import Heartbeat


async def test_a_heartbeat_told_to_beat_as_it_is_cancelled_stops(app: Any) -> None:
    nodes = app.state.nodes
    beat = Heartbeat(app.state.settings, nodes, nodes.local)
    for _ in range(5):
        task = asyncio.create_task(beat.run())
        await asyncio.sleep(0.01)  # waiting for its next beat
        beat.poke()  # a create or delete just ended
        task.cancel()  # and the server stops
        _done, pending = await asyncio.wait([task], timeout=2)
        assert not pending, "the heartbeat went on after its cancel"
        assert task.cancelled()


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"node_heartbeat": 0.5, "backend_workers": 1}


async def test_a_heartbeat_beats_while_the_storage_workers_are_all_busy(app: Any) -> None:
    """Long storage work (a big volume zeroed on delete) may hold every thread of the backend pool for minutes: the
    heartbeat's capacity read waits at most one interval, and the row says the node is alive all the same."""
    nodes = app.state.nodes
    beat = Heartbeat(app.state.settings, nodes, nodes.local)
    await beat.beat()
    known = beat.capacity
    release = threading.Event()
    busy = asyncio.create_task(app.state.dispatcher.call(release.wait, 30))  # the pool's only worker
    try:
        await asyncio.sleep(0.1)
        async with app.state.db.read() as session:
            before = await session.scalar(select(Service.heartbeat_at).where(Service.name == "tether"))  # type: ignore[arg-type]
        await asyncio.wait_for(beat.beat(), 5)  # before: it waited for the worker, as long as the work took
        async with app.state.db.read() as session:
            after = await session.scalar(select(Service.heartbeat_at).where(Service.name == "tether"))  # type: ignore[arg-type]
        assert after > before
        assert beat.capacity == known  # the last capacity read stays
    finally:
        release.set()
        await busy
