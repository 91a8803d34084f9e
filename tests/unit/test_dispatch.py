"""The dispatcher: a bounded pool, one operation per volume, different volumes in parallel."""

import asyncio
import threading
import time

from app.backends.dispatch import Dispatcher


async def test_pool_is_bounded_and_volumes_run_in_parallel() -> None:
    dispatcher = Dispatcher(workers=4)
    running = 0
    peak = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1

    started = time.perf_counter()
    await asyncio.gather(*(dispatcher.run(f"volume-{i}", work) for i in range(16)))
    elapsed = time.perf_counter() - started
    assert peak == 4
    assert elapsed < 16 * 0.05  # not serial


async def test_one_volume_is_never_worked_on_twice_at_once() -> None:
    dispatcher = Dispatcher(workers=4)
    inside = 0
    overlap = False

    def work() -> None:
        nonlocal inside, overlap
        inside += 1
        if inside > 1:
            overlap = True
        time.sleep(0.01)
        inside -= 1

    await asyncio.gather(*(dispatcher.run("same-volume", work) for _ in range(10)))
    assert not overlap


async def test_exclusive_holds_the_volume_across_calls_and_frees_the_key() -> None:
    dispatcher = Dispatcher(workers=2)
    order: list[str] = []

    async def sequence(name: str) -> None:
        async with dispatcher.exclusive("v") as run:
            await run(order.append, f"{name}-1")
            await asyncio.sleep(0.01)
            await run(order.append, f"{name}-2")

    await asyncio.gather(sequence("a"), sequence("b"))
    assert order in (["a-1", "a-2", "b-1", "b-2"], ["b-1", "b-2", "a-1", "a-2"])
    assert len(dispatcher._locks) == 0


async def test_event_loop_keeps_running_while_workers_block() -> None:
    dispatcher = Dispatcher(workers=2)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        for _ in range(10):
            await asyncio.sleep(0.01)
            ticks += 1

    await asyncio.gather(dispatcher.run("a", time.sleep, 0.2), dispatcher.run("b", time.sleep, 0.2), ticker())
    assert ticks == 10
