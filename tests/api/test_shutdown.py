"""A server stops promptly even when a volume's work ends just as it stops: that end tells the node's heartbeat to
beat at once. On Python 3.11 `asyncio.wait_for` lost a cancel that came together with that news, so the
heartbeat task never ended and the server's shutdown waited for it for good (it hung the test suite twice)."""

import asyncio
from typing import Any

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
