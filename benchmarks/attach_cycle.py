"""Attach-cycle load driver: POST /attachments (with a connector) -> os-complete -> DELETE, over and over.

Runs in its own process against a running Tether (start one with benchmarks/run_server.py or `tether serve`).
Each client owns one volume and cycles it, so clients never contend for a volume; the numbers are the
server's cost per cycle, not lock waits. Prints one JSON line per run.

    python benchmarks/attach_cycle.py --base http://127.0.0.1:8776 --clients 8 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid

import httpx

HEADERS = {"OpenStack-API-Version": "volume 3.71"}


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def make_volume(client: httpx.AsyncClient, project: str) -> str:
    created = await client.post(f"/v3/{project}/volumes", json={"volume": {"size": 1}})
    created.raise_for_status()
    volume_id: str = created.json()["volume"]["id"]
    for _ in range(500):
        shown = await client.get(f"/v3/{project}/volumes/{volume_id}")
        if shown.json()["volume"]["status"] == "available":
            return volume_id
        await asyncio.sleep(0.01)
    raise RuntimeError(f"volume {volume_id} never became available")


async def run(base: str, clients: int, seconds: float, warmup: float) -> dict[str, object]:
    project = f"bench{uuid.uuid4().hex[:8]}"
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    headers = {**HEADERS, "X-Auth-Token": f"bench:{project}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=60) as client:
        volumes = [await make_volume(client, project) for _ in range(clients)]
        latencies: dict[str, list[float]] = {"create": [], "complete": [], "delete": []}
        errors: list[int] = []
        cycles = 0
        measuring = False
        stop_at = time.perf_counter() + warmup + seconds

        async def timed(kind: str, call: object) -> httpx.Response:
            started = time.perf_counter()
            response: httpx.Response = await call  # type: ignore[misc]
            if measuring:
                latencies[kind].append(time.perf_counter() - started)
            if response.status_code >= 300:
                errors.append(response.status_code)
            return response

        async def worker(n: int, volume_id: str) -> None:
            nonlocal cycles
            connector = {"initiator": f"iqn.2004-10.org.bench:client-{n}", "host": f"bench-{n}", "ip": "127.0.0.1"}
            body = {"attachment": {"volume_uuid": volume_id, "connector": connector}}
            while time.perf_counter() < stop_at:
                created = await timed("create", client.post(f"/v3/{project}/attachments", json=body))
                if created.status_code != 200:
                    await asyncio.sleep(0.01)
                    continue
                attachment_id = created.json()["attachment"]["id"]
                await timed(
                    "complete",
                    client.post(f"/v3/{project}/attachments/{attachment_id}/action", json={"os-complete": None}),
                )
                await timed("delete", client.delete(f"/v3/{project}/attachments/{attachment_id}"))
                if measuring:
                    cycles += 1

        tasks = [asyncio.create_task(worker(n, v)) for n, v in enumerate(volumes)]
        await asyncio.sleep(warmup)
        measuring = True
        measured_from = time.perf_counter()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - measured_from

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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="http://127.0.0.1:8776")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=2)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.base, args.clients, args.seconds, args.warmup))))


if __name__ == "__main__":
    main()
