"""The thread pool doing its job: 32 concurrent attaches on 32 volumes with every fake backend call slowed
to 200 ms and 4 workers, while another client keeps reading GET /volumes/{id}.

Expected: about 32/4 x 200 ms x (backend calls per attach = 2: create_export, add_initiator) = 3.2 s, not
32 x 400 ms = 12.8 s, and the reads stay fast because the event loop never blocks.
Start the server with TETHER_FAKE_DELAY=0.2 TETHER_BACKEND_WORKERS=4 (volume creation is slowed too).

    python benchmarks/thread_pool.py --base http://127.0.0.1:18776
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

from benchmarks.attach_cycle import make_volume, percentile
from benchmarks.wire import Connection


async def main(base: str, volumes: int) -> None:
    project = f"pool{uuid.uuid4().hex[:8]}"
    headers = {"X-Auth-Token": f"bench:{project}", "OpenStack-API-Version": "volume 3.71"}
    setup = Connection(base, headers)
    ids = [await make_volume(setup, project) for _ in range(volumes)]
    await setup.close()
    reads: list[float] = []
    done = asyncio.Event()

    async def reader() -> None:
        connection = Connection(base, headers)
        while not done.is_set():
            started = time.perf_counter()
            status, _body = await connection.request("GET", f"/v3/{project}/volumes/{ids[0]}")
            reads.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"GET answered {status}")
            await asyncio.sleep(0.005)
        await connection.close()

    async def attach(n: int, volume_id: str) -> int:
        connection = Connection(base, headers)
        connector = {"initiator": f"iqn.2004-10.org.bench:pool-{n}", "host": f"pool-{n}"}
        body = {"attachment": {"volume_uuid": volume_id, "connector": connector}}
        status, _body = await connection.request("POST", f"/v3/{project}/attachments", body)
        await connection.close()
        return status

    reading = asyncio.create_task(reader())
    await asyncio.sleep(0.5)  # the reader's baseline before the burst
    started = time.perf_counter()
    codes = await asyncio.gather(*(attach(n, v) for n, v in enumerate(ids)))
    elapsed = time.perf_counter() - started
    done.set()
    await reading
    print(
        json.dumps(
            {
                "attaches": volumes,
                "statuses": sorted(set(codes)),
                "wall_s": round(elapsed, 2),
                "reads": len(reads),
                "read_p50_ms": round(1000 * percentile(reads, 0.5), 2),
                "read_p99_ms": round(1000 * percentile(reads, 0.99), 2),
                "read_max_ms": round(1000 * max(reads), 2),
            }
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="http://127.0.0.1:8776")
    parser.add_argument("--volumes", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(main(args.base, args.volumes))
