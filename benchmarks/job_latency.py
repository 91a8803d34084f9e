"""Job latency through the storage-node queue (SPEC 10): enqueue -> result of a trivial storage operation.

Starts a fresh PostgreSQL database `tether_bench` and one real `tether node` (TETHER_NODES=remote, fake backend,
TETHER_BACKEND_WORKERS=4: procrastinate runs up to 4 jobs at once), then, in this process, does what an API
worker does for every storage call: `RemoteNode.call` (app/services/nodes.py) defers the job with
app.queue.JobQueue in an autocommitted statement (procrastinate_defer_jobs_v1), waits for the node's outcome
(LISTEN tether_job_done, polling every second as a fallback) and takes the result row. One job = one
`capacity` (or `--op exports`) on the fake backend, so the time is the queue's, not the storage's. Sequential
(1 caller) and with concurrent callers, each calling one job after the other, the jobs of each caller on one
volume (procrastinate's lock = the volume id, as the API defers them), then again without a lock; p50/p99 of
enqueue -> result, jobs/s, how many took 0.4 s or more (a poll found them, not a notification), and CPU per
job of this process (the API side) and of the node.

    python -m benchmarks.job_latency --jobs 400 --concurrency 1 4 16

Needs PostgreSQL at 127.0.0.1:5432 (trust).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.attach_cycle import percentile, process_tree_cpu
from benchmarks.processes import DATABASE, bench_env, fresh_db, start_node, stop

NODE = "bench-node"
# a job this slow waited for a poll (the node's every 0.5 s, the API's every second), not for a notification
SLOW = 0.4


async def measure(op: str, jobs: int, concurrency: int, node_pid: int, locked: bool) -> dict[str, object]:
    from app.db.engine import Database
    from app.queue import JobQueue
    from app.secrets import SecretBox
    from app.services.nodes import RemoteNode

    db = Database(DATABASE, pool_size=max(4, concurrency))
    queue = JobQueue(DATABASE, SecretBox(None))
    await queue.start()
    node = RemoteNode(NODE, db, queue, timeout=60)
    latencies: list[float] = []
    slow = 0

    async def caller(count: int) -> None:
        nonlocal slow
        # locked: each caller's jobs are one volume's, as the API's (procrastinate's lock = the volume id)
        key = str(uuid.uuid4()) if locked else None
        for _ in range(count):
            started = time.perf_counter()
            await node.call(key, op, ())
            elapsed = time.perf_counter() - started
            latencies.append(elapsed)
            slow += elapsed >= SLOW

    try:
        await caller(20)  # warm-up: connections, prepared statements
        latencies.clear()
        slow = 0
        each = max(1, jobs // concurrency)
        node_from, cpu_from, wall_from = process_tree_cpu(node_pid), time.process_time(), time.perf_counter()
        await asyncio.gather(*(caller(each) for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - wall_from, time.process_time() - cpu_from
        node_cpu = process_tree_cpu(node_pid) - node_from
    finally:
        await queue.close()
        await db.dispose()
    done = len(latencies)
    return {
        "op": op,
        "lock": "one volume per caller" if locked else "none",
        "concurrency": concurrency,
        "jobs": done,
        "jobs_per_s": round(done / wall, 1),
        "p50_ms": round(1000 * percentile(latencies, 0.50), 2),
        "p90_ms": round(1000 * percentile(latencies, 0.90), 2),
        "p99_ms": round(1000 * percentile(latencies, 0.99), 2),
        "max_ms": round(1000 * max(latencies), 2),
        "mean_ms": round(1000 * statistics.fmean(latencies), 2),
        "over_0.4s": slow,
        "api_side_cpu_ms_per_job": round(1000 * cpu / done, 3),
        "node_cpu_ms_per_job": round(1000 * node_cpu / done, 3),
    }


async def round_trip(samples: int = 400) -> dict[str, object]:
    """One `SELECT 1` on an open asyncpg connection: the floor under every job's several round trips."""
    import asyncpg

    connection = await asyncpg.connect(DATABASE.replace("+asyncpg", ""))
    try:
        times = []
        for _ in range(samples):
            started = time.perf_counter()
            await connection.fetchval("SELECT 1")
            times.append(time.perf_counter() - started)
    finally:
        await connection.close()
    return {"select_1_p50_ms": round(1000 * percentile(times, 0.5), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=400, help="jobs per measurement (split over the callers)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--op", default="capacity", choices=["capacity", "exports"])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    env = bench_env(TETHER_NODES="remote", TETHER_NODE_NAME=NODE, TETHER_BACKEND_WORKERS="4")
    fresh_db(env)
    print(json.dumps({"machine": os.uname().nodename, "cpus": os.cpu_count(), "load": os.getloadavg()}), flush=True)
    with tempfile.TemporaryDirectory(prefix="tether-job-latency-") as tmp:
        node = start_node(env, Path(tmp) / "node.log")
        try:
            print(json.dumps(asyncio.run(round_trip())), flush=True)
            for round_ in range(1, args.rounds + 1):
                for locked in (True, False):
                    for concurrency in args.concurrency:
                        result = asyncio.run(measure(args.op, args.jobs, concurrency, node.pid, locked))
                        print(json.dumps({"round": round_, **result}), flush=True)
        finally:
            stop(node)
            if node.returncode not in (0, None):
                print(f"tether node exited {node.returncode}", file=sys.stderr)


if __name__ == "__main__":
    main()
