"""Crash safety: SIGKILL the server in the middle of attach, update, detach, volume create and delete, start
it again, and prove that the start-up reconcile left nothing stuck, that tgtd matches the database exactly,
and that a client's retry of each interrupted operation succeeds.

1. Slow fake backend (TETHER_FAKE_DELAY, every backend call sleeps): POST /attachments with connectors, PUT
   updates, DELETEs, POST /volumes and DELETE /volumes all in flight (their claims visible in PostgreSQL)
   when the whole process group is killed. The fake target lives in the dead processes' memory, so this
   one checks the database: nothing attaching without connection_info, no volume creating or deleting,
   every status agreeing with its attachments; then every operation is retried through the API.
2. File volumes on the private tgtd: one attach returned just before the kill (its export and ACL are in
   tgtd), deletes and attaches of other volumes in flight at the kill; tgtd then outlives the server, so
   after the restart its exports, ACLs and CHAP accounts must equal what the database says, and real logins
   agree.
3. A worker killed under load, twice (file+tgt): uvicorn starts a replacement, whose start-up reconcile runs
   while the other worker serves; the load stops half a second after the last replacement is up, and the
   invariants of the torture test hold. Before the reconcile took each volume's lock, this one caught the
   replacement rolling back a live worker's connect (an answer `reserved` with connection_info, an ACL
   left behind) and deadlocking with it (a 500).

Settings (environment variables), CI defaults in brackets (~45 s for the three):
  TETHER_CRASH_DELAY   [0.3]  seconds each fake backend call sleeps in test 1
  TETHER_CRASH_OPS     [3]    interrupted operations of each kind (tests 1 and 2)
  TETHER_CRASH_WORKERS [2]    server processes (`tether serve --workers`)
  TETHER_CRASH_SECONDS [8]    seconds of load in test 3 before the last worker kill (kills evenly spaced)
  TETHER_CRASH_KILLS   [2]    workers killed, one after the other, in test 3
  TETHER_CRASH_SEED    [7]
Full size, e.g.: TETHER_CRASH_OPS=12 TETHER_CRASH_SECONDS=120 TETHER_CRASH_KILLS=8 TETHER_CRASH_WORKERS=4 \\
    .venv/bin/pytest tests/stress/test_crash.py -q    (or .venv/bin/python -m tests.stress.test_crash)
Needs PostgreSQL (all three) and tgtd with libiscsi, as root (2 and 3): skipped without them, failed under CI=true.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import Server
from tests.storage.tgtd import TgtDaemon, readcapacity
from tests.stress.harness import (
    PgDatabase,
    Phases,
    Snapshot,
    check_at_rest,
    check_target,
    connector,
    create_volumes,
    env_float,
    env_int,
    http_client,
    kill_server,
    multiattach_type,
    read_tgtd,
    server_events,
    server_log_problems,
    snapshot,
    spawn_server,
    stop_server,
    wait_for_commands,
    wait_volume,
)
from tests.stress.load import Client, World, load_lines, server_env, verify

pytestmark = pytest.mark.postgres

DELAY = env_float("TETHER_CRASH_DELAY", 0.3)
OPS = env_int("TETHER_CRASH_OPS", 3)
WORKERS = env_int("TETHER_CRASH_WORKERS", 2)
SECONDS = env_float("TETHER_CRASH_SECONDS", 8)
KILLS = env_int("TETHER_CRASH_KILLS", 2)
SEED = env_int("TETHER_CRASH_SEED", 7)

HOST_A = "iqn.1994-05.com.example:crash-host-a"
HOST_B = "iqn.1994-05.com.example:crash-host-b"
HOST_C = "iqn.1994-05.com.example:crash-host-c"
HOST_D = "iqn.1994-05.com.example:crash-host-d"


def new_uuid() -> str:
    return str(uuid.uuid4())


async def ok(response: Awaitable[httpx.Response], status: int = 200) -> Any:
    answered = await response
    assert answered.status_code == status, f"{answered.request.method} {answered.request.url}: {answered.text}"
    return answered.json() if answered.content else None


async def attach(http: httpx.AsyncClient, volume_id: str, initiator: str, *, complete: bool) -> dict[str, Any]:
    body = {"volume_uuid": volume_id, "instance_uuid": new_uuid(), "connector": connector(initiator, "crash")}
    attachment: dict[str, Any] = (await ok(http.post("/attachments", json={"attachment": body})))["attachment"]
    assert attachment["status"] == "attaching", attachment
    assert attachment["connection_info"], attachment
    if complete:
        await ok(http.post(f"/attachments/{attachment['id']}/action", json={"os-complete": None}), 204)
    return attachment


async def reserve(http: httpx.AsyncClient, volume_id: str, instance: str | None = None) -> dict[str, Any]:
    body = {"volume_uuid": volume_id, "instance_uuid": instance or new_uuid()}
    return (await ok(http.post("/attachments", json={"attachment": body})))["attachment"]  # type: ignore[no-any-return]


async def attachments_of_instance(http: httpx.AsyncClient, instance: str) -> list[dict[str, Any]]:
    return (await ok(http.get(f"/attachments?instance_id={instance}")))["attachments"]  # type: ignore[no-any-return]


async def attach_and_detach(http: httpx.AsyncClient, attachment_id: str, initiator: str) -> None:
    """What a client does with an attachment it holds: update (connect), complete, delete."""
    body = {"attachment": {"connector": connector(initiator, "retry")}}
    updated = (await ok(http.put(f"/attachments/{attachment_id}", json=body)))["attachment"]
    assert updated["status"] == "attaching", updated
    assert updated["connection_info"], updated
    await ok(http.post(f"/attachments/{attachment_id}/action", json={"os-complete": None}), 204)
    await ok(http.delete(f"/attachments/{attachment_id}"))


async def wait_for(condition: Callable[[Snapshot], bool], pg: PgDatabase, project: str, timeout: float = 10) -> float:
    """Poll the database until `condition` holds (returns when it did) or `timeout` passes (returns then)."""
    deadline = time.monotonic() + timeout
    while not condition(await snapshot(pg, project)) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return time.monotonic()


def kinds_of(problems: list[str]) -> dict[str, int]:
    """Problems by kind, for a summary line."""
    kinds = {
        "without connection_info": "attachments attaching without connection_info",
        " is creating:": "volumes creating",
        " is deleting:": "volumes deleting",
        "; allowed ": "volume statuses not matching their attachments",
        "tgtd": "tgtd/database differences",
    }
    counted: Counter[str] = Counter()
    for problem in problems:
        counted[next((kind for needle, kind in kinds.items() if needle in problem), "other")] += 1
    return dict(counted)


# -- 1. the slow fake backend: every kind of operation interrupted ---------------------------------------------


async def test_sigkill_mid_flight_then_restart_leaves_nothing_stuck_and_retries_succeed(
    pg: PgDatabase, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {
        "TETHER_DATABASE_URL": pg.url,
        "TETHER_DATABASE_POOL_SIZE": "4",
        "TETHER_FAKE_DELAY": str(DELAY),
        # every interrupted operation must be inside its backend call, none queued for a thread
        "TETHER_BACKEND_WORKERS": "64",
    }
    started = time.monotonic()
    project = f"crash{uuid.uuid4().hex[:8]}"
    phases = Phases()
    server = spawn_server(tmp_path, env, WORKERS)
    servers = [server]
    phases.mark("start")
    try:
        multi_type = await multiattach_type(server)
        async with http_client(server, project) as http:
            # the stage: each volume in the state its interrupted operation starts from
            volumes = await create_volumes(http, OPS * 4)
            fresh, reserved_on, attached_on, doomed = (volumes[n * OPS : (n + 1) * OPS] for n in range(4))
            (multi,) = await create_volumes(http, 1, multi_type)
            reserved = [await reserve(http, v) for v in reserved_on]
            attached = await asyncio.gather(*(attach(http, v, HOST_A, complete=True) for v in [*attached_on, multi]))
            first_on_multi = attached.pop()
            phases.mark("stage")

            # the storm: everything at once, then SIGKILL once every claim is visible in the database
            storm = http_client(server, project, timeout=30)
            creates = {v: new_uuid() for v in [*fresh, multi]}
            requests: dict[str, asyncio.Task[httpx.Response]] = {}
            for volume_id, instance in creates.items():
                body = {"volume_uuid": volume_id, "instance_uuid": instance, "connector": connector(HOST_B, "b")}
                requests[f"create+connect {volume_id}"] = asyncio.create_task(
                    storm.post("/attachments", json={"attachment": body})
                )
            for attachment in reserved:
                body = {"attachment": {"connector": connector(HOST_C, "c")}}
                requests[f"update {attachment['id']}"] = asyncio.create_task(
                    storm.put(f"/attachments/{attachment['id']}", json=body)
                )
            for attachment in attached:
                requests[f"delete {attachment['id']}"] = asyncio.create_task(
                    storm.delete(f"/attachments/{attachment['id']}")
                )
            for volume_id in doomed:
                requests[f"volume-delete {volume_id}"] = asyncio.create_task(storm.delete(f"/volumes/{volume_id}"))
            for n in range(OPS):
                body = {"volume": {"size": 1, "name": f"born-in-crash-{n}"}}
                requests[f"volume-create {n}"] = asyncio.create_task(storm.post("/volumes", json=body))

            def claims(snap: Snapshot) -> list[bool]:
                mine = [
                    any(a.status == "attaching" for a in snap.attachments_of(v) if a.instance == creates[v])
                    for v in creates
                ]
                return mine + [snap.attachments[a["id"]].status == "attaching" for a in reserved]

            # SIGKILL once every attach and update has claimed its attachment (each then has 2 backend calls,
            # 2 * DELAY, to go), or DELAY after the first claim on a machine too slow to get them all in
            first = await wait_for(lambda snap: any(claims(snap)), pg, project)
            await wait_for(
                lambda snap: all(claims(snap)), pg, project, timeout=max(DELAY - (time.monotonic() - first), 0)
            )
            await asyncio.sleep(DELAY / 5)  # the deletes read first: let them reach their backend call too
            kill_server(server)
            answers = dict(zip(requests, await asyncio.gather(*requests.values(), return_exceptions=True), strict=True))
            await storm.aclose()
        at_crash = await snapshot(pg, project)
        left = check_at_rest(at_crash)
        interrupted = [k for k, a in answers.items() if isinstance(a, httpx.TransportError)]
        answered = {k: a.status_code for k, a in answers.items() if isinstance(a, httpx.Response)}
        assert set(answered.values()) <= {200, 202}, answered
        assert any("without connection_info" in p for p in left), left
        phases.mark("storm and kill")

        server = spawn_server(tmp_path, env, WORKERS, all_workers=False)
        servers.append(server)
        phases.mark("restart and reconcile")
        after = await snapshot(pg, project)
        async with http_client(server, project) as http:
            # the start-up reconcile finished or rolled back everything before the first answer
            assert check_at_rest(after) == []
            assert {v.status for v in after.volumes.values()} <= {"available", "in-use", "reserved"}, after.volumes
            born = (await ok(http.get("/volumes/detail")))["volumes"]
            born = [v for v in born if v["name"].startswith("born-in-crash-")]
            assert {v["status"] for v in born} <= {"available"}, born

            # the retries: each interrupted operation, as a client would do it again (all at once)
            retried: Counter[str] = Counter()

            async def retry_create(n: int, volume_id: str, instance: str) -> None:
                found = await attachments_of_instance(http, instance)
                if not found:  # killed before it reserved anything: simply again
                    again = await attach(http, volume_id, HOST_B, complete=True)
                    await ok(http.delete(f"/attachments/{again['id']}"))
                    retried["create+connect: never reached the database, attached anew"] += 1
                    return
                (attachment,) = found
                if attachment["status"] == "attaching":  # it finished just before the kill
                    await ok(http.post(f"/attachments/{attachment['id']}/action", json={"os-complete": None}), 204)
                    await ok(http.delete(f"/attachments/{attachment['id']}"))
                    retried["create+connect: had finished, completed and deleted"] += 1
                    return
                assert attachment["status"] == "reserved", attachment  # rolled back by the reconcile
                if n % 2:
                    await attach_and_detach(http, attachment["id"], HOST_B)
                    retried["create+connect: its reservation updated, completed, deleted"] += 1
                else:
                    await ok(http.delete(f"/attachments/{attachment['id']}"))
                    again = await attach(http, volume_id, HOST_B, complete=True)
                    await ok(http.delete(f"/attachments/{again['id']}"))
                    retried["create+connect: its reservation deleted, attached anew, deleted"] += 1

            async def retry_update(attachment: dict[str, Any]) -> None:
                await attach_and_detach(http, attachment["id"], HOST_C)
                retried["update: again, then completed, deleted"] += 1

            async def retry_delete(attachment: dict[str, Any]) -> None:
                response = await http.delete(f"/attachments/{attachment['id']}")
                assert response.status_code in (200, 404), response.text  # 404: it had finished
                retried[f"delete: again -> {response.status_code}"] += 1

            async def retry_volume_delete(volume_id: str) -> None:
                response = await http.get(f"/volumes/{volume_id}")
                if response.status_code == 404:
                    retried["volume delete: finished by the reconcile"] += 1
                    return
                await ok(http.delete(f"/volumes/{volume_id}"), 202)  # killed before it was even recorded
                await wait_volume(http, volume_id, None)
                retried["volume delete: again"] += 1

            async def delete_volume(volume: dict[str, Any]) -> None:
                await ok(http.delete(f"/volumes/{volume['id']}"), 202)
                await wait_volume(http, volume["id"], None)
                retried["volume born in the crash: deleted"] += 1

            await asyncio.gather(
                *(retry_create(n, v, i) for n, (v, i) in enumerate(creates.items())),
                *(retry_update(a) for a in reserved),
                *(retry_delete(a) for a in [*attached, first_on_multi]),
                *(delete_volume(v) for v in born),
                *(retry_volume_delete(v) for v in doomed),
            )
        phases.mark("retries")
        final = await snapshot(pg, project)
        assert final.attachments == {}
        assert {v.status for v in final.volumes.values()} == {"available"}
        assert check_at_rest(final) == []
    finally:
        for running in servers:
            stop_server(running)
    log_problems = [p for s in servers for p in server_log_problems(s)]

    with capsys.disabled():
        print(
            "\n".join(
                [
                    "",
                    f"crash 1 (fake backend, {DELAY} s per call, {WORKERS} workers): SIGKILL of the process group; "
                    f"{len(interrupted)} of {len(requests)} requests got no answer, {len(answered)} had answered "
                    f"({dict(sorted(Counter(k.split(' ')[0] for k in answered).items()))})",
                    f"  in flight: {dict(sorted(Counter(k.split(' ')[0] for k in requests).items()))}",
                    f"  left by the crash: {kinds_of(left)}",
                    f"  after restart + reconcile: {check_at_rest(after) or 'nothing stuck'}; statuses "
                    f"{dict(sorted(after.counts()[0].items()))}, attachments {dict(sorted(after.counts()[1].items()))}",
                    f"  retries that succeeded: {dict(retried)}",
                    f"  server logs: {log_problems[:3] or 'no traceback'}",
                    f"  {time.monotonic() - started:.1f} s: {phases}",
                ]
            )
        )
    assert not log_problems, log_problems[:3]


# -- 2. file volumes on tgtd: the target outlives the server ------------------------------------------------------


@pytest.mark.storage
async def test_sigkill_around_real_exports_then_restart_leaves_tgtd_matching_the_database(
    tgtd: TgtDaemon, pg: PgDatabase, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file_dir = tmp_path / "volumes"
    env = server_env(pg, tgtd, file_dir)
    started = time.monotonic()
    project = f"crash{uuid.uuid4().hex[:8]}"
    phases = Phases()
    server = spawn_server(tmp_path, env, WORKERS)
    servers = [server]
    phases.mark("start")
    try:
        multi_type = await multiattach_type(server)
        async with http_client(server, project) as http:
            kept_id, *rest = await create_volumes(http, 1 + 2 * OPS)
            detaching_on, attaching_on = rest[:OPS], rest[OPS:]
            (multi,) = await create_volumes(http, 1, multi_type)
            on_multi = [await attach(http, multi, host, complete=True) for host in (HOST_A, HOST_B)]
            to_detach = await asyncio.gather(*(attach(http, v, HOST_C, complete=True) for v in detaching_on))
            # the POST returned: export and ACL are in tgtd; the attachment is never completed
            kept = await attach(http, kept_id, HOST_A, complete=False)
            assert {t.iqn for t in read_tgtd(tgtd).targets} >= {kept["connection_info"]["target_iqn"]}
            phases.mark("stage")

            # the watcher's connection first: opened after the storm began, the storm was over before the first look
            connection = await asyncpg.connect(pg.dsn)
            storm = http_client(server, project, timeout=30)
            instances = {v: new_uuid() for v in attaching_on}
            requests: dict[str, asyncio.Task[httpx.Response]] = {}
            for attachment in to_detach:
                requests[f"delete {attachment['id']}"] = asyncio.create_task(
                    storm.delete(f"/attachments/{attachment['id']}")
                )
            for volume_id, instance in instances.items():
                body = {"volume_uuid": volume_id, "instance_uuid": instance, "connector": connector(HOST_D, "d")}
                requests[f"create+connect {volume_id}"] = asyncio.create_task(
                    storm.post("/attachments", json={"attachment": body})
                )
            # kill at the first sign of progress: an attach that has claimed its attachment (it is now inside its
            # calls to tgtd; the deletes, started with it, are on their way too). Only the database is watched,
            # between nothing else: a look at tgtd (a `tgtadm` process, several ms) once took longer than a
            # delete's last steps, and the kill came after every request had finished
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10):
                        while not await connection.fetchval(
                            "SELECT count(*) FROM attachments WHERE volume_id = ANY($1::text[]) "
                            "AND attach_status = 'attaching' AND connection_info IS NULL",
                            attaching_on,
                        ):
                            pass
            finally:
                connection.terminate()
            kill_server(server)
            answers = dict(zip(requests, await asyncio.gather(*requests.values(), return_exceptions=True), strict=True))
            await storm.aclose()
        interrupted = sorted(k for k, a in answers.items() if isinstance(a, httpx.TransportError))
        answered = {k: a.status_code for k, a in answers.items() if isinstance(a, httpx.Response)}
        assert set(answered.values()) <= {200}, answered
        # a killed server does not take its tgtadm children with it; let them finish before looking
        wait_for_commands(tgtd.control_port)
        at_crash = await snapshot(pg, project)
        mismatches = check_target(at_crash, read_tgtd(tgtd), file_dir, at_crash.volumes)
        left = check_at_rest(at_crash)
        assert left or mismatches, "the kill came too late: nothing was left half-done"
        phases.mark("storm and kill")

        server = spawn_server(tmp_path, env, WORKERS, all_workers=False)
        servers.append(server)
        phases.mark("restart and reconcile")
        after = await snapshot(pg, project)
        state = read_tgtd(tgtd)
        assert check_at_rest(after) == []
        assert check_target(after, state, file_dir, after.volumes) == []
        # what was connected before the crash still is, with the same CHAP secret
        info = kept["connection_info"]
        code, out = readcapacity(
            HOST_A, info["auth_username"], info["auth_password"], info["target_portal"], info["target_iqn"]
        )
        assert code == 0, out
        assert "Total size:" in out, out
        assert after.wanted_initiators(kept_id) == {HOST_A}
        assert after.wanted_initiators(multi) == {HOST_A, HOST_B}

        async with http_client(server, project) as http:
            retried: Counter[str] = Counter()
            for attachment in to_detach:
                response = await http.delete(f"/attachments/{attachment['id']}")
                assert response.status_code in (200, 404), response.text  # 404: it had finished
                retried[f"delete again -> {response.status_code}"] += 1
            for volume_id, instance in instances.items():
                for attachment in await attachments_of_instance(http, instance):
                    await ok(http.delete(f"/attachments/{attachment['id']}"))
                    retried[f"create+connect: its {attachment['status']} attachment deleted, attached anew"] += 1
                again = await attach(http, volume_id, HOST_D, complete=True)
                await ok(http.delete(f"/attachments/{again['id']}"))
            await ok(http.post(f"/attachments/{kept['id']}/action", json={"os-complete": None}), 204)
            await ok(http.delete(f"/attachments/{on_multi[0]['id']}"))
        phases.mark("retries")
        final = await snapshot(pg, project)
        final_state = read_tgtd(tgtd)
        assert check_at_rest(final) == []
        assert check_target(final, final_state, file_dir, final.volumes) == []
        assert {v: final.wanted_initiators(v) for v in final.volumes if final.wanted_initiators(v)} == {
            kept_id: {HOST_A},
            multi: {HOST_B},
        }
    finally:
        for running in servers:
            stop_server(running)
    log_problems = [p for s in servers for p in server_log_problems(s)]

    with capsys.disabled():
        print(
            "\n".join(
                [
                    "",
                    f"crash 2 (file + tgtd, {WORKERS} workers): SIGKILL right after an attach returned, "
                    f"with {len(interrupted)} of {len(requests)} deletes/attaches interrupted "
                    f"({len(answered)} had answered)",
                    f"  left by the crash: {kinds_of(left) or 'nothing stuck in the database'}; "
                    f"{len(mismatches)} tgtd/database differences",
                    *(f"    {m}" for m in mismatches[:4]),
                    f"  after restart + reconcile: nothing stuck; tgtd == database "
                    f"({len(state.targets)} targets); the attach kept across the crash still logs in",
                    f"  retries that succeeded: {dict(retried)}",
                    f"  server logs: {log_problems[:3] or 'no traceback'}",
                    f"  {time.monotonic() - started:.1f} s: {phases}",
                ]
            )
        )
    assert not log_problems, log_problems[:3]


# -- 3. a worker dies under load; its replacement reconciles while the others serve ------------------------------


def worker_pids(server: Server) -> list[int]:
    """uvicorn's workers: the children of the supervisor that run multiprocessing's spawn_main."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == server.process.pid and b"spawn_main" in cmdline:
            pids.append(int(entry))
    return sorted(pids)


def started_workers(server: Server) -> int:
    return server.log.read_text(errors="replace").count("Application startup complete")


def test_a_worker_that_dies_while_its_health_check_waits_is_replaced_at_once(pg: PgDatabase, tmp_path: Path) -> None:
    """uvicorn alone would wait its whole health-check timeout (60 s) for the dead worker's answer."""
    server = spawn_server(tmp_path, {"TETHER_DATABASE_URL": pg.url}, 2)
    try:
        victim = worker_pids(server)[0]
        before = started_workers(server)
        # a stopped worker cannot answer: within half a second the supervisor is waiting on its ping
        os.kill(victim, signal.SIGSTOP)
        time.sleep(1.5)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        while started_workers(server) <= before or len(worker_pids(server)) < 2:
            assert time.monotonic() - killed < 20, f"no replacement worker in 20 s:\n{server_events(server)}"
            time.sleep(0.05)
        assert victim not in worker_pids(server)
        assert httpx.get(f"{server.base}/healthcheck", timeout=5).status_code == 200
    finally:
        stop_server(server)


@pytest.mark.storage
async def test_a_worker_killed_under_load_is_replaced_and_the_invariants_hold(
    tgtd: TgtDaemon, pg: PgDatabase, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workers = WORKERS
    file_dir = tmp_path / "volumes"
    started = time.monotonic()
    project = f"crash{uuid.uuid4().hex[:8]}"
    server = spawn_server(tmp_path, server_env(pg, tgtd, file_dir), workers)
    killed: list[int] = []
    try:
        multi_type = await multiattach_type(server)
        async with http_client(server, project) as setup:
            single = await create_volumes(setup, 8)
            multi = await create_volumes(setup, 4, multi_type)
        world = World(
            deadline=float("inf"),
            multi_type=multi_type,
            volumes={**dict.fromkeys(single, False), **dict.fromkeys(multi, True)},
            seed=SEED,
            weights={"create": 8, "create+connect": 16, "update": 14, "complete": 10, "delete": 14, "list": 3},
            initiators=[f"iqn.1994-05.com.example:crash-load-{n}" for n in range(4)],
            tolerate_transport=True,
        )
        https = [http_client(server, project) for _ in range(8)]
        load_started = time.monotonic()

        async def killer() -> None:
            for n in range(KILLS):
                await asyncio.sleep(SECONDS / (KILLS + 1))
                before = started_workers(server)
                victim = worker_pids(server)[n % workers]
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
                # uvicorn notices and starts a replacement, whose lifespan (and reconcile) runs under the load
                deadline = time.monotonic() + 60
                while started_workers(server) <= before or len(worker_pids(server)) < workers:
                    assert time.monotonic() < deadline, (
                        f"no replacement worker started; supervisor exit code {server.process.poll()}, "
                        f"workers {worker_pids(server)}, server log:\n{server_events(server)}"
                    )
                    await asyncio.sleep(0.05)
            # stop soon after the last reconcile, so that whatever it broke is still there to be seen
            await asyncio.sleep(0.5)
            world.deadline = 0

        try:
            await asyncio.gather(killer(), *(Client(n, world, http).run() for n, http in enumerate(https)))
        finally:
            for http in https:
                await http.aclose()
        load_seconds = time.monotonic() - load_started
        verdict = await verify(server, pg, project, tgtd, file_dir)
    finally:
        stop_server(server)
    log_problems = server_log_problems(server)

    with capsys.disabled():
        print(
            "\n".join(
                [
                    "",
                    f"crash 3 (file + tgtd, {workers} workers): {len(killed)} worker(s) SIGKILLed under load from "
                    f"8 clients for {load_seconds:.1f} s; each replaced by uvicorn, reconciling while others served",
                    *load_lines(world, load_seconds),
                    *verdict.lines(),
                    f"  server log: {log_problems[:3] or 'no traceback'}; {time.monotonic() - started:.1f} s",
                ]
            )
        )
    assert not world.tally.failures, world.tally.failures[:20]
    assert not verdict.problems, verdict.problems
    assert not verdict.login_problems, verdict.login_problems
    assert not log_problems, log_problems[:3]


if __name__ == "__main__":
    # this module was imported (with httpx and anyio) before pytest started: no assertion rewriting for those
    sys.exit(
        pytest.main(
            [__file__, "-q", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning", *sys.argv[1:]]
        )
    )
