#!/usr/bin/env bash
# Job latency (benchmarks/job_latency.py) against the code of several commits, one after the other in one run:
# each commit's `tether node` and queue code, this checkout's benchmark scripts and .venv. Prints JSON lines.
# Name commits twice for before/after alternately (ABBA): benchmarks/job_compare.sh OLD NEW NEW OLD.
#   benchmarks/job_compare.sh <commit>…      e.g. benchmarks/job_compare.sh 6f20335 2371589 1088feb
# JOBS (300): jobs per measurement; CALLERS ("1 4"): concurrent callers;
# NODE_COST_ROUNDS: also the attach cycle embedded and remote (benchmarks/node_cost.py, that many rounds) at
# CLIENTS (10) clients for SECONDS (6) s, in the same commit's checkout.
# BENCH_PORT / BENCH_DB (common.sh): a port and database of its own.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$ROOT"
echo "## machine"; nproc; grep -m1 'model name' /proc/cpuinfo; uptime
for commit in "$@"; do
    dir=$(mktemp -d /tmp/tether-jobs-XXXXXX)
    git worktree add --detach "$dir" "$commit" >/dev/null 2>&1
    cp benchmarks/job_latency.py benchmarks/node_cost.py benchmarks/processes.py benchmarks/attach_cycle.py \
        benchmarks/wire.py "$dir/benchmarks/"
    echo "## code at $commit"; uptime
    # shellcheck disable=SC2086
    (cd "$dir" && "$PY" -m benchmarks.job_latency --jobs "${JOBS:-300}" --concurrency ${CALLERS:-1 4} --rounds 1) || true
    if [ -n "${NODE_COST_ROUNDS:-}" ]; then
        (cd "$dir" && "$PY" -m benchmarks.node_cost --clients "${CLIENTS:-10}" --seconds "${SECONDS_PER_RUN:-6}" \
            --rounds "$NODE_COST_ROUNDS") || true
    fi
    git worktree remove --force "$dir" >/dev/null 2>&1 || true
done
