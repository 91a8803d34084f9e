"""A storage node (SPEC 10): the only code that drives one host's volume store and target.

`tether node` runs `NodeAgent`: it registers the node (a `services` row, the same row after a restart),
heartbeats with its pool's capacity, consumes its queue `node.<name>` (procrastinate, one job per volume at a
time through the job's lock) and reconciles its own volumes at start and every TETHER_RECONCILE_INTERVAL.
`tether serve` in embedded mode builds the same parts in its own process (`local_storage`), with no queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import select
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from app.backends.base import BackendError, Backends, Capacity
from app.backends.dispatch import Dispatcher, LockTimeout
from app.backends.factory import build_backends
from app.backends.operations import NAMES, StorageOps
from app.config import Settings
from app.db.engine import Database
from app.db.locks import cross_process_locks
from app.db.models import utcnow
from app.logs import begin_request, bind, end_request
from app.metrics import Metrics
from app.queue import (
    CHANNEL,
    EXPIRED,
    FINISH_AND_WAKE,
    FINISH_RECORD_AND_WAKE,
    RECORD_AND_WAKE,
    RESULT_TTL,
    TASK,
    WAKE,
    Codec,
    notification,
    queue_of,
    record_outcome,
)
from app.secrets import SecretBox
from app.services.nodes import SEQUENCES, LocalNode, Nodes, node_row
from app.services.reconcile import Reconciler
from app.services.work import every

log = logging.getLogger("tether.node")
# procrastinate's own message on its queue's channel (what a defer sends): the worker fetches when it hears it
_INSERTED = json.dumps({"type": "job_inserted"})

GIB = 1024**3
# seconds between two fetches of an idle worker. procrastinate fetches on a new job's notification, or at this
# poll (5 s by default): a job deferred while its volume's previous job runs (the lock) is skipped, and nothing
# wakes the worker when that job ends; nor does a notification that lands while a fetch is finding nothing.
# Either way the job would wait for the poll, and its API caller with it.
FETCH_POLL = 0.5
# seconds before the job worker starts again after it ended by itself (its database went away)
RESTART = 1.0
_FINISHED_KEPT = 10_000
# seconds between two looks for jobs this process finished that procrastinate still has `doing`, and how long
# procrastinate has to record a job's end itself before the look does it
SETTLE_EVERY = 5.0
SETTLE_AFTER = 5.0


@dataclass
class _End:
    """What a running job leaves for its end: the outcome for its caller (None: nobody waits) and the caller's
    deadline."""

    told: tuple[bool, Any] | None = None
    deadline: float = 0.0


def finishing_manager(connector: Any, finish: Any) -> Any:
    """procrastinate's JobManager whose end of a job (what its worker calls once the task has returned) is
    `finish(manager, job, status, delete_job)`: the node's one statement for it."""
    from procrastinate.manager import JobManager

    class FinishingManager(JobManager):
        async def finish_job(self, job: Any, status: Any, delete_job: bool) -> None:
            await finish(self, job, status, delete_job)

    return FinishingManager(connector)


@dataclass
class LocalStorage:
    """This process's storage: the backends, the node that runs their operations, its reconciler."""

    backends: Backends
    node: LocalNode
    nodes: Nodes
    reconciler: Reconciler


def local_storage(settings: Settings, db: Database, dispatcher: Dispatcher, secrets: SecretBox) -> LocalStorage:
    """own pool only on a `tether node`; every volume of the database on an embedded node (the only one)."""
    backends = build_backends(settings)
    cap = settings.pool_capacity_gb * GIB if settings.pool_capacity_gb is not None else None
    node = LocalNode(settings.node_name, dispatcher, StorageOps(backends, cap))
    nodes = Nodes(db, dispatcher, local=node, down_time=settings.service_down_time)
    own = settings.node_name if settings.nodes == "remote" else None
    return LocalStorage(backends, node, nodes, Reconciler(db, nodes, secrets, own_node=own))


def job_pool(**options: Any) -> Any:
    """procrastinate's connection pool: autocommit connections, checked on handout only when the server has
    sent something since their last use, and every idle one checked at once when one turns out dead.

    Autocommit: each of procrastinate's queries is one statement (a function call), so the COMMIT psycopg
    sends after it when the pool's connection context ends is a round trip that does nothing; a job's fetch,
    done-marking and outcome are one round trip each. The check: psycopg_pool's own sends an empty query on
    every getconn, a round trip per query (13% of the node's busy samples). A connection the server closed
    (a PostgreSQL restart or a terminated backend) has the server's goodbye (or the socket's end) waiting to
    be read, so a connection with nothing to read is handed out unchecked and one with something is checked
    as before; a connection the network lost without a word fails its query instead, and the pool replaces
    it when it comes back broken.

    psycopg_pool, when the connection a getconn takes is dead, waits before taking the next one, 1, 2, 4,
    8 s: after a PostgreSQL restart each of the pool's dead connections cost the node's job worker its turn,
    and no job ran for 7 to 15 s (callers with a short TETHER_NODE_TIMEOUT answered 503). One dead connection
    mostly means all of them are: they are checked (and replaced) together at once, and the next one the
    getconn takes, a second later, is a new one."""
    import psycopg_pool

    made: list[psycopg_pool.AsyncConnectionPool] = []
    checks: set[asyncio.Task[None]] = set()

    async def check(connection: Any) -> None:
        if not connection.closed:
            readable = select.poll()  # poll, not select: no limit on the descriptor's number
            readable.register(connection.fileno(), select.POLLIN)
            if not readable.poll(0):
                return  # nothing arrived since its last use: alive as far as the socket can tell
        try:
            await psycopg_pool.AsyncConnectionPool.check_connection(connection)
        except Exception:
            if made and not checks:
                task = asyncio.get_running_loop().create_task(made[0].check())
                checks.add(task)
                task.add_done_callback(checks.discard)
            raise

    async def configure(connection: Any) -> None:
        await connection.set_autocommit(True)

    pool = psycopg_pool.AsyncConnectionPool(**{**options, "check": check, "configure": configure})
    made.append(pool)
    return pool


class Heartbeat:
    """A node's services row, refreshed every TETHER_NODE_HEARTBEAT s with its pool's capacity, and at once
    after a volume was created or deleted (so get_pools and the scheduler see the change)."""

    def __init__(self, settings: Settings, nodes: Nodes, node: LocalNode) -> None:
        self.settings = settings
        self.nodes = nodes
        self.node = node
        self.capacity: Capacity | None = None
        self._soon = asyncio.Event()

    def poke(self) -> None:
        self._soon.set()

    async def beat(self) -> None:
        """The row, with the pool's capacity as read now, or as last known when the read fails or waits longer
        than one heartbeat: it runs in the storage's thread pool, which long storage work may fill (volumes
        being zeroed on delete), and a node whose storage is busy is not down."""
        try:
            async with asyncio.timeout(self.settings.node_heartbeat):
                self.capacity = await self.node.call(None, "capacity", ())
        except TimeoutError:
            log.warning(
                "the pool's capacity was not read within %g s (the storage workers are busy): it stays as last read",
                self.settings.node_heartbeat,
            )
        except BackendError as error:  # the last capacity known stays in the row
            log.error("reading the pool's capacity failed: %s", error)
        await self.nodes.heartbeat(node_row(self.settings, self.capacity))

    async def run(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can lose a cancellation that comes as its
            # timeout fires, and then this task never ends (a server's shutdown waited for it for good)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.node_heartbeat):
                    await self._soon.wait()
            self._soon.clear()
            try:
                await self.beat()
            except Exception:
                log.exception("heartbeat failed; trying again in %g s", self.settings.node_heartbeat)


class NodeAgent:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.secrets = SecretBox(settings.secret_key)
        self.codec = Codec(self.secrets)
        self.stopping = asyncio.Event()
        self._wakes: set[asyncio.Task[None]] = set()
        self.metrics = Metrics()
        # the jobs this process ran to the end: job id -> when (monotonic), newest last
        self._finished: OrderedDict[int, float] = OrderedDict()
        # the ends of the running jobs not yet recorded, by job id
        self._ends: dict[int, _End] = {}

    async def run(self) -> None:
        import procrastinate

        from app.db.locks import asyncpg_dsn

        settings = self.settings
        db = Database(settings.database_url, settings.database_pool_size, settings.write_concurrency)
        locks = cross_process_locks(settings.database_url, True, one_host=False)
        dispatcher = Dispatcher(settings.backend_workers, locks, settings.lock_timeout)
        storage = local_storage(settings, db, dispatcher, self.secrets)
        storage.nodes.stopping = self.stopping  # its lock waits end when it is told to stop
        self.storage = storage
        self.db = db
        self.metrics.watch(dispatcher)
        if settings.node_metrics_port is not None:
            from prometheus_client import start_http_server

            start_http_server(settings.node_metrics_port, settings.node_metrics_host, registry=self.metrics.registry)
        app = procrastinate.App(
            connector=procrastinate.PsycopgConnector(conninfo=asyncpg_dsn(settings.database_url), pool_factory=job_pool)
        )
        app.job_manager = finishing_manager(app.connector, self._finish)
        app.task(name=TASK, pass_context=True)(self._job)
        beat = Heartbeat(settings, storage.nodes, storage.node)
        storage.reconciler.on_change = beat.poke
        tasks: list[asyncio.Task[Any]] = []
        try:  # the storage and the database answer, or the node does not start (one line from the CLI)
            await storage.node.call(None, "check", ())
            await beat.beat()
        except BaseException:
            if locks is not None:
                await locks.close()
            await db.dispose()
            raise
        async with app.open_async():
            try:
                await self._recover(app)
                name = settings.node_name
                tasks.append(asyncio.create_task(beat.run(), name="heartbeat"))
                tasks.append(
                    asyncio.create_task(
                        every(settings.reconcile_interval, self._reconcile, "reconcile"), name="reconcile"
                    )
                )
                tasks.append(
                    asyncio.create_task(
                        every(SETTLE_EVERY, lambda: self._settle(app), "settling ended jobs", first=False),
                        name="settle",
                    )
                )
                worker = asyncio.create_task(self._work(app), name="worker")
                tasks.append(worker)
                log.info("node %s ready: queue %s, pool %s", name, queue_of(name), settings.pool_host)
                stop = asyncio.create_task(self.stopping.wait())
                await asyncio.wait([stop, worker], return_when=asyncio.FIRST_COMPLETED)
                if worker.done() and not self.stopping.is_set():
                    worker.result()  # the worker died: say why
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(BaseException):
                        await task
                if self._wakes:  # the outcomes of the jobs that ended last, for callers still waiting
                    await asyncio.wait(set(self._wakes), timeout=SETTLE_AFTER)
                if locks is not None:
                    await locks.close()
                await db.dispose()
        log.info("node %s stopped", settings.node_name)

    async def _work(self, app: Any) -> None:
        """procrastinate's worker on this node's queue, for as long as the node runs.

        The worker ends by itself when the database fails under it (a job fetch or a job's bookkeeping during
        a PostgreSQL restart); it is started again, after the jobs it left `doing` are settled as a restart
        settles them, so a database restart never ends the node."""
        name = self.settings.node_name
        restarted = False
        while True:
            try:
                if restarted:
                    await self._recover(app)
                await app.run_worker_async(
                    queues=[queue_of(name)],
                    concurrency=self.settings.backend_workers,
                    install_signal_handlers=False,
                    delete_jobs="always",
                    fetch_job_polling_interval=FETCH_POLL,
                    name=f"tether-node-{name}",
                )
                log.error("the job worker of queue %s stopped; starting it again in %g s", queue_of(name), RESTART)
            except Exception as error:
                log.error(
                    "the job worker of queue %s failed (%s); starting it again in %g s",
                    queue_of(name),
                    str(error).strip() or type(error).__name__,
                    RESTART,
                )
            restarted = True
            await asyncio.sleep(RESTART)

    async def _settle(self, app: Any) -> None:
        """Jobs this process ran to the end that procrastinate still has `doing`: recording their end failed
        (the database went away under it, and the worker lives on), and a `doing` job holds its volume's lock,
        so every later job of that volume would wait for it for good."""
        from procrastinate.jobs import Status

        ended = time.monotonic() - SETTLE_AFTER
        for job in await app.job_manager.list_jobs_async(queue=queue_of(self.settings.node_name), status="doing"):
            if job.id is not None and self._finished.get(job.id, ended + 1) <= ended:
                log.warning("job %s ended but procrastinate did not record it: finishing it now", job.id)
                await app.job_manager.finish_job_by_id_async(job.id, status=Status.SUCCEEDED, delete_job=True)

    async def _reconcile(self) -> None:
        await self.storage.reconciler.run()

    async def _recover(self, app: Any) -> None:
        """Jobs a killed predecessor was running: the volume sequences run again (they are ensures that read
        the database first); a storage operation another process waited for is answered as failed, so that
        caller undoes its claim (or, past its deadline, this node's reconcile settles the volume)."""
        from procrastinate.jobs import Status

        queue = queue_of(self.settings.node_name)
        for job in await app.job_manager.list_jobs_async(queue=queue, status="doing"):
            op = (job.task_kwargs.get("job") or {}).get("op")
            if op in SEQUENCES:
                log.warning("job %s (%s) was cut short by a restart: running it again", job.id, op)
                await app.job_manager.retry_job_by_id_async(job.id, retry_at=utcnow())
                continue
            if job.id in self._finished:  # this process ran it to the end; only procrastinate's record of it was lost
                await app.job_manager.finish_job_by_id_async(job.id, status=Status.SUCCEEDED, delete_job=True)
                continue
            log.warning("job %s (%s) was cut short by a restart: answered as failed", job.id, op)
            async with self.db.write() as session:
                await record_outcome(session, job.id, False, "the storage node restarted during the job")
            await app.job_manager.finish_job_by_id_async(job.id, status=Status.FAILED, delete_job=True)

    async def _job(self, context: Any, job: dict[str, Any]) -> None:
        job_id = int(context.job.id)
        op = str(job.get("op"))
        tokens = begin_request(str(job.get("request_id") or "-"))
        bind(node=self.settings.node_name, job_id=str(job_id), operation=op)
        # what the job's end tells: procrastinate's worker ends the job in this task after us (_finish)
        end = self._ends[job_id] = _End()
        this = asyncio.current_task()
        if this is not None:
            this.add_done_callback(lambda _task: self._job_ended(context.app, job_id))
        started = time.perf_counter()
        deadline = job.get("deadline")
        cancelled = False
        try:
            if deadline is not None and time.time() > float(deadline):
                # its caller answered 503 already; what it claimed is this node's reconcile's to settle
                log.warning("job %s (%s) reached past its caller's deadline: not run", job_id, op)
                ok, result = False, EXPIRED
            else:
                ok, result = await self._execute(op, job.get("args") or [])
            self.metrics.observe_job(self.settings.node_name, op, time.perf_counter() - started, not ok)
            if deadline is not None:  # somebody waits for it (or did)
                end.told, end.deadline = (ok, result), float(deadline)
                if this is None:
                    await self._answer(context.app, job_id, ok, result, end.deadline)
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            if not cancelled:
                self._finished[job_id] = time.monotonic()
                while len(self._finished) > _FINISHED_KEPT:
                    self._finished.popitem(last=False)
            end_request(tokens)
            if this is None:
                self._ends.pop(job_id, None)

    async def _finish(self, manager: Any, job: Any, status: Any, delete_job: bool) -> None:
        """The end of a job as procrastinate's worker asks for it, with the outcome for its caller and the
        worker's wake-up in the same statement: one round trip and one commit where there were two. When it
        fails (the database went away), procrastinate sees its own statement fail, as before, and the outcome
        is recorded on its own when the job's task is over (_job_ended); _settle ends the job later."""
        end = self._ends.get(job.id)
        args = {"job_id": job.id, "status": status.value, "delete_job": delete_job, **self._wake_args}
        if end is not None and end.told is not None:
            await manager.connector.execute_query_async(
                FINISH_RECORD_AND_WAKE, **args, **self._outcome_args(job.id, *end.told)
            )
        else:
            await manager.connector.execute_query_async(FINISH_AND_WAKE, **args)
        self._ends.pop(job.id, None)  # told and woken

    def _job_ended(self, app: Any, job_id: int) -> None:
        """A job's task is over. Its end, recorded by _finish, told its caller and woke the worker; when that
        statement failed (or never ran), the outcome for its caller and the worker's wake-up are sent now, in
        one statement."""
        end = self._ends.pop(job_id, None)
        if end is None:  # recorded
            return
        told = end.told
        task = self._answer(app, job_id, *told, end.deadline) if told is not None else self._wake(app)
        ending = asyncio.get_running_loop().create_task(task)
        self._wakes.add(ending)
        ending.add_done_callback(self._wakes.discard)

    @cached_property
    def _wake_args(self) -> dict[str, str]:
        """The wake-up's arguments: the same for every job of this node (its queue and that queue's channel)."""
        from procrastinate.manager import get_channel_for_queues

        queue = queue_of(self.settings.node_name)
        (channel,) = get_channel_for_queues([queue])
        return {"channel": channel, "message": _INSERTED, "queue": queue}

    @staticmethod
    def _outcome_args(job_id: int, ok: bool, result: Any) -> dict[str, Any]:
        encoded = json.dumps(result)
        return {
            "ok": ok,
            "result": encoded,
            "done": CHANNEL,
            "payload": notification(job_id, ok, encoded),
            "prune": job_id % 100 == 0,
            "ttl": RESULT_TTL,
        }

    async def _answer(self, app: Any, job_id: int, ok: bool, result: Any, deadline: float) -> None:
        """The outcome for the job's caller (and the worker's wake-up), recorded also across a database restart:
        tried again until the caller's deadline has passed (the storage work is done; only telling it was
        interrupted)."""
        from procrastinate.exceptions import ConnectorException

        args = {"job_id": job_id, **self._outcome_args(job_id, ok, result), **self._wake_args}
        delay = 0.1
        while True:
            try:
                await app.connector.execute_query_async(RECORD_AND_WAKE, **args)
                return
            except ConnectorException as error:
                if time.time() > deadline:
                    log.error("recording the outcome of job %s failed past its deadline: %s", job_id, error.__cause__)
                    return
                log.warning("recording the outcome of job %s failed (%s); trying again", job_id, error.__cause__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _wake(self, app: Any) -> None:
        try:
            await app.connector.execute_query_async(WAKE, **self._wake_args)
        except Exception as error:  # the poll finds the job anyway
            log.debug("waking the job worker failed: %s", error)

    async def _execute(self, op: str, raw: list[Any]) -> tuple[bool, Any]:
        if op not in NAMES and op not in SEQUENCES:
            log.error("refusing a job with an unknown operation %r", op)
            return False, f"unknown operation {op!r}"
        try:
            args = tuple(self.codec.decode(a) for a in raw)
            key = args[0].id if args and hasattr(args[0], "id") else None
            result = await self.storage.node.call(key, op, args)
            return True, self.codec.encode(result)
        except (BackendError, LockTimeout) as error:  # LockTimeout: a volume busy too long, or this node stopping
            log.error("%s failed: %s", op, error)
            return False, str(error)
        except Exception as error:  # a job never dies unanswered: its caller would wait for the deadline
            log.exception("%s failed", op)
            return False, f"{type(error).__name__} on the node"
