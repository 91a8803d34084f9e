"""iSCSI target on LIO (the Linux kernel target) through rtslib-fb in process: per volume a block backstore, a target
with TPG 1 (CHAP required, one portal, LUN 0) and one NodeACL per connected initiator carrying the volume's CHAP.

configfs is the only source of truth: every call looks its objects up by name and changes only what differs, so each
operation is idempotent and safe to repeat after a crash or a restart. Changes are saved to LIO's config file so
they survive a reboot.

Where the CHAP lives: LIO checks CHAP per NodeACL, but add_initiator is not given the secret. create_export
therefore also writes it to the TPG's own auth attributes (tpgt_1/auth), which rtslib reads back and saves with
the config, so it survives a Tether or host restart. The kernel uses TPG-level credentials only for ACLs it
generates itself (generate_node_acls=1); this target pins generate_node_acls=0, so they admit nobody. On a kernel
without TPG auth attributes, add_initiator falls back to the CHAP this process last exported the volume with, then
to the credentials of any NodeACL of the same TPG.

All rtslib access goes through one module-like object (the real `rtslib_fb`, or a stand-in in tests).
"""

from __future__ import annotations

import contextlib
import importlib
import ipaddress
import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from app.backends.base import BackendError, Chap, ExportInfo, ExportState, InvalidConnector, VolumeRef
from app.backends.connectors import valid_initiator, validate_iscsi_connector

log = logging.getLogger(__name__)

LUN = 0
TPG_TAG = 1
DEFAULT_PORT = 3260
MAX_AUTH_LENGTH = 255  # configfs auth attributes take at most this many bytes

_CHAP_VALUE = re.compile(r"^[A-Za-z0-9._:@-]+$")
# rtslib's own rules for initiator names (it lower-cases them first): an iqn with a second dot after its date
# and no underscore, an eui. of 16 hex digits, an naa. of 16 hex digits whose first one is 1, 2, 5 or c-f
_LIO_IQN = re.compile(r"^iqn\.\d{4}-[01]\d\.[^_\s]*\.[^_\s]*$")
_LIO_EUI = re.compile(r"^eui\.[0-9a-f]{16}$")
_LIO_NAA = re.compile(r"^naa\.[125c-f][0-9a-f]{15}$")


def lio_initiator(name: object) -> str | None:
    """The initiator name as LIO stores it (lower case), or None when LIO would refuse it."""
    if not valid_initiator(name):
        return None
    lowered = str(name).lower()
    if _LIO_IQN.match(lowered) or _LIO_EUI.match(lowered) or _LIO_NAA.match(lowered):
        return lowered
    return None


def parse_portal(portal: str) -> tuple[str, int]:
    """`ip:port`, `[v6]:port` or a bare address -> (address as rtslib wants it, with brackets for IPv6; port)."""
    host, port = portal, ""
    if portal.startswith("["):
        end = portal.find("]")
        if end < 0:
            raise ValueError(f"invalid portal {portal!r}")
        host, rest = portal[1:end], portal[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"invalid portal {portal!r}")
            port = rest[1:]
    elif portal.count(":") == 1:
        host, port = portal.split(":")
    try:
        address = ipaddress.ip_address(host)
        number = int(port) if port else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"invalid portal {portal!r}: expected ip:port") from None
    if not 0 < number < 65536:
        raise ValueError(f"invalid portal {portal!r}: port out of range")
    return (f"[{address}]" if address.version == 6 else str(address)), number


def validate_lio_connector(connector: Mapping[str, Any]) -> dict[str, Any]:
    """The iSCSI check, and an initiator name LIO accepts, spelt as LIO lists it (so exports() and the
    database agree when reconciling)."""
    checked = validate_iscsi_connector(connector)
    initiator = lio_initiator(checked["initiator"])
    if initiator is None:
        raise InvalidConnector("initiator", "is not an iSCSI name LIO accepts (an iqn. needs a dotted name, no _)")
    checked["initiator"] = initiator
    return checked


class LioTarget:
    name = "lio"

    def __init__(
        self,
        iqn_prefix: str,
        portal: str,
        *,
        rtslib: Any = None,
        save: bool = True,
        save_file: str | None = None,
    ) -> None:
        self.iqn_prefix = iqn_prefix
        self.portal = portal
        self.ip, self.port = parse_portal(portal)
        self.save = save
        self.save_file = save_file  # None: rtslib's default, /etc/target/saveconfig.json
        self._module = rtslib
        self._root_ready = False
        # the CHAP of each volume exported by this process, for kernels without TPG auth attributes
        # (configfs stays the first source: it survives a restart, this does not)
        self._chaps: dict[str, Chap] = {}
        # rtslib keeps module-global caches (the backstore index cache) and saves through one fixed temporary
        # file name, so it is not safe from several threads; LIO calls take milliseconds, so one at a time
        self._lock = threading.RLock()

    # -- Target protocol ---------------------------------------------------------------------------

    def iqn(self, volume: VolumeRef) -> str:
        # LIO keeps target names in lower case; say what it will really serve
        return f"{self.iqn_prefix}{volume.name}".lower()

    def validate_connector(self, connector: Mapping[str, Any]) -> dict[str, Any]:
        return validate_lio_connector(connector)

    def create_export(self, volume: VolumeRef, path: str, chap: Chap) -> ExportInfo:
        for what, value in (("CHAP user", chap.username), ("CHAP secret", chap.secret)):
            if not _CHAP_VALUE.match(value) or len(value) > MAX_AUTH_LENGTH or value == "NULL":
                raise BackendError(f"refusing the {what} of {volume.name}: empty, too long or not plain characters")
        if not path.startswith("/"):
            raise BackendError(f"refusing a relative backing path for {volume.name}")
        iqn = self.iqn(volume)
        with self._rtslib(f"exporting {volume.name}") as rts:
            changed = False
            store = self._maybe(lambda: rts.BlockStorageObject(volume.name))
            if store is not None and store.udev_path != path:
                log.warning("%s: backstore points at %s, re-pointing it at %s", iqn, store.udev_path, path)
                store.delete()  # takes its LUNs and their mapped LUNs along; all are made again below
                store = None
            if store is None:
                store = rts.BlockStorageObject(volume.name, dev=path)
                changed = True
            target, created = self._ensure(
                lambda: rts.Target(self._fabric(), iqn, mode="lookup"),
                lambda: rts.Target(self._fabric(), iqn, mode="create"),
            )
            changed |= created
            tpg, created = self._ensure(
                lambda: rts.TPG(target, TPG_TAG, mode="lookup"), lambda: rts.TPG(target, TPG_TAG, mode="create")
            )
            changed |= created
            # a new TPG is disabled; CHAP is required and ACL-only before it gets a LUN, a portal or is enabled
            changed |= _set_attribute(tpg, "authentication", "1")
            changed |= _set_attribute(tpg, "generate_node_acls", "0")
            changed |= _record_chap(tpg, chap)
            self._chaps[volume.id] = chap
            lun = self._maybe(lambda: rts.LUN(tpg, LUN))
            if lun is not None and not self._backed_by(lun, volume.name):
                lun.delete()
                lun = None
            if lun is None:
                lun = rts.LUN(tpg, LUN, storage_object=store)
                changed = True
            _, created = self._ensure(
                lambda: rts.NetworkPortal(tpg, self.ip, self.port, mode="lookup"),
                lambda: rts.NetworkPortal(tpg, self.ip, self.port, mode="create"),
            )
            changed |= created
            # a re-export may carry a new secret: initiators already allowed in must need that one
            for acl in tpg.node_acls:
                changed |= self._grant(acl, lun, chap)
            if not tpg.enable:
                tpg.enable = True
                changed = True
            if changed:
                self._save()
                log.info("exported %s as %s", volume.name, iqn)
        return ExportInfo(
            target_iqn=iqn,
            target_portal=self.portal,
            target_lun=LUN,
            provider_location=f"{self.portal},{TPG_TAG} {iqn} {LUN}",
        )

    def add_initiator(self, volume: VolumeRef, initiator: str) -> None:
        name = self._check_initiator(initiator)
        with self._rtslib(f"allowing {name} on {volume.name}") as rts:
            tpg = self._tpg(volume)
            lun = self._maybe(lambda: rts.LUN(tpg, LUN)) if tpg is not None else None
            if tpg is None or lun is None:
                raise BackendError(f"{volume.name} is not exported")
            chap = _tpg_chap(tpg) or self._chaps.get(volume.id) or _acl_chap(tpg)
            if chap is None:
                # without credentials the ACL would be useless; never create one that skips CHAP
                raise BackendError(f"no CHAP is recorded on the target of {volume.name}; export it again")
            acl, created = self._ensure(
                lambda: rts.NodeACL(tpg, name, mode="lookup"), lambda: rts.NodeACL(tpg, name, mode="create")
            )
            # CHAP is set before the LUN is mapped, so a crash in between leaves an ACL that shows nothing
            if self._grant(acl, lun, chap) or created:
                self._save()
                log.info("allowed %s on %s", name, volume.name)

    def remove_initiator(self, volume: VolumeRef, initiator: str) -> None:
        name = self._check_initiator(initiator)
        with self._rtslib(f"removing {name} from {volume.name}") as rts:
            tpg = self._tpg(volume)
            acl = self._maybe(lambda: rts.NodeACL(tpg, name, mode="lookup")) if tpg is not None else None
            if acl is None:
                return
            acl.delete()  # with its mapped LUN; the kernel drops any session it has
            self._save()
            log.info("removed %s from %s", name, volume.name)

    def remove_export(self, volume: VolumeRef) -> None:
        iqn = self.iqn(volume)
        with self._rtslib(f"removing the export of {volume.name}") as rts:
            changed = False
            # the target goes first, so no initiator can reach the LUN while its backstore is taken away
            target = self._maybe(lambda: rts.Target(self._fabric(), iqn, mode="lookup"))
            if target is not None:
                target.delete()
                changed = True
            # looked up even without a target: a crash between the two deletes leaves the LV held open
            store = self._maybe(lambda: rts.BlockStorageObject(volume.name))
            if store is not None:
                store.delete()
                changed = True
            self._chaps.pop(volume.id, None)
            if changed:
                self._save()
                log.info("removed the export of %s", volume.name)

    def exports(self) -> dict[str, ExportState]:
        prefix = f"{self.iqn_prefix}volume-".lower()
        states: dict[str, ExportState] = {}
        with self._rtslib("listing exports"):
            for target in self._fabric().targets:
                iqn = target.wwn
                if not iqn.startswith(prefix):
                    continue
                volume_id = iqn[len(prefix) :]
                initiators = frozenset(acl.node_wwn for tpg in target.tpgs for acl in tpg.node_acls)
                states[volume_id] = ExportState(volume_id=volume_id, target_iqn=iqn, initiators=initiators)
        return states

    # -- rtslib ------------------------------------------------------------------------------------

    @property
    def _rts(self) -> Any:
        if self._module is None:
            try:
                self._module = importlib.import_module("rtslib_fb")
            except ImportError:
                raise BackendError("the lio target needs the rtslib-fb package") from None
        return self._module

    @contextlib.contextmanager
    def _rtslib(self, doing: str) -> Iterator[Any]:
        """Hold the rtslib lock and turn what rtslib raises into a BackendError naming the operation."""
        with self._lock:
            rts = self._rts
            try:
                yield rts
            except BackendError:
                raise
            # RuntimeError: save_to_file's way of saying it could not write
            except (rts.RTSLibError, OSError, RuntimeError) as exc:
                raise BackendError(f"LIO failed {doing}: {exc}") from None

    def _fabric(self) -> Any:
        if not self._root_ready:
            # the first RTSRoot mounts configfs and loads target_core_mod if they are not there yet
            self._rts.RTSRoot()
            self._root_ready = True
        return self._rts.FabricModule("iscsi")

    def _maybe(self, lookup: Callable[[], Any]) -> Any | None:
        """The object `lookup` finds, or None when it is not in configfs."""
        try:
            return lookup()
        except self._rts.RTSLibNotInCFSError:
            return None

    def _ensure(self, lookup: Callable[[], Any], create: Callable[[], Any]) -> tuple[Any, bool]:
        """The object, and whether it had to be created (so unchanged repeats need no save)."""
        found = self._maybe(lookup)
        return (found, False) if found is not None else (create(), True)

    def _tpg(self, volume: VolumeRef) -> Any | None:
        rts = self._rts
        target = self._maybe(lambda: rts.Target(self._fabric(), self.iqn(volume), mode="lookup"))
        if target is None:
            return None
        return self._maybe(lambda: rts.TPG(target, TPG_TAG, mode="lookup"))

    def _grant(self, acl: Any, lun: Any, chap: Chap) -> bool:
        """Give `acl` the volume's CHAP and then LUN 0; say whether anything changed."""
        changed = _set_chap(acl, chap)
        if self._maybe(lambda: self._rts.MappedLUN(acl, LUN)) is None:
            self._rts.MappedLUN(acl, LUN, lun)
            changed = True
        return changed

    def _backed_by(self, lun: Any, name: str) -> bool:
        try:
            store = lun.storage_object
        except (self._rts.RTSLibError, KeyError, OSError):
            return False  # a LUN whose backstore link is broken is replaced like a wrong one
        return bool(store.plugin == "block" and store.name == name)

    def _save(self) -> None:
        if self.save:
            self._rts.RTSRoot().save_to_file(save_file=self.save_file)

    @staticmethod
    def _check_initiator(initiator: str) -> str:
        # the service validated it already; this is the last guard before a value reaches configfs
        name = lio_initiator(initiator)
        if name is None:
            raise BackendError(f"refusing initiator name {str(initiator)[:64]!r}: not an iSCSI name LIO accepts")
        return name


def _set_attribute(tpg: Any, attribute: str, value: str) -> bool:
    if tpg.get_attribute(attribute) == value:
        return False
    tpg.set_attribute(attribute, value)
    return True


def _record_chap(tpg: Any, chap: Chap) -> bool:
    """Keep the volume's CHAP on the TPG for add_initiator; False also when the kernel has no TPG auth."""
    if tpg.chap_userid is None:
        return False  # rtslib's answer when tpgt_1/auth is missing: the NodeACLs are the only record
    return _set_chap(tpg, chap)


def _set_chap(node: Any, chap: Chap) -> bool:
    """Give an rtslib NodeACL or TPG the volume's CHAP user and secret; say whether anything changed."""
    changed = False
    if node.chap_userid != chap.username:
        node.chap_userid = chap.username
        changed = True
    if node.chap_password != chap.secret:
        node.chap_password = chap.secret
        changed = True
    return changed


def _tpg_chap(tpg: Any) -> Chap | None:
    user, secret = tpg.chap_userid, tpg.chap_password
    return Chap(username=user, secret=secret) if user and secret else None


def _acl_chap(tpg: Any) -> Chap | None:
    # create_export gives every ACL of the TPG the same credentials, so any one of them will do
    for acl in tpg.node_acls:
        if acl.chap_userid and acl.chap_password:
            return Chap(username=acl.chap_userid, secret=acl.chap_password)
    return None
