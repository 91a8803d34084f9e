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
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import psycopg
import pytest
from sqlalchemy import text

from app.db.engine import Database
from app.db.locks import asyncpg_dsn
from app.node import _End, job_pool
from app.queue import (
    CHANNEL,
    DISCARD_AFTER,
    FINISH_RECORD_AND_WAKE,
    PAYLOAD_MAX,
    RECORD_AND_WAKE,
    JobFailed,
    JobQueue,
    JobTimeout,
    notification,
)
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


def _end_args(job_id: int, ok: bool, result: Any) -> dict[str, Any]:
    """What a node sends when a job of queue node.test ends (the FINISH_ statements' arguments, which
    RECORD_AND_WAKE's are a part of)."""
    encoded = json.dumps(result)
    return {
        "job_id": job_id,
        "status": "succeeded",
        "delete_job": True,
        "ok": ok,
        "result": encoded,
        "done": CHANNEL,
        "payload": notification(job_id, ok, encoded),
        "prune": False,
        "ttl": 3600.0,
        "channel": "procrastinate_queue_v1#node.test",
        "message": json.dumps({"type": "job_inserted"}),
        "queue": "node.test",
    }


async def node_ends(url: str, job_id: int, ok: bool, result: Any) -> None:
    """What a node does when a job somebody waits for has ended and procrastinate recorded its end, on a
    connection like its pool's."""
    async with await psycopg.AsyncConnection.connect(asyncpg_dsn(url), autocommit=True) as connection:
        await connection.execute(RECORD_AND_WAKE, _end_args(job_id, ok, result))


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


async def _doing_and_waiting(db: Database) -> tuple[int, int]:
    """Two jobs of one volume on queue node.test: the first taken (`doing`), the second queued behind it."""
    defer = text(
        "SELECT unnest(procrastinate_defer_jobs_v1(ARRAY[ROW('node.test', 'tether.node_op', 0, 'vol-1', NULL,"
        " '{}'::jsonb, NULL)]::procrastinate_job_to_defer_v1[]))"
    )
    async with db.autocommit() as session:
        first = int(await session.scalar(defer))
        second = int(await session.scalar(defer))
        await session.execute(text("UPDATE procrastinate_jobs SET status = 'doing' WHERE id = :id"), {"id": first})
    return first, second


async def test_a_jobs_end_tells_its_caller_and_wakes_the_worker_in_the_statement_that_ends_it(
    queue: JobQueue, postgres_url: str
) -> None:
    """FINISH_RECORD_AND_WAKE, what a node sends when a job somebody waits for is over: procrastinate's end of the
    job (its row gone, the volume's job lock free), the outcome for the waiter, and the worker's wake-up for the
    job queued behind it, in one statement; when the end cannot be recorded (the job is no longer `doing`: the
    node settled it meanwhile) nothing of it is, and the node records the outcome on its own (RECORD_AND_WAKE)."""
    db = Database(postgres_url, 2)
    woken: list[str] = []
    listener = await asyncpg.connect(asyncpg_dsn(postgres_url))
    await listener.add_listener("procrastinate_queue_v1#node.test", lambda *heard: woken.append(heard[-1]))
    try:
        first, second = await _doing_and_waiting(db)
        waiting = asyncio.create_task(queue.wait(first, 10, node="test", op="capacity"))
        await asyncio.sleep(0.05)
        woken.clear()  # the defers' own notifications
        async with await psycopg.AsyncConnection.connect(asyncpg_dsn(postgres_url), autocommit=True) as connection:
            await connection.execute(FINISH_RECORD_AND_WAKE, _end_args(first, True, queue.codec.encode({"free": 7})))
            assert await waiting == {"free": 7}
            async with db.read() as session:
                left = (await session.execute(text("SELECT id, status FROM procrastinate_jobs ORDER BY id"))).all()
            assert [tuple(row) for row in left] == [(second, "todo")]
            await asyncio.sleep(0.1)
            assert woken == [json.dumps({"type": "job_inserted"})]

            # the same end again: the job is gone, so the statement fails and records no outcome either
            late = asyncio.create_task(queue.wait(first, 1.5, node="test", op="capacity"))
            with pytest.raises(psycopg.errors.RaiseException, match="not found"):
                await connection.execute(FINISH_RECORD_AND_WAKE, _end_args(first, False, "late"))
            with pytest.raises(JobTimeout):
                await late
            assert await rows(postgres_url, first) == 0
    finally:
        await listener.close()
        async with db.autocommit() as session:
            await session.execute(text("DELETE FROM procrastinate_jobs WHERE queue_name = 'node.test'"))
        await db.dispose()


async def test_a_job_whose_end_failed_to_record_still_tells_its_caller(queue: JobQueue, postgres_url: str) -> None:
    """The node's side of it (NodeAgent._finish, _job_ended) on a real procrastinate connector: procrastinate is
    told its end failed, as when its own statement fails, and the outcome reaches the caller by itself."""
    import procrastinate
    from procrastinate.exceptions import ConnectorException
    from procrastinate.jobs import Status

    from app.node import NodeAgent, finishing_manager
    from tests.conftest import make_settings

    agent = NodeAgent(make_settings(postgres_url, node_name="test"))
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=asyncpg_dsn(postgres_url)))
    manager = finishing_manager(app.connector, agent._finish)
    job_id = random.randrange(10**12, 10**13)  # no such job: procrastinate's end of it fails
    async with app.open_async():
        waiting = asyncio.create_task(queue.wait(job_id, 10, node="test", op="capacity"))
        agent._ends[job_id] = end = _End(told=(True, queue.codec.encode({"free": 9})), deadline=time.time() + 10)
        with pytest.raises(ConnectorException):
            await manager.finish_job(
                procrastinate.jobs.Job(
                    id=job_id, queue="node.test", lock=None, queueing_lock=None, task_name="tether.node_op"
                ),
                Status.SUCCEEDED,
                True,
            )
        assert agent._ends[job_id] is end  # not recorded: left for the job's task's end
        agent._job_ended(app, job_id)
        assert await waiting == {"free": 9}
        await asyncio.gather(*agent._wakes)


async def test_a_job_whose_transaction_rolled_back_leaves_no_waiter_and_the_next_job_is_heard(
    queue: JobQueue, postgres_url: str
) -> None:
    """A claim that fails after its job was deferred rolls the job back with it: nobody will wait for that job,
    and the process must not keep a waiter for it (one per failed claim, until the process ended)."""
    db = Database(postgres_url, 2)
    try:
        deferred: list[int] = []

        async def claim_failing_after_its_job() -> None:
            async with db.write() as session:
                deferred.append(await queue.defer(session, "test", None, "capacity", (), "req-rolled-back"))
                raise RuntimeError("the claim failed after its job")

        with pytest.raises(RuntimeError):
            await claim_failing_after_its_job()
        (rolled_back,) = deferred
        async with db.autocommit() as session:
            assert not await session.scalar(
                text("SELECT count(*) FROM procrastinate_jobs WHERE id = :id"), {"id": rolled_back}
            )
            job_id = await queue.defer(session, "test", None, "capacity", (), "req-kept", deadline_s=10)
        assert queue._waiters == {}, "a job deferred in a rolled-back transaction is still awaited"
        await node_ends(postgres_url, job_id, True, queue.codec.encode({"free": 5}))  # heard before its wait
        assert await asyncio.wait_for(queue.wait(job_id, 10), 0.9) == {"free": 5}
        assert queue._waiters == {}
    finally:
        async with db.autocommit() as session:
            await session.execute(text("DELETE FROM procrastinate_jobs WHERE queue_name = 'node.test'"))
        await db.dispose()
