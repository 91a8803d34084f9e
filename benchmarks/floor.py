"""The floor: the attach cycle's database work served by the least a FastAPI service can be, on this machine.

Not Tether. A FastAPI app, served by the same uvicorn (uvloop, httptools, no access log) with the same number of
workers, that answers the requests of benchmarks/attach_cycle.py on raw asyncpg (a pool per worker, statements
prepared once) with the database writes a cycle must make, in Tether's own tables (a database migrated by `tether db
upgrade`), and nothing else: no auth, no policy, no validation, no ORM, no storage backend, no volume lock.

- create with a connector: the volume claimed, the attachment inserted and its connector rows, one statement; the
  connection info recorded, a second (Tether's two round trips of the storage request);
- os-complete: the attachment and its volume, one statement;
- delete: the attachment's initiator read, then `tether_remove_attachment()` (Tether's own function), two.

That is 5 round trips per cycle; `--locks` adds the volume's advisory lock and unlock around create and delete on a
connection of their own, as Tether takes them (9 in all, Tether's count). The cycle rate the floor reaches is what
this machine gives any Python service doing this work; Tether's rate next to it, in the same run, is what Tether's
own layers cost. `floor_compare.sh` runs the two alternately.

    python -m benchmarks.floor --port 18790 --workers 2 [--locks]   # then attach_cycle.py --base http://127.0.0.1:18790
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

DSN = os.environ.get("FLOOR_DSN", "postgresql://postgres@127.0.0.1:5432/tether_bench")
LOCKS = os.environ.get("FLOOR_LOCKS") == "1"

CREATE_VOLUME = """
INSERT INTO volumes (id, project_id, user_id, size, status, attach_status, availability_zone, multiattach, bootable,
                     created_at, updated_at)
VALUES ($1, $2, 'bench', 1, 'available', 'detached', 'nova', false, false, $3, $3)
"""
SHOW_VOLUME = "SELECT status FROM volumes WHERE id = $1 AND project_id = $2"
CLAIM_AND_INSERT = """
WITH claimed AS (
    UPDATE volumes SET status = 'attaching', attach_status = 'attaching', updated_at = $3
    WHERE id = $1 AND project_id = $2 AND status = 'available'
    RETURNING id, project_id
), inserted AS (
    INSERT INTO attachments (id, volume_id, project_id, attached_host, attach_mode, attach_status, terminated,
                             created_at, updated_at)
    SELECT $4, claimed.id, claimed.project_id, $5, 'rw', 'attaching', false, $3, $3 FROM claimed
    RETURNING id
), specs AS (
    INSERT INTO attachment_specs (attachment_id, key, value)
    SELECT inserted.id, given.key, given.value FROM inserted, unnest($6::text[], $7::text[]) AS given(key, value)
)
SELECT id FROM claimed
"""
RECORD = "UPDATE attachments SET connection_info = $2, updated_at = $3 WHERE id = $1 RETURNING id"
COMPLETE = """
WITH locked AS (
    SELECT a.volume_id FROM attachments a JOIN volumes v ON v.id = a.volume_id
    WHERE a.id = $1 AND a.project_id = $2 FOR UPDATE OF v
), done AS (
    UPDATE attachments SET attach_status = 'attached', updated_at = $3
    WHERE id = $1 AND attach_status IN ('attaching', 'attached') AND EXISTS (SELECT 1 FROM locked)
    RETURNING volume_id
), moved AS (
    UPDATE volumes SET status = 'in-use', attach_status = 'attached', updated_at = $3
    WHERE id IN (SELECT volume_id FROM done) RETURNING id
)
SELECT (SELECT count(*) FROM done) AS done FROM locked
"""
INITIATORS = """
SELECT a.id, a.volume_id, a.project_id, a.attach_status, s.value FROM attachments a
LEFT JOIN attachment_specs s ON s.attachment_id = a.id AND s.key = 'initiator'
WHERE a.volume_id = (SELECT volume_id FROM attachments WHERE id = $1)
"""
REMOVE = "SELECT id FROM tether_remove_attachment($1, $2, $3)"


def key_of(volume_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(volume_id.encode(), digest_size=8).digest(), "big", signed=True)


class Floor:
    def __init__(self) -> None:
        self.pool: Any = None
        self.locker: Any = None
        self.use = asyncio.Lock()

    @asynccontextmanager
    async def locked(self, volume_id: str) -> AsyncIterator[None]:
        """The volume's advisory lock, a round trip to take and one to give back, on one connection."""
        if not LOCKS:
            yield
            return
        async with self.use:
            await self.locker.fetchval("SELECT pg_try_advisory_lock($1)", key_of(volume_id))
        try:
            yield
        finally:
            async with self.use:
                await self.locker.fetchval("SELECT pg_advisory_unlock($1)", key_of(volume_id))


floor = Floor()


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    floor.pool = await asyncpg.create_pool(DSN, min_size=4, max_size=10)
    if LOCKS:
        floor.locker = await asyncpg.connect(DSN)
    yield
    await floor.pool.close()


app = FastAPI(lifespan=lifespan)


def now() -> datetime:
    return datetime.now(UTC)


@app.post("/v3/{project_id}/volumes", status_code=202)
async def create_volume(project_id: str) -> dict[str, Any]:
    volume_id = str(uuid.uuid4())
    await floor.pool.execute(CREATE_VOLUME, volume_id, project_id, now())
    return {"volume": {"id": volume_id, "status": "available"}}


@app.get("/v3/{project_id}/volumes/{volume_id}")
async def show_volume(project_id: str, volume_id: str) -> Response:
    status = await floor.pool.fetchval(SHOW_VOLUME, volume_id, project_id)
    if status is None:
        return JSONResponse({"itemNotFound": {"code": 404, "message": "no such volume"}}, status_code=404)
    return JSONResponse({"volume": {"id": volume_id, "status": status}})


@app.post("/v3/{project_id}/attachments")
async def create_attachment(project_id: str, request: Request) -> Response:
    body = (await request.json())["attachment"]
    volume_id, connector = body["volume_uuid"], body["connector"]
    attachment_id, at = str(uuid.uuid4()), now()
    async with floor.locked(volume_id):
        claimed = await floor.pool.fetchval(
            CLAIM_AND_INSERT,
            volume_id,
            project_id,
            at,
            attachment_id,
            connector.get("host"),
            list(connector),
            [json.dumps(v) for v in connector.values()],
        )
        if claimed is None:
            return JSONResponse({"badRequest": {"code": 400, "message": "volume not available"}}, status_code=400)
        info = {"driver_volume_type": "iscsi", "data": {"target_iqn": f"iqn.2026-12.floor:{volume_id}", "lun": 1}}
        await floor.pool.fetchval(RECORD, attachment_id, json.dumps(info), at)
    return JSONResponse({"attachment": {"id": attachment_id, "status": "attaching", "connection_info": info}})


@app.post("/v3/{project_id}/attachments/{attachment_id}/action", status_code=204)
async def attachment_action(project_id: str, attachment_id: str) -> Response:
    done = await floor.pool.fetchval(COMPLETE, attachment_id, project_id, now())
    if not done:
        return JSONResponse({"badRequest": {"code": 400, "message": "not completed"}}, status_code=400)
    return Response(status_code=204)


@app.delete("/v3/{project_id}/attachments/{attachment_id}")
async def delete_attachment(project_id: str, attachment_id: str) -> Response:
    rows = await floor.pool.fetch(INITIATORS, attachment_id)
    this = next((row for row in rows if row["id"] == attachment_id and row["project_id"] == project_id), None)
    if this is None:
        return JSONResponse({"itemNotFound": {"code": 404, "message": "no such attachment"}}, status_code=404)
    async with floor.locked(this["volume_id"]):
        await floor.pool.fetch(REMOVE, this["volume_id"], attachment_id, now())
    return JSONResponse({"attachments": []})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=18790)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--locks", action="store_true", help="the volume's advisory lock round trips, as Tether")
    args = parser.parse_args()
    if args.locks:
        os.environ["FLOOR_LOCKS"] = "1"
    uvicorn.run(
        "benchmarks.floor:app",
        host="127.0.0.1",
        port=args.port,
        workers=args.workers,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
