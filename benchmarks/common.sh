# Sourced by run_all.sh and compare.sh: the settings, the fresh database and the server start/stop they share.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=$ROOT/.venv/bin/python
PORT=${BENCH_PORT:-18776}
BENCH_DB=${BENCH_DB:-tether_bench}
BASE=http://127.0.0.1:$PORT
SERVER=
export TETHER_DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/$BENCH_DB
export TETHER_LOG_LEVEL=WARNING TETHER_RECONCILE_ON_START=false

fresh_db() {  # fresh_db [CODE_DIR]: an empty $BENCH_DB, migrated by the code in CODE_DIR (default: this checkout)
    psql -q -U postgres -h 127.0.0.1 -c "DROP DATABASE IF EXISTS $BENCH_DB WITH (FORCE)" -c "CREATE DATABASE $BENCH_DB"
    (cd "${1:-$ROOT}" && "$PY" -m app.cli db upgrade >/dev/null)
}

serve() {  # serve CODE_DIR WORKERS [ENV=VALUE…]: the server of that code in the background, PID in $SERVER
    local dir=$1 workers=$2
    shift 2
    (cd "$dir" && exec env "$@" "$PY" -m app.cli serve --port $PORT --workers "$workers" >/tmp/tether-bench-$PORT.log 2>&1) &
    SERVER=$!
    for _ in $(seq 1 100); do curl -fs $BASE/healthcheck >/dev/null 2>&1 && return; sleep 0.1; done
    echo "server did not start" >&2; cat /tmp/tether-bench-$PORT.log >&2; exit 1
}

stop() {
    [ -n "$SERVER" ] || return 0
    kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null || true; SERVER=
}
