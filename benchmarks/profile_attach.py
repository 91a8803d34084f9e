"""Where the time goes: pyinstrument over the attach cycle at concurrency 8, in one process.

The app runs in-process behind httpx's ASGI transport against PostgreSQL with the fake backend, so the
profile holds only Tether's own work (routing, validation, SQL, state machine), none of a load generator's.
Prints cycles/s, CPU ms per request, SQL statements per cycle, and pyinstrument's text tree.

    python -m benchmarks.profile_attach --db postgresql+asyncpg://postgres@127.0.0.1:5432/tether_bench
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import httpx
from pyinstrument import Profiler
from sqlalchemy import event

from app.config import Settings
from app.main import create_app


async def cycles(client: httpx.AsyncClient, project: str, volume_id: str, n: int, worker: int) -> None:
    connector = {"initiator": f"iqn.2004-10.org.bench:profile-{worker}", "host": f"p{worker}"}
    body = {"attachment": {"volume_uuid": volume_id, "connector": connector}}
    for _ in range(n):
        created = await client.post(f"/v3/{project}/attachments", json=body)
        attachment_id = created.json()["attachment"]["id"]
        await client.post(f"/v3/{project}/attachments/{attachment_id}/action", json={"os-complete": None})
        await client.delete(f"/v3/{project}/attachments/{attachment_id}")


async def main(db: str, clients: int, per_client: int, profile: bool) -> None:
    settings = Settings(_env_file=None, database_url=db, reconcile_on_start=False, log_level="WARNING")  # type: ignore[call-arg]
    app = create_app(settings)
    statements = 0

    def count(*_args: Any) -> None:
        nonlocal statements
        statements += 1

    project = f"prof{uuid.uuid4().hex[:8]}"
    headers = {"X-Auth-Token": f"bench:{project}", "OpenStack-API-Version": "volume 3.71"}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", headers=headers) as client,
    ):
        event.listen(app.state.db.engine.sync_engine, "before_cursor_execute", count)
        volumes = []
        for _ in range(clients):
            volumes.append((await client.post(f"/v3/{project}/volumes", json={"volume": {"size": 1}})).json())
        await app.state.work.idle()
        await cycles(client, project, volumes[0]["volume"]["id"], 5, 0)  # warm caches
        statements = 0
        profiler = Profiler(async_mode="disabled") if profile else None
        if profiler:
            profiler.start()
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(
            *(cycles(client, project, v["volume"]["id"], per_client, i) for i, v in enumerate(volumes))
        )
        elapsed, cpu_used = time.perf_counter() - started, time.process_time() - cpu
        if profiler:
            profiler.stop()
    total = clients * per_client
    print(
        f"{total} cycles at concurrency {clients}: {total / elapsed:.1f} cycles/s, "
        f"{1000 * cpu_used / total / 3:.2f} ms CPU per request, {statements / total:.1f} SQL statements per cycle"
    )
    if profiler:
        print(profiler.output_text(unicode=False, color=False, show_all=False))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="postgresql+asyncpg://postgres@127.0.0.1:5432/tether_bench")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=50)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.db, args.clients, args.per_client, not args.no_profile))
