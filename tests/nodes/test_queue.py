"""The job queue's two ends without a node process (SPEC 10), on PostgreSQL: what a node sends when a job ends
(app.queue.RECORD_AND_WAKE), what the waiting API process does with it (app.queue.JobQueue.wait), and the
connection pool procrastinate uses on a node (app.node.job_pool).

An outcome that fits in its notification reaches its waiter without a read of its row, which is removed a
little later together with others; one too long for a notification is read from its row; one heard before its
job's autocommitted defer had returned is not missed.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import psycopg
import pytest
from sqlalchemy import text

from app.db.engine import Database
from app.db.locks import asyncpg_dsn
from app.node import job_pool
from app.queue import CHANNEL, DISCARD_AFTER, PAYLOAD_MAX, RECORD_AND_WAKE, JobFailed, JobQueue, notification
from app.secrets import SecretBox

pytestmark = pytest.mark.postgres


@pytest.fixture
async def queue(postgres_url: str) -> AsyncIterator[JobQueue]:
    jobs = JobQueue(postgres_url, SecretBox(None))
    await jobs.start()
    try:
        yield jobs
    finally:
        await jobs.close()


async def node_ends(url: str, job_id: int, ok: bool, result: Any) -> None:
    """What a node does when a job somebody waits for has ended, on a connection like its pool's."""
    encoded = json.dumps(result)
    async with await psycopg.AsyncConnection.connect(asyncpg_dsn(url), autocommit=True) as connection:
        await connection.execute(
            RECORD_AND_WAKE,
            {
                "job_id": job_id,
                "ok": ok,
                "result": encoded,
                "done": CHANNEL,
                "payload": notification(job_id, ok, encoded),
                "prune": False,
                "ttl": 3600.0,
                "channel": "procrastinate_queue_v1#node.test",
                "message": json.dumps({"type": "job_inserted"}),
                "queue": "node.test",
            },
        )


async def rows(url: str, job_id: int) -> int:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return int(await connection.fetchval("SELECT count(*) FROM node_job_results WHERE job_id = $1", job_id))
    finally:
        await connection.close()


async def outcome_of(queue: JobQueue, url: str, ok: bool, value: Any) -> Any:
    """A waiter for a new job id, and the node's end of that job once the waiter waits."""
    job_id = random.randrange(10**12, 10**13)
    waiting = asyncio.create_task(queue.wait(job_id, 10, node="test", op="capacity"))
    await asyncio.sleep(0.05)
    await node_ends(url, job_id, ok, queue.codec.encode(value) if ok else value)
    return job_id, await waiting


async def test_an_outcome_in_its_notification_is_not_read_from_its_row_which_goes_soon_after(
    queue: JobQueue, postgres_url: str
) -> None:
    value = {"free": 7, "exports": ["a", "b"]}
    job_id, result = await asyncio.wait_for(outcome_of(queue, postgres_url, True, value), 5)
    assert result == value
    assert await rows(postgres_url, job_id) == 1, "the waiter read (and deleted) the row it had heard"
    await asyncio.sleep(DISCARD_AFTER + 1.0)
    assert await rows(postgres_url, job_id) == 0, "a heard outcome's row stayed"


async def test_an_outcome_too_long_for_a_notification_is_read_from_its_row(queue: JobQueue, postgres_url: str) -> None:
    value = "x" * (PAYLOAD_MAX + 1000)
    job_id, result = await asyncio.wait_for(outcome_of(queue, postgres_url, True, value), 5)
    assert result == value
    assert await rows(postgres_url, job_id) == 0


async def test_a_failed_job_heard_in_its_notification_fails_its_waiter(queue: JobQueue, postgres_url: str) -> None:
    with pytest.raises(JobFailed, match="the pool is full"):
        await asyncio.wait_for(outcome_of(queue, postgres_url, False, "the pool is full"), 5)


async def test_an_outcome_heard_before_its_autocommitted_defer_returned_reaches_its_waiter(postgres_url: str) -> None:
    """An autocommitted defer (RemoteNode.call) commits the job with its statement: a node can finish it, and a
    busy API process read the outcome's notification, before the defer's answer, when nobody waits for the job
    yet. The waiter registered after it must still have it at once, not at the next poll."""
    queue = JobQueue(postgres_url, SecretBox(None), poll=5.0)
    await queue.start()
    db = Database(postgres_url, 2)
    try:
        async with db.autocommit() as session:  # this database's next job id (nothing else defers in it)
            upcoming = int(await session.scalar(text("SELECT nextval('procrastinate_jobs_id_seq')"))) + 1
        await node_ends(postgres_url, upcoming, True, queue.codec.encode({"free": 3}))
        await asyncio.sleep(0.3)  # heard, with no waiter
        async with db.autocommit() as session:
            job_id = await queue.defer(session, "test", None, "capacity", (), "req-early", deadline_s=10)
        assert job_id == upcoming
        started = asyncio.get_running_loop().time()
        assert await queue.wait(job_id, 10) == {"free": 3}
        assert asyncio.get_running_loop().time() - started < 1.0, "the waiter waited for the poll"
    finally:
        async with db.autocommit() as session:
            await session.execute(text("DELETE FROM procrastinate_jobs WHERE queue_name = 'node.test'"))
        await queue.close()
        await db.dispose()


async def test_the_node_pool_replaces_a_connection_whose_backend_ended_when_it_hands_it_out(
    postgres_url: str,
) -> None:
    """A live connection is handed out without a check's round trip; one whose server ended it is noticed (its
    goodbye waits on the socket) and replaced before it is used, not failed in a job's query."""
    pool = job_pool(conninfo=asyncpg_dsn(postgres_url), min_size=1, max_size=1, open=False)
    await pool.open(wait=True)
    try:
        async with pool.connection() as connection:
            assert connection.autocommit
            pid = connection.info.backend_pid
        admin = await asyncpg.connect(asyncpg_dsn(postgres_url))
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        await asyncio.sleep(0.3)
        async with pool.connection() as connection:
            cursor = await connection.execute("SELECT 1")
            assert await cursor.fetchone() == (1,)
            assert connection.info.backend_pid != pid
    finally:
        await pool.close()
