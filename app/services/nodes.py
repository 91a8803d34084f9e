"""Where a volume's storage work runs (SPEC 10): its storage node, in this process or across the queue.

Services hold a volume with `nodes.exclusive(volume_id)` and get a `NodeRunner`; `await run("connect", ref, chap,
initiator)` runs a named operation (app/backends/operations.py) on the volume's node and `await run.defer(session,
…)` adds it to the caller's transaction (the outbox) and returns what to await once that commits.
- **embedded**: one node in this process (`LocalNode`), the dispatcher's thread pool; every volume is its own.
- **remote**: each volume's node is the `<node>` of its host `<node>@<backend>#<pool>`; a `RemoteNode` defers
  procrastinate jobs on that node's queue (app/queue.py) and waits for their outcome with TETHER_NODE_TIMEOUT.
  A node whose heartbeat is older than TETHER_SERVICE_DOWN_TIME is down: work for it fails fast with a 503.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, overload

from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.backends.base import BackendError
from app.backends.dispatch import Dispatcher, KeyedLocks, Lease, LockTimeout
from app.backends.operations import NAMES, StorageOps
from app.db.engine import Database
from app.db.locks import advisory_key
from app.db.models import Service, Volume, utcnow
from app.errors import InvalidVolume, ServiceUnavailable
from app.logs import bind, request_id_var
from app.queue import JobFailed, JobQueue, JobTimeout

log = logging.getLogger("tether.nodes")

VOLUME = "cinder-volume"
SCHEDULER = "cinder-scheduler"
GIB = 1024**3
_HOSTS_KEPT = 100_000
# seconds a process believes what it read of the services table (who is up)
_STATE_TTL = 1.0
# seconds a request waits for a busy volume before it looks whether the volume's node is down (then every as long)
_LOCK_LOOK = 1.0
# one placement at a time across every API process, held until the create's transaction commits: the next
# create then counts the volume this one placed (racing creates each saw the same free space and all took it)
_PLACEMENT_LOCK = text("SELECT pg_advisory_xact_lock(:key)")
_PLACEMENT_KEY = advisory_key("tether.placement")


class NodeStopping(LockTimeout):
    """This node was told to stop while a job waited for a volume's lock: the job ends; a reconcile after the
    restart settles the volume."""

    def __init__(self, key: str) -> None:
        super().__init__(key, 0)
        self.args = (f"the node is stopping: {key} was not worked on; its reconcile after the restart settles it",)


class Unwanted(Exception):
    """The work that waited for a volume's lock is no longer wanted (what `exclusive(wanted=...)` was told)."""


# asked while a volume's lock is waited for: is the work still wanted?
Wanted = Callable[[], Awaitable[bool]]


class NodeUnavailable(ServiceUnavailable):
    def __init__(self, node: str, why: str = "is down") -> None:
        super().__init__(f"Storage node {node} {why}; try again later.")
        self.node = node


class Pending(Protocol):
    async def result(self) -> Any: ...


class Node(Protocol):
    name: str

    async def call(self, key: str | None, op: str, args: tuple[Any, ...]) -> Any: ...

    async def reconcile(self) -> dict[str, Any]: ...

    async def defer(
        self, session: AsyncSession, key: str | None, op: str, args: tuple[Any, ...], *, wait: bool = True
    ) -> Pending: ...


# the node-side sequences a job may name besides the storage operations: they update the database themselves
SEQUENCES = frozenset({"finish_create", "finish_delete", "reconcile"})


class NodeSide(Protocol):
    """What a node runs for the sequences (the reconciler): storage work and its database update together."""

    async def sequence(self, op: str, args: tuple[Any, ...]) -> Any: ...


@dataclass
class _Now:
    """Embedded: the operation runs when awaited (the transaction that 'deferred' it has committed by then)."""

    call: Callable[[], Awaitable[Any]]

    async def result(self) -> Any:
        return await self.call()


async def _nothing() -> None:
    return None


class LocalNode:
    """The storage of this process: named operations in the dispatcher's pool, one call per volume at a time."""

    def __init__(self, name: str, dispatcher: Dispatcher, ops: StorageOps) -> None:
        self.name = name
        self.dispatcher = dispatcher
        self.ops = ops
        self.side: NodeSide | None = None
        self._calls = KeyedLocks()

    async def call(self, key: str | None, op: str, args: tuple[Any, ...]) -> Any:
        if op in SEQUENCES:
            assert self.side is not None
            return await self.side.sequence(op, args)
        if op not in NAMES:
            raise BackendError(f"unknown storage operation {op!r}")
        if key is None:
            return await self.dispatcher.call(getattr(self.ops, op), *args)
        async with self._calls.hold(key):
            return await self.dispatcher.call(getattr(self.ops, op), *args)

    async def defer(
        self, session: AsyncSession, key: str | None, op: str, args: tuple[Any, ...], *, wait: bool = True
    ) -> Pending:
        return _Now(lambda: self.call(key, op, args))

    async def reconcile(self) -> dict[str, Any]:
        return await self.call(None, "reconcile", ())  # type: ignore[no-any-return]


@dataclass
class _Job:
    queue: JobQueue
    job_id: int
    node: str
    op: str
    timeout: float

    async def result(self) -> Any:
        try:
            return await self.queue.wait(self.job_id, self.timeout, node=self.node, op=self.op)
        except JobFailed as error:
            raise BackendError(f"node {self.node}: {error}") from None
        except JobTimeout:
            raise NodeUnavailable(self.node, f"did not finish {self.op} within {self.timeout:g} s") from None


class RemoteNode:
    """A `tether node` elsewhere: each call is a job on its queue, awaited with the node timeout."""

    def __init__(self, name: str, db: Database, queue: JobQueue, timeout: float) -> None:
        self.name = name
        self.db = db
        self.queue = queue
        self.timeout = timeout

    async def defer(
        self, session: AsyncSession | Any, key: str | None, op: str, args: tuple[Any, ...], *, wait: bool = True
    ) -> Pending:
        """wait=False: nobody awaits the outcome (the node records it in the database itself). `session`: a
        transaction's, or a Database.statements() connection (the job alone)."""
        job_id = await self.queue.defer(
            session, self.name, key, op, args, request_id_var.get(), wait=wait, deadline_s=self.timeout
        )
        bind(node=self.name, job_id=str(job_id), operation=op)  # the request's log lines name its job
        if not wait:
            return _Now(_nothing)
        return _Job(self.queue, job_id, self.name, op, self.timeout)

    async def call(self, key: str | None, op: str, args: tuple[Any, ...]) -> Any:
        # the job alone: one statement, committed by itself, on the driver's connection
        async with self.db.statements(write=True) as connection:
            pending = await self.defer(connection, key, op, args)
        return await pending.result()

    async def reconcile(self) -> dict[str, Any]:
        """One reconcile job; a node runs them one at a time (their lock): a reconcile waits for the lock of each
        volume it changes, and several at once (`tether reconcile` run again and again) could take every one of
        the node's job slots while the holders of those locks wait for a job of their own."""
        return await self.call(f"reconcile@{self.name}", "reconcile", ())  # type: ignore[no-any-return]


class NodeRunner:
    """Named operations on one volume's node, while the caller holds the volume's lock."""

    def __init__(self, nodes: Nodes, volume_id: str, lease: Lease | None) -> None:
        self.nodes = nodes
        self.volume_id = volume_id
        self._lease = lease

    def check(self) -> None:
        """Raise LockLost if the lock this sequence holds was lost (another process may hold it now)."""
        if self._lease is not None:
            self._lease.check()

    async def require(self) -> None:
        """503 when the volume's node is down: call before a state change that needs its work. A volume that
        does not exist or was never placed passes: the state change refuses it (404, 400) as it would anyway."""
        await self.nodes.node_of(self.volume_id, placed=False)

    async def __call__(self, op: str, *args: Any) -> Any:
        self.check()
        node = await self.nodes.node_of(self.volume_id)
        return await node.call(self.volume_id, op, args)

    def when_awaited(self, op: str, *args: Any) -> Pending:
        """Embedded: the operation run when `.result()` is awaited, as defer() runs it, for a caller whose state
        change committed without a session (app/db/prepared.py's statements)."""
        self.check()
        local = self.nodes.local
        assert local is not None, "only an embedded node runs an operation without its job"
        return _Now(lambda: local.call(self.volume_id, op, args))

    async def defer(self, session: AsyncSession | Any, op: str, *args: Any, wait: bool = True) -> Pending:
        """The operation as part of `session`'s transaction (or of one open on a Database.statements() connection);
        await `.result()` after it commits."""
        self.check()
        node = await self.nodes.node_of(self.volume_id)
        return await node.defer(session, self.volume_id, op, args, wait=wait)


class Nodes:
    def __init__(
        self,
        db: Database,
        dispatcher: Dispatcher,
        *,
        local: LocalNode | None = None,
        queue: JobQueue | None = None,
        timeout: float = 60.0,
        down_time: float = 60.0,
    ) -> None:
        """`local`: every volume is this process's (embedded, or a node's own view); else `queue` (remote)."""
        assert local is not None or queue is not None
        self.db = db
        self.dispatcher = dispatcher
        self.local = local
        self.queue = queue
        self.timeout = timeout
        self.down_time = down_time
        self._hosts: OrderedDict[str, str] = OrderedDict()
        self._remote: dict[str, RemoteNode] = {}
        self._state: tuple[float, dict[str, Service]] = (0.0, {})
        # a `tether node`'s: set once it is told to stop (its lock waits end then)
        self.stopping: asyncio.Event | None = None

    @property
    def embedded(self) -> bool:
        return self.local is not None

    @asynccontextmanager
    async def exclusive(self, volume_id: str, wanted: Wanted | None = None) -> AsyncIterator[NodeRunner]:
        """Hold the volume (across every process sharing the database) for a sequence of state changes and
        storage operations. `wanted`: asked before the first try and then every second of the wait; when it
        says no, the wait ends with Unwanted."""
        async with AsyncExitStack() as stack:
            lease = await self._acquire(stack, volume_id, wanted)
            yield NodeRunner(self, volume_id, lease)

    async def _acquire(self, stack: AsyncExitStack, volume_id: str, wanted: Wanted | None = None) -> Lease | None:
        """The volume's lock, waited for at most lock_timeout. In remote mode a lock still busy after a second has
        the volume's node looked at, every second: a node that hung while it held the volume (stopped mid-job:
        its connection, and PostgreSQL's lock with it, lives on) would hold it until lock_timeout, and what waits
        here needs that node anyway, so a down node is a 503 now (a 409 after two minutes before).

        On a node (`stopping` set), a wait ends with NodeStopping within a second of the node's SIGTERM: whoever
        holds the lock may be an API request waiting for a job of this node, which a stopping node no longer
        fetches, and the node would wait for the job that waits here (a reconcile) until it is killed."""
        if self.local is not None and self.stopping is None and wanted is None:
            return await stack.enter_async_context(self.dispatcher.hold(volume_id))
        limit = self.dispatcher.lock_timeout
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            if self.stopping is not None and self.stopping.is_set():
                raise NodeStopping(volume_id)
            if wanted is not None and not await wanted():
                raise Unwanted(volume_id)
            step = _LOCK_LOOK if deadline is None else max(0.0, min(_LOCK_LOOK, deadline - time.monotonic()))
            try:
                return await stack.enter_async_context(self.dispatcher.hold(volume_id, step))
            except LockTimeout:
                if deadline is not None and time.monotonic() >= deadline:
                    raise LockTimeout(volume_id, limit or 0) from None
            if self.local is not None:
                continue
            try:
                await self.node_of(volume_id)
            except NodeUnavailable:
                if self._hosts.get(volume_id):  # its node is down (not: the volume is gone or was never placed)
                    raise

    def runner(self, volume_id: str) -> NodeRunner:
        """Operations on a volume without holding its lock (node-side sequences already serialised by the queue)."""
        return NodeRunner(self, volume_id, None)

    # -- which node -------------------------------------------------------------------------------

    def remember(self, volume_id: str, host: str) -> None:
        self._hosts[volume_id] = host
        if len(self._hosts) > _HOSTS_KEPT:
            self._hosts.popitem(last=False)

    @overload
    async def node_of(self, volume_id: str) -> Node: ...

    @overload
    async def node_of(self, volume_id: str, *, placed: bool) -> Node | None: ...

    async def node_of(self, volume_id: str, *, placed: bool = True) -> Node | None:
        """The node that holds the volume; 503 when it is down. One that does not exist or was never placed:
        InvalidVolume, or None with placed=False."""
        if self.local is not None:
            return self.local
        host = self._hosts.get(volume_id)
        if host is None:
            async with self.db.read() as session:
                host = await session.scalar(select(Volume.host).where(Volume.id == volume_id))  # type: ignore[arg-type]
            if host:  # a volume's host never changes; a missing or unplaced one is asked again
                self.remember(volume_id, host)
        if not host:
            if not placed:
                return None
            raise InvalidVolume(f"Volume {volume_id} is on no storage node: it was never placed.")
        return await self.node_named(host.split("@", 1)[0])

    async def node_named(self, name: str) -> Node:
        """The node, or NodeUnavailable when its last heartbeat is too old (or it never registered)."""
        if self.local is not None:
            return self.local
        service = (await self.services()).get(name)
        if service is None or not self.is_up(service):
            raise NodeUnavailable(name)
        assert self.queue is not None
        node = self._remote.get(name)
        if node is None:
            node = self._remote[name] = RemoteNode(name, self.db, self.queue, self.timeout)
        return node

    def is_up(self, service: Service) -> bool:
        return utcnow() - service.heartbeat_at <= timedelta(seconds=self.down_time)

    def targets(self) -> set[str]:
        """The target kinds (tgt, lio, fake) of the nodes this process has heard of (no query: what the last
        read of the services table said)."""
        return {s.target for s in self._state[1].values() if s.target}

    async def services(self, *, fresh: bool = False) -> dict[str, Service]:
        """The storage nodes by name, as their last heartbeats left them (re-read at most once a second)."""
        at, known = self._state
        if fresh or time.monotonic() - at > _STATE_TTL:
            async with self.db.read() as session:
                rows = (await session.execute(select(Service).where(Service.binary == VOLUME))).scalars().all()  # type: ignore[arg-type]
            known = {row.name: row for row in rows}
            self._state = (time.monotonic(), known)
        return known

    # -- placement --------------------------------------------------------------------------------

    async def zones(self) -> set[str]:
        return {s.availability_zone for s in (await self.services()).values()}

    async def place(
        self, session: AsyncSession, size_gb: int, zone: str | None, backend_name: str | None
    ) -> tuple[Service | None, str]:
        """The up node of `zone` (any zone when None) with the most free space that fits, and why when none does."""
        candidates = [
            s
            for s in (await self.services(fresh=True)).values()
            if (zone is None or s.availability_zone == zone)
            and (backend_name is None or s.backend_name == backend_name)
        ]
        up = [s for s in candidates if self.is_up(s)]
        if not up:
            why = "no storage node" if not candidates else "every storage node is down"
            return None, f"{why} in zone {zone or '(any)'}" + (
                f" with volume_backend_name {backend_name}" if backend_name else ""
            )
        if not self.db.is_sqlite:  # SQLite's writers take turns already (BEGIN IMMEDIATE)
            await session.execute(_PLACEMENT_LOCK, {"key": _PLACEMENT_KEY})
        allocated = await allocated_gb(session, [s.pool_host for s in up])
        best: tuple[int, str, Service] | None = None
        for service in up:
            free = free_bytes(service, allocated.get(service.pool_host, 0))
            if free >= size_gb * GIB and (best is None or (free, best[1]) > (best[0], service.name)):
                best = (free, service.name, service)
        if best is None:
            return None, f"no up storage node in zone {zone or '(any)'} has {size_gb} GiB free"
        return best[2], ""

    async def pools(self) -> list[tuple[Service, int]]:
        """Every node's pool (down ones too, as their last heartbeat left them) and the GiB its volumes hold."""
        services = sorted((await self.services(fresh=True)).values(), key=lambda s: s.name)
        async with self.db.read() as session:
            allocated = await allocated_gb(session, [s.pool_host for s in services])
        return [(service, allocated.get(service.pool_host, 0)) for service in services]

    # -- heartbeats -------------------------------------------------------------------------------

    async def heartbeat(self, row: dict[str, Any]) -> None:
        """Insert or refresh a services row (a restarted node keeps its row: same binary and name)."""
        now = utcnow()
        values = {**row, "heartbeat_at": now}
        insert = sqlite_insert if self.db.is_sqlite else pg_insert
        stmt = insert(Service).values(**values, created_at=now)
        stmt = stmt.on_conflict_do_update(index_elements=["binary", "name"], set_=values)
        async with self.db.autocommit() as session:
            await session.execute(stmt)


async def allocated_gb(session: AsyncSession, hosts: list[str]) -> dict[str, int]:
    """GiB of the volumes placed on each pool host (whatever their status: a volume holds its place)."""
    rows = await session.execute(
        select(Volume.host, func.sum(Volume.size))
        .where(Volume.host.in_(hosts))  # type: ignore[union-attr]
        .group_by(Volume.host)
    )
    return {str(host): int(size or 0) for host, size in rows.all()}


def free_bytes(service: Service, allocated_gb: int) -> int:
    """What the scheduler may still promise: the pool's free space, and no more than its size less what is
    allocated (a sparse or thin pool reports more free space than its volumes may grow into)."""
    total, free = service.total_bytes or 0, service.free_bytes or 0
    return max(0, min(free, total - allocated_gb * GIB))


def node_row(settings: Any, capacity: Any | None) -> dict[str, Any]:
    """A node's services row from its settings and its pool's capacity."""
    return {
        "binary": VOLUME,
        "name": settings.node_name,
        "backend_name": settings.backend_name,
        "pool_name": settings.pool_name,
        "availability_zone": settings.availability_zone,
        "portal": settings.target_portal,
        "volume_backend": settings.volume_backend,
        "target": settings.target,
        "thin": settings.volume_backend == "lvm" and settings.lvm_type == "thin",
        "total_bytes": capacity.total_bytes if capacity is not None else None,
        "free_bytes": capacity.free_bytes if capacity is not None else None,
    }


def scheduler_row(settings: Any) -> dict[str, Any]:
    """An API host's row: os-services lists it as the cinder-scheduler of that host."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64] or "tether"
    return {"binary": SCHEDULER, "name": host, "availability_zone": settings.availability_zone}
