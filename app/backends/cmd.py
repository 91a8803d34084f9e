"""The one place Tether runs external commands: argv lists only, a timeout, the C locale, secrets masked."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from app.backends.base import BackendError

log = logging.getLogger(__name__)

MASK = "***"


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


class CommandFailed(BackendError):
    """A command exited non-zero. `stderr` is already masked, so callers may match on it and log it."""

    def __init__(self, message: str, *, command: str, returncode: int, stderr: str) -> None:
        super().__init__(message)
        self.command = command
        self.returncode = returncode
        self.stderr = stderr


def mask(text: str, secrets: Sequence[str]) -> str:
    """Replace every secret in `text` by ***."""
    # longest first, so a secret that contains another is not left half-visible
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run(
    argv: Sequence[str],
    *,
    timeout: float = 30,
    check: bool = True,
    secrets: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Completed:
    """Run `argv` (never through a shell) and return its exit code and text output.

    `env` adds to the inherited environment; LC_ALL=C always wins so output can be parsed.
    Raises BackendError when the command is missing or times out, and CommandFailed on a
    non-zero exit when `check` is true. Nothing logged or raised contains a string of `secrets`.
    """
    if isinstance(argv, str | bytes):
        # iterating a command string would run its first character; nothing here is ever a shell line
        raise TypeError("run() takes an argv list, never a command string")
    args = [str(a) for a in argv]
    if not args:
        raise ValueError("empty argv")
    command = os.path.basename(args[0])
    shown = mask(shlex.join(args), secrets)
    full_env = {**os.environ, **(env or {}), "LC_ALL": "C"}
    log.debug("running %s", shown)
    started = time.monotonic()
    try:
        # a new session gives the command its own process group, so a timeout can kill
        # the children it started too; otherwise they would hold our pipes open
        proc = subprocess.Popen(  # noqa: S603 - argv list, never a shell
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",  # a path or name in odd bytes must not turn a result into a crash
            env=full_env,
            start_new_session=True,
        )
    except OSError as exc:
        raise BackendError(f"{command} could not be started: {mask(exc.strerror or str(exc), secrets)}") from None
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc, command)
        log.warning("%s timed out after %s s", shown, timeout)
        raise BackendError(f"{command} timed out after {timeout:g} s") from None
    except BaseException:
        _kill_group(proc, command)
        raise
    elapsed_ms = (time.monotonic() - started) * 1000
    log.debug("%s exited %d after %.0f ms", command, proc.returncode, elapsed_ms)
    if proc.returncode != 0 and check:
        safe_stderr = mask(stderr, secrets)
        detail = last_line(safe_stderr) or "no error output"
        log.debug("%s stderr: %s", command, safe_stderr.strip())
        raise CommandFailed(
            f"{command} exited with {proc.returncode}: {detail}",
            command=command,
            returncode=proc.returncode,
            stderr=safe_stderr,
        )
    return Completed(proc.returncode, stdout, stderr)


def _kill_group(proc: subprocess.Popen[str], command: str) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        # the group is dead, so the pipes close; the bound only guards against a stuck kernel
        proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        log.error("%s (pid %d) did not die after SIGKILL", command, proc.pid)
