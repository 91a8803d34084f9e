"""What an operator asks: is the database reachable, is the backend reachable, how many of what."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import func, select, text

from app.backends.base import BackendError, Capacity
from app.db.engine import Database
from app.db.models import Attachment, Volume, utcnow
from app.errors import BackendFailure
from app.queue import queue_of
from app.services.nodes import LocalNode, Nodes, free_bytes

log = logging.getLogger("tether.status")


@dataclass
class StatusReport:
    database: str = "unknown"
    backend: str = "unknown"
    volumes: dict[str, int] = field(default_factory=dict)
    attachments: dict[str, int] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return self.database == "ok" and self.backend == "ok"


async def counts(db: Database) -> tuple[dict[str, int], dict[str, int]]:
    async with db.read() as session:
        volumes = await session.execute(select(Volume.status, func.count()).group_by(Volume.status))
        attachments = await session.execute(
            select(Attachment.attach_status, func.count()).group_by(Attachment.attach_status)
        )
        return {s: n for s, n in volumes.all()}, {s: n for s, n in attachments.all()}


async def capacity(node: LocalNode) -> Capacity:
    try:
        return await node.call(None, "capacity", ())  # type: ignore[no-any-return]
    except BackendError as error:
        log.error("reading the volume store's capacity failed: %s", error)
        raise BackendFailure("Unable to read the storage backend's capacity.") from None


async def status(db: Database, node: LocalNode | None) -> StatusReport:
    """node: this process's storage; None for a pure API tier (its nodes report through their heartbeats)."""
    report = StatusReport()
    try:
        report.volumes, report.attachments = await counts(db)
        report.database = "ok"
    except Exception as error:
        report.database = f"unreachable: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if node is None:
        report.backend = "ok"
        return report
    try:
        await node.call(None, "check", ())
        report.backend = "ok"
    except (BackendError, OSError) as error:
        report.backend = f"unreachable: {error}"
    return report


@dataclass
class NodeState:
    name: str
    host: str
    zone: str
    up: bool
    heartbeat_age: float
    total_bytes: int | None
    free_bytes: int | None
    queue_depth: int | None


async def node_states(nodes: Nodes) -> list[tuple[str, float, bool, int | None]]:
    """(name, heartbeat age, up, queue depth) per node, for /metrics."""
    return [(n.name, n.heartbeat_age, n.up, n.queue_depth) for n in await node_report(nodes)]


async def node_report(nodes: Nodes) -> list[NodeState]:
    """Every storage node as its last heartbeat left it, with the jobs waiting in its queue (PostgreSQL)."""
    pools = await nodes.pools()
    depths: dict[str, int] = {}
    if not nodes.db.is_sqlite and nodes.queue is not None:
        async with nodes.db.read() as session:
            rows = await session.execute(
                text(
                    "SELECT queue_name, count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
                    " GROUP BY queue_name"
                )
            )
            depths = {name: int(count) for name, count in rows.all()}
    now = utcnow()
    return [
        NodeState(
            name=s.name,
            host=s.pool_host,
            zone=s.availability_zone,
            up=nodes.is_up(s),
            heartbeat_age=(now - s.heartbeat_at).total_seconds(),
            total_bytes=s.total_bytes,
            # what the scheduler may still promise, as get_pools shows it
            free_bytes=free_bytes(s, allocated) if s.free_bytes is not None else None,
            queue_depth=depths.get(queue_of(s.name), 0) if nodes.queue is not None else None,
        )
        for s, allocated in pools
    ]
