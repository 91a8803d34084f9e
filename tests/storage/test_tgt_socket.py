"""tgt_socket's requests, byte for byte what the real tgtadm sends for the same argv: every kind the tgt target
makes. tgtadm is pointed (TGT_IPC_SOCKET) at a socket of this test's, which keeps what it receives and answers
"done"; the rest (tgtd's answers, its refusals as tgtadm's messages) is the tgt suites' (test_tgt_target.py,
test_target_contract.py), run with both controls on a real tgtd.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from app.backends.targets import tgt_socket
from tests.conftest import missing

PORT = 7
IQN = "iqn.2010-10.org.openstack:volume-5f0e2c8e-1d7b-4a57-9d7e-0c9a3f1b2d44"
INITIATOR = "iqn.1994-05.com.redhat:host-a"
SECRET = "s3cretS3cret4567"

# every argv shape the tgt target sends (app/backends/targets/tgt.py)
SHAPES = {
    "show sys": ["--op", "show", "--mode", "sys"],
    "show target": ["--op", "show", "--mode", "target"],
    "new target": ["--op", "new", "--mode", "target", "--tid", "3", "-T", IQN],
    "delete target": ["--op", "delete", "--mode", "target", "--tid", "3", "--force"],
    "new logicalunit": ["--op", "new", "--mode", "logicalunit", "--tid", "3", "--lun", "1", "-b", "/srv/v/volume-1"],
    "delete logicalunit": ["--op", "delete", "--mode", "logicalunit", "--tid", "3", "--lun", "1"],
    "bind target": ["--op", "bind", "--mode", "target", "--tid", "3", "-Q", INITIATOR],
    "unbind target": ["--op", "unbind", "--mode", "target", "--tid", "3", "-Q", INITIATOR],
    "new account": ["--op", "new", "--mode", "account", "--user", "chap-user", "--password", SECRET],
    "delete account": ["--op", "delete", "--mode", "account", "--user", "chap-user"],
    "bind account": ["--op", "bind", "--mode", "account", "--tid", "3", "--user", "chap-user"],
    "unbind account": ["--op", "unbind", "--mode", "account", "--tid", "3", "--user", "chap-user"],
    "update target": ["--op", "update", "--mode", "target", "--tid", "3", "--name", "state", "--value", "offline"],
}


def received_by_tgtd(tmp_path: Path, argv: list[str]) -> bytes:
    """What the real tgtadm sends for `argv` on the control socket."""
    base = tmp_path / "socket"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{base}.{PORT}")
    listener.listen(1)
    listener.settimeout(10)
    got = bytearray()

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.settimeout(10)
            while len(got) < 120 or len(got) < struct.unpack_from("=I", got, 72)[0]:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                got.extend(chunk)
            connection.sendall(struct.pack("=II", 0, 8))

    server = threading.Thread(target=serve)
    server.start()
    try:
        done = subprocess.run(
            ["tgtadm", *argv],
            env={"TGT_IPC_SOCKET": str(base), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    finally:
        server.join(15)
        listener.close()
    assert done.returncode == 0, done.stderr
    return bytes(got)


@pytest.fixture(scope="module")
def tgtadm() -> None:
    if shutil.which("tgtadm", path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
        missing("tgtadm is not installed (Debian package tgt)")


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_a_request_is_what_tgtadm_sends(tgtadm: None, tmp_path: Path, shape: list[str]) -> None:
    argv = ["tgtadm", "-C", str(PORT), "--lld", "iscsi", *shape]
    port, request = tgt_socket.request(argv)
    assert port == PORT
    assert request == received_by_tgtd(tmp_path, argv[1:])
