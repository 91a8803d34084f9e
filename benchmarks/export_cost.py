"""Real export cost: file + tgt attach and detach latency (median of N), and the share spent in tgtadm's requests.

Starts a private tgtd (own portal and control port, as the storage tests do), runs Tether in-process
(httpx's ASGI transport, PostgreSQL by default) with the file store and the tgt target, and for each round
times `POST /attachments` with a connector (target, LUN, CHAP account, ACL) and `DELETE` of it, while a
wrapper around both ways the target makes a tgtadm request (the command through app/backends/cmd.run, or sent
on tgtd's control socket by app/backends/targets/tgt_socket.run) adds up their wall time.
Needs root and the Debian packages tgt and libiscsi-bin.

    python -m benchmarks.export_cost --rounds 50 [--controls tgtadm socket] [--blocks 2]

Each of --controls (TETHER_TGT_CONTROL) is measured --blocks times, alternately, each block a fresh server and
volume on the same tgtd. The database defaults to $BENCH_DB (tether_bench), which must be migrated (`tether db
upgrade`). After the table it prints the tgtadm operations of the last measured attach and detach, in order.
`--ipc N` then times, on the same tgtd, N `tgtadm --op show --mode sys` run as a command against N of the
same request sent on the control socket: how much of a tgtadm process is the process, not tgtd.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.backends import cmd
from app.backends.targets import tgt_socket
from app.config import Settings
from app.main import create_app
from tests.storage.tgtd import TgtDaemon

HEADERS = {"OpenStack-API-Version": "volume 3.71"}


class TgtadmClock:
    """Wraps cmd.run and tgt_socket.run: the seconds and the number of tgtadm requests since the last reset()."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self.ops: list[str] = []  # "<op> <mode>" of each call since the last reset()

    def install(self) -> None:
        for module in (cmd, tgt_socket):

            def timed(argv: Any, real: Any = module.run, **kwargs: Any) -> cmd.Completed:
                started = time.perf_counter()
                try:
                    return real(argv, **kwargs)  # type: ignore[no-any-return]
                finally:
                    if argv and str(argv[0]).endswith("tgtadm"):
                        self.seconds += time.perf_counter() - started
                        self.calls += 1
                        words = [str(a) for a in argv]
                        self.ops.append(f"{words[words.index('--op') + 1]} {words[words.index('--mode') + 1]}")

            module.run = timed  # type: ignore[attr-defined]

    def reset(self) -> tuple[float, int, list[str]]:
        taken = (self.seconds, self.calls, self.ops)
        self.seconds, self.calls, self.ops = 0.0, 0, []
        return taken


@dataclass
class Samples:
    """One operation's wall times, time in tgtadm, and tgtadm calls, per round."""

    label: str
    total: list[float] = field(default_factory=list)
    tgtadm: list[float] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)  # the last round's tgtadm operations

    def row(self) -> str:
        total, spent = statistics.median(self.total), statistics.median(self.tgtadm)
        per_call = statistics.median(t / n for t, n in zip(self.tgtadm, self.calls, strict=True) if n)
        return (
            f"| {self.label} | {1000 * total:.1f} | {1000 * spent:.1f} | {100 * spent / total:.0f}% | "
            f"{statistics.median(self.calls):.0f} | {1000 * per_call:.2f} | "
            f"{1000 * min(self.total):.1f} / {1000 * max(self.total):.1f} |"
        )


async def timed(clock: TgtadmClock, samples: Samples | None, call: Awaitable[httpx.Response]) -> httpx.Response:
    """Await one request; unless warming up (samples is None), record its time and its tgtadm work."""
    clock.reset()
    started = time.perf_counter()
    response = await call
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        what = samples.label if samples else "warm-up"
        raise RuntimeError(f"{what} answered {response.status_code}: {response.text}")
    spent, calls, ops = clock.reset()
    if samples is not None:
        samples.total.append(elapsed)
        samples.tgtadm.append(spent)
        samples.calls.append(calls)
        samples.ops = ops
    return response


def ipc_cost(control_port: int, n: int) -> list[str]:
    argv = ["tgtadm", "-C", str(control_port), "--lld", "iscsi", "--op", "show", "--mode", "sys"]
    ways = {
        "tgtadm through cmd.run": lambda: cmd.run(argv),
        "the request on the socket (tgt_socket.run)": lambda: tgt_socket.run(argv),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(2):  # alternated, after a warm-up of each
        for name, call in ways.items():
            for _ in range(10):
                call()
            for _ in range(n):
                started = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - started)
    return [f"show sys, {name}: median {1000 * statistics.median(t):.3f} ms over {len(t)}" for name, t in times.items()]


async def measure(
    daemon: TgtDaemon, work: Path, db: str, control: str, rounds: int, clock: TgtadmClock, block: int
) -> tuple[Samples, Samples]:
    """One block: a server with this control, a fresh volume, 3 warm-up rounds and `rounds` measured ones."""
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=db,
        volume_backend="file",
        target="tgt",
        tgt_control=control,
        file_dir=str(work / "volumes"),
        target_portal=daemon.portal,
        tgt_control_port=daemon.control_port,
        reconcile_on_start=False,
        log_level="WARNING",
    )
    app = create_app(settings)
    project = f"cost{uuid.uuid4().hex[:8]}"
    headers = {**HEADERS, "X-Auth-Token": f"bench:{project}"}
    attach = Samples(f"attach, {control} (block {block})")
    detach = Samples(f"detach, {control} (block {block})")
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", headers=headers) as client,
    ):
        created = await client.post(f"/v3/{project}/volumes", json={"volume": {"size": 1}})
        volume_id = created.json()["volume"]["id"]
        await app.state.work.idle()
        for n in range(rounds + 3):  # the first 3 warm up (and create the volume's CHAP account)
            connector = {"initiator": f"iqn.2004-10.org.bench:cost-{n % 4}", "host": f"cost-{n % 4}"}
            body = {"attachment": {"volume_uuid": volume_id, "connector": connector}}
            attached = await timed(
                clock, attach if n >= 3 else None, client.post(f"/v3/{project}/attachments", json=body)
            )
            attachment_id = attached.json()["attachment"]["id"]
            removal = client.delete(f"/v3/{project}/attachments/{attachment_id}")
            await timed(clock, detach if n >= 3 else None, removal)
    return attach, detach


async def main(db: str, rounds: int, controls: list[str], blocks: int, ipc: int = 0) -> dict[str, dict[str, list[Any]]]:
    work = Path(tempfile.mkdtemp(prefix="tether-export-cost-"))
    daemon = TgtDaemon(log_dir=work)
    daemon.start()
    clock = TgtadmClock()
    clock.install()
    measured: list[Samples] = []
    try:
        for block in range(1, blocks + 1):
            for control in controls:
                measured += await measure(daemon, work, db, control, rounds, clock, block)
        ipc_lines = ipc_cost(daemon.control_port, ipc) if ipc else []
    finally:
        daemon.stop()
    print(f"{rounds} rounds per block, file + tgt, {db.split('+')[0]}")
    print(
        "| operation, control | median ms | tgtadm requests median ms | their share | requests | ms per request "
        "| min / max ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for samples in measured:
        print(samples.row())
    for samples in measured[-2:]:
        print(f"{samples.label.split(',')[0]}: {', '.join(samples.ops)}")
    for line in ipc_lines:
        print(line)
    return {s.label: {"total": s.total, "tgtadm": s.tgtadm, "calls": s.calls} for s in measured}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_db = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{os.environ.get('BENCH_DB', 'tether_bench')}"
    parser.add_argument("--db", default=default_db)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--raw", type=Path, help="also write every round's numbers to this JSON file")
    parser.add_argument("--controls", nargs="+", choices=["tgtadm", "socket"], default=["tgtadm", "socket"])
    parser.add_argument("--blocks", type=int, default=2, help="blocks of rounds per control, alternated")
    parser.add_argument(
        "--ipc", type=int, default=0, metavar="N", help="also time N tgtadm commands against N socket requests"
    )
    args = parser.parse_args()
    kept = asyncio.run(main(args.db, args.rounds, args.controls, args.blocks, args.ipc))
    if args.raw is not None:
        args.raw.write_text(json.dumps(kept))
