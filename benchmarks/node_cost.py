"""What the storage-node queue costs the attach cycle: embedded and remote mode (one `tether node`), alternately,
in one run.

For each round, in ABBA order, a fresh PostgreSQL database `tether_bench` and:
- embedded: `tether serve` with the in-process node (the fake backend's calls run in its thread pool);
- remote: one `tether node` (fake backend, TETHER_BACKEND_WORKERS=4) and `tether serve` in TETHER_NODES=remote
  in front of it: every storage call is a procrastinate job the API worker defers and waits for.
Then benchmarks/attach_cycle.py from its own process against each (the same driver, clients and database). A
cycle is create-with-connector -> os-complete -> delete: two storage calls (connect, disconnect), so in remote
mode two jobs. The fake backend makes the numbers the engine's cost, not tgtadm's. Reports the API's CPU per
request and, in remote mode, the node's (`node_cpu_ms_per_request`).

    python -m benchmarks.node_cost --clients 1 8 --seconds 6 --rounds 4

Needs PostgreSQL at 127.0.0.1:5432 (trust).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from benchmarks.processes import bench_env, drive, fresh_db, serve, start_node, stop

NODE = "bench-node"


def run_mode(mode: str, clients: list[int], seconds: float, workers: int, tmp: Path) -> list[dict[str, object]]:
    embedded = bench_env()
    remote = bench_env(TETHER_NODES="remote")
    fresh_db(embedded)
    node = None
    if mode == "remote":
        node = start_node({**remote, "TETHER_NODE_NAME": NODE, "TETHER_BACKEND_WORKERS": "4"}, tmp / "node.log")
    try:
        server = serve(remote if node else embedded, workers, tmp / "server.log")
        try:
            return [
                {"mode": mode, **drive(count, seconds, server.pid, node_pids=(node.pid,) if node else ())}
                for count in clients
            ]
        finally:
            stop(server)
    finally:
        if node is not None:
            stop(node)


def summarize(results: list[dict[str, object]], clients: list[int]) -> None:
    """The median over the rounds of each mode and client count, and remote's cycles/s as a share of embedded's."""
    medians: dict[tuple[str, int], float] = {}
    for count in clients:
        for mode in ("embedded", "remote"):
            runs = [r for r in results if r["mode"] == mode and r["clients"] == count]
            line: dict[str, object] = {"summary": mode, "clients": count, "rounds": len(runs)}
            for key in (
                "cycles_per_s",
                "p50_ms",
                "p99_ms",
                "server_cpu_ms_per_request",
                "node_cpu_ms_per_request",
                "postgres_cpu_ms_per_request",
                "driver_cpu_ms_per_request",
            ):
                values = [float(str(r[key])) for r in runs if r.get(key) is not None]
                if values:
                    line[key] = round(statistics.median(values), 2)
            line["cycles_per_s_range"] = [
                min(float(str(r["cycles_per_s"])) for r in runs),
                max(float(str(r["cycles_per_s"])) for r in runs),
            ]
            medians[(mode, count)] = float(str(line["cycles_per_s"]))
            print(json.dumps(line))
        ratio = medians[("remote", count)] / medians[("embedded", count)]
        print(json.dumps({"summary": "remote/embedded", "clients": count, "cycles_per_s_ratio": round(ratio, 2)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1, help="API processes (`tether serve --workers`)")
    args = parser.parse_args()

    print(json.dumps({"machine": os.uname().nodename, "cpus": os.cpu_count(), "load": os.getloadavg()}), flush=True)
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="tether-node-cost-") as tmp:
        for round_ in range(1, args.rounds + 1):
            # ABBA: this machine's speed drifts, so neither mode always runs first
            modes = ["embedded", "remote"] if round_ % 2 else ["remote", "embedded"]
            for mode in modes:
                for result in run_mode(mode, args.clients, args.seconds, args.workers, Path(tmp)):
                    results.append({"round": round_, **result})
                    print(json.dumps(results[-1]), flush=True)
    summarize(results, args.clients)
    print(json.dumps({"load_after": os.getloadavg()}))


if __name__ == "__main__":
    main()
