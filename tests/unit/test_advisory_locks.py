"""Per-volume locks across processes: two lock objects have two PostgreSQL sessions, like two workers; the
SQLite lock file is shared with a real second process."""

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.backends.dispatch import Dispatcher, LockLost, LockTimeout
from app.db.locks import AdvisoryLocks, FileLocks, advisory_key, asyncpg_dsn, cross_process_locks
from tests.conftest import ROOT


async def test_a_volume_held_by_one_process_waits_in_another(postgres_url: str) -> None:
    first, second = AdvisoryLocks(postgres_url), AdvisoryLocks(postgres_url)
    order: list[str] = []
    try:
        async with first.hold("volume-a"):
            waiter = asyncio.create_task(_take(second, "volume-a", order))
            await asyncio.sleep(0.2)
            assert not waiter.done(), "the second process got a volume the first one holds"
            async with second.hold("volume-b"):  # other volumes are not blocked
                order.append("b")
            order.append("a released")
        await asyncio.wait_for(waiter, 5)
        assert order == ["b", "a released", "a taken"]
    finally:
        await first.close()
        await second.close()


async def _take(locks: AdvisoryLocks, key: str, order: list[str]) -> None:
    async with locks.hold(key):
        order.append(f"{key[-1]} taken")


async def _terminate(locks: AdvisoryLocks, dsn: str) -> None:
    """What a network cut or a PostgreSQL restart does to the lock connection."""
    import asyncpg

    pid = locks._connection.get_server_pid()
    admin = await asyncpg.connect(asyncpg_dsn(dsn))
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()


async def test_a_lock_lost_with_its_connection_stops_the_work_that_held_it(postgres_url: str) -> None:
    """PostgreSQL frees a dropped session's locks: the holder must stop, not carry on beside the next holder."""
    locks, other = AdvisoryLocks(postgres_url), AdvisoryLocks(postgres_url)
    dispatcher = Dispatcher(1, locks)
    calls: list[str] = []
    try:
        async with dispatcher.exclusive("volume-c") as run:
            await run(calls.append, "before")
            await _terminate(locks, postgres_url)
            # another process gets the volume at once: the lock really is gone
            async with other.hold("volume-c", wait=5):
                pass
            # and the work that held it is told so before its next backend call, within a ping or two
            for _ in range(50):
                try:
                    run.check()
                except LockLost:
                    break
                await asyncio.sleep(0.1)
            with pytest.raises(LockLost):
                await run(calls.append, "after")
        assert calls == ["before"]
        # the next holder takes it again on a new connection
        async with dispatcher.exclusive("volume-c") as run:
            await run(calls.append, "again")
        assert calls == ["before", "again"]
    finally:
        await locks.close()
        await other.close()


async def test_a_lock_lost_while_idle_is_seen_before_any_backend_call(postgres_url: str) -> None:
    """No lock call in between: the termination is noticed by the connection's own listener."""
    locks = AdvisoryLocks(postgres_url)
    try:
        async with locks.hold("volume-d") as lease:
            await _terminate(locks, postgres_url)
            for _ in range(50):
                if lease.lost:  # type: ignore[attr-defined]
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(LockLost):
                lease.check()
    finally:
        await locks.close()


async def test_waiting_for_a_held_volume_gives_up(postgres_url: str) -> None:
    first, second = AdvisoryLocks(postgres_url), AdvisoryLocks(postgres_url)
    try:
        async with first.hold("volume-e"):
            started = time.monotonic()
            with pytest.raises(LockTimeout):
                async with second.hold("volume-e", wait=0.3):
                    pass
            assert 0.25 < time.monotonic() - started < 3
        async with second.hold("volume-e", wait=0.3):  # and gets it once it is free
            pass
    finally:
        await first.close()
        await second.close()


async def test_in_process_waits_give_up_too() -> None:
    dispatcher = Dispatcher(1, lock_timeout=0.2)
    async with dispatcher.exclusive("volume-f"):
        with pytest.raises(LockTimeout):
            async with dispatcher.exclusive("volume-f"):
                pass


_HOLDER = """
import asyncio, sys
from app.db.locks import FileLocks

async def main() -> None:
    async with FileLocks(sys.argv[1]).hold("volume-g"):
        print("held", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


async def test_sqlite_locks_span_processes(tmp_path: Path) -> None:
    """`tether reconcile` beside a server on SQLite: the same volume's lock, held by another process."""
    path = str(tmp_path / "tether.db.locks")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, text=True
    )
    locks = FileLocks(path)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeout):
            async with locks.hold("volume-g", wait=0.3):
                pass
        async with locks.hold("volume-h", wait=0.3):  # other volumes are free
            pass
        holder.communicate("", timeout=10)
        async with locks.hold("volume-g", wait=2):
            pass
    finally:
        holder.kill()
        await locks.close()


async def test_two_lock_files_in_one_process_exclude_each_other_and_closing_one_frees_only_its_own(
    tmp_path: Path,
) -> None:
    """Open-file-description locks: each FileLocks owns its locks, as a process would (POSIX record locks belong to
    the process: a second FileLocks of the same process was granted the held byte, and closing it freed the
    first's)."""
    path = str(tmp_path / "volumes.lock")
    first, second = FileLocks(path), FileLocks(path)
    try:
        async with first.hold("volume-i"):
            with pytest.raises(LockTimeout):
                async with second.hold("volume-i", wait=0.2):
                    pass
            async with second.hold("volume-j", wait=0.2):  # other volumes are free
                pass
            await second.close()  # its file closed: the first's lock stays
            third = FileLocks(path)
            try:
                with pytest.raises(LockTimeout):
                    async with third.hold("volume-i", wait=0.2):
                        pass
            finally:
                await third.close()
        async with second.hold("volume-i", wait=1):
            pass
    finally:
        await first.close()
        await second.close()


def test_embedded_mode_locks_in_a_file_and_remote_mode_in_postgresql(tmp_path: Path, postgres_url: str) -> None:
    """One host's processes (embedded: the workers, `tether reconcile`) meet in a lock file, a system call per lock
    instead of two round trips; processes of several hosts (remote mode's API tier and nodes) in PostgreSQL."""
    embedded = cross_process_locks(postgres_url, True, one_host=True, lock_path=str(tmp_path / "locks"))
    assert isinstance(embedded, FileLocks)
    assert embedded.path == str(tmp_path / "locks" / "volumes.lock")
    default = cross_process_locks(postgres_url, True, one_host=True)
    assert isinstance(default, FileLocks)
    assert default.path == "/run/lock/tether/volumes.lock"
    assert isinstance(cross_process_locks(postgres_url, True, one_host=False), AdvisoryLocks)
    assert cross_process_locks(postgres_url, False, one_host=True) is None
    sqlite = f"sqlite+aiosqlite:///{tmp_path}/tether.db"  # unchanged: beside the database
    beside = cross_process_locks(sqlite, True, one_host=True)
    assert isinstance(beside, FileLocks)
    assert beside.path == f"{tmp_path}/tether.db.locks"
    assert cross_process_locks("sqlite+aiosqlite:///:memory:", True, one_host=True) is None


def test_keys_are_stable_signed_64_bit() -> None:
    assert advisory_key("volume-x") == advisory_key("volume-x")
    assert advisory_key("volume-x") != advisory_key("volume-y")
    assert -(2**63) <= advisory_key("volume-x") < 2**63


async def test_a_database_url_with_sqlalchemys_tls_option_works_for_the_lock_connection(postgres_url: str) -> None:
    """`?ssl=disable` (SQLAlchemy's asyncpg spelling, which the engine takes) reaches asyncpg as `sslmode`: passed
    on as `ssl`, PostgreSQL refused the lock connection (a runtime parameter it cannot change)."""
    url = f"{postgres_url}?ssl=disable"
    assert asyncpg_dsn(url).endswith("?sslmode=disable")
    locks = AdvisoryLocks(url)
    try:
        async with locks.hold("volume-tls"):
            pass
    finally:
        await locks.close()
