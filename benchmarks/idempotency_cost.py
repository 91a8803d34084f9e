"""What an Idempotency-Key costs: a replayed request next to a fresh one, with and without a key.

One client on one keep-alive connection (benchmarks/wire.py) against a running `tether serve`, sequentially, so
each number is one request's own latency and the server's CPU for it. Six kinds of request, measured in phases
of `--requests` each and alternated over `--rounds` (this machine's speed drifts):

- volume create (POST /volumes, 202): without a key, with a new key each time, and a replay of one answered key;
- attachment create with a connector (POST /attachments, 200: reserve, export, ACL): the same three. The fresh
  ones each use a volume made beforehand (outside the measured window) and detached afterwards.

    python -m benchmarks.idempotency_cost --base http://127.0.0.1:8776 --server-pid <pid>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

from benchmarks.attach_cycle import HEADERS, make_volume, percentile, process_tree_cpu
from benchmarks.wire import Connection

KEY = "Idempotency-Key"


def connector(n: int) -> dict[str, Any]:
    return {"initiator": f"iqn.2004-10.org.bench:idem-{n}", "host": f"idem-{n}", "ip": "127.0.0.1"}


class Bench:
    def __init__(self, base: str, server_pid: int | None) -> None:
        self.project = f"idem{uuid.uuid4().hex[:8]}"
        self.client = Connection(base, {**HEADERS, "X-Auth-Token": f"bench:{self.project}"})
        self.server_pid = server_pid
        self.results: dict[str, list[dict[str, float]]] = {}

    async def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        status, answer = await self.client.request(method, f"/v3/{self.project}{path}", body, headers)
        if status >= 300:
            raise RuntimeError(f"{method} {path} answered {status}: {answer}")
        return answer

    async def phase(self, kind: str, requests: list[Callable[[], Awaitable[Any]]]) -> None:
        latencies = []
        cpu_from = process_tree_cpu(self.server_pid) if self.server_pid else 0.0
        for send in requests:
            started = time.perf_counter()
            await send()
            latencies.append(time.perf_counter() - started)
        cpu = process_tree_cpu(self.server_pid) - cpu_from if self.server_pid else float("nan")
        self.results.setdefault(kind, []).append(
            {
                "p50_ms": 1000 * percentile(latencies, 0.5),
                "p99_ms": 1000 * percentile(latencies, 0.99),
                "mean_ms": 1000 * statistics.fmean(latencies),
                "server_cpu_ms": 1000 * cpu / len(latencies),
            }
        )

    async def volumes(self, count: int) -> list[str]:
        return [await make_volume(self.client, self.project) for _ in range(count)]

    async def detach_all(self, attachments: list[str]) -> None:
        for attachment_id in attachments:
            await self.call("DELETE", f"/attachments/{attachment_id}")

    async def round(self, n: int) -> None:
        volume = {"volume": {"size": 1, "name": "bench"}}
        replayed_volume_key = str(uuid.uuid4())
        await self.call("POST", "/volumes", volume, {KEY: replayed_volume_key})

        def create_volume(headers: dict[str, str] | None) -> Callable[[], Awaitable[Any]]:
            return lambda: self.call("POST", "/volumes", volume, headers)

        await self.phase("volume: fresh, no key", [create_volume(None) for _ in range(n)])
        await self.phase("volume: fresh, new key", [create_volume({KEY: str(uuid.uuid4())}) for _ in range(n)])
        await self.phase("volume: replay", [create_volume({KEY: replayed_volume_key}) for _ in range(n)])
        await asyncio.sleep(0.5)  # the background creates finish before the attachments are measured

        replayed_key = str(uuid.uuid4())
        (replayed_on,) = await self.volumes(1)
        replayed_body = {"attachment": {"volume_uuid": replayed_on, "connector": connector(0)}}
        replayed = (await self.call("POST", "/attachments", replayed_body, {KEY: replayed_key}))["attachment"]["id"]
        for kind, keyed in (("attachment: fresh, no key", False), ("attachment: fresh, new key", True)):
            made: list[str] = []

            def attach(volume_id: str, i: int, keyed: bool = keyed, made: list[str] = made) -> Any:
                async def send() -> None:
                    body = {"attachment": {"volume_uuid": volume_id, "connector": connector(i)}}
                    answer = await self.call("POST", "/attachments", body, {KEY: str(uuid.uuid4())} if keyed else None)
                    made.append(answer["attachment"]["id"])

                return send

            targets = await self.volumes(n)
            await self.phase(kind, [attach(v, i) for i, v in enumerate(targets)])
            await self.detach_all(made)
        await self.phase(
            "attachment: replay",
            [lambda: self.call("POST", "/attachments", replayed_body, {KEY: replayed_key}) for _ in range(n)],
        )
        await self.detach_all([replayed])

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            kind: {metric: round(statistics.median(r[metric] for r in rounds), 3) for metric in rounds[0]}
            for kind, rounds in self.results.items()
        }


async def run(base: str, requests: int, rounds: int, server_pid: int | None) -> dict[str, Any]:
    bench = Bench(base, server_pid)
    await bench.round(max(10, requests // 10))  # warm-up, not counted
    bench.results.clear()
    for _ in range(rounds):
        await bench.round(requests)
    await bench.client.close()
    return {"requests_per_phase": requests, "rounds": rounds, "median_of_rounds": bench.summary()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="http://127.0.0.1:8776")
    parser.add_argument("--requests", type=int, default=200, help="requests per phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server-pid", type=int, help="the server's PID: report its CPU per request")
    args = parser.parse_args()
    print(json.dumps(uvloop.run(run(args.base, args.requests, args.rounds, args.server_pid)), indent=1))


if __name__ == "__main__":
    main()
