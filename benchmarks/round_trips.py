"""Database round trips per attach cycle, counted on the wire (issue 17: "<= 10 per cycle, BEGIN/COMMIT included").

A small TCP proxy in this process sits between `tether serve` and PostgreSQL and reads what the server sends
(the PostgreSQL protocol, client side). A round trip is one message the server must wait for an answer to:
each simple query ('Q': BEGIN, COMMIT, a statement without parameters), each Sync ('S') that ends an
extended-protocol exchange (Parse/Bind/Execute...: asyncpg's prepared statements, the advisory lock's
pg_try_advisory_lock), and each Flush ('H') after Parse/Describe (asyncpg prepares a statement so, once per
connection; the count is checked against the server's ReadyForQuery messages, which follow all but those).
The SQL of every Parse and Query is kept, and each Bind is named by the statement it executes (prepared
earlier on that connection), so the report lists what a cycle sends.

What it runs: a fresh database (BENCH_DB), `tether serve --workers N` (BENCH_PORT, embedded node, fake
backend) whose TETHER_DATABASE_URL points at the proxy (127.0.0.1:--proxy-port -> 127.0.0.1:5432), volumes
made first and some warm-up cycles (neither counted), then the server's background round trips while idle
(heartbeats, sweeps) for --idle-seconds before and after, as a rate, and --cycles sequential attach cycles
(create attachment with a connector -> os-complete -> DELETE, as benchmarks/attach_cycle.py) with the counter
read between requests (after the server has been quiet on the wire for --quiet seconds, so work finishing after
an answer is not put on the next request). A periodic task can land in a request's window: the medians per
request are the numbers to trust; the mean per cycle is also shown with the idle rate subtracted.

    python -m benchmarks.round_trips [--workers 2] [--cycles 50] [--tree /tmp/old-checkout] [--brief] [--remote]

--remote serves in TETHER_NODES=remote in front of one `tether node` (fake backend) that talks to PostgreSQL
directly: what is counted is the API tier's round trips (a job's defer, its outcome's row), not the node's.

--tree runs the server (and the migrations) of another checkout (a git worktree) with this venv, so before and
after can be compared. TLS: the proxy answers PostgreSQL's SSLRequest with "no" itself, so asyncpg (which
prefers TLS) talks plain text through it; no ?ssl= parameter is needed in the URL. Needs PostgreSQL at
127.0.0.1:5432 (trust).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.attach_cycle import HEADERS, make_volume
from benchmarks.processes import BASE, BENCH_DB, PORT, ROOT, bench_env, fresh_db, start_node, stop
from benchmarks.wire import Connection

SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST = 80877103, 80877104, 80877102
KINDS = ("create", "complete", "delete")


@dataclass
class RoundTrip:
    at: float
    connection: int
    how: str  # "query" (simple protocol), "execute" (Bind, Execute), "prepare" (Parse, Describe), "close", "sync"
    statements: list[str]
    ends: str = "Q"  # the message that ended it: Q (a simple query), S (Sync) or H (Flush)


@dataclass
class _ClientSide:
    """What one client connection has said so far: its prepared statements and the exchange in progress."""

    prepared: dict[str, str] = field(default_factory=dict)
    parsed: list[str] = field(default_factory=list)  # Parse messages since the last Sync
    bound: list[str] = field(default_factory=list)  # the statements bound since the last Sync
    closed: list[str] = field(default_factory=list)  # the prepared statements closed since the last Sync


class Proxy:
    """Forwards 127.0.0.1:listen -> upstream and records every round trip the clients make."""

    def __init__(self, listen: int, upstream: tuple[str, int]) -> None:
        self.listen = listen
        self.upstream = upstream
        self.trips: list[RoundTrip] = []
        self.ready = 0  # the server's ReadyForQuery messages
        self.connections = 0  # opened so far (each also costs the startup's round trips, not counted)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.listen)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            # the untyped start: SSLRequest / GSSENCRequest (answered "no" here: the rest must be readable),
            # then a StartupMessage or a CancelRequest, forwarded as it is
            while True:
                head = await reader.readexactly(8)
                length, code = struct.unpack("!ii", head)
                body = await reader.readexactly(length - 8)
                if code in (SSL_REQUEST, GSSENC_REQUEST):
                    writer.write(b"N")
                    await writer.drain()
                    continue
                break
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except (OSError, asyncio.IncompleteReadError):
            writer.close()
            return
        up_writer.write(head + body)
        back = asyncio.create_task(self._pipe(up_reader, writer))
        try:
            if code != CANCEL_REQUEST:
                await self._client_messages(number, reader, up_writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            up_writer.close()
            with contextlib.suppress(OSError):
                await back
            writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The server's side, forwarded as it comes; its ReadyForQuery messages counted (a check: one ends each
        round trip, and each connection's startup)."""
        pending = b""
        try:
            while data := await reader.read(65536):
                writer.write(data)
                pending += data
                while len(pending) >= 5:
                    length = struct.unpack("!i", pending[1:5])[0]
                    if len(pending) < 1 + length:
                        break
                    self.ready += pending[:1] == b"Z"
                    pending = pending[1 + length :]
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _client_messages(
        self, number: int, reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter
    ) -> None:
        side = _ClientSide()
        while True:
            head = await reader.readexactly(5)
            kind, length = head[:1], struct.unpack("!i", head[1:])[0]
            body = await reader.readexactly(length - 4)
            up_writer.write(head + body)
            self._note(number, side, kind, body)
            await up_writer.drain()

    def _note(self, number: int, side: _ClientSide, kind: bytes, body: bytes) -> None:
        if kind == b"Q":
            self.trips.append(RoundTrip(time.perf_counter(), number, "query", [_cstring(body, 0)[0]]))
        elif kind == b"P":
            name, at = _cstring(body, 0)
            sql = _cstring(body, at)[0]
            side.prepared[name] = sql
            side.parsed.append(sql)
        elif kind == b"B":
            _portal, at = _cstring(body, 0)
            statement = _cstring(body, at)[0]
            side.bound.append(side.prepared.get(statement, f"<statement {statement!r}, prepared before counting>"))
        elif kind == b"C" and body[:1] == b"S":  # Close of a prepared statement (asyncpg's cache evicting it)
            side.closed.append(side.prepared.pop(_cstring(body, 1)[0], "?"))
        elif kind == b"S" or (kind == b"H" and (side.bound or side.parsed)):
            # a Sync ends an exchange (ReadyForQuery follows); a Flush after messages asks for their answers
            # now, and the client waits for them: asyncpg prepares with Parse, Describe, Flush
            if side.bound:
                trip = RoundTrip(time.perf_counter(), number, "execute", side.bound)
            elif side.parsed:
                trip = RoundTrip(time.perf_counter(), number, "prepare", side.parsed)
            elif side.closed:
                trip = RoundTrip(time.perf_counter(), number, "close", side.closed)
            else:
                trip = RoundTrip(time.perf_counter(), number, "sync", [])
            trip.ends = kind.decode()
            self.trips.append(trip)
            side.parsed, side.bound, side.closed = [], [], []

    async def quiet(self, seconds: float, limit: float = 1.0) -> None:
        """Returns once no round trip has started for `seconds` (at most after `limit`)."""
        deadline = time.perf_counter() + limit
        while time.perf_counter() < deadline:
            last = self.trips[-1].at if self.trips else 0.0
            wait = last + seconds - time.perf_counter()
            if wait <= 0:
                return
            await asyncio.sleep(wait)


def _cstring(data: bytes, start: int) -> tuple[str, int]:
    end = data.index(b"\0", start)
    return data[start:end].decode(errors="replace"), end + 1


def short(sql: str, width: int = 110) -> str:
    """One line; a SELECT's column list and an INSERT's columns and values as "…"."""
    text = " ".join(sql.split())
    text = re.sub(r"^SELECT (?!pg_)(.{40,}?) FROM ", "SELECT … FROM ", text)
    text = re.sub(r"^(INSERT INTO \S+) \(.*?\) VALUES \(.*?\)", r"\1 (…) VALUES (…)", text)
    text = re.sub(r"\$\d+::[A-Z]+(\[\])?", "$n", text)
    return text if len(text) <= width else text[: width - 1] + "…"


def label(trip: RoundTrip) -> str:
    statements = " + ".join(short(s) for s in trip.statements) or "(bare Sync)"
    return f"{trip.how}: {statements}" if trip.how in ("prepare", "close") else statements


def transaction_word(trip: RoundTrip) -> str | None:
    if len(trip.statements) == 1:
        word = trip.statements[0].strip().split(" ", 1)[0].rstrip(";").upper()
        if word in ("BEGIN", "COMMIT", "ROLLBACK"):
            return word
    return None


def git_commit(tree: Path) -> str:
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "diff", "--quiet"], capture_output=True).returncode
    return done.stdout.strip() + ("+changes" if dirty else "")


def start_server(tree: Path, env: dict[str, str], workers: int, log: Path) -> subprocess.Popen[bytes]:
    """`tether serve` of the code in `tree` (this venv's Python: the tree's `app` comes first on the path)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(PORT), "--workers", str(workers)],
            cwd=tree,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def failed_start(server: subprocess.Popen[bytes], log: Path) -> RuntimeError:
    server.kill()
    return RuntimeError(f"tether serve did not start: {log.read_text()[-2000:]}")


async def serve(tree: Path, env: dict[str, str], workers: int, log: Path) -> subprocess.Popen[bytes]:
    """The server, once it answers; waited for on the event loop, which the proxy needs meanwhile."""
    server = start_server(tree, env, workers, log)
    async with httpx.AsyncClient() as client:
        for _ in range(300):
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{BASE}/healthcheck", timeout=1)).status_code == 200:
                    return server
            if server.poll() is not None:
                break
            await asyncio.sleep(0.1)
    raise failed_start(server, log)


async def measure(args: argparse.Namespace, tree: Path, log: Path) -> dict[str, object]:
    proxy = Proxy(args.proxy_port, ("127.0.0.1", 5432))
    await proxy.start()
    direct = bench_env(TETHER_NODES="remote") if args.remote else bench_env()
    fresh_db(direct, tree)
    proxied = {**direct, "TETHER_DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:{args.proxy_port}/{BENCH_DB}"}
    # remote: one `tether node` on the database directly (its round trips are not counted), the API's through
    # the proxy
    node = None
    if args.remote:
        env = {**direct, "TETHER_NODE_NAME": "bench-node"}
        node = await asyncio.to_thread(start_node, env, log.with_suffix(".node.log"))
    try:
        # stop() waits for the process: in a thread, so the proxy keeps forwarding the server's last words
        server = await serve(tree, proxied, args.workers, log)
        try:
            return await cycles(args, proxy, tree)
        finally:
            await asyncio.to_thread(stop, server)
            await proxy.close()
    finally:
        if node is not None:
            await asyncio.to_thread(stop, node)


async def cycles(args: argparse.Namespace, proxy: Proxy, tree: Path) -> dict[str, object]:
    project = f"bench{uuid.uuid4().hex[:8]}"
    client = Connection(BASE, {**HEADERS, "X-Auth-Token": f"bench:{project}"})
    volume = await make_volume(client, project)
    connector = {"initiator": "iqn.2004-10.org.bench:round-trips", "host": "bench-rt", "ip": "127.0.0.1"}
    body = {"attachment": {"volume_uuid": volume, "connector": connector}}
    windows: dict[str, list[tuple[list[RoundTrip], float]]] = {kind: [] for kind in KINDS}

    async def request(kind: str, method: str, path: str, payload: object = None) -> object:
        start, started = len(proxy.trips), time.perf_counter()
        status, answer = await client.request(method, path, payload)
        if status >= 300:
            raise RuntimeError(f"{kind} answered {status}: {answer}")
        await proxy.quiet(args.quiet)
        windows[kind].append((proxy.trips[start:], time.perf_counter() - started))
        return answer

    async def cycle() -> None:
        created = await request("create", "POST", f"/v3/{project}/attachments", body)
        assert isinstance(created, dict)
        attachment = f"/v3/{project}/attachments/{created['attachment']['id']}"
        await request("complete", "POST", f"{attachment}/action", {"os-complete": None})
        await request("delete", "DELETE", attachment)

    async def idle() -> tuple[list[RoundTrip], float]:
        await client.close()  # uvicorn closes a keep-alive connection quiet for 5 s; the next request opens one
        await proxy.quiet(args.quiet)
        start, started = len(proxy.trips), time.perf_counter()
        await asyncio.sleep(args.idle_seconds)
        return proxy.trips[start:], time.perf_counter() - started

    for _ in range(args.warmup):
        await cycle()
        await client.close()  # the next cycle's connection may land on another worker: warm both up
    # the first cycle on a fresh server: its connections' first statements are prepared (and typed) first
    cold = {kind: len(values[0][0]) for kind, values in windows.items() if values}
    idle_trips, idle_time = await idle()
    for values in windows.values():
        values.clear()
    opened = proxy.connections
    for _ in range(args.cycles):
        await cycle()
    opened = proxy.connections - opened
    first_new = proxy.connections - opened + 1
    after_trips, after_time = await idle()
    await client.close()
    idle_trips += after_trips
    idle_time += after_time
    await proxy.quiet(args.quiet)
    # every round trip counted but the Flushes, and every connection's startup, ended in one ReadyForQuery
    flushes = sum(1 for t in proxy.trips if t.ends == "H")
    check = {
        "round_trips_counted": len(proxy.trips),
        "of_them_ended_by_flush": flushes,
        "connections": proxy.connections,
        "server_ready_for_query": proxy.ready,
        "agrees": proxy.ready == len(proxy.trips) - flushes + proxy.connections,
    }
    result = report(args, tree, windows, idle_trips, idle_time)
    # a connection opened while cycling (a pool growing, a worker's first use): what it was used for
    new = {n: [label(t) for t in proxy.trips if t.connection == n][:6] for n in range(first_new, first_new + opened)}
    extra = {"first_cycle_cold": cold, "database_connections_opened_while_cycling": new, "whole_run_check": check}
    return {**result, **extra}


def report(
    args: argparse.Namespace,
    tree: Path,
    windows: dict[str, list[tuple[list[RoundTrip], float]]],
    idle_trips: list[RoundTrip],
    idle_time: float,
) -> dict[str, object]:
    rate = len(idle_trips) / idle_time
    count = args.cycles
    per_request: dict[str, object] = {}
    sequence: dict[str, list[str]] = {}
    mean_statements: Counter[tuple[str, str]] = Counter()
    words: Counter[str] = Counter()
    prepares = 0
    medians: dict[str, float] = {}
    for kind, values in windows.items():
        counts = [len(trips) for trips, _ in values]
        median = medians[kind] = statistics.median(counts)
        kind_words = [Counter(transaction_word(t) for t in trips) for trips, _ in values]
        per_request[kind] = {
            "median": median,
            "min": min(counts),
            "max": max(counts),
            "mean_less_idle": round(statistics.fmean(counts) - rate * statistics.fmean(s for _, s in values), 2),
            "begin_median": statistics.median(w["BEGIN"] for w in kind_words),
            "commit_median": statistics.median(w["COMMIT"] for w in kind_words),
            "windows_off_the_median": sum(1 for c in counts if c != median),
        }
        # a window with the median count, in the order the server sent it
        typical = next((trips for trips, _ in values if len(trips) == median), values[0][0])
        sequence[kind] = [label(t) for t in typical]
        for trips, _ in values:
            for trip in trips:
                mean_statements[(kind, label(trip))] += 1
                words[transaction_word(trip) or "other"] += 1
                prepares += int(trip.how == "prepare")
    seen = sum(len(trips) for values in windows.values() for trips, _ in values)
    seconds = sum(s for values in windows.values() for _, s in values)
    return {
        "tree": str(tree),
        "code": git_commit(tree),
        "workers": args.workers,
        "cycles": count,
        "round_trips_per_cycle": {
            "sum_of_request_medians": sum(medians.values()),
            "mean": round(seen / count, 2),
            "mean_less_idle": round((seen - rate * seconds) / count, 2),
            "begin": round(words["BEGIN"] / count, 2),
            "commit": round(words["COMMIT"] / count, 2),
            "rollback": round(words["ROLLBACK"] / count, 2),
            "prepares": round(prepares / count, 2),
        },
        "per_request": per_request,
        "idle": {
            "seconds": round(idle_time, 1),
            "round_trips": len(idle_trips),
            "per_s": round(rate, 2),
            "statements": dict(Counter(label(t) for t in idle_trips).most_common()),
        },
        "typical_cycle": sequence,
        "statements_per_cycle": [
            {"request": kind, "per_cycle": round(n / count, 2), "statement": text}
            for (kind, text), n in mean_statements.items()
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="API processes (`tether serve --workers`)")
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10, help="cycles before counting (pool connections, prepares)")
    parser.add_argument("--idle-seconds", type=float, default=6, help="idle measurement before and after the cycles")
    parser.add_argument("--quiet", type=float, default=0.03, help="seconds without a round trip that end a window")
    parser.add_argument("--proxy-port", type=int, default=int(os.environ.get("BENCH_PROXY_PORT", PORT + 1)))
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose server runs (default: this one)")
    parser.add_argument("--remote", action="store_true", help="TETHER_NODES=remote, one node (not counted)")
    parser.add_argument("--brief", action="store_true", help="one JSON line: the totals and the medians only")
    args = parser.parse_args()
    tree = args.tree.resolve()
    if not (tree / "app" / "cli.py").exists():
        parser.error(f"{tree} is not a Tether checkout")
    log = Path(tempfile.gettempdir()) / f"tether-round-trips-{PORT}.log"
    log.unlink(missing_ok=True)
    try:
        result = asyncio.run(measure(args, tree, log))
    except Exception:
        print(f"the server's log ({log}):\n{log.read_text()[-3000:] if log.exists() else ''}", file=sys.stderr)
        raise
    if args.brief:
        per_request = result["per_request"]
        assert isinstance(per_request, dict)
        medians = {kind: numbers["median"] for kind, numbers in per_request.items()}
        brief = {k: result[k] for k in ("code", "workers", "cycles", "round_trips_per_cycle")}
        print(json.dumps({**brief, "request_medians": medians, "check": result["whole_run_check"]}))
    else:
        print(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
