"""The namespace helpers themselves: a private tgtd inside a namespace, logged in to from the root namespace."""

from __future__ import annotations

import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nodes import netns
from tests.nodes.netns import Namespace, Network
from tests.storage.tgtd import IQN_PREFIX, TgtDaemon, readcapacity

pytestmark = pytest.mark.storage

INITIATOR = "iqn.1994-05.com.example:netns-root"
GIB = 1024**3


def export(daemon: TgtDaemon, backing: Path, user: str, secret: str) -> str:
    """One 1 GiB LUN behind CHAP and an initiator ACL; returns its IQN."""
    iqn = f"{IQN_PREFIX}netns-{uuid.uuid4().hex[:8]}"
    subprocess.run(["truncate", "-s", str(GIB), str(backing)], check=True)
    for args in (
        ("--op", "new", "--mode", "target", "--tid", "1", "-T", iqn),
        ("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", str(backing)),
        ("--op", "new", "--mode", "account", "--user", user, "--password", secret),
        ("--op", "bind", "--mode", "account", "--tid", "1", "--user", user),
        ("--op", "bind", "--mode", "target", "--tid", "1", "-Q", INITIATOR),
    ):
        result = daemon.tgtadm(*args)
        assert result.returncode == 0, f"tgtadm {args}: {result.stderr}"
    return iqn


def listening(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def namespaced_tgtd(network: Network, iscsi_tools: None, tmp_path: Path) -> Iterator[tuple[Namespace, TgtDaemon]]:
    host = network.add_host()
    daemon = TgtDaemon(log_dir=tmp_path, host=host.ip, prefix=host.argv([]))
    daemon.start()
    yield host, daemon
    daemon.stop()


def test_a_tgtd_in_a_namespace_serves_an_initiator_in_the_root_namespace(
    namespaced_tgtd: tuple[Namespace, TgtDaemon], tmp_path: Path
) -> None:
    host, daemon = namespaced_tgtd
    assert daemon.proc is not None
    assert daemon.proc.pid in host.pids(), "tgtd runs inside the namespace"
    assert daemon.portal == f"{host.ip}:{daemon.port}"
    # the portal is on the namespace's address only: nothing listens on that port in the root namespace
    assert not listening("127.0.0.1", daemon.port)

    iqn = export(daemon, tmp_path / "lun.img", "netnsuser", "netnssecret12")

    code, out = readcapacity(INITIATOR, "netnsuser", "netnssecret12", daemon.portal, iqn)
    assert code == 0, out
    assert f"Total size:{GIB}" in out

    listed = subprocess.run(
        ["iscsi-ls", "-i", INITIATOR, "-s", f"iscsi://netnsuser%netnssecret12@{daemon.portal}"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert iqn in listed.stdout, listed.stdout
    assert f"Portal:{daemon.portal}" in listed.stdout.replace(" ", ""), listed.stdout

    code, out = readcapacity(INITIATOR, "netnsuser", "wrong-secret1", daemon.portal, iqn)
    assert code != 0
    assert "Authentication failure" in out, out


def test_a_disconnected_host_is_unreachable_until_reconnected(
    namespaced_tgtd: tuple[Namespace, TgtDaemon], tmp_path: Path
) -> None:
    host, daemon = namespaced_tgtd
    iqn = export(daemon, tmp_path / "lun.img", "cutuser", "cutsecret123")

    host.disconnect()
    code, out = readcapacity(INITIATOR, "cutuser", "cutsecret123", daemon.portal, iqn, timeout=5)
    assert code != 0, out
    assert daemon.alive(), "the daemon keeps running while its host is cut off"

    host.reconnect()
    code, out = readcapacity(INITIATOR, "cutuser", "cutsecret123", daemon.portal, iqn)
    assert code == 0, out
    assert f"Total size:{GIB}" in out


def test_hosts_get_their_own_addresses_and_reach_the_gateway(network: Network) -> None:
    a, b = network.add_host(), network.add_host()
    assert a.ip != b.ip
    assert network.subnet is not None
    assert {a.ip, b.ip} <= {str(address) for address in network.subnet.hosts()}
    # each namespace sees only its own address and lo
    shown = a.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True)
    assert a.ip in shown.stdout
    assert b.ip not in shown.stdout
    # a relay on the gateway reaches a listener that is on 127.0.0.1 in the root namespace only
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        network.forward(port)
        probe = b.run(
            ["python3", "-c", f"import socket; s = socket.create_connection(('{network.gateway}', {port}), 3)"],
            capture_output=True,
            text=True,
        )
        assert probe.returncode == 0, probe.stderr


def test_leftovers_of_a_dead_run_are_removed_and_a_live_runs_are_kept(network: Network) -> None:
    mine = network.add_host()
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = f"{netns.PREFIX}{finished.pid}x"
    netns.ip("netns", "add", dead)
    netns.ip("link", "add", f"{dead}h", "type", "veth", "peer", "name", f"{dead}n")
    try:
        removed = netns.remove_stale()
        assert dead in removed
        assert f"{dead}h" in removed or f"{dead}h" not in netns.links()
        assert dead not in netns.namespaces()
        assert f"{dead}h" not in netns.links()
        assert mine.name in netns.namespaces()
    finally:
        netns.ip("netns", "delete", dead, check=False)
        netns.ip("link", "delete", f"{dead}h", check=False)


def test_destroy_is_idempotent(network: Network) -> None:
    host = network.add_host()
    network.destroy()
    network.destroy()
    assert host.name not in netns.namespaces()
    assert not [name for name in netns.links() if name.startswith(network.tag)]
