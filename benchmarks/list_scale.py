"""List latency against table size: GET /attachments?limit=100 and ?volume_id=… with 1k, 10k, 100k rows.

Seeds one project's volumes and attachments straight into PostgreSQL (COPY), then times the requests
against a running server and prints PostgreSQL's plan for each query, so the indexes used are on record.

    python benchmarks/list_scale.py --base http://127.0.0.1:18776 --db postgresql://postgres@127.0.0.1/tether_bench
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from benchmarks.attach_cycle import percentile
from benchmarks.wire import Connection


async def seed(db: str, project: str, attachments: int, per_volume: int = 10) -> str:
    """`attachments` rows over attachments/per_volume volumes; returns one volume id to filter on."""
    connection = await asyncpg.connect(db)
    try:
        type_id = await connection.fetchval("SELECT id FROM volume_types WHERE name = '__DEFAULT__'")
        now = datetime.now(UTC)
        volumes = [str(uuid.uuid4()) for _ in range(max(1, attachments // per_volume))]
        await connection.copy_records_to_table(
            "volumes",
            records=[
                (v, project, "bench", 1, "in-use", "attached", "nova", type_id, True, False, now) for v in volumes
            ],
            columns=[
                "id",
                "project_id",
                "user_id",
                "size",
                "status",
                "attach_status",
                "availability_zone",
                "volume_type_id",
                "multiattach",
                "bootable",
                "created_at",
            ],
        )
        rows = []
        for i in range(attachments):
            created = now - timedelta(microseconds=i)
            rows.append(
                (str(uuid.uuid4()), volumes[i % len(volumes)], project, str(uuid.uuid4()), "rw", "attached", created)
            )
        await connection.copy_records_to_table(
            "attachments",
            records=rows,
            columns=["id", "volume_id", "project_id", "instance_uuid", "attach_mode", "attach_status", "created_at"],
        )
        await connection.execute("ANALYZE attachments; ANALYZE volumes")
        return volumes[len(volumes) // 2]
    finally:
        await connection.close()


async def plans(db: str, project: str, volume_id: str) -> dict[str, str]:
    connection = await asyncpg.connect(db)
    try:
        page = await connection.fetch(
            "EXPLAIN SELECT * FROM attachments WHERE project_id = $1 ORDER BY created_at DESC, id DESC LIMIT 100",
            project,
        )
        by_volume = await connection.fetch(
            "EXPLAIN SELECT * FROM attachments WHERE project_id = $1 AND volume_id = $2 "
            "ORDER BY created_at DESC, id DESC LIMIT 1000",
            project,
            volume_id,
        )
        return {"page": "\n".join(r[0] for r in page), "by_volume": "\n".join(r[0] for r in by_volume)}
    finally:
        await connection.close()


async def timed(client: Connection, path: str, repeat: int) -> dict[str, float]:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        status, _body = await client.request("GET", path)
        samples.append(time.perf_counter() - started)
        if status != 200:
            raise RuntimeError(f"GET {path} answered {status}")
    return {"p50_ms": round(1000 * percentile(samples, 0.5), 2), "p95_ms": round(1000 * percentile(samples, 0.95), 2)}


async def main(base: str, db: str, sizes: list[int], repeat: int) -> None:
    for size in sizes:
        project = f"scale{size}x{uuid.uuid4().hex[:6]}"
        volume_id = await seed(db, project, size)
        headers = {"X-Auth-Token": f"bench:{project}", "OpenStack-API-Version": "volume 3.71"}
        client = Connection(base, headers)
        await client.request("GET", f"/v3/{project}/attachments?limit=100")  # warm
        page = await timed(client, f"/v3/{project}/attachments?limit=100", repeat)
        by_volume = await timed(client, f"/v3/{project}/attachments?volume_id={volume_id}", repeat)
        await client.close()
        explained = await plans(db, project, volume_id)
        print(json.dumps({"attachments": size, "limit_100": page, "volume_id_filter": by_volume}))
        for name, plan in explained.items():
            print(f"  plan {name}: " + plan.replace("\n", "\n    "))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="http://127.0.0.1:8776")
    parser.add_argument("--db", default="postgresql://postgres@127.0.0.1:5432/tether_bench")
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.base, args.db, [int(s) for s in args.sizes.split(",")], args.repeat))
