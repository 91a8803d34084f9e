"""app/db/prepared.py: a Core statement run on the driver's connection gives what SQLAlchemy's session gives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, timedelta
from typing import Any

import pytest
from sqlalchemy import bindparam, select, text

from app.db.engine import Database
from app.db.models import Volume, VolumeStatus, utcnow
from app.db.prepared import Prepared
from app.errors import DatabaseUnavailable

pytestmark = pytest.mark.asyncio

V: Any = Volume.__table__  # type: ignore[attr-defined]
# a literal in the statement (the status), a parameter with a type conversion (the time), a boolean column
_SHOWN = Prepared(
    select(V.c.id, V.c.status, V.c.multiattach, V.c.created_at).where(
        V.c.id == bindparam("volume_id"), V.c.status == VolumeStatus.AVAILABLE.value, V.c.created_at < bindparam("now")
    )
)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    yield database
    await database.dispose()


async def new_volume(db: Database, **values: Any) -> Volume:
    volume = Volume(project_id="p1", user_id="u1", size=1, status=VolumeStatus.AVAILABLE, **values)
    async with db.write() as session:
        session.add(volume)
    return volume


async def test_rows_are_the_same_on_the_session_and_on_the_driver(db: Database) -> None:
    volume = await new_volume(db, multiattach=True)
    values = {"volume_id": volume.id, "now": utcnow() + timedelta(seconds=5)}
    async with db.read() as session:
        (through_session,) = await _SHOWN.rows(session, values)
    async with db.statements(write=False) as on:
        (direct,) = await _SHOWN.rows(on, values)
    assert direct == through_session
    assert (direct.id, direct.status, direct.multiattach) == (volume.id, "available", True)
    assert direct.created_at == volume.created_at
    assert direct.created_at.utcoffset() == UTC.utcoffset(None)
    async with db.statements(write=False) as on:  # the bound time converted as SQLAlchemy converts it
        assert await _SHOWN.rows(on, {**values, "now": volume.created_at - timedelta(seconds=5)}) == []


async def test_a_missing_parameter_is_refused_before_anything_is_sent(db: Database) -> None:
    async with db.statements(write=False) as on:
        with pytest.raises(KeyError, match="now"):
            await _SHOWN.rows(on, {"volume_id": "x"})


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_connection_that_dropped_is_a_503_and_never_served_again(db: Database) -> None:
    """Its backend killed (a database restart, as far as the connection knows): DatabaseUnavailable, and the pool
    does not hand the dead connection out again (it holds one connection here, so a reused one would fail)."""
    small = Database(db.url, pool_size=1)
    volume = await new_volume(small)
    values = {"volume_id": volume.id, "now": utcnow() + timedelta(seconds=5)}
    try:
        async with small.statements(write=False) as on:
            pid = await on.fetchval("SELECT pg_backend_pid()")
        async with db.write() as session:
            await session.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(DatabaseUnavailable):
            async with small.statements(write=True) as on:
                await _SHOWN.rows(on, values)
        for _ in range(3):
            async with small.statements(write=False) as on:
                assert len(await _SHOWN.rows(on, values)) == 1
    finally:
        await small.dispose()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_after_a_database_restart_one_statement_is_a_503_and_the_next_gets_a_new_connection(db: Database) -> None:
    """A restart leaves every pooled connection dead. The first one a statement meets is a 503, and the rest of
    its generation is replaced at checkout (as SQLAlchemy does for a session's disconnect), not one 503 per
    pooled connection: the cluster's restart test had a connect right after it answered 503 twice."""
    small = Database(db.url, pool_size=3)

    async def pid_of() -> int:
        async with small.statements(write=False) as on:
            await on.fetchval("SELECT pg_sleep(0.05)")
            return int(await on.fetchval("SELECT pg_backend_pid()"))

    try:
        pids = set(await asyncio.gather(*(pid_of() for _ in range(3))))  # three connections in the pool
        assert len(pids) == 3
        async with db.write() as session:
            await session.execute(
                text("SELECT pg_terminate_backend(pid) FROM unnest(CAST(:pids AS int[])) AS pid"), {"pids": list(pids)}
            )
        with pytest.raises(DatabaseUnavailable):
            async with small.statements(write=False) as on:
                await on.fetchval("SELECT 1")
        for _ in range(3):
            async with small.statements(write=False) as on:
                assert await on.fetchval("SELECT pg_backend_pid()") not in pids
    finally:
        await small.dispose()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_more_statements_at_once_than_the_pool_keeps_return_every_connection_cleanly(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection returned past the pool's size is closed, which the asyncpg adapter awaits: returned outside a
    greenlet, the pool logged MissingGreenlet tracebacks (the stress tests' server logs) and the close never ran."""
    small = Database(db.url, pool_size=2)  # 2 kept, 2 more in overflow

    async def use() -> None:
        async with small.statements(write=False) as on:
            await on.fetchval("SELECT pg_sleep(0.05)")

    try:
        with caplog.at_level("ERROR"):
            await asyncio.gather(*(use() for _ in range(4)))
        assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
        assert small.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert small.engine.pool.size() == 2  # type: ignore[attr-defined]
    finally:
        await small.dispose()


async def test_a_statement_whose_sql_changes_per_execution_is_refused() -> None:
    """An IN list's parameters are rendered into the SQL by SQLAlchemy on each execution: not preparable once."""
    with pytest.raises(ValueError, match="per execution"):
        Prepared(select(V.c.id).where(V.c.status.in_(bindparam("statuses", expanding=True))))
