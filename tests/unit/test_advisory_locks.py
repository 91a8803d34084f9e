"""Per-volume locks across processes: two lock objects have two PostgreSQL sessions, like two workers."""

import asyncio

from app.db.locks import AdvisoryLocks, advisory_key


async def test_a_volume_held_by_one_process_waits_in_another(postgres_url: str) -> None:
    first, second = AdvisoryLocks(postgres_url), AdvisoryLocks(postgres_url)
    order: list[str] = []
    try:
        async with first.hold("volume-a"):
            waiter = asyncio.create_task(_take(second, "volume-a", order))
            await asyncio.sleep(0.2)
            assert not waiter.done(), "the second process got a volume the first one holds"
            async with second.hold("volume-b"):  # other volumes are not blocked
                order.append("b")
            order.append("a released")
        await asyncio.wait_for(waiter, 5)
        assert order == ["b", "a released", "a taken"]
    finally:
        await first.close()
        await second.close()


async def _take(locks: AdvisoryLocks, key: str, order: list[str]) -> None:
    async with locks.hold(key):
        order.append(f"{key[-1]} taken")


async def test_lock_survives_a_lost_connection(postgres_url: str) -> None:
    locks = AdvisoryLocks(postgres_url)
    try:
        async with locks.hold("volume-c"):
            pass
        await locks._connection.close()  # the server went away between two operations
        async with locks.hold("volume-c"):
            pass
    finally:
        await locks.close()


def test_keys_are_stable_signed_64_bit() -> None:
    assert advisory_key("volume-x") == advisory_key("volume-x")
    assert advisory_key("volume-x") != advisory_key("volume-y")
    assert -(2**63) <= advisory_key("volume-x") < 2**63
