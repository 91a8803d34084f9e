"""A private PostgreSQL server for tests that restart their database: never the shared one on 127.0.0.1:5432,
which the rest of the suite uses in the same run.

`initdb` into a fresh directory (as the user postgres when we are root: initdb refuses root), trust auth, one
free port on 127.0.0.1, the socket in that directory, fsync off (a test's data need not survive a power cut,
only a restart, and a fast shutdown writes everything out first), and authentication_timeout 2 s: a fast
shutdown waits for every backend, and one forked for a connection whose client never sent its startup packet
waits that long for it (the default 60 s; seen here in about one restart in ten under load, the client not yet
identified: `restart` keeps what the server's processes and sockets were doing in `slow_restarts`). Longer than
TETHER_SERVICE_DOWN_TIME, such a restart makes every node look down for a while.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from tests.conftest import free_port

START_TIMEOUT = 60


def binaries() -> Path | None:
    """/usr/lib/postgresql/<ver>/bin of the newest installed server, or None."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else None


class PrivatePostgres:
    def __init__(self, bin_dir: Path, *, max_connections: int = 300) -> None:
        self.bin = bin_dir
        # not under pytest's tmp directory: that one is root's alone (0700), and the server runs as postgres
        self.dir = Path(tempfile.mkdtemp(prefix="tether-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = 0
        self.max_connections = max_connections
        self.restarts = 0
        self.slow_restarts: list[str] = []
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")

    def _run(self, *argv: str, timeout: float = START_TIMEOUT) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)

    def _options(self) -> str:
        return (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
            f" -c max_connections={self.max_connections} -c authentication_timeout=2s"
        )

    def _pg_ctl(self, *args: str) -> None:
        result = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", *args)
        if result.returncode != 0:
            raise RuntimeError(
                f"pg_ctl {' '.join(args)}: {result.stdout}{result.stderr}\n{self.log_tail(60)}\n{self.processes()}"
            )

    def start(self) -> PrivatePostgres:
        if not self.data.exists():
            made = self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
            if made.returncode != 0:
                raise RuntimeError(f"initdb: {made.stdout}{made.stderr}")
        errors = []
        for _ in range(3):  # a free port may be taken before the server binds it
            self.port = free_port()
            try:
                self._pg_ctl("start", "-o", self._options())
                return self
            except RuntimeError as error:
                errors.append(str(error))
        raise RuntimeError("could not start PostgreSQL: " + "\n".join(errors))

    def restart(self, mode: str = "fast", *, slow: float = 5.0) -> float:
        """pg_ctl restart -m <mode> on the same port; the seconds it took (the server's gap). A restart still
        under way after `slow` seconds leaves what the server's processes were doing in `slow_restarts`."""
        started = time.monotonic()
        done = threading.Event()

        def watch() -> None:
            if not done.wait(slow):
                self.slow_restarts.append(self.processes())

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            self._pg_ctl("restart", "-m", mode, "-o", self._options())
        finally:
            done.set()
            watcher.join()
        self.restarts += 1
        return time.monotonic() - started

    def stop(self) -> None:
        if self.data.exists():
            with contextlib.suppress(Exception):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new database: its Tether URL (asyncpg)."""
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=10) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{name}"

    def processes(self) -> str:
        """The server's processes and what each waits on (for a report when it does not stop)."""
        try:
            postmaster = (self.data / "postmaster.pid").read_text().split()[0]
        except (OSError, IndexError):
            return "(no postmaster.pid)"
        listing = subprocess.run(
            ["ps", "-o", "pid,stat,wchan:32,cmd", "--ppid", postmaster],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        sockets = subprocess.run(
            ["ss", "-tnpo", "state", "established", f"( sport = :{self.port} or dport = :{self.port} )"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return f"{listing.stdout}\n{sockets.stdout}"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
