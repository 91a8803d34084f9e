"""The job queue between the API tier and the storage nodes (SPEC 10): procrastinate on PostgreSQL.

A job is one named operation (app/backends/operations.py, or a node-side sequence such as create_volume) with
JSON arguments, on the queue `node.<name>`, with the volume's id as procrastinate's `lock`, so one volume's jobs
run one at a time and in order. The API tier defers a job with `procrastinate_defer_jobs_v1` on its own
connection, inside the transaction of the state change the job serves (the outbox); the node writes the outcome
to `node_job_results` and notifies `tether_job_done` in one statement, the outcome in the notification too when
it fits; the waiting API process hears it and has the outcome (removing the row later, together with other
rows it heard), or finds the row when it polls or the notification had only the job's id, and takes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import asyncpg
from sqlalchemy import BigInteger, column, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.backends.base import Capacity, Chap, ExportInfo, ExportState, VolumeRef
from app.db.locks import asyncpg_dsn
from app.db.prepared import Prepared
from app.secrets import SecretBox

log = logging.getLogger("tether.queue")

TASK = "tether.node_op"
CHANNEL = "tether_job_done"
# a result nobody read within this long (its waiter crashed) is removed by the next reader
RESULT_TTL = 3600.0
# seconds to wait for a new connection to the database (asyncpg's default is 60: past any job's deadline)
_CONNECT_TIMEOUT = 5.0
# what a connection that the database dropped (or that an operation cut off mid-way left unusable) raises
_CONNECTION_LOST = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
# the outcome of a job that a node reached after its caller's deadline and did not run
EXPIRED = "the caller stopped waiting before the node reached the job"

# prepared: a job deferred by itself (a storage call outside a claim) runs on the driver's connection
_DEFER = Prepared(
    text(
        "SELECT unnest(procrastinate_defer_jobs_v1(ARRAY[ROW(:queue, :task, 0, :lock, NULL, CAST(:args AS jsonb),"
        " NULL)]::procrastinate_job_to_defer_v1[]))"
    ).columns(column("id", BigInteger))
)
_TAKE_RESULT = text("DELETE FROM node_job_results WHERE job_id = $1 RETURNING ok, result")
_DISCARD = "DELETE FROM node_job_results WHERE job_id = ANY($1::bigint[])"
# seconds a heard outcome's row stays before it is removed, with the rows of the others heard meanwhile
DISCARD_AFTER = 0.5
# an outcome whose JSON is longer than this (bytes) travels in its row only: NOTIFY's payload is under 8000
PAYLOAD_MAX = 7000
# notifications heard for jobs nobody here waited for (yet), the newest kept: an autocommitted defer commits the
# job with its statement, and a busy API process may read the job's outcome notification before that
# statement's answer, when the job has no waiter yet (it then waited for the poll, 1 s)
_EARLY_KEPT = 1024


def notification(job_id: int, ok: bool, result: str) -> str:
    """What the node sends on CHANNEL for a job's outcome (`result`, JSON): "<job id> <0|1> <result>", or the
    job's id alone when the outcome is too long for a notification."""
    if len(result) * 4 <= PAYLOAD_MAX or len(result.encode()) <= PAYLOAD_MAX:
        return f"{job_id} {int(ok)} {result}"
    return str(job_id)


def queue_of(node: str) -> str:
    return f"node.{node}"


class JobFailed(Exception):
    """The node ran the job and it failed; the message is the node's (safe to log, not to return)."""


class JobTimeout(Exception):
    """No outcome within the deadline: the node is slow, down or dead; the job may still run later."""


# -- what crosses the queue: the backends' dataclasses as JSON ---------------------------------------------------


class Codec:
    """Arguments and results as JSON; a CHAP secret travels sealed when TETHER_SECRET_KEY is set."""

    def __init__(self, secrets: SecretBox) -> None:
        self.secrets = secrets

    def encode(self, value: Any) -> Any:
        if isinstance(value, VolumeRef):
            return {"volume": {"id": value.id, "size_gb": value.size_gb}}
        if isinstance(value, Chap):
            return {"chap": {"username": value.username, "secret": self.secrets.seal(value.secret)}}
        if isinstance(value, ExportInfo):
            return {"export": asdict(value)}
        if isinstance(value, Capacity):
            return {"capacity": asdict(value)}
        if isinstance(value, dict) and all(isinstance(v, ExportState) for v in value.values()):
            return {"exports": {k: {**asdict(v), "initiators": sorted(v.initiators)} for k, v in value.items()}}
        if isinstance(value, list | tuple):
            return {"list": [self.encode(v) for v in value]}
        return {"value": value}

    def decode(self, value: Any) -> Any:
        ((kind, body),) = value.items()
        if kind == "volume":
            return VolumeRef(id=body["id"], size_gb=body["size_gb"])
        if kind == "chap":
            return Chap(username=body["username"], secret=self.secrets.open(body["secret"]))
        if kind == "export":
            return ExportInfo(**body)
        if kind == "capacity":
            return Capacity(**body)
        if kind == "exports":
            return {k: ExportState(**{**v, "initiators": frozenset(v["initiators"])}) for k, v in body.items()}
        if kind == "list":
            return [self.decode(v) for v in body]
        return body


# -- the API tier's side: defer in the caller's transaction, await the outcome -----------------------------------


class JobQueue:
    """One per API process (and per node, for the jobs a node defers itself): defers jobs and awaits outcomes."""

    def __init__(self, database_url: str, secrets: SecretBox, *, poll: float = 1.0) -> None:
        self.dsn = asyncpg_dsn(database_url)
        self.codec = Codec(secrets)
        self.poll = poll
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._listener: asyncpg.Connection | None = None
        self._reader: asyncpg.Connection | None = None
        self._reader_lock = asyncio.Lock()
        self._closing = False
        # outcomes heard in their notification, not yet read by their waiter; rows to remove (read that way)
        self._heard_outcomes: dict[int, tuple[bool, Any]] = {}
        self._read: list[int] = []
        self._early: OrderedDict[int, str] = OrderedDict()
        self._discarding: asyncio.Task[None] | None = None
        # observers for metrics: fn(node, operation, seconds, failed)
        self.observers: list[Callable[[str, str, float, bool], None]] = []

    async def start(self) -> None:
        await self._listen()

    async def _listen(self) -> None:
        try:
            connection = await asyncpg.connect(self.dsn, timeout=_CONNECT_TIMEOUT)
            await connection.add_listener(CHANNEL, self._heard)
            connection.add_termination_listener(self._lost)
            self._listener = connection
        except (OSError, asyncpg.PostgresError) as error:  # waiters poll meanwhile; the next wait tries again
            log.warning("listening for job outcomes failed (polling instead): %s", error)
            self._listener = None

    def _heard(self, _connection: object, _pid: int, _channel: str, payload: str) -> None:
        """Every API process hears every job's outcome: only the jobs this one waits for are read further."""
        head, _, outcome = payload.partition(" ")
        with contextlib.suppress(ValueError):
            job_id = int(head)
            waiter = self._waiters.get(job_id)
            if waiter is None:  # another process's job, or one of ours not awaited yet (committed a moment ago)
                self._early[job_id] = outcome
                if len(self._early) > _EARLY_KEPT:
                    self._early.popitem(last=False)
                return
            self._deliver(job_id, waiter, outcome)

    def _deliver(self, job_id: int, waiter: asyncio.Future[None], outcome: str) -> None:
        if waiter.done():
            return
        with contextlib.suppress(ValueError):  # a notification without the outcome: the waiter reads the row
            if outcome:
                ok, _, result = outcome.partition(" ")
                self._heard_outcomes[job_id] = (ok == "1", json.loads(result))
        waiter.set_result(None)

    def _waiter(self, job_id: int) -> asyncio.Future[None]:
        """The job's waiter; already done when its outcome was heard before it was registered."""
        waiter = self._waiters.get(job_id)
        if waiter is None:
            waiter = self._waiters[job_id] = asyncio.get_running_loop().create_future()
            early = self._early.pop(job_id, None)
            if early is not None:
                self._deliver(job_id, waiter, early)
        return waiter

    def _lost(self, _connection: object) -> None:
        self._listener = None
        for waiter in self._waiters.values():  # look in the table at once: a notification may have been lost
            if not waiter.done():
                waiter.set_result(None)

    async def close(self) -> None:
        self._closing = True
        if self._discarding is not None:
            self._discarding.cancel()
            with contextlib.suppress(BaseException):
                await self._discarding
        with contextlib.suppress(*_CONNECTION_LOST):
            await self._discard_read()
        for connection in (self._listener, self._reader):
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.close()

    async def defer(
        self,
        session: AsyncSession | Any,
        node: str,
        lock: str | None,
        op: str,
        args: tuple[Any, ...],
        request_id: str,
        *,
        wait: bool = True,
        deadline_s: float = 60.0,
    ) -> int:
        """Add the job to `session`'s transaction: it exists exactly when that transaction commits (or, on a
        Database.statements() connection, the job alone, committed by itself).

        A job somebody waits for carries that wait's end (`deadline`, wall-clock seconds): a node that gets to it
        later answers it failed without running it, since its caller has answered 503 and the node's reconcile
        settles what the caller claimed; a job nobody waits for (`deadline` null) runs whenever it is reached,
        and its outcome is not recorded."""
        payload = {
            "op": op,
            "args": [self.codec.encode(a) for a in args],
            "request_id": request_id,
            "deadline": time.time() + deadline_s if wait else None,
        }
        (row,) = await _DEFER.rows(
            session, {"queue": queue_of(node), "task": TASK, "lock": lock, "args": json.dumps({"job": payload})}
        )
        # its waiter is made by wait(), not here: a job whose transaction rolls back is never awaited, and a
        # waiter made for it would stay until the process ends. An outcome heard between the commit and wait()
        # (an autocommitted defer's, or a quick node's) waits for it in _early.
        return int(row.id)

    async def wait(self, job_id: int, deadline_s: float, *, node: str = "", op: str = "") -> Any:
        """The job's result, or JobFailed with the node's message, or JobTimeout past `deadline_s` seconds."""
        started = time.perf_counter()
        deadline = time.monotonic() + deadline_s
        waiter = self._waiter(job_id)
        failed = True
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise JobTimeout(f"job {job_id} ({op} on node {node}) had no outcome within {deadline_s:g} s")
                if self._listener is None and not self._closing:
                    await self._listen()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, self.poll)):  # not wait_for: see app/node.py
                        await asyncio.shield(waiter)
                try:
                    outcome = self._heard_outcomes.pop(job_id, None)
                    if outcome is not None:
                        self._discard_later(job_id)
                    else:
                        outcome = await self._take(job_id)
                except _CONNECTION_LOST as error:
                    # the database went away (a restart): the outcome, once the node records it, waits in its table
                    log.warning("reading the outcome of job %s failed (%s); trying again", job_id, error)
                    outcome = None
                if outcome is not None:
                    ok, result = outcome
                    if not ok and result == EXPIRED:  # not run: as if it had had no outcome in time
                        raise JobTimeout(f"job {job_id} ({op} on node {node}) was reached past its deadline")
                    if not ok:
                        raise JobFailed(str(result))
                    failed = False
                    return self.codec.decode(result)
                if waiter.done():
                    waiter = self._waiters[job_id] = asyncio.get_running_loop().create_future()
        finally:
            self._waiters.pop(job_id, None)
            if self._heard_outcomes.pop(job_id, None) is not None:
                self._discard_later(job_id)
            for observe in self.observers:
                observe(node, op, time.perf_counter() - started, failed)

    async def _take(self, job_id: int) -> tuple[bool, Any] | None:
        row = await self._on_reader(lambda reader: reader.fetchrow(_TAKE_RESULT.text, job_id))
        if row is None:
            return None
        return bool(row["ok"]), json.loads(row["result"]) if row["result"] is not None else None

    async def _on_reader(self, run: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
        async with self._reader_lock:
            if self._reader is None or self._reader.is_closed():
                self._reader = await asyncpg.connect(self.dsn, timeout=_CONNECT_TIMEOUT)
            try:
                return await run(self._reader)
            except _CONNECTION_LOST:
                self._reader.terminate()  # closed at once: one cut off mid-operation cannot run another
                self._reader = None
                raise

    def _discard_later(self, job_id: int) -> None:
        """The row of an outcome its waiter read from the notification: removed within DISCARD_AFTER, in one
        statement with the others read meanwhile (one round trip for many jobs instead of one per job)."""
        self._read.append(job_id)
        if self._discarding is None or self._discarding.done():
            self._discarding = asyncio.get_running_loop().create_task(self._discard_soon())

    async def _discard_soon(self) -> None:
        await asyncio.sleep(DISCARD_AFTER)
        try:
            await self._discard_read()
        except _CONNECTION_LOST as error:  # RESULT_TTL's prune removes them
            log.warning("removing the rows of job outcomes already read failed: %s", error)

    async def _discard_read(self) -> None:
        while self._read:
            ids, self._read = self._read, []

            async def discard(reader: asyncpg.Connection, ids: list[int] = ids) -> None:
                await reader.execute(_DISCARD, ids)

            await self._on_reader(discard)


# the outcome and its notification in one statement (NOTIFY is sent when that statement's transaction commits)
_RECORD = text(
    "WITH recorded AS (INSERT INTO node_job_results (job_id, ok, result, created_at)"
    " VALUES (:job_id, :ok, :result, now())"
    " ON CONFLICT (job_id) DO UPDATE SET ok = excluded.ok, result = excluded.result RETURNING job_id)"
    " SELECT pg_notify(:channel, :payload) FROM recorded"
)
# The node's own statements for the end of a job, on procrastinate's psycopg connections (psycopg's parameter
# style), each one round trip:
# - the outcome for the job's caller and its notification, and, when `prune`, the results nobody read;
# - procrastinate's job_inserted notification on the node's queue when a job of it is waiting (one skipped while
#   this job held the volume's lock, or deferred while a fetch found nothing): nothing else wakes the worker;
# - FINISH_*: procrastinate's own end of the job (procrastinate_finish_job_v1, what its worker sends) in the same
#   statement, so one commit ends the job, frees the volume's job lock and tells the caller (whose notification
#   is sent at that commit, when its next job of the volume can run). RECORD_AND_WAKE and WAKE are for a job
#   whose end procrastinate recorded on its own (that statement failed, or the job ended some other way).
_RECORDED = (
    "recorded AS (INSERT INTO node_job_results (job_id, ok, result, created_at)"
    " VALUES (%(job_id)s, %(ok)s, %(result)s, now())"
    " ON CONFLICT (job_id) DO UPDATE SET ok = excluded.ok, result = excluded.result RETURNING job_id),"
    " pruned AS (DELETE FROM node_job_results"
    " WHERE %(prune)s AND created_at < now() - make_interval(secs => %(ttl)s))"
)
_WAKE_IF_WAITING = (
    "SELECT pg_notify(%(channel)s, %(message)s) WHERE EXISTS"
    " (SELECT 1 FROM procrastinate_jobs WHERE queue_name = %(queue)s AND status = 'todo')"
)
_FINISH = "SELECT procrastinate_finish_job_v1(%(job_id)s, %(status)s, %(delete_job)s)"
_TELL = "SELECT pg_notify(%(done)s, %(payload)s) FROM recorded"
# (joined from constants: nothing of a caller's is in a statement's text)
RECORD_AND_WAKE = " ".join(("WITH", _RECORDED, _TELL, "UNION ALL", _WAKE_IF_WAITING))
WAKE = _WAKE_IF_WAITING
# a SELECT without FROM: one row, each of its expressions evaluated once (the finish always, whatever the others)
FINISH_RECORD_AND_WAKE = "".join(("WITH ", _RECORDED, " ", _FINISH, ", (", _TELL, "), (", _WAKE_IF_WAITING, ")"))
FINISH_AND_WAKE = "".join((_FINISH, ", (", _WAKE_IF_WAITING, ")"))
_PRUNE = text("DELETE FROM node_job_results WHERE created_at < now() - make_interval(secs => :ttl)")


async def record_outcome(session: AsyncSession, job_id: int, ok: bool, result: Any, *, prune: bool = False) -> None:
    """The node's half: the outcome and its notification (one statement; the caller's session commits it)."""
    encoded = json.dumps(result)
    await session.execute(
        _RECORD,
        {
            "job_id": job_id,
            "ok": ok,
            "result": encoded,
            "channel": CHANNEL,
            "payload": notification(job_id, ok, encoded),
        },
    )
    if prune:
        await session.execute(_PRUNE, {"ttl": RESULT_TTL})


def install_schema(database_url: str) -> None:
    """procrastinate's tables and functions, once per database (blocking; `tether db upgrade` runs it)."""
    import psycopg
    from procrastinate.schema import SchemaManager

    with psycopg.connect(asyncpg_dsn(database_url), autocommit=True) as connection:
        connection.execute("SELECT pg_advisory_lock(7340301)")
        try:
            present = connection.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()
            if present is None or present[0] is None:
                connection.execute(SchemaManager.get_schema())
        finally:
            connection.execute("SELECT pg_advisory_unlock(7340301)")
