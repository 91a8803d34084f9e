"""How soon a real `tether node` starts a job (SPEC 10): a job queued behind another job of the same volume (the
queue's per-volume lock) starts when that one ends, not at the queue library's next poll, also when it was
deferred in the instant between the previous job's outcome and its end.

procrastinate's worker fetches on a notification of a new job, or every fetch_job_polling_interval (5 s by
default); when the job ahead of it on the same lock ends, nothing tells the worker to fetch again. So the
first connect of a new volume whose finish_create job had just written `available` (and was not yet marked
done), or any job deferred while its volume's previous job ran, waited up to 5 s.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sqlalchemy import select

from app.backends.base import VolumeRef
from app.db.engine import Database
from app.node import FETCH_POLL
from app.queue import JobQueue
from app.secrets import SecretBox
from app.services.nodes import RemoteNode
from tests.conftest import new_pg_database
from tests.nodes.cluster import Cluster, NodeSpec, running

pytestmark = pytest.mark.postgres

DELAY = 0.5  # seconds each fake backend call sleeps on the node (`capacity` does not)
JOBS = 40


@pytest.fixture(scope="module")
def slow_fake_node(tmp_path_factory: pytest.TempPathFactory, iscsi_tools: None, tether_node: None) -> Iterator[Cluster]:
    """One `tether node` on the fake backend, each storage call taking DELAY seconds; no API tier; one for the
    module (each test uses volumes of its own)."""
    spec = NodeSpec(
        "node-q",
        env={"TETHER_VOLUME_BACKEND": "fake", "TETHER_TARGET": "fake", "TETHER_FAKE_DELAY": f"{DELAY:g}"},
    )
    cluster = Cluster(
        tmp_path_factory.mktemp("job-pickup"), new_pg_database("tether_nodes"), [spec], owns_database=True
    )
    with running(cluster, api=False):
        yield cluster


@pytest.fixture
async def remote(slow_fake_node: Cluster) -> AsyncIterator[RemoteNode]:
    """What an API worker uses to run a job on node-q and wait for its outcome."""
    url = slow_fake_node.database_url
    queue = JobQueue(url, SecretBox(None))
    await queue.start()
    db = Database(url, 2)
    try:
        yield RemoteNode("node-q", db, queue, timeout=30)
    finally:
        await queue.close()
        await db.dispose()


async def timed(node: RemoteNode, key: str, op: str, *args: Any) -> float:
    """Seconds from the job's defer to its outcome."""
    started = time.monotonic()
    await node.call(key, op, args)
    return time.monotonic() - started


async def test_a_job_queued_behind_its_volumes_running_job_starts_when_that_one_ends(remote: RemoteNode) -> None:
    await timed(remote, "warm-up", "capacity")  # the node is consuming
    for _ in range(3):
        volume = VolumeRef(id=str(uuid.uuid4()), size_gb=1)
        first = asyncio.create_task(timed(remote, volume.id, "create_volume", volume))
        await asyncio.sleep(DELAY / 2)  # the first job is running on the node and holds the volume's lock
        second = await timed(remote, volume.id, "create_volume", volume)  # an idempotent ensure: runs again
        await first
        # the rest of the first job, then the second: about 1.5 x DELAY; the library's poll would make it 5 s
        assert second < DELAY * 1.5 + 1.5, f"the second job of a volume took {second:.2f} s"


async def test_a_volumes_next_job_deferred_as_its_last_one_ends_starts_at_once(remote: RemoteNode) -> None:
    """What an API worker does on every request: defer a volume's job as soon as it has the previous job's
    outcome. A node that records that outcome before procrastinate marks the job done has the next job often
    find the volume's lock still held: it is skipped and (nothing waking the worker) waits for the poll. The
    node records it after the job is marked done, and wakes its worker in the same statement when a job waits."""
    key = str(uuid.uuid4())
    await timed(remote, key, "capacity")
    took = [await timed(remote, key, "capacity") for _ in range(JOBS)]
    waited = [round(t, 2) for t in took if t >= FETCH_POLL * 0.8]
    # a busy machine may stall one or two; the poll alone stalled about one job in six
    assert len(waited) <= 2, f"{len(waited)} of {JOBS} jobs of one volume waited for the worker's poll: {waited}"


async def test_a_nodes_reconcile_jobs_run_one_at_a_time(slow_fake_node: Cluster, remote: RemoteNode) -> None:
    """`tether reconcile` run several times at once: the node runs their jobs one after the other. A reconcile
    waits for the lock of each volume it changes, and reconciles that all ran at once could take every one of the
    node's job slots while the holders of those locks (a connect, a reset) each waited for a job of their own.
    Here a volume of node-q is left `creating` and its lock is held by the test: each reconcile waits for it."""
    import asyncpg

    from app.db.locks import AdvisoryLocks, asyncpg_dsn
    from app.db.models import Volume, VolumeStatus

    await timed(remote, "warm-up", "capacity")
    async with remote.db.write() as session:
        volume = Volume(
            project_id="p", user_id="u", size=1, status=VolumeStatus.CREATING, host="node-q@default#default"
        )
        session.add(volume)
    holder = AdvisoryLocks(slow_fake_node.database_url)
    watcher = await asyncpg.connect(asyncpg_dsn(slow_fake_node.database_url))
    most = 0
    try:
        async with holder.hold(volume.id):
            calls = [asyncio.create_task(remote.reconcile()) for _ in range(5)]  # node-q runs 4 jobs at once
            for _ in range(30):  # 1.5 s: every reconcile that has started waits for the volume
                doing = await watcher.fetchval(
                    "SELECT count(*) FROM procrastinate_jobs WHERE queue_name = 'node.node-q' AND status = 'doing'"
                    " AND args -> 'job' ->> 'op' = 'reconcile'"
                )
                most = max(most, doing)
                await asyncio.sleep(0.05)
        await asyncio.gather(*calls)
        async with remote.db.read() as session:
            status = await session.scalar(select(Volume.status).where(Volume.id == volume.id))  # type: ignore[arg-type]
    finally:
        await watcher.close()
        await holder.close()
    assert most == 1, f"{most} reconcile jobs ran at once on one node"
    assert status == VolumeStatus.AVAILABLE  # the first reconcile to get the volume finished its create
