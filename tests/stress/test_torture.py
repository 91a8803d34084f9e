"""Torture: `tether serve --workers 4` on PostgreSQL, file volumes exported by a private tgtd, hammered by
concurrent clients that mix the attachments API and the legacy actions on the same volumes; once they stop,
the database, tgtd and the volume directory must agree exactly.

Each client draws from its own seeded random stream: create (with and without a connector), update,
os-complete, delete, the legacy attach sequence (os-reserve, os-initialize_connection, os-attach) and detach
sequence (os-begin_detaching, os-terminate_connection, os-detach), lists, shows, and now and then a volume
delete (mostly refused: attached) followed by a replacement volume; beside them an operator now and then
resets a volume (an admin's os-reset_status to available/detached, which takes every attachment and its
export) and runs `tether reconcile` in the middle of everything, legacy sequences included (it takes each
volume's lock as the servers do). A few mutating requests are abandoned
by the client mid-flight (a short timeout), as a Nova that gave up would. 4xx answers are races, expected
and counted; a 5xx, another code, a request without an answer, a traceback in the server log, or a write
whose answer does not show the state after it (SPEC §9: a connect answers attaching/attached with its
connection_info, a reserve answers reserved without) is a failure. Work on one volume must be serialised
across the four processes (PostgreSQL advisory locks), or the ACLs drift from the database.

Invariants at rest (read straight from PostgreSQL with asyncpg, from `tgtadm --op show`, and from the disk):
- every attachment is reserved, attaching or attached; a connected one (attaching/attached) has its
  connection_info and its stored initiator, a reserved one has no connection_info: nothing is stranded
  half-way; no volume is left creating or deleting;
- every volume's status and attach_status follow SPEC §5's recompute rule from its live attachments (any
  attached -> in-use; else attaching; else reserved; none -> available/detached), except that a multiattach
  volume holding a reservation may show `reserved` (SPEC §5: reserving moves it there from in-use too); a
  non-multiattach volume has at most one live attachment;
- tgtd exports exactly the volumes with a connected attachment, each with an ACL equal to the set of their
  initiators, LUN 1 on the volume's file, the volume's one CHAP account bound and the target ready; no
  other target of ours, no account left bound to nothing; the volume directory holds exactly one file per
  volume; and a real initiator in the ACL logs in with the CHAP secret the API gave, one outside does not.

The legacy face carries no attachment identity in os-unreserve and os-terminate_connection, so two legacy
attach sequences on one volume at once are outside what it can express (Nova serialises them per volume);
the clients hold a per-volume lock around a legacy attach sequence, and finish every sequence they start
(an os-reserve leaves the volume `attaching` and os-begin_detaching leaves it `detaching` until then).

Settings (environment variables), CI defaults in brackets (sized for a 2-core machine: ~30 s in all, 20 s
of it load, 600 to 1500 operations and 750 to 1700 requests depending on the host):
  TETHER_TORTURE_SECONDS [20]   seconds of load
  TETHER_TORTURE_CLIENTS [8]    concurrent clients
  TETHER_TORTURE_VOLUMES [20]   volumes, of which TETHER_TORTURE_MULTIATTACH [8] are multiattach
  TETHER_TORTURE_WORKERS [4]    server processes (`tether serve --workers`)
  TETHER_TORTURE_HOSTS   [6]    initiators the clients connect from (fewer: more shared ACLs)
  TETHER_TORTURE_ABANDON [0.03] share of mutating requests the client abandons mid-flight
  TETHER_TORTURE_SEED    [20261121]
Full size, e.g.:
  TETHER_TORTURE_SECONDS=300 TETHER_TORTURE_CLIENTS=32 TETHER_TORTURE_VOLUMES=60 \\
      .venv/bin/pytest tests/stress/test_torture.py -q
  TETHER_TORTURE_SECONDS=120 TETHER_TORTURE_CLIENTS=16 .venv/bin/python -m tests.stress.test_torture
(One run of 120 s with 16 clients: 5400 operations, 6278 requests answered, 89 abandoned, 0 5xx, invariants held.)
Needs PostgreSQL, tgtd and libiscsi's iscsi-readcapacity16, as root: skipped without them, failed under CI=true.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import ROOT, Server
from tests.storage.tgtd import TgtDaemon
from tests.stress.harness import (
    PgDatabase,
    create_volumes,
    env_float,
    env_int,
    http_client,
    multiattach_type,
    server_log_problems,
    spawn_server,
    stop_server,
)
from tests.stress.load import TORTURE_MIX, Client, World, load_lines, server_env, verify

pytestmark = [pytest.mark.storage, pytest.mark.postgres]

SECONDS = env_float("TETHER_TORTURE_SECONDS", 20)
CLIENTS = env_int("TETHER_TORTURE_CLIENTS", 8)
VOLUMES = env_int("TETHER_TORTURE_VOLUMES", 20)
MULTIATTACH = env_int("TETHER_TORTURE_MULTIATTACH", VOLUMES * 2 // 5)
WORKERS = env_int("TETHER_TORTURE_WORKERS", 4)
HOSTS = env_int("TETHER_TORTURE_HOSTS", 6)
ABANDON = env_float("TETHER_TORTURE_ABANDON", 0.03)
SEED = env_int("TETHER_TORTURE_SEED", 20261121)

INITIATORS = [f"iqn.1994-05.com.example:torture-host-{n}" for n in range(HOSTS)]


# -- the test -----------------------------------------------------------------------------------------------


async def test_torture(tgtd: TgtDaemon, pg: PgDatabase, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file_dir = tmp_path / "volumes"
    started = time.monotonic()
    server: Server = spawn_server(tmp_path, server_env(pg, tgtd, file_dir), WORKERS)
    project = f"torture{uuid.uuid4().hex[:8]}"
    try:
        multi_type = await multiattach_type(server)
        async with http_client(server, project) as setup:
            single = await create_volumes(setup, VOLUMES - MULTIATTACH)
            multi = await create_volumes(setup, MULTIATTACH, multi_type)
        world = World(
            deadline=time.monotonic() + SECONDS,
            multi_type=multi_type,
            volumes={**dict.fromkeys(single, False), **dict.fromkeys(multi, True)},
            seed=SEED,
            weights=TORTURE_MIX,
            initiators=INITIATORS,
            abandon=ABANDON,
            admin=http_client(server, "admin", "admin"),
            reconcile_env={**server.env, "PYTHONPATH": str(ROOT)},
        )
        https = [http_client(server, project) for _ in range(CLIENTS)]
        load_started = time.monotonic()
        try:
            await asyncio.gather(*(Client(n, world, http).run() for n, http in enumerate(https)))
        finally:
            for http in [*https, world.admin]:
                if http is not None:
                    await http.aclose()
        load_seconds = time.monotonic() - load_started

        verdict = await verify(server, pg, project, tgtd, file_dir)
    finally:
        stop_server(server)
    log_problems = server_log_problems(server)

    summary = [
        "",
        f"torture: {WORKERS} workers on PostgreSQL, file volumes exported by tgtd; {CLIENTS} clients for "
        f"{load_seconds:.1f} s (seed {SEED}); {VOLUMES} volumes ({MULTIATTACH} multiattach), {HOSTS} hosts",
        *load_lines(world, load_seconds),
        *verdict.lines(),
        f"  server log: {log_problems[:3] or 'no traceback'}",
        f"total {time.monotonic() - started:.1f} s",
    ]
    with capsys.disabled():
        print("\n".join(summary))
    assert not world.tally.failures, world.tally.failures[:20]
    assert not verdict.problems, verdict.problems
    assert not verdict.login_problems, verdict.login_problems
    assert not log_problems, log_problems[:3]
    assert world.tally.codes.get("create+connect", Counter())[200] > 0, "no attach ever succeeded: not a test"


if __name__ == "__main__":
    # this module was imported (with httpx and anyio) before pytest started: no assertion rewriting for those
    sys.exit(
        pytest.main(
            [__file__, "-q", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning", *sys.argv[1:]]
        )
    )
