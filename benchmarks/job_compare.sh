#!/usr/bin/env bash
# Job latency (benchmarks/job_latency.py) against the code of several commits, one after the other in one run:
# each commit's `tether node` and queue code, this checkout's benchmark scripts and .venv. Prints JSON lines.
#   benchmarks/job_compare.sh <commit>…      e.g. benchmarks/job_compare.sh 6f20335 2371589 1088feb
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$ROOT"
echo "## machine"; nproc; grep -m1 'model name' /proc/cpuinfo; uptime
for commit in "$@"; do
    dir=$(mktemp -d /tmp/tether-jobs-XXXXXX)
    git worktree add --detach "$dir" "$commit" >/dev/null 2>&1
    cp benchmarks/job_latency.py benchmarks/processes.py benchmarks/attach_cycle.py "$dir/benchmarks/"
    echo "## code at $commit"
    (cd "$dir" && "$PY" -m benchmarks.job_latency --jobs "${JOBS:-300}" --concurrency 1 4 --rounds 1) || true
    git worktree remove --force "$dir" >/dev/null 2>&1 || true
done
