#!/usr/bin/env bash
# Before/after with both servers up at once, driven in turn for short runs (ABBA order, ROUNDS times), so each pair
# is measured within seconds of each other: on a virtual machine whose speed drifts by ±25% from one minute to the
# next, the paired ratio is steadier than compare.sh's. Prints one JSON line per run, then the medians.
#   [WORKERS=2] [SECONDS_PER_RUN=4] [ROUNDS=6] benchmarks/interleave.sh <commit> [clients]   e.g. benchmarks/interleave.sh HEAD~1 10
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$ROOT"
COMMIT=$1
CLIENTS=${2:-10}
OLD=$(mktemp -d /tmp/tether-interleave-XXXXXX)
git worktree add --detach "$OLD" "$COMMIT" >/dev/null 2>&1
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; done
    git worktree remove --force "$OLD" >/dev/null 2>&1 || true
}
trap cleanup EXIT

start() {  # start LABEL DIR PORT: common.sh's fresh database and server, on a database and port of their own
    BENCH_DB=${DB_BASE}_$1 PORT=$3 BASE=http://127.0.0.1:$3
    export TETHER_DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/$BENCH_DB
    fresh_db "$2" 2>/dev/null
    serve "$2" "${WORKERS:-2}"
    PIDS+=("$SERVER")
    SERVER=
}

FIRST_PORT=$PORT DB_BASE=$BENCH_DB
start before "$OLD" "$FIRST_PORT"
start after "$ROOT" $((FIRST_PORT + 1))
run() {  # run LABEL INDEX: one short run against that server
    local port=$((FIRST_PORT + $2))
    echo -n "$1 "
    "$PY" -m benchmarks.attach_cycle --base "http://127.0.0.1:$port" --clients "$CLIENTS" \
        --seconds "${SECONDS_PER_RUN:-4}" --warmup 1 --server-pid "${PIDS[$2]}"
}
echo "## machine"; nproc; grep -m1 'model name' /proc/cpuinfo; uptime
OUT=$(mktemp)
for round in $(seq 1 "${ROUNDS:-6}"); do
    if (( round % 2 )); then order="0 1"; else order="1 0"; fi
    for i in $order; do
        label=$([ "$i" = 0 ] && echo "before($COMMIT)" || echo "after($(git rev-parse --short HEAD)$(git diff --quiet || echo +changes))")
        run "$label" "$i" | tee -a "$OUT"
    done
done
"$PY" - "$OUT" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    label, _, body = line.partition(" ")
    runs.setdefault(label, []).append(json.loads(body))
for label, rows in runs.items():
    med = lambda key: statistics.median(r[key] for r in rows)
    print(f"median {label}: {med('cycles_per_s'):.1f} cycles/s, p99 {med('p99_ms'):.1f} ms, "
          f"server CPU {med('server_cpu_ms_per_request'):.2f} ms/request ({len(rows)} runs)")
PY
