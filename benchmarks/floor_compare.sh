#!/usr/bin/env bash
# Tether next to the floor (benchmarks/floor.py: the cycle's database writes behind the least a FastAPI service can
# be), alternately, two rounds each, same driver, database schema, workers and machine. One JSON line per run.
#   [WORKERS=2] [SECONDS_PER_RUN=8] [BENCH_PORT=… BENCH_DB=…] benchmarks/floor_compare.sh [clients…]   e.g. 8 10 32
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$ROOT"
CLIENTS=${*:-10}
WORKERS=${WORKERS:-2}
export FLOOR_DSN=postgresql://postgres@127.0.0.1:5432/$BENCH_DB

serve_floor() {  # serve_floor [--locks]: the floor in the background, PID in $SERVER
    "$PY" -m benchmarks.floor --port "$PORT" --workers "$WORKERS" "$@" >/tmp/tether-floor-$PORT.log 2>&1 &
    SERVER=$!
    for _ in $(seq 1 100); do curl -s "$BASE/v3/x/volumes/none" -o /dev/null -w '%{http_code}' 2>/dev/null | grep -q 404 && return; sleep 0.1; done
    echo "the floor did not start" >&2; cat /tmp/tether-floor-$PORT.log >&2; exit 1
}

cycle() {  # cycle LABEL: one run per client count against the server in $SERVER
    for clients in $CLIENTS; do
        echo -n "$1 "
        "$PY" -m benchmarks.attach_cycle --base "$BASE" --clients "$clients" \
            --seconds "${SECONDS_PER_RUN:-8}" --server-pid "$SERVER"
    done
}

trap stop EXIT
echo "## machine"; nproc; grep -m1 'model name' /proc/cpuinfo; uptime
for round in 1 2; do
    fresh_db; serve "$ROOT" "$WORKERS"; cycle "tether round=$round"; stop
    fresh_db; serve_floor; cycle "floor round=$round"; stop
    fresh_db; serve_floor --locks; cycle "floor+locks round=$round"; stop
done
