"""The clients of the stress tests: seeded random operations on shared volumes through both faces of the API.

Each client draws from its own seeded random stream; the mix is a table of weights by operation. The
clients share what the API told them (volumes, attachment ids, instance uuids) and one tally of every
request by kind and status code. Legacy sequences are finished once started, and a legacy attach holds a
per-volume lock (see tests/stress/test_torture.py for why).
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Server
from tests.storage.tgtd import IQN_PREFIX, TgtDaemon, readcapacity
from tests.stress.harness import (
    CONNECTED,
    PgDatabase,
    Snapshot,
    Tally,
    TargetState,
    check_at_rest,
    check_files,
    check_target,
    connector,
    create_volumes,
    http_client,
    read_tgtd,
    snapshot,
    wait_volume,
)

OUTSIDER = "iqn.1994-05.com.example:stress-outsider"
TETHER = str(Path(sys.executable).parent / "tether")


class Unanswered(Exception):
    """A request of a sequence got no answer, so the sequence cannot go on."""


@dataclass
class Legacy:
    """An attachment a client made through the legacy actions, and the connector it used."""

    volume_id: str
    attachment_id: str
    connector: dict[str, Any]
    resets: int = 0  # the volume's os-reset_status count when this was made: a reset since took it away


@dataclass
class World:
    """What the clients share: the volumes, the attachments the API returned, and the tally."""

    deadline: float
    multi_type: str
    volumes: dict[str, bool]  # id -> multiattach
    seed: int
    weights: dict[str, int]
    initiators: list[str]
    abandon: float = 0.0  # share of mutating requests abandoned mid-flight
    # a server process may die under the clients: count a request without an answer instead of failing
    tolerate_transport: bool = False
    tally: Tally = field(default_factory=Tally)
    attachments: dict[str, str] = field(default_factory=dict)  # attachments-API attachment id -> volume id
    instances: set[str] = field(default_factory=set)  # instance uuids the attachments API was given
    legacy_locks: defaultdict[str, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
    operations: Counter[str] = field(default_factory=Counter)  # sequences and operations, once each
    notes: Counter[str] = field(default_factory=Counter)
    # an admin's client (os-reset_status) and what `tether reconcile` needs to reach the servers' database
    admin: httpx.AsyncClient | None = None
    reconcile_env: dict[str, str] | None = None
    resets: Counter[str] = field(default_factory=Counter)  # volume id -> os-reset_status calls


class Client:
    def __init__(self, number: int, world: World, http: httpx.AsyncClient) -> None:
        self.rng = random.Random(world.seed * 1000 + number)
        self.world = world
        self.http = http
        self.legacy: list[Legacy] = []

    # -- plumbing ---------------------------------------------------------------------------------------

    async def call(
        self, kind: str, method: str, path: str, body: Any = None, *, abandon: bool = False
    ) -> httpx.Response | None:
        """One request, tallied; None when it got no answer (abandoned by us, or the server went away)."""
        timeout = self.rng.uniform(0.005, 0.08) if abandon else httpx.USE_CLIENT_DEFAULT
        try:
            response = await self.http.request(method, path, json=body, timeout=timeout)
        except httpx.TransportError as error:
            if abandon and isinstance(error, httpx.TimeoutException):
                self.world.tally.transport[f"{kind} (abandoned)"] += 1
                return None
            self.world.tally.transport[f"{kind} (interrupted)"] += 1
            if not self.world.tolerate_transport:
                # a worker died or hung (uvicorn kills a worker that misses its 5 s health check)
                self.world.tally.failures.append(f"{kind}: {method} {path}: no answer ({type(error).__name__})")
            return None
        self.world.tally.record(kind, response)
        return response

    async def must(self, kind: str, method: str, path: str, body: Any = None) -> httpx.Response:
        """A step of a legacy sequence: one without an answer abandons the sequence (and is a failure)."""
        response = await self.call(kind, method, path, body)
        if response is None:
            raise Unanswered(kind)
        return response

    async def action(self, name: str, volume_id: str, value: Any = None) -> httpx.Response:
        return await self.must(name, "POST", f"/volumes/{volume_id}/action", {name: value if value is not None else {}})

    def abandon(self) -> bool:
        return self.rng.random() < self.world.abandon

    def connector(self) -> dict[str, Any]:
        n = self.rng.randrange(len(self.world.initiators))
        return connector(self.world.initiators[n], f"stress-host-{n}", multipath=self.rng.random() < 0.2)

    def uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def volume(self) -> str:
        return self.rng.choice(sorted(self.world.volumes))

    def attachment(self) -> str | None:
        known = sorted(self.world.attachments)
        return self.rng.choice(known) if known else None

    # -- the loop -----------------------------------------------------------------------------------------

    async def run(self) -> None:
        kinds, weights = list(self.world.weights), list(self.world.weights.values())
        while time.monotonic() < self.world.deadline:
            kind = self.rng.choices(kinds, weights)[0]
            self.world.operations[kind] += 1
            try:
                await OPERATIONS[kind](self)
            except Unanswered:
                self.world.notes[f"{kind} cut short: a request got no answer"] += 1

    # -- the attachments API ------------------------------------------------------------------------------

    async def create(self, with_connector: bool = False) -> None:
        volume_id, instance = self.volume(), self.uuid()
        self.world.instances.add(instance)
        body: dict[str, Any] = {"volume_uuid": volume_id, "instance_uuid": instance}
        if self.rng.random() < 0.3:
            body["mode"] = self.rng.choice(["rw", "ro"])
        if with_connector:
            body["connector"] = self.connector()
        kind = "create+connect" if with_connector else "create"
        response = await self.call(kind, "POST", "/attachments", {"attachment": body}, abandon=self.abandon())
        if response is not None and response.status_code == 200:
            self.world.attachments[response.json()["attachment"]["id"]] = volume_id
            self.check_answer(kind, response, connected=with_connector)

    async def create_connected(self) -> None:
        await self.create(with_connector=True)

    async def forget_if_gone(self, attachment_id: str, response: httpx.Response | None) -> None:
        if response is not None and response.status_code == 404:
            self.world.attachments.pop(attachment_id, None)

    async def update(self) -> None:
        if (attachment_id := self.attachment()) is None:
            return
        body = {"attachment": {"connector": self.connector()}}
        response = await self.call("update", "PUT", f"/attachments/{attachment_id}", body, abandon=self.abandon())
        await self.forget_if_gone(attachment_id, response)
        if response is not None and response.status_code == 200:
            self.check_answer("update", response, connected=True)

    def check_answer(self, kind: str, response: httpx.Response, *, connected: bool) -> None:
        """A write answers with the state after the write (SPEC §9): connected means attaching or attached."""
        attachment = response.json()["attachment"]
        if connected:
            ok = attachment["status"] in ("attaching", "attached") and bool(attachment["connection_info"])
        else:
            ok = attachment["status"] == "reserved" and not attachment["connection_info"]
        if not ok:
            self.world.tally.failures.append(
                f"{kind} answered {response.status_code} with attachment {attachment['id']} "
                f"{attachment['status']}, connection_info {'set' if attachment['connection_info'] else 'empty'}"
            )

    async def complete(self) -> None:
        if (attachment_id := self.attachment()) is None:
            return
        response = await self.call("complete", "POST", f"/attachments/{attachment_id}/action", {"os-complete": None})
        await self.forget_if_gone(attachment_id, response)

    async def delete(self) -> None:
        if (attachment_id := self.attachment()) is None:
            return
        response = await self.call("delete", "DELETE", f"/attachments/{attachment_id}", abandon=self.abandon())
        if response is not None and response.status_code in (200, 404):
            self.world.attachments.pop(attachment_id, None)

    async def list_attachments(self) -> None:
        """Also finds the attachments of abandoned creates, so they too are updated, completed and deleted."""
        response = await self.call("list", "GET", f"/attachments/detail?volume_id={self.volume()}")
        if response is None:
            return
        for attachment in response.json().get("attachments", []):
            if attachment["instance"] in self.world.instances:
                self.world.attachments.setdefault(attachment["id"], attachment["volume_id"])

    async def show(self) -> None:
        await self.call("show", "GET", f"/volumes/{self.volume()}")

    async def volume_churn(self) -> None:
        """Delete a volume (refused while it has attachments); if it goes, a new one of its kind replaces it."""
        volume_id = self.volume()
        lock = self.world.legacy_locks[volume_id]
        if lock.locked():  # a legacy sequence or an admin's reset is at work on it
            return
        async with lock:
            response = await self.must("volume-delete", "DELETE", f"/volumes/{volume_id}")
            if response.status_code != 202:
                return
            multiattach = self.world.volumes.pop(volume_id)
        await wait_volume(self.http, volume_id, None)
        (replacement,) = await create_volumes(self.http, 1, self.world.multi_type if multiattach else None)
        self.world.operations["volume-create (replacement)"] += 1
        self.world.volumes[replacement] = multiattach

    # -- the legacy actions ---------------------------------------------------------------------------------

    async def legacy_attach(self) -> None:
        volume_id = self.volume()
        lock = self.world.legacy_locks[volume_id]
        if lock.locked():
            self.world.notes["legacy attach skipped: another in progress on the volume"] += 1
            return
        async with lock:
            if (await self.action("os-reserve", volume_id)).status_code != 202:
                return
            conn, instance = self.connector(), self.uuid()
            if (await self.action("os-initialize_connection", volume_id, {"connector": conn})).status_code != 200:
                self.world.notes["legacy attach undone after os-initialize_connection"] += 1
                await self.action("os-unreserve", volume_id)
                return
            attach = {"instance_uuid": instance, "mountpoint": "/dev/vdb", "mode": "rw"}
            if (await self.action("os-attach", volume_id, attach)).status_code != 202:
                self.world.notes["legacy attach undone after os-attach"] += 1
                await self.action("os-unreserve", volume_id)
                return
            found = await self.must("list", "GET", f"/attachments?volume_id={volume_id}&instance_id={instance}")
            mine = [a["id"] for a in found.json()["attachments"] if a["status"] == "attached"]
            if len(mine) != 1:
                self.world.tally.failures.append(f"after os-attach of {instance} on {volume_id}: {found.text}")
                return
            self.legacy.append(Legacy(volume_id, mine[0], conn, self.world.resets[volume_id]))

    async def legacy_detach(self) -> None:
        if not self.legacy:
            await self.legacy_attach()
            return
        item = self.legacy.pop(self.rng.randrange(len(self.legacy)))
        lock = self.world.legacy_locks[item.volume_id]
        if lock.locked():  # a legacy attach or an admin's reset is at work on the volume: later
            self.legacy.append(item)
            return
        # held against an admin's reset: one between os-begin_detaching and os-detach would take the attachment,
        # and another client's attach after it would be left `detaching` by this sequence
        async with lock:
            if self.world.resets[item.volume_id] != item.resets:
                self.world.notes["legacy detach dropped: an admin's os-reset_status took the attachment"] += 1
                return
            # refused (400) when the volume is not in-use, e.g. a reservation or another detach is in progress
            begun = await self.action("os-begin_detaching", item.volume_id)
            await self.action("os-terminate_connection", item.volume_id, {"connector": item.connector})
            detached = await self.action("os-detach", item.volume_id, {"attachment_id": item.attachment_id})
            if detached.status_code != 202:
                self.world.tally.failures.append(f"os-detach of {item.attachment_id} (own, attached): {detached.text}")
                if begun.status_code == 202:
                    await self.action("os-roll_detaching", item.volume_id)

    # -- an operator at work beside the clients ---------------------------------------------------------------

    async def reset(self) -> None:
        """An admin's os-reset_status to available/detached: every attachment goes, and its export with it."""
        if self.world.admin is None:
            return
        volume_id = self.volume()
        lock = self.world.legacy_locks[volume_id]
        if lock.locked():  # never in the middle of a legacy attach the clients finish (or a volume delete)
            self.world.notes["reset skipped: a legacy attach in progress on the volume"] += 1
            return
        async with lock:
            self.world.resets[volume_id] += 1
            body = {"os-reset_status": {"status": "available", "attach_status": "detached"}}
            response = await self.world.admin.post(f"/volumes/{volume_id}/action", json=body)
            self.world.tally.record("reset", response)

    async def reconcile(self) -> None:
        """`tether reconcile` while the clients go on: it takes each volume's lock as the servers do, so it
        never rolls back a connect in flight nor removes an ACL the database still wants."""
        if self.world.reconcile_env is None:
            return
        process = await asyncio.create_subprocess_exec(
            TETHER,
            "reconcile",
            env=self.world.reconcile_env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await process.communicate()
        self.world.notes[f"tether reconcile exited {process.returncode}"] += 1
        if process.returncode != 0:
            self.world.tally.failures.append(f"tether reconcile exited {process.returncode}: {out.decode()[-2000:]}")


OPERATIONS = {
    "create": Client.create,
    "create+connect": Client.create_connected,
    "update": Client.update,
    "complete": Client.complete,
    "delete": Client.delete,
    "legacy-attach": Client.legacy_attach,
    "legacy-detach": Client.legacy_detach,
    "list": Client.list_attachments,
    "show": Client.show,
    "volume-churn": Client.volume_churn,
    "reset": Client.reset,
    "reconcile": Client.reconcile,
}

# the torture tests' mix: weights by operation
TORTURE_MIX = {
    "create": 10,
    "create+connect": 14,
    "update": 12,
    "complete": 12,
    "delete": 16,
    "legacy-attach": 7,
    "legacy-detach": 6,
    "list": 3,
    "show": 3,
    "volume-churn": 2,
    "reset": 1,
    "reconcile": 1,
}


def server_env(pg: PgDatabase, tgtd: TgtDaemon, file_dir: Path) -> dict[str, str]:
    return {
        "TETHER_DATABASE_URL": pg.url,
        "TETHER_DATABASE_POOL_SIZE": "4",
        "TETHER_VOLUME_BACKEND": "file",
        "TETHER_TARGET": "tgt",
        "TETHER_TGT_CONTROL_PORT": str(tgtd.control_port),
        "TETHER_TARGET_PORTAL": tgtd.portal,
        "TETHER_TARGET_IQN_PREFIX": IQN_PREFIX,
        "TETHER_FILE_DIR": str(file_dir),
    }


async def quiet(pg: PgDatabase, project: str, timeout: float = 30) -> None:
    """Wait until no volume is being created or deleted (the only work that outlives a request)."""
    deadline = time.monotonic() + timeout
    while True:
        volumes, _ = (await snapshot(pg, project)).counts()
        if not volumes["creating"] and not volumes["deleting"]:
            return
        assert time.monotonic() < deadline, f"volumes still busy after {timeout} s: {volumes}"
        await asyncio.sleep(0.1)


async def logins(http: httpx.AsyncClient, pg: PgDatabase, project: str, sample: int = 6) -> tuple[list[str], int, int]:
    """Log in to a sample of the exported volumes as a connected initiator (admitted) and an outsider (refused)."""
    snap = await snapshot(pg, project)
    problems, admitted, refused = [], 0, 0
    exported = sorted(v for v in snap.volumes if snap.wanted_initiators(v))
    for volume_id in exported[:sample]:
        attachment = min(
            (
                a
                for a in snap.attachments_of(volume_id)
                if a.status in CONNECTED and a.id in snap.initiators and not a.terminated
            ),
            key=lambda a: a.id,
        )
        response = await http.get(f"/attachments/{attachment.id}")
        info = response.json()["attachment"]["connection_info"]
        args = (info["auth_username"], info["auth_password"], info["target_portal"], info["target_iqn"], 1)
        code, out = readcapacity(snap.initiators[attachment.id], *args)
        if code == 0 and "Total size:" in out:
            admitted += 1
        else:
            problems.append(f"volume {volume_id}: {snap.initiators[attachment.id]} could not log in: {out.strip()}")
        code, out = readcapacity(OUTSIDER, *args)
        if code != 0 and "Target not found" in out:
            refused += 1
        else:
            problems.append(f"volume {volume_id}: an initiator outside the ACL was not refused: {out.strip()}")
    return problems, admitted, refused


@dataclass(frozen=True)
class Store:
    """One storage host as the checks see it: its tgtd and its volume directory."""

    tgtd: TgtDaemon
    file_dir: Path


@dataclass
class Verdict:
    """The invariants at rest, checked once the clients have stopped."""

    snap: Snapshot
    states: dict[str | None, TargetState]  # by storage node (None: the one host)
    problems: list[str]
    login_problems: list[str]
    admitted: int
    refused: int

    def lines(self) -> list[str]:
        volumes, attachments = self.snap.counts()
        targets = []
        for node, state in self.states.items():
            exported = [t for t in state.targets if t.iqn.startswith(IQN_PREFIX)]
            targets.append(
                f"tgtd{f' of {node}' if node else ''}: {len(self.snap.volumes_on(node))} volumes, "
                f"{len(exported)} targets, {sum(len(t.acls) for t in exported)} ACL entries, "
                f"{len(state.accounts)} accounts"
            )
        return [
            f"at rest: volumes {dict(sorted(volumes.items()))}; attachments {dict(sorted(attachments.items()))}",
            *targets,
            f"logins: {self.admitted} admitted, {self.refused} refused",
            f"  statuses at rest, tgtd == database, files: {'ok' if not self.problems else 'FAILED'}",
            *(f"    {p}" for p in self.problems),
            f"  real logins: {self.login_problems or 'ok'}",
        ]


async def verify(server: Server, pg: PgDatabase, project: str, tgtd: TgtDaemon, file_dir: Path) -> Verdict:
    """One storage host (embedded mode): its tgtd and directory hold every volume of the database."""
    return await verify_stores(server, pg, project, {None: Store(tgtd, file_dir)})


async def verify_stores(server: Server, pg: PgDatabase, project: str, stores: Mapping[str | None, Store]) -> Verdict:
    """Each storage node's tgtd and directory against the database's volumes of that node (keyed by the node's
    name, the `<node>` of a volume's host; None: one host holding every volume)."""
    await quiet(pg, project)
    snap = await snapshot(pg, project)
    problems = check_at_rest(snap)
    if None not in stores:
        problems += [
            f"volume {v.id} ({v.status}) is on {v.host!r}, no storage node of this cluster"
            for v in snap.volumes.values()
            if v.node not in stores
        ]
    states = {}
    for node, store in stores.items():
        states[node] = state = read_tgtd(store.tgtd)
        mine = snap.volumes_on(node)
        problems += [
            f"{node}: {p}" if node else p
            for p in check_target(snap, state, store.file_dir, mine) + check_files(snap, store.file_dir, mine)
        ]
    async with http_client(server, project) as http:
        login_problems, admitted, refused = await logins(http, pg, project)
    return Verdict(snap, states, problems, login_problems, admitted, refused)


def load_lines(world: World, seconds: float) -> list[str]:
    """What ran: operations by kind, requests by kind and status code."""
    codes = world.tally.by_code()
    return [
        f"operations: {sum(world.operations.values())} "
        f"({', '.join(f'{kind} {n}' for kind, n in sorted(world.operations.items()))})",
        f"requests: {world.tally.total()} answered ({world.tally.total() / seconds:.0f}/s), "
        f"{sum(world.tally.transport.values())} without an answer",
        world.tally.table(),
        f"status codes: {dict(sorted(codes.items()))}; 5xx: {sum(n for c, n in codes.items() if c >= 500)}; "
        f"4xx (races, expected): {sum(n for c, n in codes.items() if 400 <= c < 500)}",
        *(f"note: {text}: {n}" for text, n in sorted(world.notes.items())),
        f"  no 5xx or unexpected code: {world.tally.failures[:10] or 'ok'}",
    ]
