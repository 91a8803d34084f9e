"""iSCSI target on Linux tgt (tgtd), driven by tgtadm's requests: one target per volume, LUN 1, CHAP and ACLs.

tgtd is the only source of truth: a call changes only what differs from what tgtd holds (as `--op show --mode
target` reads it, or as a refusal of tgtd's proves it), so each operation is idempotent and safe to repeat
after a crash or a tgtd restart. Each request is a tgtadm argv; by default this process sends it on tgtd's
control socket itself (tgt_socket.py: ~0.05 ms), with TETHER_TGT_CONTROL=tgtadm it runs the tgtadm command
(~1-2 ms each, nearly all of it fork and exec). tgtd closes its control socket after each request, so there is
no channel to keep open; a node operation reads the targets at most once and lets tgtd's own refusals stand
in for the other reads:
- `new target` fails when the tid or the name is taken, so when this process has not seen the volume's
  target it creates it first, and a success proves the target new and empty (no listing at all);
- `new account` fails when the user exists, and only then is it deleted and made again (no `show account`);
- `connect` and `disconnect` hand what they read (or made) from one step to the next.

Two tgtd facts shape the CHAP code (both hold in tgt 1.0.85 and in upstream 1.0.97):
- a target with no incoming account bound lets every initiator in its ACL log in without CHAP;
- a target keeps its bound accounts in an array, and unbinding (or deleting) any account but the
  last one bound leaves a hole that makes the next `--op show --mode target` crash tgtd.
So accounts are only ever unbound last-first, and only while the target refuses logins.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from app.backends import cmd
from app.backends.base import BackendError, Chap, ExportInfo, ExportState, VolumeRef
from app.backends.connectors import valid_initiator, validate_iscsi_connector
from app.backends.targets import tgt_socket

log = logging.getLogger(__name__)

LUN = 1
TIMEOUT = 30.0
PING_TIMEOUT = 5.0
READY = "ready"
OFFLINE = "offline"

# tgtadm exits 22 for every refusal, so its stderr is the only way to tell them apart
_TARGET_EXISTS = "this target already exists"
_NO_TARGET = "can't find the target"
_LUN_EXISTS = "this logical unit number already exists"
_NO_LUN = "can't find the logical unit"
_ACCOUNT_EXISTS = "this account already exists"  # also what binding a bound account says
_NO_ACCOUNT = "can't find the account"
_ACL_EXISTS = "this access control rule already exists"
_NO_ACL = "this access control rule does not exist"

_TARGET_LINE = re.compile(r"^Target (\d+): (\S+)\s*$")
_OUTGOING = " (outgoing)"
_CHAP_VALUE = re.compile(r"^[A-Za-z0-9._:@-]+$")


@dataclass
class TgtTargetView:
    """One target as `tgtadm --op show --mode target` prints it."""

    tid: int
    iqn: str
    state: str = READY
    luns: dict[int, str] = field(default_factory=dict)  # LUN -> backing store path
    accounts: list[str] = field(default_factory=list)  # incoming CHAP users, in tgtd's binding order
    acls: set[str] = field(default_factory=set)  # initiator names and addresses allowed in


def parse_targets(text: str) -> list[TgtTargetView]:
    """Parse `tgtadm --op show --mode target`.

    Targets start at column 0; their sections ("System information:", "LUN information:",
    "Account information:", "ACL information:", ...) are indented 4; a section's items deeper.
    """
    targets: list[TgtTargetView] = []
    current: TgtTargetView | None = None
    section = ""
    lun: int | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _TARGET_LINE.match(line)
        if match:
            current = TgtTargetView(tid=int(match[1]), iqn=match[2])
            targets.append(current)
            section, lun = "", None
            continue
        if current is None:
            continue
        indent = len(line) - len(line.lstrip(" "))
        item = line.strip()
        if indent <= 4:
            section, lun = item.rstrip(":"), None
            continue
        key, _, value = item.partition(": ")
        if section == "System information":
            if key == "State":
                current.state = value
        elif section == "LUN information":
            if key == "LUN" and value.isdigit():
                lun = int(value)
            elif key == "Backing store path" and lun is not None:
                current.luns[lun] = value
        elif section == "Account information":
            # outgoing accounts are the target's own credentials, not who may log in
            if not item.endswith(_OUTGOING):
                current.accounts.append(item)
        elif section == "ACL information":
            current.acls.add(item)
    return targets


def _named(targets: Sequence[TgtTargetView], iqn: str) -> TgtTargetView | None:
    return next((t for t in targets if t.iqn == iqn), None)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _free_tid(used: Iterable[int]) -> int:
    taken = set(used)
    return next(n for n in range(1, len(taken) + 2) if n not in taken)


class TgtTarget:
    name = "tgt"

    def __init__(self, iqn_prefix: str, portal: str, control_port: int | None = None, control: str = "socket") -> None:
        """`control`: "socket" sends tgtadm's requests on tgtd's control socket from this process, "tgtadm" runs
        the command."""
        if control not in ("socket", "tgtadm"):
            raise ValueError(f"unknown tgt control {control!r}")
        self.iqn_prefix = iqn_prefix
        self.portal = portal
        self.control_port = control_port
        self.control = control
        # tids are chosen by reading then creating; two volumes exported at once must not pick the same one
        self._create_lock = threading.Lock()
        # tgtd never shows a password, so remember (as digests) the ones this process set; an account
        # with no entry here, or a different one, is set again
        self._keys_lock = threading.Lock()
        self._keys: dict[str, str] = {}
        # the targets (iqn -> tid) as this process last saw them: only a guess of which to list first and
        # which tid to try; a wrong guess costs one refused tgtadm call, never a wrong change
        self._seen_lock = threading.Lock()
        self._seen: dict[str, int] = {}

    # -- Target protocol ---------------------------------------------------------------------------

    def iqn(self, volume: VolumeRef) -> str:
        return f"{self.iqn_prefix}{volume.name}"

    def validate_connector(self, connector: Mapping[str, Any]) -> dict[str, Any]:
        return validate_iscsi_connector(connector)

    def create_export(self, volume: VolumeRef, path: str, chap: Chap) -> ExportInfo:
        return self._export(volume, path, chap)[0]

    def add_initiator(self, volume: VolumeRef, initiator: str) -> None:
        self._check_initiator(initiator)
        self._allow(volume, self._find(self.iqn(volume)), initiator)

    def connect(self, volume: VolumeRef, path: str, chap: Chap, initiator: str) -> ExportInfo:
        """create_export then add_initiator, the second on the target as the first left it (no second read)."""
        self._check_initiator(initiator)
        info, target = self._export(volume, path, chap)
        self._allow(volume, target, initiator)
        return info

    def remove_initiator(self, volume: VolumeRef, initiator: str) -> None:
        self.disconnect(volume, [initiator], export=False)

    def remove_export(self, volume: VolumeRef) -> None:
        self.disconnect(volume, [], export=True)

    def disconnect(self, volume: VolumeRef, initiators: Sequence[str], export: bool) -> None:
        """remove_initiator for each of `initiators`, then remove_export if `export`, on one read of the targets.

        Deleting a target takes its ACLs with it, so with `export` the initiators need no unbinding of their own.
        """
        for initiator in initiators:
            self._check_initiator(initiator)
        listing = self._targets()
        target = _named(listing, self.iqn(volume))
        if target is None:
            return
        if export:
            self._delete(volume, target, listing)
            return
        for initiator in dict.fromkeys(initiators):
            if initiator in target.acls:
                self._tgtadm("unbind", "target", "-Q", initiator, tid=target.tid, ok=(_NO_ACL, _NO_TARGET))
                log.info("removed %s from %s", initiator, volume.name)

    def _export(self, volume: VolumeRef, path: str, chap: Chap) -> tuple[ExportInfo, TgtTargetView]:
        """The export, and the target as it is after it (LUN, the one account, ready; ACLs unchanged)."""
        for what, value in (("CHAP user", chap.username), ("CHAP secret", chap.secret)):
            if not _CHAP_VALUE.match(value):
                raise BackendError(f"refusing the {what} of {volume.name}: empty or not plain characters")
        if not path.startswith("/"):
            raise BackendError(f"refusing a relative backing path for {volume.name}")
        iqn = self.iqn(volume)
        # a new target has an empty ACL, which tgtd treats as "nobody", so it stays closed until the
        # CHAP account below is bound and add_initiator opens it
        target, listing = self._ensure_target(iqn)
        current = target.luns.get(LUN)
        if current != path:
            if current is not None:
                log.warning("%s: LUN %d is backed by %s, re-pointing it at %s", iqn, LUN, current, path)
                self._tgtadm("delete", "logicalunit", "--lun", str(LUN), tid=target.tid, ok=(_NO_LUN,))
            self._tgtadm("new", "logicalunit", "--lun", str(LUN), "-b", path, tid=target.tid, ok=(_LUN_EXISTS,))
        self._ensure_account(target, chap, listing)
        info = ExportInfo(
            target_iqn=iqn,
            target_portal=self.portal,
            target_lun=LUN,
            provider_location=f"{self.portal},{target.tid} {iqn} {LUN}",
        )
        return info, replace(target, state=READY, luns={**target.luns, LUN: path}, accounts=[chap.username])

    def _allow(self, volume: VolumeRef, target: TgtTargetView | None, initiator: str) -> None:
        if target is None:
            raise BackendError(f"{volume.name} is not exported")
        if initiator in target.acls:
            return
        if not target.accounts:
            # without a bound account tgtd lets anyone in the ACL log in with no CHAP at all
            raise BackendError(f"refusing to open {volume.name}: no CHAP account is bound to its target")
        self._tgtadm("bind", "target", "-Q", initiator, tid=target.tid, ok=(_ACL_EXISTS,))
        log.info("allowed %s on %s", initiator, volume.name)

    def _delete(self, volume: VolumeRef, target: TgtTargetView, listing: Sequence[TgtTargetView]) -> None:
        # the target goes first: its accounts then die unbound, and nothing is ever open without CHAP
        self._tgtadm("delete", "target", "--force", tid=target.tid, ok=(_NO_TARGET,))
        with self._seen_lock:
            self._seen.pop(target.iqn, None)
        # the listing from before the delete says which other targets use its accounts (each volume has
        # its own account, and only this volume's operations, which are serialised, change it)
        self._drop_unbound_accounts(target.accounts, target, listing)
        log.info("removed the export of %s (tid %d)", volume.name, target.tid)

    def exports(self) -> dict[str, ExportState]:
        prefix = f"{self.iqn_prefix}volume-"
        states: dict[str, ExportState] = {}
        for target in self._targets():
            if not target.iqn.startswith(prefix):
                continue
            volume_id = target.iqn[len(prefix) :]
            # address ACLs (-I) share the list with initiator names; only names are ours
            initiators = frozenset(a for a in target.acls if valid_initiator(a))
            complete = LUN in target.luns and bool(target.accounts) and target.state == READY
            states[volume_id] = ExportState(
                volume_id=volume_id, target_iqn=target.iqn, initiators=initiators, complete=complete
            )
        return states

    def ping(self) -> None:
        """Raise BackendError with a one-line reason when tgtd does not answer."""
        try:
            self._tgtadm("show", "sys", timeout=PING_TIMEOUT)
        except BackendError as exc:
            where = f" on control port {self.control_port}" if self.control_port is not None else ""
            raise BackendError(f"tgtd is not reachable{where}: {exc}") from None

    # -- tgtadm ------------------------------------------------------------------------------------

    def _tgtadm(
        self,
        op: str,
        mode: str,
        *args: str,
        tid: int | None = None,
        ok: Sequence[str] = (),
        secrets: Sequence[str] = (),
        timeout: float = TIMEOUT,
    ) -> cmd.Completed:
        """`tgtadm --op <op> --mode <mode>`, sent or run; a refusal whose message is in `ok` means "already so"."""
        argv = ["tgtadm"]
        if self.control_port is not None:
            argv += ["-C", str(self.control_port)]
        argv += ["--lld", "iscsi", "--op", op, "--mode", mode]
        if tid is not None:
            argv += ["--tid", str(tid)]
        argv += args
        try:
            if self.control == "socket":
                return tgt_socket.run(argv, timeout=timeout, secrets=secrets)
            return cmd.run(argv, timeout=timeout, secrets=secrets)
        except cmd.CommandFailed as exc:
            if any(message in exc.stderr for message in ok):
                return cmd.Completed(exc.returncode, "", exc.stderr)
            raise

    def _targets(self) -> list[TgtTargetView]:
        targets = parse_targets(self._tgtadm("show", "target").stdout)
        with self._seen_lock:
            self._seen = {t.iqn: t.tid for t in targets}
        return targets

    def _find(self, iqn: str) -> TgtTargetView | None:
        return _named(self._targets(), iqn)

    def _new_target(self, iqn: str, tid: int) -> bool:
        """Create the target; False when tgtd refuses because the tid or the name is taken."""
        if self._tgtadm("new", "target", "-T", iqn, tid=tid, ok=(_TARGET_EXISTS,)).returncode != 0:
            return False
        with self._seen_lock:
            self._seen[iqn] = tid
        log.info("created target %s (tid %d)", iqn, tid)
        return True

    def _ensure_target(self, iqn: str) -> tuple[TgtTargetView, list[TgtTargetView] | None]:
        """The volume's target, created if missing, and the listing it was found in (None: created unread)."""
        with self._create_lock:
            with self._seen_lock:
                guess = None if iqn in self._seen else _free_tid(self._seen.values())
            # tgtd refuses a taken tid and a taken name alike, so a target it accepts is new and empty
            if guess is not None and self._new_target(iqn, guess):
                return TgtTargetView(tid=guess, iqn=iqn), None
            # a refused tid means another tgtadm user took it between our read and our create
            for _ in range(5):
                targets = self._targets()
                found = _named(targets, iqn)
                if found is not None:
                    return found, targets
                tid = _free_tid(t.tid for t in targets)
                if self._new_target(iqn, tid):
                    return TgtTargetView(tid=tid, iqn=iqn), targets
        raise BackendError(f"could not find a free target id for {iqn}")

    def _ensure_account(self, target: TgtTargetView, chap: Chap, listing: list[TgtTargetView] | None) -> None:
        """Make `chap` the one account bound to the target, with its secret, and leave the target ready."""
        with self._keys_lock:
            known = self._keys.get(chap.username) == _digest(chap.secret)
        if target.accounts == [chap.username] and known:
            if target.state != READY:
                self._set_state(target.tid, READY)  # left offline by a failed call
            return
        self._rebind_account(target, chap, listing)
        with self._keys_lock:
            self._keys[chap.username] = _digest(chap.secret)

    def _rebind_account(self, target: TgtTargetView, chap: Chap, listing: list[TgtTargetView] | None) -> None:
        """`listing`: the targets as create_export just read them (the account is this volume's alone), or None
        for a target it has just made: no account, no ACL, nothing read yet."""
        user = chap.username
        if listing is not None:
            self._refuse_shared(user, target, listing)
        # while no account or the wrong one is bound, nobody may log in; an ACL-less target admits no one anyway
        close = bool(target.acls) and target.state == READY
        if close:
            self._set_state(target.tid, OFFLINE)
        # if a step below fails the target stays offline: refusing logins until a retry is the safe side
        for old in reversed(target.accounts):
            self._tgtadm("unbind", "account", "--user", old, tid=target.tid, ok=(_NO_ACCOUNT,))
        # the secret of an account that exists is unknown (tgtd never shows it and cannot change it): make it again
        if not self._new_account(chap):
            if listing is None:
                listing = self._targets()
                self._refuse_shared(user, target, listing)
            self._tgtadm("delete", "account", "--user", user, ok=(_NO_ACCOUNT,))
            if not self._new_account(chap):
                raise BackendError(f"CHAP user {user} came back while it was being made again")
        self._tgtadm("bind", "account", "--user", user, tid=target.tid, ok=(_ACCOUNT_EXISTS,))
        self._drop_unbound_accounts([a for a in target.accounts if a != user], target, listing or [])
        if close or target.state != READY:
            self._set_state(target.tid, READY)
        log.info("set CHAP account %s on tid %d", user, target.tid)

    def _new_account(self, chap: Chap) -> bool:
        """Make the account; False when it exists already."""
        made = self._tgtadm(
            "new",
            "account",
            "--user",
            chap.username,
            "--password",
            chap.secret,
            secrets=[chap.secret],
            ok=(_ACCOUNT_EXISTS,),
        )
        return made.returncode == 0

    @staticmethod
    def _refuse_shared(user: str, target: TgtTargetView, listing: Sequence[TgtTargetView]) -> None:
        shared = sorted(t.tid for t in listing if t.tid != target.tid and user in t.accounts)
        if shared:
            # deleting it would punch a hole in those targets' account arrays (see the module docstring)
            raise BackendError(f"CHAP user {user} is also bound to tid {shared}; refusing to change it")

    def _set_state(self, tid: int, state: str) -> None:
        self._tgtadm("update", "target", "--name", "state", "--value", state, tid=tid)

    def _drop_unbound_accounts(
        self, users: Sequence[str], target: TgtTargetView, listing: Sequence[TgtTargetView]
    ) -> None:
        """Delete accounts that no target of `listing` but `target` uses; one bound elsewhere is left alone."""
        if not users:
            return
        still_bound = {a for t in listing if t.tid != target.tid for a in t.accounts}
        for user in sorted(set(users) - still_bound):
            self._tgtadm("delete", "account", "--user", user, ok=(_NO_ACCOUNT,))
            with self._keys_lock:
                self._keys.pop(user, None)

    @staticmethod
    def _check_initiator(initiator: str) -> None:
        # the service validated it already; this is the last guard before a value reaches tgtadm
        if not valid_initiator(initiator):
            raise BackendError(f"refusing initiator name {str(initiator)[:64]!r}: not an iSCSI name")
