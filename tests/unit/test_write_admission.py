"""Admission for write transactions: at most `write_concurrency` in flight, reads never wait, nesting works."""

from __future__ import annotations

import asyncio

from sqlalchemy import text

from app.db.engine import Database


async def test_write_transactions_beyond_the_limit_wait_and_reads_do_not(postgres_url: str) -> None:
    # PostgreSQL: SQLite's own write lock already lets one writer in at a time
    db = Database(postgres_url, write_concurrency=2)
    inside = 0
    most = 0
    release = asyncio.Event()

    async def writer() -> None:
        nonlocal inside, most
        async with db.write() as session:
            await session.execute(text("SELECT 1"))
            inside += 1
            most = max(most, inside)
            await release.wait()
            inside -= 1

    try:
        writers = [asyncio.create_task(writer()) for _ in range(5)]
        for _ in range(100):
            if inside == 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # time for a third writer to get in, if the limit let it
        assert inside == 2
        # both slots are taken and three writers queue: a read still answers at once
        async with asyncio.timeout(2), db.read() as session:
            assert (await session.execute(text("SELECT 41 + 1"))).scalar() == 42
        release.set()
        async with asyncio.timeout(10):
            await asyncio.gather(*writers)
        assert most == 2
    finally:
        release.set()
        await db.dispose()


async def test_a_write_inside_a_write_does_not_wait_for_a_slot(postgres_url: str) -> None:
    # PostgreSQL, for the same reason: on SQLite the inner writer would wait for the outer one's lock
    db = Database(postgres_url, write_concurrency=1)
    try:
        async with asyncio.timeout(5), db.write() as outer:
            await outer.execute(text("SELECT 1"))
            # a service may open a second transaction while its first is open; with one slot this would
            # wait for itself forever if the nested one queued
            async with db.write() as inner:
                assert (await inner.execute(text("SELECT 2"))).scalar() == 2
            async with db.autocommit() as inner:
                assert (await inner.execute(text("SELECT 3"))).scalar() == 3
    finally:
        await db.dispose()
