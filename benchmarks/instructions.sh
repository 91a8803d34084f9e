#!/usr/bin/env bash
# Instructions per request of the attach cycle (benchmarks/in_process.py under valgrind), for an earlier commit and
# for the working tree, side by side: a count, not a time, so this machine's drifting speed does not move it
# (repeat runs of one tree agree to ~3%). Each figure is the difference of a 40- and a 10-cycle run (10 clients),
# so start-up and warm-up cancel out: 900 requests' worth. Needs valgrind and PostgreSQL; ~2 minutes.
#   benchmarks/instructions.sh <commit>
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$ROOT"
COMMIT=$1
OLD=$(mktemp -d /tmp/tether-instructions-XXXXXX)
git worktree add --detach "$OLD" "$COMMIT" >/dev/null 2>&1
trap 'git worktree remove --force "$OLD" >/dev/null 2>&1 || true' EXIT
fresh_db

count() {  # count DIR CYCLES: the instructions valgrind counted for one run
    (cd "$1" && valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \
        "$PY" -m benchmarks.in_process --db "postgresql+asyncpg://postgres@127.0.0.1:5432/$BENCH_DB" --cycles "$2" 2>&1 |
        sed -n 's/.*I *refs: *//p' | tr -d ,)
}

per_request() {  # per_request LABEL DIR
    local short long
    short=$(count "$2" 10)
    long=$(count "$2" 40)
    echo "$1: $(( (long - short) / 900 )) instructions per request"
}

# the earlier commit may predate benchmarks/in_process.py: it runs this checkout's, from that commit's directory
mkdir -p "$OLD/benchmarks" && cp benchmarks/in_process.py "$OLD/benchmarks/"
per_request "before($COMMIT)" "$OLD" &
per_request "after($(git rev-parse --short HEAD)$(git diff --quiet || echo +changes))" "$ROOT"
wait
