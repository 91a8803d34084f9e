"""Attach-cycle load driver: POST /attachments (with a connector) -> os-complete -> DELETE, over and over.

Runs in its own process against a running Tether (`tether serve`). Each client owns one volume and one
keep-alive connection (benchmarks/wire.py: httpx's pool was the bottleneck) and cycles its volume, so
clients never contend for a volume; the numbers are the server's cost per cycle, not lock waits. Prints
one JSON line per run, with the driver's own CPU per request so a saturated driver is visible.

    python benchmarks/attach_cycle.py --base http://127.0.0.1:8776 --clients 8 --seconds 10

Against a keystone-mode server, `--token <a Keystone token> --project <its project id>` (benchmarks/auth_cost.py);
against an API tier in remote mode, `--node-pid <pid>` (repeatable) adds the storage nodes' CPU per request
(benchmarks/node_cost.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import time
import uuid
from pathlib import Path

import uvloop

from benchmarks.wire import Connection

HEADERS = {"OpenStack-API-Version": "volume 3.71"}


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by `pid` and all its descendants (the server's workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, (ppid, _cpu) in stats.items() if ppid == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(stats[p][1] for p in tree if p in stats)


def postmaster_pid() -> int | None:
    """The local PostgreSQL's postmaster (its processes' CPU counts as the database's), when this host runs one."""
    for pid_file in sorted(Path("/var/run/postgresql").glob("*.pid")):
        with contextlib.suppress(OSError, ValueError):
            return int(pid_file.read_text().split()[0])
    return None


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def make_volume(client: Connection, project: str) -> str:
    status, created = await client.request("POST", f"/v3/{project}/volumes", {"volume": {"size": 1}})
    if status != 202:
        raise RuntimeError(f"volume create answered {status}: {created}")
    volume_id: str = created["volume"]["id"]
    for _ in range(500):
        _, shown = await client.request("GET", f"/v3/{project}/volumes/{volume_id}")
        if shown["volume"]["status"] == "available":
            return volume_id
        await asyncio.sleep(0.01)
    raise RuntimeError(f"volume {volume_id} never became available")


async def run(
    base: str,
    clients: int,
    seconds: float,
    warmup: float,
    server_pid: int | None,
    token: str | None = None,
    project: str | None = None,
    node_pids: tuple[int, ...] = (),
) -> dict[str, object]:
    # noauth: a project of its own; keystone: the token's project
    project = project or f"bench{uuid.uuid4().hex[:8]}"
    headers = {**HEADERS, "X-Auth-Token": token or f"bench:{project}"}
    connections = [Connection(base, headers) for _ in range(clients)]
    volumes = [await make_volume(connections[0], project) for _ in range(clients)]
    latencies: dict[str, list[float]] = {"create": [], "complete": [], "delete": []}
    errors: list[int] = []
    cycles = 0
    measuring = False
    stop_at = time.perf_counter() + warmup + seconds

    async def timed(kind: str, client: Connection, method: str, path: str, body: object = None) -> object:
        started = time.perf_counter()
        status, answer = await client.request(method, path, body)
        if measuring:
            latencies[kind].append(time.perf_counter() - started)
        if status >= 300:
            errors.append(status)
            return None
        return answer

    async def worker(n: int, volume_id: str) -> None:
        nonlocal cycles
        client = connections[n]
        connector = {"initiator": f"iqn.2004-10.org.bench:client-{n}", "host": f"bench-{n}", "ip": "127.0.0.1"}
        body = {"attachment": {"volume_uuid": volume_id, "connector": connector}}
        while time.perf_counter() < stop_at:
            created = await timed("create", client, "POST", f"/v3/{project}/attachments", body)
            if not isinstance(created, dict):
                await asyncio.sleep(0.01)
                continue
            attachment = f"/v3/{project}/attachments/{created['attachment']['id']}"
            await timed("complete", client, "POST", f"{attachment}/action", {"os-complete": None})
            await timed("delete", client, "DELETE", attachment)
            if measuring:
                cycles += 1

    tasks = [asyncio.create_task(worker(n, v)) for n, v in enumerate(volumes)]
    await asyncio.sleep(warmup)
    measuring = True
    measured_from, cpu_from = time.perf_counter(), time.process_time()
    server_from = process_tree_cpu(server_pid) if server_pid else 0.0
    nodes_from = sum(process_tree_cpu(pid) for pid in node_pids)
    postgres = postmaster_pid()
    postgres_from = process_tree_cpu(postgres) if postgres else 0.0
    await asyncio.gather(*tasks)
    elapsed, driver_cpu = time.perf_counter() - measured_from, time.process_time() - cpu_from
    server_cpu = process_tree_cpu(server_pid) - server_from if server_pid else None
    nodes_cpu = sum(process_tree_cpu(pid) for pid in node_pids) - nodes_from
    postgres_cpu = process_tree_cpu(postgres) - postgres_from if postgres else None
    for connection in connections:
        await connection.close()

    every = [x for values in latencies.values() for x in values]
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "cycles": cycles,
        "cycles_per_s": round(cycles / elapsed, 1),
        "errors": len(errors),
        "p50_ms": round(1000 * percentile(every, 0.50), 2),
        "p95_ms": round(1000 * percentile(every, 0.95), 2),
        "p99_ms": round(1000 * percentile(every, 0.99), 2),
        "per_request_p99_ms": {k: round(1000 * percentile(v, 0.99), 2) for k, v in latencies.items()},
        "mean_ms": round(1000 * statistics.fmean(every), 2) if every else None,
        "driver_cpu_ms_per_request": round(1000 * driver_cpu / len(every), 3) if every else None,
        # the tasks finish their last cycle after the window: this slightly overstates the server's CPU per request
        "server_cpu_ms_per_request": round(1000 * server_cpu / len(every), 2) if every and server_cpu else None,
        # remote mode: the storage nodes' CPU (their job handling), beside the API tier's
        **(
            {"node_cpu_ms_per_request": round(1000 * nodes_cpu / len(every), 2) if every else None} if node_pids else {}
        ),
        # the local PostgreSQL's processes (all its databases: run nothing else meanwhile)
        "postgres_cpu_ms_per_request": round(1000 * postgres_cpu / len(every), 2) if every and postgres_cpu else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="http://127.0.0.1:8776")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--server-pid", type=int, help="the server's PID: report its CPU per request")
    parser.add_argument(
        "--node-pid", type=int, action="append", default=[], help="a `tether node` PID: report the nodes' CPU too"
    )
    parser.add_argument("--token", help="a Keystone token (keystone mode); default: noauth's bench:<project>")
    parser.add_argument("--project", help="the token's project id (with --token)")
    args = parser.parse_args()
    if bool(args.token) != bool(args.project):
        parser.error("--token and --project go together")
    result = run(
        args.base,
        args.clients,
        args.seconds,
        args.warmup,
        args.server_pid,
        args.token,
        args.project,
        tuple(args.node_pid),
    )
    print(json.dumps(uvloop.run(result)))


if __name__ == "__main__":
    main()
