#!/usr/bin/env bash
# Before/after in one run: the attach cycle against the code of an earlier commit and of the working tree,
# alternately (two rounds each), with the same driver, database and machine. Prints one JSON line per run.
#   [WORKERS=2] [BENCH_PORT=… BENCH_DB=…] benchmarks/compare.sh <commit> [clients…]   e.g. benchmarks/compare.sh ce8a2fb 1 8 32
# ROUND_TRIPS=1 also counts both codes' database round trips per attach cycle (benchmarks/round_trips.py, through a
# proxy on BENCH_PORT+1), one JSON line each, after the timed runs.
# The earlier code runs from a temporary git worktree with this checkout's .venv; nothing is installed.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$ROOT"
COMMIT=$1
shift
CLIENTS=${*:-1 8 32}

OLD=$(mktemp -d /tmp/tether-compare-XXXXXX)
git worktree add --detach "$OLD" "$COMMIT" >/dev/null 2>&1
cleanup() {
    stop
    git worktree remove --force "$OLD" >/dev/null 2>&1 || true
}
trap cleanup EXIT

run_code() {  # run_code LABEL DIR: a fresh database migrated by that code, its server, one run per client count
    local label=$1 dir=$2
    fresh_db "$dir"
    serve "$dir" "${WORKERS:-1}"
    for clients in $CLIENTS; do
        echo -n "$label "
        "$PY" -m benchmarks.attach_cycle --base $BASE --clients "$clients" \
            --seconds "${SECONDS_PER_RUN:-8}" --server-pid "$SERVER"
    done
    stop
}

echo "## machine"; nproc; grep -m1 'model name' /proc/cpuinfo; uptime
for round in 1 2; do
    run_code "before($COMMIT) round=$round" "$OLD"
    run_code "after($(git rev-parse --short HEAD)$(git diff --quiet || echo +changes)) round=$round" "$ROOT"
done
if [ -n "${ROUND_TRIPS:-}" ]; then
    for dir in "$OLD" "$ROOT"; do
        "$PY" -m benchmarks.round_trips --brief --tree "$dir" --workers "${WORKERS:-1}"
    done
fi
