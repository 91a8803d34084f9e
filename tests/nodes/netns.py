"""Network namespaces for multi-node tests: a private /24 on a bridge, one namespace per host, a veth each.

The root namespace owns the bridge and the network's first address (the gateway), so processes left in the
root namespace (the API tier, the initiator, pytest itself) reach every host directly. A host reaches the
root namespace only at the gateway address: PostgreSQL listens on 127.0.0.1, so `Network.forward` relays a
gateway port to it. Unix sockets (tgtd's control socket, PostgreSQL's) are files and cross namespaces anyway.

Names carry the pid of the pytest process that made them (`tnt<pid>...`), so `remove_stale()` deletes what a
crashed earlier run left behind without touching a live run's network. Every command is an argv list.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "tnt"
# the /24s handed out: 10.77.<n>.0/24, the first one no live interface uses
SUPERNET = ipaddress.IPv4Network("10.77.0.0/16")
LOCK_FILE = Path("/run/tether-test-netns.lock")
FIRST_HOST = 10
_NAME = re.compile(rf"^{PREFIX}(\d+)")


class NetnsError(RuntimeError):
    """An `ip` command failed; the message holds the argv and what it printed."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    if check and result.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: exit {result.returncode}: {(result.stderr or result.stdout).strip()}")
    return result


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if shutil.which("ip") is None:
        return "needs ip (Debian package iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


def namespaces() -> list[str]:
    # `ip netns list` prints "name" or "name (id: N)"
    return [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]


def links() -> list[str]:
    # "5: tnt123a@if4: <...>" -> "tnt123a"
    names = []
    for line in ip("-o", "link", "show").stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def _owner_alive(name: str) -> bool:
    match = _NAME.match(name)
    if match is None:
        return True  # not ours: never touched
    pid = int(match.group(1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete the namespaces and links of runs whose pytest process is gone; returns what was deleted."""
    removed = []
    for name in namespaces():
        if name.startswith(PREFIX) and not _owner_alive(name):
            _kill_inside(name)
            ip("netns", "delete", name, check=False)
            removed.append(name)
    for name in links():
        if name.startswith(PREFIX) and not _owner_alive(name):
            ip("link", "delete", name, check=False)
            removed.append(name)
    return removed


def _kill_inside(namespace: str) -> None:
    """SIGKILL whatever still runs in a namespace (a leftover tgtd would keep its portal and control socket)."""
    result = ip("netns", "pids", namespace, check=False)
    for pid in result.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Two runs choosing a /24 at once would choose the same one."""
    with LOCK_FILE.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _used_networks() -> set[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    used: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()
    for line in ip("-o", "-4", "addr", "show").stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            used.add(ipaddress.ip_interface(fields[fields.index("inet") + 1]).network)
    return used


@dataclass
class Namespace:
    """One host: a network namespace with one veth end (`ip` on the network's /24) and lo up."""

    name: str
    ip: str
    host_link: str  # the end on the bridge, in the root namespace
    ns_link: str  # the end inside the namespace

    def argv(self, command: Sequence[str]) -> list[str]:
        """`command` run inside the namespace (`ip netns exec` execs it: the pid is the command's own)."""
        return ["ip", "netns", "exec", self.name, *command]

    def run(self, command: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        kwargs.setdefault("check", False)
        kwargs.setdefault("timeout", 30)
        return subprocess.run(self.argv(command), **kwargs)

    def popen(self, command: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.argv(command), **kwargs)

    def disconnect(self) -> None:
        """Cut this host off the network (its link goes down); what runs inside keeps running."""
        ip("link", "set", self.host_link, "down")

    def reconnect(self) -> None:
        ip("link", "set", self.host_link, "up")

    def pids(self) -> list[int]:
        return [int(pid) for pid in ip("netns", "pids", self.name, check=False).stdout.split()]


@dataclass
class Network:
    """A bridge with a free 10.77.<n>.0/24 in the root namespace, and namespaces plugged into it."""

    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    bridge: str = ""
    subnet: ipaddress.IPv4Network | None = None
    hosts: list[Namespace] = field(default_factory=list)
    forwarders: list[TcpForwarder] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.tag) > 11:
            raise ValueError(f"tag {self.tag!r}: interface names hold 15 characters, the tag at most 11")
        self.bridge = f"{self.tag}br"

    @property
    def gateway(self) -> str:
        assert self.subnet is not None, "the network is not created"
        return str(self.subnet.network_address + 1)

    def create(self) -> Network:
        remove_stale()
        self.destroy()  # a leftover of this very tag (same pid, an earlier failed setup) goes first
        with _locked():
            used = _used_networks()
            for candidate in SUPERNET.subnets(new_prefix=24):
                if candidate not in used:
                    self.subnet = candidate
                    break
            else:
                raise NetnsError(f"no free /24 left in {SUPERNET}")
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
        return self

    def add_host(self, suffix: str | None = None) -> Namespace:
        """A new namespace on the network, at the next free address (.10, .11, ...)."""
        assert self.subnet is not None, "create() the network first"
        index = len(self.hosts)
        suffix = suffix or chr(ord("a") + index)
        if not suffix[0].isalpha():
            raise ValueError(f"suffix {suffix!r} must start with a letter (the owner's pid ends at the first one)")
        name = f"{self.tag}{suffix}"
        if len(name) + 1 > 15:
            raise ValueError(f"{name!r}: too long for an interface name")
        address = str(self.subnet.network_address + FIRST_HOST + index)
        host = Namespace(name=name, ip=address, host_link=f"{name}h", ns_link=f"{name}n")
        ip("netns", "add", name)
        self.hosts.append(host)  # from here on destroy() cleans it up
        ip("link", "add", host.host_link, "type", "veth", "peer", "name", host.ns_link)
        ip("link", "set", host.ns_link, "netns", name)
        ip("link", "set", host.host_link, "master", self.bridge)
        ip("link", "set", host.host_link, "up")
        ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        ip("netns", "exec", name, "ip", "addr", "add", f"{address}/24", "dev", host.ns_link)
        ip("netns", "exec", name, "ip", "link", "set", host.ns_link, "up")
        ip("netns", "exec", name, "ip", "route", "add", "default", "via", self.gateway)
        return host

    def forward(self, port: int, target: tuple[str, int] | None = None) -> TcpForwarder:
        """Relay <gateway>:<port> to `target` (default 127.0.0.1:<port>) in the root namespace; once per port."""
        for running in self.forwarders:
            if running.listen == (self.gateway, port):
                return running
        forwarder = TcpForwarder((self.gateway, port), target or ("127.0.0.1", port))
        forwarder.start()
        self.forwarders.append(forwarder)
        return forwarder

    def destroy(self) -> None:
        """Delete every namespace, link and relay of this network; safe to call twice or after a failed create."""
        for forwarder in self.forwarders:
            forwarder.stop()
        self.forwarders.clear()
        ours = [name for name in namespaces() if name.startswith(self.tag)]
        for name in ours:
            _kill_inside(name)
            ip("netns", "delete", name, check=False)
        for name in links():
            if name.startswith(self.tag):
                ip("link", "delete", name, check=False)
        self.hosts.clear()
        self.subnet = None


class TcpForwarder:
    """A TCP relay in this process: each connection to `listen` is piped to `target` (two threads a connection)."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.listen = listen
        self.target = target
        self._server = socket.create_server(listen, reuse_port=False)
        self._server.settimeout(0.2)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=f"forward-{listen[0]}:{listen[1]}", daemon=True)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=2)
        self._server.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.close()
            self._open.clear()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                for sock in (source, sink):
                    if sock in self._open:
                        self._open.discard(sock)
                        sock.close()
