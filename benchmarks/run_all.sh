#!/usr/bin/env bash
# Reproduces every number in benchmarks/README.md on this machine: PostgreSQL at 127.0.0.1:5432 (trust),
# a fresh database tether_bench, servers on 127.0.0.1:18776, load from separate processes on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PORT=18776
BASE=http://127.0.0.1:$PORT
export TETHER_DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/tether_bench
export TETHER_LOG_LEVEL=WARNING TETHER_RECONCILE_ON_START=false

fresh_db() {
    psql -q -U postgres -h 127.0.0.1 -c "DROP DATABASE IF EXISTS tether_bench WITH (FORCE)" -c "CREATE DATABASE tether_bench"
    .venv/bin/tether db upgrade >/dev/null
}
serve() {  # serve WORKERS [ENV=VALUE…]
    local workers=$1; shift
    env "$@" .venv/bin/tether serve --port $PORT --workers "$workers" >/tmp/tether-bench.log 2>&1 &
    SERVER=$!
    for _ in $(seq 1 100); do curl -fs $BASE/healthcheck >/dev/null 2>&1 && return; sleep 0.1; done
    echo "server did not start" >&2; cat /tmp/tether-bench.log >&2; exit 1
}
stop() { kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null || true; SERVER=; }
trap '[ -n "${SERVER:-}" ] && stop' EXIT

echo "## machine"; nproc; grep -m1 'model name' /proc/cpuinfo; free -g | head -2; uptime

echo "## attach cycles (fake backend, PostgreSQL)"
for workers in 1 2; do
    fresh_db; serve $workers
    for clients in 1 8 32; do
        echo -n "workers=$workers "; $PY -m benchmarks.attach_cycle --base $BASE --clients $clients --seconds ${SECONDS_PER_RUN:-10}
    done
    stop
done

echo "## thread pool (200 ms per fake call, 4 backend workers)"
fresh_db; serve 1 TETHER_FAKE_DELAY=0.2 TETHER_BACKEND_WORKERS=4
$PY -m benchmarks.thread_pool --base $BASE
stop

echo "## list latency against table size"
fresh_db; serve 1
$PY -m benchmarks.list_scale --base $BASE --db postgresql://postgres@127.0.0.1:5432/tether_bench
stop
