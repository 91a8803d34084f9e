"""What one database round trip costs the server's CPU, by the way it is sent (PostgreSQL, one connection).

Runs each way of sending a statement a few hundred times in this process and prints the CPU microseconds
per call: the numbers behind "what limits the attach cycle" in benchmarks/README.md.

    python -m benchmarks.statement_cost --db postgresql+asyncpg://postgres@127.0.0.1:5432/tether_bench
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from sqlalchemy import bindparam, select, update

from app.db.engine import Database
from app.db.locks import asyncpg_dsn
from app.db.models import Volume, utcnow

VOLUMES: Any = Volume.__table__


async def cost(label: str, call: Callable[[], Awaitable[Any]], repeat: int) -> None:
    for _ in range(repeat // 10):
        await call()
    started = time.process_time()
    for _ in range(repeat):
        await call()
    print(f"| {label} | {1e6 * (time.process_time() - started) / repeat:.0f} |")


async def main(db_url: str, repeat: int) -> None:
    db = Database(db_url)
    async with db.write() as session:
        volume = Volume(project_id="statement-cost", user_id="bench", size=1, status="available")
        session.add(volume)
    orm_select = select(Volume).where(Volume.id == bindparam("volume_id"))  # type: ignore[arg-type]
    core_select = select(VOLUMES).where(VOLUMES.c.id == bindparam("volume_id"))
    core_update = update(VOLUMES).where(VOLUMES.c.id == bindparam("volume_id")).values(updated_at=bindparam("now"))
    orm_update = (
        update(Volume).where(Volume.id == bindparam("volume_id")).values(updated_at=bindparam("now"))  # type: ignore[arg-type]
    )
    key = {"volume_id": volume.id}

    async def in_transaction(work: Callable[[Any], Awaitable[Any]]) -> None:
        async with db.write() as session:
            await work(session)

    async def raw(session: Any) -> Any:
        driver = (await (await session.connection()).get_raw_connection()).driver_connection
        return await driver.fetchrow("SELECT * FROM volumes WHERE id = $1", volume.id)

    print("| how | CPU µs per call |\n|---|---|")
    async with db.write() as session:
        await cost(
            "ORM select, built per call", lambda: session.execute(select(Volume).where(Volume.id == volume.id)), repeat
        )  # type: ignore[arg-type]
        await cost("ORM select, pre-built", lambda: session.execute(orm_select, key), repeat)
        await cost("Core select, pre-built", lambda: session.execute(core_select, key), repeat)
        await cost(
            "ORM UPDATE (bulk path, session synchronised)",
            lambda: session.execute(orm_update, {**key, "now": utcnow()}),
            repeat,
        )
        await cost("Core UPDATE, pre-built", lambda: session.execute(core_update, {**key, "now": utcnow()}), repeat)
        await cost("raw asyncpg fetchrow", lambda: raw(session), repeat)
    await cost(
        "write transaction with one Core UPDATE (session, BEGIN, COMMIT)",
        lambda: in_transaction(lambda s: s.execute(core_update, {**key, "now": utcnow()})),
        repeat,
    )

    async def read_one() -> None:
        async with db.read() as session:
            await session.execute(core_select, key)

    await cost("read session (autocommit) with one Core select", read_one, repeat)

    autocommit = db.engine.execution_options(isolation_level="AUTOCOMMIT")

    async def core_connection() -> None:
        async with autocommit.connect() as connection:
            await connection.execute(core_select, key)

    await cost("Core connection from the pool (autocommit) with one Core select", core_connection, repeat)

    async def driver_of_pooled() -> None:
        async with autocommit.connect() as connection:
            driver = (await connection.get_raw_connection()).driver_connection
            await driver.fetchrow("SELECT * FROM volumes WHERE id = $1", volume.id)

    await cost("asyncpg fetchrow on a connection of SQLAlchemy's pool", driver_of_pooled, repeat)
    pool = await asyncpg.create_pool(asyncpg_dsn(db_url), min_size=1, max_size=2)
    await cost("asyncpg pool fetchrow", lambda: pool.fetchrow("SELECT * FROM volumes WHERE id = $1", volume.id), repeat)
    await pool.close()
    await db.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="postgresql+asyncpg://postgres@127.0.0.1:5432/tether_bench")
    parser.add_argument("--repeat", type=int, default=1000)
    args = parser.parse_args()
    asyncio.run(main(args.db, args.repeat))
