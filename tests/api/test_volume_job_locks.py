"""A node's work waiting for a volume's lock, on PostgreSQL (the lock spans processes): a volume job
(finish_create, finish_delete) ends without the lock once the volume's status has moved on, and any wait ends
when the node is told to stop.

Whoever moved it may hold the lock and wait for its own next job of that volume: an admin's os-reset_status to
`available`/`detached` commits the status under the lock, then drops the export as a job on the volume's queue,
which runs only after the waiting job ends (one volume's jobs run in order). A job that went on waiting for the
lock kept both waiting until the admin's TETHER_NODE_TIMEOUT, and the node's SIGTERM with them (the torture
across nodes saw a node take more than 20 s to stop).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select, update

from app.backends.base import VolumeRef
from app.db.locks import FileLocks, cross_process_locks
from app.db.models import Attachment, AttachStatus, Volume, VolumeStatus
from tests.conftest import Api, migrated_pg_database

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    """A database of this module's own: a reconcile looks at every volume there is (an embedded node's)."""
    with migrated_pg_database() as url:
        yield url


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"lock_timeout": 60}


def another_process(api: Api) -> FileLocks:
    """The volumes' locks as another process of this deployment takes them (another API worker, `tether
    reconcile`): this embedded app's lock file."""
    settings = api.app.state.settings
    locks = cross_process_locks(settings.database_url, True, one_host=True, lock_path=settings.lock_path)
    assert isinstance(locks, FileLocks)
    return locks


async def set_status(api: Api, volume_id: str, status: VolumeStatus) -> None:
    async with api.app.state.db.write() as session:
        await session.execute(update(Volume).where(Volume.id == volume_id).values(status=status))  # type: ignore[arg-type]


async def status_of(api: Api, volume_id: str) -> str | None:
    async with api.app.state.db.read() as session:
        return await session.scalar(select(Volume.status).where(Volume.id == volume_id))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("op", "waiting"), [("finish_delete", VolumeStatus.DELETING), ("finish_create", VolumeStatus.CREATING)]
)
async def test_a_volume_job_whose_volume_moved_on_while_it_waited_for_the_lock_ends_without_it(
    api: Api, op: str, waiting: VolumeStatus
) -> None:
    volume = await api.create_volume()
    await set_status(api, volume["id"], waiting)  # as the API left it, and the job was deferred
    other = another_process(api)  # an admin's os-reset_status in another API worker
    try:
        async with other.hold(volume["id"]):
            job = asyncio.create_task(api.app.state.reconciler.sequence(op, (VolumeRef(id=volume["id"], size_gb=1),)))
            await asyncio.sleep(0.3)
            assert not job.done(), "the job did not wait for the lock another process holds"
            await set_status(api, volume["id"], VolumeStatus.AVAILABLE)  # the reset commits, under its lock
            # ... and now waits for its drop_export job, which the queue runs after this one: the job must end
            # while the lock is still held (before: it waited for the lock until lock_timeout)
            assert await asyncio.wait_for(job, 10) is None
        assert await status_of(api, volume["id"]) == VolumeStatus.AVAILABLE
        assert (await api.get(f"/volumes/{volume['id']}")).status_code == 200  # nothing was deleted
    finally:
        await other.close()


async def test_a_reconcile_waiting_for_a_volumes_lock_ends_when_the_node_is_told_to_stop(api: Api) -> None:
    """A `tether node` told to stop lets its running jobs end, and fetches no more. A reconcile job waiting for a
    volume's lock held by an API request that waits for a job of this node (which it no longer fetches) never
    ended: the node did not stop until it was killed (20 s in the torture across nodes). The wait ends at once
    on the node's SIGTERM; the reconcile reports the volume, and the one after the restart settles it."""
    volume = await api.create_volume()
    reserved = await api.post("/attachments", {"attachment": {"volume_uuid": volume["id"]}})
    attachment_id = reserved.json()["attachment"]["id"]
    async with api.app.state.db.write() as session:  # a connect cut short: attaching, no connection_info
        await session.execute(
            update(Attachment).where(Attachment.id == attachment_id).values(attach_status=AttachStatus.ATTACHING)  # type: ignore[arg-type]
        )
    nodes = api.app.state.nodes
    nodes.stopping = asyncio.Event()
    other = another_process(api)  # an API worker's connect, waiting for its job
    try:
        async with other.hold(volume["id"]):
            reconcile = asyncio.create_task(api.app.state.reconciler.run())
            await asyncio.sleep(0.3)
            assert not reconcile.done(), "the reconcile did not wait for the lock another process holds"
            nodes.stopping.set()  # SIGTERM
            report = await asyncio.wait_for(reconcile, 5)  # before: it waited until lock_timeout
            assert report.errors == [f"attachment {attachment_id}"]
        async with api.app.state.db.read() as session:
            status = await session.scalar(select(Attachment.attach_status).where(Attachment.id == attachment_id))  # type: ignore[arg-type]
        assert status == AttachStatus.ATTACHING  # left for the reconcile after the restart
    finally:
        nodes.stopping = None
        await other.close()
