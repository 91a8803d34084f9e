"""tgtadm's requests, sent on tgtd's control socket by this process: the same argv, no process per call.

A `tgtadm` process is ~1-2 ms here, nearly all of it fork and exec: tgtd answers the request itself in ~0.04 ms.
`run(argv)` takes the argv the tgt target would give `cmd.run` (`tgtadm [-C N] --lld iscsi --op OP --mode MODE
[--tid N] ...`, only the options that target uses), sends tgtadm's request for it (tgt's `struct tgtadm_req`, a
fixed 120-byte header, then its `name=value,...` text, as usr/tgtadm.c builds it) on the Unix socket
`/var/run/tgtd/socket.<N>`, and answers as tgtadm would: the text tgtd sends back as stdout, and a refusal as
tgtadm's exit status 22 with its message ("tgtadm: can't find the target") on stderr, so what matches on those
messages does not change. tgtd serves one request per connection and then closes it.

The layout and the error numbers are tgt's (usr/tgtadm.h, usr/tgtadm_error.h; the same from tgt 1.0.85, the
Debian 12 package, to upstream 1.0.97). TETHER_TGT_CONTROL=tgtadm runs the real tgtadm instead.
"""

from __future__ import annotations

import errno
import logging
import shlex
import socket
import struct
import time
from collections.abc import Sequence

from app.backends.base import BackendError
from app.backends.cmd import CommandFailed, Completed, mask

log = logging.getLogger(__name__)

SOCKET = "/var/run/tgtd/socket"
# struct tgtadm_req: mode, op, lld[64], len, tid, sid, lun, cid, host_no, device_type, ac_dir, pack, force
_REQUEST = struct.Struct("=ii64sIiQQIIIIII")
# struct tgtadm_rsp: err, len (the header's 8 bytes included)
_RESPONSE = struct.Struct("=II")
_NO_LUN_GIVEN = 2**64 - 1  # tgtadm's "no --lun"
_OPS = {"new": 0, "delete": 1, "show": 2, "bind": 3, "unbind": 4, "update": 5}
_MODES = {"sys": 0, "target": 1, "logicalunit": 2, "account": 7}
# tgtadm's message for each of tgtd's error numbers (usr/tgtadm.c, tgtadm_strerror)
_ERRORS = {
    1: "unknown error",
    2: "out of memory",
    3: "can't find the driver",
    4: "can't find the target",
    5: "can't find the logical unit",
    6: "can't find the session",
    7: "can't find the connection",
    8: "can't find the binding",
    9: "this target already exists",
    10: "this logical unit number already exists",
    11: "this binding already exists",
    12: "this access control rule already exists",
    13: "this access control rule does not exist",
    14: "this account already exists",
    15: "can't find the account",
    16: "too many accounts",
    17: "invalid request",
    18: "this target already has an outgoing account",
    19: "this target is still active",
    20: "this logical unit is still active",
    21: "this driver is busy",
    22: "this operation isn't supported",
    23: "unknown parameter",
    24: "this device has Prevent Removal set",
}
# tgtadm's options that become the request's text, in the order tgtadm writes them
_TEXT = (("-b", "path"), ("-T", "targetname"), ("-Q", "initiator-name"), ("--user", "user"), ("--password", "password"))
_VALUED = {"-C", "--lld", "--op", "--mode", "--tid", "--lun", "--name", "--value", *(flag for flag, _ in _TEXT)}


def request(argv: Sequence[str]) -> tuple[int, bytes]:
    """The control port and the request tgtadm would send for `argv`; ValueError for an option it does not know."""
    words = [str(a) for a in argv]
    if not words or words[0] != "tgtadm":
        raise ValueError("not a tgtadm command")
    given: dict[str, str] = {}
    force = 0
    rest = iter(words[1:])
    for word in rest:
        if word == "--force":
            force = 1
        elif word in _VALUED:
            value = next(rest, None)
            if value is None:
                raise ValueError(f"{word} needs a value")
            given[word] = value
        else:
            raise ValueError(f"tgtadm option {word!r} is not one this client sends")
    try:
        op, mode = _OPS[given["--op"]], _MODES[given["--mode"]]
    except KeyError as missing:
        raise ValueError(f"an unknown or missing --op or --mode: {missing}") from None
    text = []
    if "--name" in given:
        text.append(f"{given['--name']}={given.get('--value', '')}")
    text += [f"{key}={given[flag]}" for flag, key in _TEXT if flag in given]
    # tgtd splits the text at commas and knows no quoting: a value with one would be read as a second parameter
    if any("," in item or "\0" in item for item in text):
        raise ValueError("a tgtadm value with a comma or a NUL")
    body = ",".join(text).encode() + b"\0" if text else b""
    header = _REQUEST.pack(
        mode,
        op,
        given.get("--lld", "").encode(),
        _REQUEST.size + len(body),
        int(given.get("--tid", -1)),
        0,
        int(given.get("--lun", _NO_LUN_GIVEN)),
        0,
        0,
        0,  # TYPE_DISK
        0,  # incoming account
        0,
        force,
    )
    return int(given.get("-C", 0)), header + body


def _answer(channel: socket.socket) -> bytearray:
    """The header, then as many bytes as it says (tgtd closes the connection after them; a short read is kept)."""
    answer = bytearray()
    while True:
        wanted = _RESPONSE.unpack_from(answer)[1] if len(answer) >= _RESPONSE.size else _RESPONSE.size
        if len(answer) >= wanted:
            return answer
        chunk = channel.recv(max(65536, wanted - len(answer)))
        if not chunk:
            return answer
        answer += chunk


def run(argv: Sequence[str], *, timeout: float = 30, secrets: Sequence[str] = ()) -> Completed:
    """What `cmd.run(argv)` would answer for a tgtadm argv, from tgtd's control socket: raises CommandFailed
    (exit status 22, tgtadm's message) on a refusal, BackendError when tgtd cannot be reached."""
    try:
        port, message = request(argv)
    except ValueError as error:
        raise BackendError(f"not sent to tgtd: {error}") from None
    path = f"{SOCKET}.{port}"
    shown = mask(shlex.join(str(a) for a in argv), secrets)
    log.debug("sending %s", shown)
    started = time.monotonic()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as channel:
            channel.settimeout(timeout)
            channel.connect(path)
            channel.sendall(message)
            answer = _answer(channel)
    except TimeoutError:
        log.warning("tgtd did not answer %s within %s s", shown, timeout)
        raise BackendError(f"tgtd did not answer within {timeout:g} s") from None
    except OSError as error:
        reason = errno.errorcode.get(error.errno or 0, "") or str(error)
        raise BackendError(f"tgtd's control socket {path} does not answer: {error.strerror or reason}") from None
    if len(answer) < _RESPONSE.size:
        raise BackendError(f"tgtd closed its control socket {path} without an answer")
    err, length = _RESPONSE.unpack_from(answer)
    log.debug("tgtd answered %d after %.2f ms", err, (time.monotonic() - started) * 1000)
    if err:
        stderr = f"tgtadm: {_ERRORS.get(err, '(unknown tgtadm_errno)')}\n"
        raise CommandFailed(f"tgtd refused {shown}: {stderr.strip()}", command="tgtadm", returncode=22, stderr=stderr)
    if length != len(answer):
        raise BackendError(f"tgtd's answer on {path} was cut short ({len(answer)} of {length} bytes)")
    return Completed(0, bytes(answer[_RESPONSE.size :]).rstrip(b"\0").decode(errors="replace"), "")
