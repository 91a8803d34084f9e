"""The attach cycle in one process: the app called as ASGI directly (no HTTP, no client library), PostgreSQL, the
fake backend. Prints cycles/s and the process's CPU per request; `benchmarks/instructions.sh` runs it under
valgrind to count the instructions a request costs, which, unlike time, does not drift with this virtual
machine's speed (±25% from one minute to the next), so two commits compare to a few percent.

    python -m benchmarks.in_process --cycles 40        # run from the checkout whose app/ is measured
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

import uvloop

# `python -m` puts the directory it runs in first: the app/ measured is that directory's (an earlier commit's, run
# by instructions.sh)
from app.config import Settings
from app.main import create_app


async def call(app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]], body: object = None) -> Any:
    """One request through the ASGI app: (status, the decoded JSON body or None)."""
    raw = json.dumps(body).encode() if body is not None else b""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench"), (b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    scope["headers"].append((b"content-length", str(len(raw)).encode()))
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.Event().wait()  # the client never goes away
        raise AssertionError

    status, chunks = 0, []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    data = b"".join(chunks)
    return status, json.loads(data) if data else None


async def main(db: str, clients: int, cycles: int, warmup: int) -> None:
    app = create_app(Settings(_env_file=None, database_url=db, reconcile_on_start=False, log_level="WARNING"))  # type: ignore[call-arg]
    project = f"inproc{uuid.uuid4().hex[:8]}"
    headers = [(b"x-auth-token", f"bench:{project}".encode()), (b"openstack-api-version", b"volume 3.71")]
    async with app.router.lifespan_context(app):
        volumes = []
        for _ in range(clients):
            _, created = await call(app, "POST", f"/v3/{project}/volumes", headers, {"volume": {"size": 1}})
            volumes.append(created["volume"]["id"])
        await app.state.work.idle()

        async def cycle(n: int, volume_id: str, count: int) -> None:
            connector = {"initiator": f"iqn.2004-10.org.bench:c-{n}", "host": f"bench-{n}", "ip": "127.0.0.1"}
            body = {"attachment": {"volume_uuid": volume_id, "connector": connector}}
            for _ in range(count):
                status, created = await call(app, "POST", f"/v3/{project}/attachments", headers, body)
                assert status == 200, (status, created)
                attachment = f"/v3/{project}/attachments/{created['attachment']['id']}"
                status, _ = await call(app, "POST", f"{attachment}/action", headers, {"os-complete": None})
                assert status == 204, status
                status, _ = await call(app, "DELETE", attachment, headers)
                assert status == 200, status

        await asyncio.gather(*(cycle(n, v, warmup) for n, v in enumerate(volumes)))
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(cycle(n, v, cycles) for n, v in enumerate(volumes)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    requests = 3 * clients * cycles
    print(f"{clients * cycles / elapsed:.1f} cycles/s, {1000 * cpu / requests:.3f} ms CPU per request")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="postgresql+asyncpg://postgres@127.0.0.1:5432/tether_bench")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--cycles", type=int, default=40, help="measured cycles per client")
    parser.add_argument("--warmup", type=int, default=20, help="cycles per client before measuring")
    args = parser.parse_args()
    uvloop.run(main(args.db, args.clients, args.cycles, args.warmup))
