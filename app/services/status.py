"""What an operator asks: is the database reachable, is the backend reachable, how many of what."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import func, select

from app.backends.base import BackendError, Backends, Capacity
from app.backends.dispatch import Dispatcher
from app.db.engine import Database
from app.db.models import Attachment, Volume
from app.errors import BackendFailure

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


async def capacity(dispatcher: Dispatcher, backends: Backends) -> Capacity:
    try:
        return await dispatcher.run("__capacity__", backends.volumes.capacity)
    except BackendError as error:
        log.error("reading the volume store's capacity failed: %s", error)
        raise BackendFailure("Unable to read the storage backend's capacity.") from None


async def status(db: Database, dispatcher: Dispatcher, backends: Backends) -> StatusReport:
    report = StatusReport()
    try:
        report.volumes, report.attachments = await counts(db)
        report.database = "ok"
    except Exception as error:
        report.database = f"unreachable: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    try:
        await dispatcher.run("__status__", backends.volumes.capacity)
        await dispatcher.run("__status__", backends.target.exports)
        report.backend = "ok"
    except (BackendError, OSError) as error:
        report.backend = f"unreachable: {error}"
    return report
