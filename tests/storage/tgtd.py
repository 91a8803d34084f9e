"""A private tgtd for storage tests (own portal port and control socket), and a real initiator login."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from app.backends.targets.tgt import parse_targets

IQN_PREFIX = "iqn.2010-10.org.openstack:"
SOCKET_DIR = Path("/var/run/tgtd")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
LOGIN_TIMEOUT = 20.0
MAX_CONTROL_PORT = 32767


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _control_socket_in_use(control_port: int) -> bool:
    path = SOCKET_DIR / f"socket.{control_port}"
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False  # a stale socket file from a daemon that is gone
        return True


class TgtDaemon:
    """tgtd in the foreground on <host>:<port>, controlled through /var/run/tgtd/socket.<control_port>.

    `prefix` runs it inside something (`ip netns exec <ns>`, which execs, so the process is tgtd itself); the
    control socket is a file, so tgtadm reaches it from any network namespace.
    """

    def __init__(self, log_dir: Path | None = None, *, host: str = "127.0.0.1", prefix: Sequence[str] = ()) -> None:
        self.host = host
        self.prefix = list(prefix)
        self.port = 0
        self.control_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = (log_dir or Path(tempfile.mkdtemp(prefix="tgtd-"))) / "tgtd.log"

    @property
    def portal(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        if self.port:
            self._spawn()
            return
        # a chosen port can be taken before tgtd binds it; try a few
        errors = []
        for _ in range(5):
            self.port = _free_port()
            # the control number only names a socket file, but tgtd takes 0..32767 and 0 is the default daemon's
            self.control_port = 1 + self.port % MAX_CONTROL_PORT
            if _control_socket_in_use(self.control_port):
                continue
            try:
                self._spawn()
                return
            except RuntimeError as exc:
                errors.append(str(exc))
        raise RuntimeError("could not start tgtd: " + "; ".join(errors))

    def _spawn(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, "tgtd", "-f", "--iscsi", f"portal={self.portal}", "-C", str(self.control_port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"tgtd exited at start: {self.log_tail()}")
            if self.tgtadm("--op", "show", "--mode", "sys").returncode == 0 and self._portal_listening():
                return
            time.sleep(0.05)
        self._kill()
        raise RuntimeError(f"tgtd did not answer within {START_TIMEOUT} s: {self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _portal_listening(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    def tgtadm(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tgtadm", "-C", str(self.control_port), "--lld", "iscsi", *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
        )

    def show(self) -> str:
        return self.tgtadm("--op", "show", "--mode", "target").stdout

    def clear(self) -> None:
        """Delete every target and account, leaving the daemon running."""
        for target in parse_targets(self.show()):
            self.tgtadm("--op", "delete", "--mode", "target", "--force", "--tid", str(target.tid))
        accounts = self.tgtadm("--op", "show", "--mode", "account").stdout
        for line in accounts.splitlines()[1:]:
            if line.strip():
                self.tgtadm("--op", "delete", "--mode", "account", "--user", line.strip().removesuffix(" (outgoing)"))

    def stop(self) -> None:
        """Take tgtd offline, empty it and let it exit; it ignores SIGTERM, so SIGKILL is the fallback."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.tgtadm("--op", "update", "--mode", "sys", "--name", "State", "-v", "offline")
            self.clear()
            self.tgtadm("--op", "delete", "--mode", "sys")
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._kill()
        self.proc = None
        for leftover in (f"socket.{self.control_port}", f"socket.{self.control_port}.lock"):
            (SOCKET_DIR / leftover).unlink(missing_ok=True)

    def restart_empty(self) -> None:
        """Stop and start again on the same portal and control port, with no targets or accounts."""
        self.stop()
        self.start()

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT)

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def readcapacity(
    initiator: str, user: str, secret: str, portal: str, iqn: str, lun: int = 1, timeout: float = LOGIN_TIMEOUT
) -> tuple[int, str]:
    """Log in as `initiator` with CHAP and read the LUN's size: (exit code, stdout and stderr together)."""
    url = f"iscsi://{user}%{secret}@{portal}/{iqn}/{lun}"
    try:
        result = subprocess.run(
            ["iscsi-readcapacity16", "-i", initiator, url],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return -1, f"iscsi-readcapacity16 timed out after {timeout} s"
    return result.returncode, result.stdout + result.stderr
