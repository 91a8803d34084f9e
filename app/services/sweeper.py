"""The periodic sweep (SPEC 12): reservations past TETHER_RESERVATION_TTL, and Idempotency-Keys past their TTL.

Every API process runs the loop; one process sweeps per round (on PostgreSQL the one that takes the sweep's
advisory lock; SQLite has one process), and if it dies another takes the next round. The lease itself needs no
such lock to be safe: each volume's expired reservations go in one conditional DELETE under the volume's row
lock, so a reservation is removed once, and never one that a connect claimed in the meantime (it is no longer
`reserved`). Connected attachments never expire. Removing a reservation touches no storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, select, text

from app.db.engine import Database
from app.db.locks import sole_turn
from app.db.models import utcnow
from app.services.idempotency import Idempotency
from app.services.transitions import A, lock_volume, recompute_volume
from app.services.work import every

log = logging.getLogger("tether.sweeper")

_BATCH = 500
# a literal, not a parameter: the partial index ix_attachments_reserved_created is chosen only for this predicate
_RESERVED = text("attachments.attach_status = 'reserved'")
_EXPIRED_VOLUMES = (
    select(A.c.volume_id)
    .where(_RESERVED, A.c.created_at <= bindparam("cutoff"))
    .group_by(A.c.volume_id)
    .order_by(A.c.volume_id)
    .limit(_BATCH)
)
_EXPIRE = (
    delete(A)
    .where(A.c.volume_id == bindparam("volume_id"), _RESERVED, A.c.created_at <= bindparam("cutoff"))
    .returning(A.c.id, A.c.project_id, A.c.instance_uuid, A.c.created_at)
)


@dataclass(frozen=True)
class Expired:
    """A reservation the lease removed."""

    attachment_id: str
    volume_id: str
    project_id: str
    created_at: datetime


@dataclass
class SweepReport:
    # False: another process had this round
    ran: bool = False
    reservations: list[Expired] = field(default_factory=list)
    keys: int = 0


class Sweeper:
    def __init__(
        self,
        db: Database,
        idempotency: Idempotency,
        *,
        reservation_ttl: float,
        interval: float,
        forget: Callable[[str], None] = lambda _attachment_id: None,
        observe: Callable[[SweepReport], None] = lambda _report: None,
    ) -> None:
        self.db = db
        self.idempotency = idempotency
        self.reservation_ttl = reservation_ttl
        self.interval = interval
        # the attachment service's cache of who owns an attachment
        self.forget = forget
        self.observe = observe
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        """Sweep every `interval` seconds until cancelled; a failed round is logged and the next one retries."""
        await every(self.interval, self.sweep, "the sweep", first=False)

    async def sweep(self) -> SweepReport:
        report = SweepReport()
        async with sole_turn(self.db, "tether:sweep") as mine:
            if not mine:
                return report
            report.ran = True
            if self.reservation_ttl > 0:
                await self._reservations(report)
            report.keys = await self.idempotency.sweep()
        self.observe(report)
        return report

    async def _reservations(self, report: SweepReport) -> None:
        cutoff = utcnow() - timedelta(seconds=self.reservation_ttl)
        seen: set[str] = set()
        while True:
            async with self.db.read() as session:
                volumes = [v for v in (await session.execute(_EXPIRED_VOLUMES, {"cutoff": cutoff})).scalars()]
            fresh = [v for v in volumes if v not in seen]
            for volume_id in fresh:
                seen.add(volume_id)
                try:
                    await self._expire(volume_id, cutoff, report)
                except Exception:  # one volume never stops the others
                    log.exception("expiring the reservations of volume %s failed", volume_id)
            if len(volumes) < _BATCH or not fresh:
                return

    async def _expire(self, volume_id: str, cutoff: datetime, report: SweepReport) -> None:
        async with self.db.write() as session:
            # the volume's row lock first, as every transition takes it
            if not await lock_volume(session, volume_id):
                return
            rows: list[Any] = list((await session.execute(_EXPIRE, {"volume_id": volume_id, "cutoff": cutoff})).all())
            if rows:
                await recompute_volume(session, volume_id)
        for row in rows:
            self.forget(row.id)
            report.reservations.append(Expired(row.id, volume_id, row.project_id, row.created_at))
            log.info(
                "reservation lease: removed attachment %s of volume %s in project %s (instance %s), reserved since "
                "%s and never connected; TETHER_RESERVATION_TTL is %s s",
                row.id,
                volume_id,
                row.project_id,
                row.instance_uuid,
                row.created_at.isoformat(),
                self.reservation_ttl,
                extra={"attachment_id": row.id, "volume_id": volume_id, "project_id": row.project_id},
            )
