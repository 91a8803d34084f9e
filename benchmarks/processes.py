"""The processes the Python benchmarks start: a fresh `tether_bench` database, `tether serve` on port 18776,
`tether node` (remote mode), and the attach-cycle driver in a process of its own (what common.sh does for the
shell scripts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
# BENCH_PORT / BENCH_DB: another port and database, so two benchmarks can run side by side
PORT = int(os.environ.get("BENCH_PORT", "18776"))
BENCH_DB = os.environ.get("BENCH_DB", "tether_bench")
BASE = f"http://127.0.0.1:{PORT}"
DATABASE = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{BENCH_DB}"


def bench_env(**settings: str) -> dict[str, str]:
    """This environment without TETHER_* and OS_* variables, plus the benchmarks' database and `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TETHER_", "OS_"))}
    env.update({"TETHER_DATABASE_URL": DATABASE, "TETHER_LOG_LEVEL": "WARNING", "TETHER_RECONCILE_ON_START": "false"})
    env.update(settings)
    return env


def fresh_db(env: dict[str, str], tree: Path = ROOT) -> None:
    """An empty BENCH_DB, migrated by the code in `tree` (this checkout by default)."""
    psql = ["psql", "-q", "-U", "postgres", "-h", "127.0.0.1"]
    subprocess.run(
        [*psql, "-c", f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)", "-c", f"CREATE DATABASE {BENCH_DB}"],
        check=True,
    )
    subprocess.run(
        [sys.executable, "-m", "app.cli", "db", "upgrade"], cwd=tree, env=env, check=True, capture_output=True
    )


def serve(env: dict[str, str], workers: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(PORT), "--workers", str(workers)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    for _ in range(200):
        try:
            if httpx.get(f"{BASE}/healthcheck", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"tether serve did not start: {log.read_text()[-2000:]}")


def start_node(env: dict[str, str], log: Path, timeout: float = 60) -> subprocess.Popen[bytes]:
    """`tether node` (env: TETHER_NODES=remote, TETHER_NODE_NAME, the storage settings), once it says ready
    (logged at INFO; a node logs nothing per job that succeeds)."""
    offset = log.stat().st_size if log.exists() else 0
    with log.open("ab") as out:
        node = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "node"],
            cwd=ROOT,
            env={**env, "TETHER_LOG_LEVEL": "INFO"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    marker = f"node {env['TETHER_NODE_NAME']} ready"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with log.open("rb") as read:
            read.seek(offset)
            if marker in read.read().decode(errors="replace"):
                return node
        if node.poll() is not None:
            break
        time.sleep(0.05)
    node.kill()
    raise RuntimeError(f"tether node did not start: {log.read_text()[-2000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def drive(
    clients: int,
    seconds: float,
    server: int,
    token: str | None = None,
    project: str | None = None,
    node_pids: tuple[int, ...] = (),
) -> dict[str, object]:
    """benchmarks/attach_cycle.py against the server on BASE, from its own process; its JSON line."""
    argv = [sys.executable, "-m", "benchmarks.attach_cycle", "--base", BASE, "--clients", str(clients)]
    argv += ["--seconds", str(seconds), "--server-pid", str(server)]
    for pid in node_pids:
        argv += ["--node-pid", str(pid)]
    if token and project:
        argv += ["--token", token, "--project", project]
    out = subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]
