#!/usr/bin/env bash
# Reproduces every number in benchmarks/README.md on this machine: PostgreSQL at 127.0.0.1:5432 (trust),
# a fresh database tether_bench, servers on 127.0.0.1:18776, load from separate processes on loopback.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$ROOT"
trap stop EXIT

echo "## machine"; nproc; grep -m1 'model name' /proc/cpuinfo; free -g | head -2; uptime

echo "## attach cycles (fake backend, PostgreSQL)"
for workers in 1 2; do
    fresh_db; serve "$ROOT" $workers
    for clients in 1 8 32; do
        echo -n "workers=$workers "
        $PY -m benchmarks.attach_cycle --base $BASE --clients $clients --seconds ${SECONDS_PER_RUN:-10} --server-pid "$SERVER"
    done
    stop
done

echo "## thread pool (200 ms per fake call, 4 backend workers)"
fresh_db; serve "$ROOT" 1 TETHER_FAKE_DELAY=0.2 TETHER_BACKEND_WORKERS=4
$PY -m benchmarks.thread_pool --base $BASE
stop

echo "## real export cost (file + tgt, private tgtd; needs root, tgt and libiscsi-bin)"
fresh_db
$PY -m benchmarks.export_cost --rounds 50 --db "$TETHER_DATABASE_URL"

echo "## Idempotency-Key: a replay next to a fresh request"
fresh_db; serve "$ROOT" 1
$PY -m benchmarks.idempotency_cost --base $BASE --server-pid "$SERVER"
stop

echo "## list latency against table size"
fresh_db; serve "$ROOT" 1
$PY -m benchmarks.list_scale --base $BASE --db postgresql://postgres@127.0.0.1:5432/tether_bench
stop

echo "## storage-node queue: job latency (one tether node, fake backend)"
$PY -m benchmarks.job_latency --jobs 400 --concurrency 1 4 16 --rounds 2

echo "## storage-node queue: attach cycles embedded vs remote (one tether node, fake backend), alternately"
$PY -m benchmarks.node_cost --clients 1 8 --seconds ${SECONDS_PER_RUN:-6} --rounds 4
