"""What a storage-node job costs PostgreSQL itself: the database server's CPU for each statement of one job's life
(SPEC 10), one job after the other, each statement on the connection of the side that sends it.

A job of remote mode is: the API tier's defer (app/queue.py), procrastinate's fetch on the node, the node's end of
the job (procrastinate's finish, the outcome and its notification in one statement: app/queue.py
FINISH_RECORD_AND_WAKE), and the API tier's removal of the outcome's row
(batched in the server: one statement for many jobs; here one per job, the upper bound). Each statement is sent as
its side sends it (asyncpg for the API tier, psycopg for the node) and timed by the PostgreSQL backend's own CPU
time (`/proc/<backend pid>/schedstat`), so this needs PostgreSQL on this host. The numbers behind "what limits
remote mode" in benchmarks/README.md.

    python -m benchmarks.queue_cost --jobs 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import asyncpg
import psycopg
from procrastinate.manager import get_channel_for_queues

from app.db.locks import asyncpg_dsn
from app.queue import _DEFER, _DISCARD, CHANNEL, FINISH_RECORD_AND_WAKE, RESULT_TTL, TASK, queue_of
from benchmarks.processes import DATABASE, bench_env, fresh_db

NODE = "bench-node"
FETCH = "SELECT id FROM procrastinate_fetch_job_v2(%(queues)s::varchar[], %(worker_id)s)"
T = TypeVar("T")


def backend_cpu_ns(pid: int) -> int:
    """The backend's time on a CPU so far, in nanoseconds (the first field of schedstat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


async def main(jobs: int) -> None:
    fresh_db(bench_env())
    dsn = asyncpg_dsn(DATABASE)
    api = await asyncpg.connect(dsn)
    node = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    api_pid = int(await api.fetchval("SELECT pg_backend_pid()"))
    node_pid = int((await (await node.execute("SELECT pg_backend_pid()")).fetchone())[0])  # type: ignore[index]
    worker = (await (await node.execute("SELECT procrastinate_register_worker_v1()")).fetchone())[0]  # type: ignore[index]
    queue = queue_of(NODE)
    (channel,) = get_channel_for_queues([queue])
    spent: dict[str, int] = {}

    async def timed(name: str, pid: int, statement: Awaitable[T], measured: bool) -> T:
        before = backend_cpu_ns(pid)
        result = await statement
        if measured:
            spent[name] = spent.get(name, 0) + backend_cpu_ns(pid) - before
        return result

    for n in range(jobs + jobs // 10):
        measured = n >= jobs // 10  # the first tenth warms the plans and caches
        await timed("SELECT 1, for scale (API)", api_pid, api.fetchval("SELECT 1"), measured)
        payload = json.dumps({"job": {"op": "connect", "args": [], "request_id": "-", "deadline": None}})
        args = _DEFER.args({"queue": queue, "task": TASK, "lock": f"volume-{n % 10}", "args": payload})
        await timed("defer (API)", api_pid, api.fetchval(_DEFER.sql, *args), measured)
        fetch = node.execute(FETCH, {"queues": [queue], "worker_id": worker})
        row = await (await timed("fetch (node, procrastinate)", node_pid, fetch, measured)).fetchone()
        assert row is not None, "the job just deferred was not fetched"
        job_id = int(row[0])
        outcome = json.dumps({"value": None})
        values = {"job_id": job_id, "ok": True, "result": outcome, "done": CHANNEL, "payload": f"{job_id} 1 {outcome}"}
        values |= {"prune": False, "ttl": RESULT_TTL, "channel": channel, "message": '{"type": "job_inserted"}'}
        values |= {"status": "succeeded", "delete_job": True}
        end = node.execute(FINISH_RECORD_AND_WAKE, {**values, "queue": queue})
        await timed("finish + outcome + notify (node)", node_pid, end, measured)
        await timed("outcome row removed (API)", api_pid, api.execute(_DISCARD, [job_id]), measured)
    await api.close()
    await node.close()
    print("| statement | PostgreSQL CPU µs per job |\n|---|---|")
    for name, total in spent.items():
        print(f"| {name} | {total / jobs / 1000:.0f} |")
    life = sum(total for name, total in spent.items() if "for scale" not in name)
    print(f"| **a job's life** | **{life / jobs / 1000:.0f}** |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000)
    asyncio.run(main(parser.parse_args().jobs))
