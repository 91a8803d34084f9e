"""What Keystone auth costs the attach cycle: noauth and keystone mode (cached tokens) alternately, in one run.

Starts a real Keystone (.venvs/keystone, as the tests do: tests/keystone/keystone.py) in a temporary directory,
then, for each round, a fresh PostgreSQL database `tether_bench` and `tether serve` on port 18776 in noauth
mode and in keystone mode, and runs benchmarks/attach_cycle.py against each from its own process: the same
driver, clients and database, a member's Keystone token in keystone mode (validated once, then cached for
TETHER_KEYSTONE_TOKEN_CACHE_TIME). Then, against the keystone-mode server, what one request with a token it
has never seen costs (a validation round trip to Keystone) next to one with a cached token. Last, the
same comparison in one process without HTTP (server CPU per cycle only, alternating blocks).

    python -m benchmarks.auth_cost --clients 1 8 --seconds 5 --rounds 8

Needs PostgreSQL at 127.0.0.1:5432 (trust) and scripts/client-venvs (for .venvs/keystone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.processes import BASE, bench_env, drive, fresh_db, serve, stop
from tests.keystone.keystone import PASSWORD, Keystone, make_cloud


def validation_cost(cloud: object, project: str, token: str, count: int = 20) -> dict[str, float]:
    """ms of one GET /volumes with a token never seen (one validation), and with the cached token."""
    fresh_ms, cached_ms = [], []
    with httpx.Client(base_url=BASE, timeout=30) as http:
        for _ in range(count):
            new = cloud.token("alice")  # type: ignore[attr-defined]
            for tokens, into in ((new, fresh_ms), (token, cached_ms)):
                started = time.perf_counter()
                response = http.get(f"/v3/{project}/volumes?limit=1", headers={"X-Auth-Token": tokens})
                into.append(1000 * (time.perf_counter() - started))
                assert response.status_code == 200, response.text
    return {
        "uncached_p50_ms": round(statistics.median(fresh_ms), 2),
        "cached_p50_ms": round(statistics.median(cached_ms), 2),
    }


async def _in_process(keystone_url: str, token: str, project: str, blocks: int, cycles: int) -> dict[str, float]:
    """Server CPU per attach cycle of two apps in this process, noauth and keystone mode (the real Keystone,
    the token cached after its first request), alternating in blocks on one SQLite database: no HTTP, no
    other process, and the machine's drift falls on both alike."""
    from app.db.migrate import upgrade
    from app.main import create_app
    from tests.conftest import make_settings

    url = f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='tether-auth-cost-')}/tether.db"
    await asyncio.to_thread(upgrade, url)
    keystone = {
        "auth": "keystone",
        "keystone_auth_url": keystone_url,
        "keystone_username": "tether",
        "keystone_password": PASSWORD,
    }
    apps = {"noauth": create_app(make_settings(url)), "keystone": create_app(make_settings(url, **keystone))}
    tokens = {"noauth": f"bench:{project}", "keystone": token}
    connector = {"initiator": "iqn.2004-10.org.bench:in-process", "host": "bench", "ip": "127.0.0.1"}
    cpu = dict.fromkeys(apps, 0.0)
    noauth, keystone_mode = apps["noauth"], apps["keystone"]
    async with noauth.router.lifespan_context(noauth), keystone_mode.router.lifespan_context(keystone_mode):
        clients, volumes = {}, {}
        for mode, app in apps.items():
            headers = {"X-Auth-Token": tokens[mode], "OpenStack-API-Version": "volume 3.71"}
            clients[mode] = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://tether", headers=headers
            )
            created = await clients[mode].post(f"/v3/{project}/volumes", json={"volume": {"size": 1}})
            await app.state.work.idle()
            volumes[mode] = created.json()["volume"]["id"]
        for block in range(blocks):
            for mode in ("noauth", "keystone") if block % 2 else ("keystone", "noauth"):
                client, base = clients[mode], f"/v3/{project}/attachments"
                body = {"attachment": {"volume_uuid": volumes[mode], "connector": connector}}
                started = time.process_time()
                for _ in range(cycles):
                    attachment = (await client.post(base, json=body)).json()["attachment"]["id"]
                    await client.post(f"{base}/{attachment}/action", json={"os-complete": None})
                    assert (await client.delete(f"{base}/{attachment}")).status_code == 200
                cpu[mode] += time.process_time() - started
        for client in clients.values():
            await client.aclose()
    return {f"{mode}_cpu_ms_per_cycle": round(1000 * cpu[mode] / (blocks * cycles), 2) for mode in apps}


def summarize(results: list[dict[str, object]], clients: list[int]) -> None:
    """The median over the rounds of each mode and client count: one line each."""
    for count in clients:
        for mode in ("noauth", "keystone"):
            runs = [r for r in results if r["mode"] == mode and r["clients"] == count]
            line = {"summary": mode, "clients": count, "rounds": len(runs)}
            for key in ("cycles_per_s", "p50_ms", "p99_ms", "server_cpu_ms_per_request"):
                line[key] = round(statistics.median(float(str(r[key])) for r in runs), 2)
            # each server process runs at its own speed on this VM (±15%): the spread says how much
            line["cycles_per_s_range"] = [
                min(float(str(r["cycles_per_s"])) for r in runs),
                max(float(str(r["cycles_per_s"])) for r in runs),
            ]
            print(json.dumps(line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    base_env = bench_env()
    with tempfile.TemporaryDirectory(prefix="tether-auth-cost-") as tmp:
        keystone = Keystone(Path(tmp))
        keystone.install()
        keystone.start()
        try:
            with httpx.Client(timeout=30) as http:
                cloud = make_cloud(keystone, http)
                alice = cloud.users["alice"]
                keystone_env = {
                    **base_env,
                    "TETHER_AUTH": "keystone",
                    "TETHER_KEYSTONE_AUTH_URL": keystone.url,
                    "TETHER_KEYSTONE_USERNAME": "tether",
                    "TETHER_KEYSTONE_PASSWORD": PASSWORD,
                }
                log = Path(tmp) / "server.log"
                print(json.dumps({"machine": os.uname().nodename, "cpus": os.cpu_count(), "load": os.getloadavg()}))
                results: list[dict[str, object]] = []
                for round_ in range(1, args.rounds + 1):
                    # ABBA: this machine's speed drifts, so neither mode always runs first
                    modes = [("noauth", base_env), ("keystone", keystone_env)]
                    for mode, env in modes if round_ % 2 else modes[::-1]:
                        fresh_db(base_env)
                        server = serve(env, args.workers, log)
                        try:
                            for clients in args.clients:
                                token, project = (alice.token, alice.project_id) if mode == "keystone" else (None, None)
                                result = {
                                    "mode": mode,
                                    "round": round_,
                                    **drive(clients, args.seconds, server.pid, token, project),
                                }
                                results.append(result)
                                print(json.dumps(result), flush=True)
                            if mode == "keystone" and round_ == args.rounds:
                                print(
                                    json.dumps(
                                        {"mode": "keystone", **validation_cost(cloud, alice.project_id, alice.token)}
                                    )
                                )
                        finally:
                            stop(server)
                summarize(results, args.clients)
                in_process = _in_process(keystone.url, alice.token, alice.project_id, blocks=12, cycles=40)
                print(json.dumps({"in_process": True, **asyncio.run(in_process)}))
        finally:
            keystone.stop()


if __name__ == "__main__":
    main()
