"""Idempotency-Key (SPEC 12): which keyed POSTs were answered, and the answer, stored with their state change.

A keyed request claims its (project, key) in the first statement of the transaction that makes its state change
and stores the answer it rendered in that same transaction, so a rolled-back change leaves no key and no change
commits without its key. A create with a connector spans transactions (claim, backend, record): its key commits
`in_flight` with the claim, gets its answer with the record, and goes with the undo; a retry meanwhile is a 409.

A retry of an answered request gets the stored answer from one read, before any write (`check`). Two first
attempts that both pass that read meet at the claim: the database lets one insert the key, and the other waits
for that transaction (PostgreSQL's ON CONFLICT waits for the inserter; SQLite's writers queue) and then finds the
key answered (its stored answer is replayed), in flight (409) or never committed (it runs as the first).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, NoReturn, TypeVar

from sqlalchemy import ColumnElement, and_, bindparam, delete, exists, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.engine import Database
from app.db.models import IdempotencyKey, KeyStatus, utcnow
from app.errors import Conflict, TetherError, UnprocessableEntity
from app.secrets import SecretBox, SecretKeyError

log = logging.getLogger("tether.idempotency")

K: Any = IdempotencyKey.__table__  # type: ignore[attr-defined]
T = TypeVar("T")

HEADER = "Idempotency-Key"
KEY_PATTERN = r"^[ -~]{1,255}$"  # 1 to 255 printable ASCII characters
_ANSWER_COLUMNS = ("fingerprint", "status", "resource_id", "response_status", "response_body", "created_at")


@dataclass(frozen=True)
class KeyedRequest:
    """One request's key: its project (the key's scope), the key, the operation and what exactly it asked."""

    project_id: str
    key: str
    operation: str
    fingerprint: str


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    resource_id: str | None


class Replayed(Exception):
    """A retry: the answer its first attempt got, to be sent again exactly as it was."""

    def __init__(self, request: KeyedRequest, reply: Reply) -> None:
        super().__init__(f"{request.operation}: the answer to Idempotency-Key {request.key!r} replayed")
        self.request = request
        self.reply = reply


class KeyInFlight(Conflict):
    def __init__(self, key: str) -> None:
        super().__init__(f"A request with Idempotency-Key {key!r} is still in progress; retry it later.")


class KeyReused(UnprocessableEntity):
    def __init__(self, key: str) -> None:
        super().__init__(
            f"Idempotency-Key {key!r} was already used for a different request; send a new key for a new request."
        )


def fingerprint(*, method: str, operation: str, version: str, user: str, body: Any) -> str:
    """What makes two requests the same: the operation, the microversion (the answer is rendered for it), the user
    (an admin's answer shows more than a member's) and the body as canonical JSON (key order and spacing aside)."""
    canonical = json.dumps([method, operation, version, user, body], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _claim_statement(insert: Any) -> Any:
    """Insert the key in flight; a row past its TTL that the sweep has not removed yet is free and is taken over."""
    stmt = insert(K).values(
        project_id=bindparam("k_project"),
        key=bindparam("k_key"),
        fingerprint=bindparam("k_fingerprint"),
        status=KeyStatus.IN_FLIGHT.value,
        resource_id=None,
        response_status=None,
        response_body=None,
        created_at=bindparam("k_now"),
        expires_at=bindparam("k_expires"),
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[K.c.project_id, K.c.key],
        set_={name: stmt.excluded[name] for name in (*_ANSWER_COLUMNS, "expires_at")},
        where=K.c.expires_at <= stmt.excluded.created_at,
    )
    return stmt.returning(K.c.key)


_CLAIM = {True: _claim_statement(sqlite.insert), False: _claim_statement(postgresql.insert)}
_THIS = and_(K.c.project_id == bindparam("k_project"), K.c.key == bindparam("k_key"))
_LOOKUP = select(K.c.fingerprint, K.c.status, K.c.response_status, K.c.response_body, K.c.resource_id).where(
    _THIS, K.c.expires_at > bindparam("k_now")
)
_LINK = update(K).where(_THIS).values(resource_id=bindparam("k_resource"))
_COMPLETE = (
    update(K)
    .where(_THIS)
    .values(
        status=KeyStatus.DONE.value,
        resource_id=bindparam("k_resource"),
        response_status=bindparam("k_status"),
        response_body=bindparam("k_body"),
    )
)
_RELEASE = delete(K).where(_THIS, K.c.status == KeyStatus.IN_FLIGHT.value)
_SWEEP = delete(K).where(K.c.expires_at <= bindparam("k_now"))
_ABANDON = delete(K).where(K.c.resource_id == bindparam("k_resource"), K.c.status == KeyStatus.IN_FLIGHT.value)


class Idempotency:
    """The stored answers, kept `ttl` seconds; bodies sealed with the CHAP secrets' key (they carry CHAP secrets)."""

    def __init__(self, db: Database, secrets: SecretBox, ttl: float) -> None:
        self.db = db
        self.secrets = secrets
        self.ttl = timedelta(seconds=ttl)
        self._claim = _CLAIM[db.is_sqlite]

    async def check(self, request: KeyedRequest) -> None:
        """Before any write: a stored answer is replayed (Replayed); a key in flight is a 409, another request's 422."""
        async with self.db.read() as session:
            row = (await session.execute(_LOOKUP, self._params(request, k_now=utcnow()))).first()
        if row is not None:
            self._judge(request, row)

    def answer(self, request: KeyedRequest, status: int, render: Callable[[T], dict[str, Any]]) -> Answer[T]:
        """What a service takes into its transactions: `render` turns its result into the body sent with `status`."""
        return Answer(self, request, status, render)

    async def sweep(self) -> int:
        """Remove the keys past their TTL (answered or not); returns how many."""
        async with self.db.autocommit() as session:
            result = await session.execute(_SWEEP, {"k_now": utcnow()})
        return int(result.rowcount)  # type: ignore[attr-defined]

    # -- used by Answer -------------------------------------------------------------------------

    @staticmethod
    def _params(request: KeyedRequest, **extra: Any) -> dict[str, Any]:
        return {"k_project": request.project_id, "k_key": request.key, **extra}

    def _judge(self, request: KeyedRequest, row: Any) -> NoReturn:
        if row.fingerprint != request.fingerprint:
            raise KeyReused(request.key)
        if row.status != KeyStatus.DONE:
            raise KeyInFlight(request.key)
        raise Replayed(request, Reply(int(row.response_status), self._open(row.response_body), row.resource_id))

    def _seal(self, body: dict[str, Any]) -> str:
        return self.secrets.seal(json.dumps(body))

    def _open(self, stored: str) -> dict[str, Any]:
        try:
            body: dict[str, Any] = json.loads(self.secrets.open(stored))
        except SecretKeyError as error:
            log.error("a stored Idempotency-Key answer: %s", error)
            raise TetherError("The stored answer to this request cannot be read; check TETHER_SECRET_KEY.") from None
        return body


class Answer(Generic[T]):
    """One keyed request's key, claimed and answered inside the transactions of the service that serves it."""

    def __init__(
        self, store: Idempotency, request: KeyedRequest, status: int, render: Callable[[T], dict[str, Any]]
    ) -> None:
        self.store = store
        self.request = request
        self.status = status
        self.render = render

    async def check(self) -> None:
        """Before the service's first write (and after the route's policy check): a retry is answered here."""
        await self.store.check(self.request)

    async def claim(self, session: AsyncSession) -> None:
        """The transaction's first statement: the key is this request's, or the request is a retry (see _judge)."""
        now = utcnow()
        params = Idempotency._params(
            self.request, k_fingerprint=self.request.fingerprint, k_now=now, k_expires=now + self.store.ttl
        )
        if (await session.execute(self.store._claim, params)).first() is not None:
            return
        row = (await session.execute(_LOOKUP, Idempotency._params(self.request, k_now=now))).first()
        if row is None:  # removed between the two statements (a failed attempt's undo): the client retries
            raise KeyInFlight(self.request.key)
        self.store._judge(self.request, row)

    async def link(self, session: AsyncSession, resource_id: str) -> None:
        """Name what an in-flight request made, so a reconcile after a crash finds its key."""
        await session.execute(_LINK, Idempotency._params(self.request, k_resource=resource_id))

    async def complete(self, session: AsyncSession, result: T, resource_id: str) -> None:
        """Store the answer, in the transaction that commits the state change it describes."""
        body = self.store._seal(self.render(result))
        await session.execute(
            _COMPLETE,
            Idempotency._params(self.request, k_resource=resource_id, k_status=self.status, k_body=body),
        )

    async def release(self, session: AsyncSession) -> None:
        """The request failed and its change is undone: the key is free for a retry."""
        await session.execute(_RELEASE, Idempotency._params(self.request))


def in_flight_for(resource_id: Any) -> ColumnElement[bool]:
    """Whether a keyed request that made `resource_id` (a value or a column) is still in flight."""
    return exists().where(K.c.resource_id == resource_id, K.c.status == KeyStatus.IN_FLIGHT.value)


async def abandon(session: AsyncSession, resource_id: str) -> None:
    """Reconcile: drop the in-flight key of a create whose process died mid-connect (its attachment is gone)."""
    await session.execute(_ABANDON, {"k_resource": resource_id})
