"""An in-memory stand-in for the part of rtslib-fb's object model that LioTarget uses, for hosts without configfs.

It keeps rtslib's semantics where LioTarget depends on them: objects are handles on configfs paths; constructors
take mode 'any' / 'create' / 'lookup' (or, for LUN, MappedLUN and BlockStorageObject, create when given what to
link and look up otherwise); a lookup of a missing object raises RTSLibNotInCFSError, a create of an existing one
RTSLibError; children are listed by their parents; deleting a parent deletes its children; initiator and target
names are normalised (lower case) and checked as rtslib checks them; CHAP values follow the configfs rules ('NULL'
refused, 255 bytes at most, '' unsets). Anything LioTarget does not need is absent and raises, never a silent
default: this is a recorded contract, not a mock.

One `RtslibStandIn()` is one host's kernel target: hand it to LioTarget(rtslib=...) and inspect `tree`, `calls`
and `saves`. A second LioTarget on the same stand-in is a Tether restart; configfs survives it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

MAX_LUN = 65535
_IQN = re.compile(r"iqn\.[0-9]{4}-[0-1][0-9]\..*\..*")
_NAA = re.compile(r"naa\.[125c-f][0-9a-f]{15}$")
_EUI = re.compile(r"eui\.[0-9a-f]{16}$")
TPG_ATTRIBUTES = {"authentication": "0", "generate_node_acls": "0", "demo_mode_write_protect": "1"}


class RTSLibError(Exception):
    pass


class RTSLibNotInCFSError(RTSLibError):
    pass


class RTSLibBrokenLink(RTSLibError):
    pass


@dataclass
class Node:
    """One configfs directory: its attribute files and, for LUNs and mapped LUNs, the path it links to."""

    files: dict[str, str] = field(default_factory=dict)
    link: str | None = None


def _normalise_wwn(wwn: str, types: tuple[str, ...]) -> str:
    clean = str(wwn).strip().lower()
    for kind in types:
        if kind == "iqn" and _IQN.match(clean) and " " not in clean and "_" not in clean:
            return clean
        if kind == "naa" and _NAA.match(clean):
            return clean
        if kind == "eui" and _EUI.match(clean):
            return clean
    raise RTSLibError(f"WWN not valid as: {', '.join(types)}")


def _auth_value(value: str) -> str:
    value = value.strip()
    if value == "NULL":
        raise RTSLibError("'NULL' is not a permitted value")
    if len(value) > 255:
        raise RTSLibError("Value longer than maximum length of 255")
    return value or "NULL"


def _auth_read(value: str | None) -> str | None:
    return None if value is None else ("" if value == "NULL" else value)


class _CFSNode:
    """A handle on a configfs path, like rtslib's CFSNode; attributes outside the contract cannot even be set."""

    __slots__ = ("_path",)
    _rts: RtslibStandIn

    def _record(self, what: str, *args: Any) -> None:
        self._rts.calls.append((f"{type(self).__name__}.{what}", args))

    @property
    def _fs(self) -> dict[str, Node]:
        return self._rts.tree

    @property
    def exists(self) -> bool:
        return self._path in self._fs

    def _check_self(self) -> None:
        if not self.exists:
            raise RTSLibNotInCFSError(f"This {type(self).__name__} does not exist in configFS")

    def _create_in_cfs_ine(self, mode: str, files: dict[str, str] | None = None) -> None:
        if mode not in ("any", "lookup", "create"):
            raise RTSLibError(f"Invalid mode: {mode}")
        if self.exists and mode == "create":
            raise RTSLibError(f"This {type(self).__name__} already exists in configFS")
        if not self.exists and mode == "lookup":
            raise RTSLibNotInCFSError(f"No such {type(self).__name__} in configfs: {self._path}")
        if not self.exists:
            parent = self._path.rsplit("/", 1)[0]
            if parent not in self._fs:
                raise RTSLibError(f"Could not create {type(self).__name__} in configFS: no parent {parent}")
            self._fs[self._path] = Node(files=dict(files or {}))

    def _children(self, sub: str = "") -> list[str]:
        base = f"{self._path}/{sub}".rstrip("/") + "/"
        return sorted(p[len(base) :] for p in self._fs if p.startswith(base) and "/" not in p[len(base) :])

    def _rmdir(self) -> None:
        # configfs refuses to remove a directory that still holds objects; its default groups go with it
        defaults = ("lun", "np", "acls")
        if any(self._children(sub) for sub in defaults) or set(self._children()) - set(defaults):
            raise RTSLibError(f"Cannot remove {self._path}: it is not empty")
        for sub in defaults:
            self._fs.pop(f"{self._path}/{sub}", None)
        self._fs.pop(self._path, None)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _CFSNode) and self._path == other._path

    def __hash__(self) -> int:
        return hash(self._path)


class RTSRoot(_CFSNode):
    __slots__ = ()

    def __init__(self) -> None:
        self._path = "target"
        self._record("__init__")
        # the real one mounts configfs and loads target_core_mod
        if not self._rts.configfs:
            raise RTSLibError("configfs is not mounted")
        self._fs.setdefault("target", Node())
        self._fs.setdefault("target/core", Node())

    def save_to_file(self, save_file: str | None = None, so_path: str | None = None) -> None:
        if so_path is not None:
            raise NotImplementedError("rtslib stand-in: partial saves are not part of the contract")
        self._record("save_to_file", save_file)
        if self._rts.fail_save:
            raise RuntimeError(f"Could not open {save_file or '/etc/target/saveconfig.json'}.temp")
        self._rts.saves.append((save_file, copy.deepcopy(self._fs)))


class FabricModule(_CFSNode):
    __slots__ = ()

    def __new__(cls, name: str) -> FabricModule:
        if name != "iscsi":
            raise KeyError(name)  # rtslib indexes its fabric table the same way
        return super().__new__(cls)

    def __init__(self, name: str) -> None:
        self._path = "target/iscsi"
        self._record("__init__", name)

    def _check_self(self) -> None:
        # the real fabric module creates its directory (loading iscsi_target_mod) on first use
        if "target" not in self._fs:
            raise RTSLibError("configfs is not mounted: no RTSRoot was made")
        self._fs.setdefault(self._path, Node())

    @property
    def targets(self) -> Iterator[Target]:
        self._record("targets")
        if self.exists:
            for wwn in self._children():
                yield self._rts.Target(self, wwn, "lookup")


class Target(_CFSNode):
    __slots__ = ("_fabric", "_wwn")

    def __init__(self, fabric_module: FabricModule, wwn: str | None = None, mode: str = "any") -> None:
        self._record("__init__", wwn, mode)
        if wwn is None:
            raise NotImplementedError("rtslib stand-in: generated target names are not part of the contract")
        if not isinstance(fabric_module, FabricModule):
            raise RTSLibError("Invalid fabric module")
        fabric_module._check_self()
        self._fabric = fabric_module
        self._wwn = _normalise_wwn(wwn, ("iqn", "naa", "eui"))
        self._path = f"{fabric_module._path}/{self._wwn}"
        self._create_in_cfs_ine(mode)

    @property
    def wwn(self) -> str:
        return self._wwn

    @property
    def tpgs(self) -> Iterator[TPG]:
        self._check_self()
        for child in self._children():
            if child.startswith("tpgt_"):
                yield self._rts.TPG(self, int(child.split("_")[1]), "lookup")

    def delete(self) -> None:
        self._record("delete")
        self._check_self()
        for tpg in list(self.tpgs):
            tpg._delete()
        self._rmdir()


class TPG(_CFSNode):
    __slots__ = ("_tag", "_target")

    def __init__(self, parent_target: Target, tag: int | None = None, mode: str = "any") -> None:
        self._record("__init__", tag, mode)
        if tag is None:
            raise NotImplementedError("rtslib stand-in: generated TPG tags are not part of the contract")
        if not isinstance(parent_target, Target):
            raise RTSLibError("Invalid parent Target")
        if int(tag) < 0:
            raise RTSLibError("The TPG Tag must be >=0")
        self._target = parent_target
        self._tag = int(tag)
        self._path = f"{parent_target._path}/tpgt_{self._tag}"
        files = {f"attrib/{k}": v for k, v in TPG_ATTRIBUTES.items()} | {"enable": "0"}
        if self._rts.tpg_auth:
            files |= {"auth/userid": "NULL", "auth/password": "NULL"}
        self._create_in_cfs_ine(mode, files)
        for sub in ("lun", "np", "acls"):
            self._fs.setdefault(f"{self._path}/{sub}", Node())

    @property
    def _files(self) -> dict[str, str]:
        self._check_self()
        return self._fs[self._path].files

    @property
    def tag(self) -> int:
        return self._tag

    def get_attribute(self, attribute: str) -> str:
        self._record("get_attribute", attribute)
        try:
            return self._files[f"attrib/{attribute}"]
        except KeyError:
            raise RTSLibError(f"Cannot find attribute: {attribute}") from None

    def set_attribute(self, attribute: str, value: str) -> None:
        self._record("set_attribute", attribute, value)
        if f"attrib/{attribute}" not in self._files:
            raise RTSLibError(f"Cannot find attribute: {attribute}")
        self._files[f"attrib/{attribute}"] = str(value)

    @property
    def enable(self) -> bool:
        return self._files["enable"] == "1"

    @enable.setter
    def enable(self, value: bool) -> None:
        self._record("enable", value)
        self._files["enable"] = "1" if value else "0"

    # rtslib reads and writes tpgt_N/auth with errors ignored: None when the kernel has no such files
    @property
    def chap_userid(self) -> str | None:
        return _auth_read(self._files.get("auth/userid"))

    @chap_userid.setter
    def chap_userid(self, value: str) -> None:
        self._record("chap_userid")
        if "auth/userid" in self._files:
            self._files["auth/userid"] = _auth_value(value)

    @property
    def chap_password(self) -> str | None:
        return _auth_read(self._files.get("auth/password"))

    @chap_password.setter
    def chap_password(self, value: str) -> None:
        self._record("chap_password")  # never the value: tests print calls
        if "auth/password" in self._files:
            self._files["auth/password"] = _auth_value(value)

    @property
    def node_acls(self) -> Iterator[NodeACL]:
        self._record("node_acls")
        self._check_self()
        for wwn in self._children("acls"):
            yield self._rts.NodeACL(self, wwn, "lookup")

    def _luns(self) -> list[LUN]:
        return [self._rts.LUN(self, int(name.split("_")[1])) for name in self._children("lun")]

    def _delete(self) -> None:
        # as rtslib: disable, then ACLs, LUNs and portals, then the TPG itself
        self._files["enable"] = "0"
        for acl in list(self.node_acls):
            acl.delete()
        for lun in self._luns():
            lun.delete()
        for portal in self._children("np"):
            self._fs.pop(f"{self._path}/np/{portal}", None)
        self._rmdir()


class NetworkPortal(_CFSNode):
    __slots__ = ()

    def __init__(self, parent_tpg: TPG, ip_address: str, port: int = 3260, mode: str = "any") -> None:
        self._record("__init__", ip_address, port, mode)
        if not isinstance(parent_tpg, TPG):
            raise RTSLibError("Invalid parent TPG")
        self._path = f"{parent_tpg._path}/np/{ip_address}:{int(port)}"
        self._create_in_cfs_ine(mode)


class BlockStorageObject(_CFSNode):
    __slots__ = ("_name",)

    def __init__(
        self,
        name: str,
        dev: str | None = None,
        wwn: str | None = None,
        readonly: bool = False,
        write_back: bool = False,
        index: int | None = None,
        exclusive: bool = True,
    ) -> None:
        self._record("__init__", name, dev)
        if wwn is not None or readonly or write_back or index is not None or not exclusive:
            raise NotImplementedError("rtslib stand-in: only name and dev are part of the contract")
        if any(c in name for c in "/ \t\n"):
            raise RTSLibError("A storage object's name cannot contain  /, newline or spaces/tabs")
        self._name = name
        self._path = f"target/core/block/{name}"
        if dev is None:
            if not self.exists:
                raise RTSLibNotInCFSError(f"Storage object block/{name} not found")
            return
        if self.exists:
            raise RTSLibError(f"Storage object block/{name} exists")
        if not dev.startswith("/"):
            raise RTSLibError(f"Device {dev} is not a TYPE_DISK block device")
        if any(n.files.get("udev_path") == dev for p, n in self._fs.items() if p.startswith("target/core/block/")):
            raise RTSLibError(f"Cannot configure StorageObject because device {dev} is already in use")
        self._fs.setdefault("target/core/block", Node())
        self._fs[self._path] = Node(files={"udev_path": dev})

    @property
    def name(self) -> str:
        return self._name

    @property
    def plugin(self) -> str:
        return "block"

    @property
    def udev_path(self) -> str:
        self._check_self()
        return self._fs[self._path].files["udev_path"]

    def delete(self, save: bool = False) -> None:
        self._record("delete")
        if save:
            raise NotImplementedError("rtslib stand-in: delete(save=True) is not part of the contract")
        self._check_self()
        # as rtslib: every LUN using this object goes first, with the mapped LUNs that point at it
        for path in [p for p, n in self._fs.items() if n.link == self._path]:
            tpg_path, _, lun_name = path.rpartition("/lun/")
            tpg = _tpg_at(self._rts, tpg_path)
            self._rts.LUN(tpg, int(lun_name.split("_")[1])).delete()
        self._fs.pop(self._path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockStorageObject) and self._name == other._name

    def __hash__(self) -> int:
        return hash(self._name)


class LUN(_CFSNode):
    __slots__ = ("_lun", "_tpg")

    def __init__(
        self,
        parent_tpg: TPG,
        lun: int | None = None,
        storage_object: BlockStorageObject | None = None,
        alias: Any = None,
    ) -> None:
        self._record("__init__", lun, storage_object.name if storage_object is not None else None)
        if lun is None or alias is not None:
            raise NotImplementedError("rtslib stand-in: pick LUN numbers yourself, no aliases")
        if not isinstance(parent_tpg, TPG):
            raise RTSLibError("Invalid parent TPG")
        if not 0 <= int(lun) <= MAX_LUN:
            raise RTSLibError(f"LUN must be 0 to {MAX_LUN}")
        self._tpg = parent_tpg
        self._lun = int(lun)
        self._path = f"{parent_tpg._path}/lun/lun_{self._lun}"
        if storage_object is None:
            self._create_in_cfs_ine("lookup")
            return
        if not storage_object.exists:
            raise RTSLibError("storage_object does not exist in configFS")
        self._create_in_cfs_ine("create")
        self._fs[self._path].link = storage_object._path

    @property
    def lun(self) -> int:
        return self._lun

    @property
    def storage_object(self) -> BlockStorageObject:
        self._check_self()
        link = self._fs[self._path].link
        if link is None or link not in self._fs:
            raise RTSLibBrokenLink("Broken LUN in configFS, no storage object")
        return self._rts.BlockStorageObject(link.rsplit("/", 1)[1])

    def delete(self) -> None:
        self._record("delete")
        self._check_self()
        for path in [p for p, n in self._fs.items() if n.link == self._path]:
            self._fs.pop(path)  # the mapped LUNs of every ACL that pointed here
        self._fs.pop(self._path)


class NodeACL(_CFSNode):
    __slots__ = ("_tpg", "_wwn")

    def __init__(self, parent_tpg: TPG, node_wwn: str, mode: str = "any") -> None:
        self._record("__init__", node_wwn, mode)
        if not isinstance(parent_tpg, TPG):
            raise RTSLibError("Invalid parent TPG")
        self._tpg = parent_tpg
        self._wwn = _normalise_wwn(node_wwn, ("iqn", "naa", "eui"))
        self._path = f"{parent_tpg._path}/acls/{self._wwn}"
        self._create_in_cfs_ine(mode, {"auth/userid": "NULL", "auth/password": "NULL"})

    @property
    def node_wwn(self) -> str:
        return self._wwn

    @property
    def _files(self) -> dict[str, str]:
        self._check_self()
        return self._fs[self._path].files

    @property
    def chap_userid(self) -> str:
        return _auth_read(self._files["auth/userid"]) or ""

    @chap_userid.setter
    def chap_userid(self, value: str) -> None:
        self._record("chap_userid")
        self._files["auth/userid"] = _auth_value(value)

    @property
    def chap_password(self) -> str:
        return _auth_read(self._files["auth/password"]) or ""

    @chap_password.setter
    def chap_password(self, value: str) -> None:
        self._record("chap_password")
        self._files["auth/password"] = _auth_value(value)

    def delete(self) -> None:
        self._record("delete")
        self._check_self()
        for name in self._children():
            self._fs.pop(f"{self._path}/{name}")
        self._fs.pop(self._path)


class MappedLUN(_CFSNode):
    __slots__ = ()

    def __init__(
        self,
        parent_nodeacl: NodeACL,
        mapped_lun: int,
        tpg_lun: LUN | int | None = None,
        write_protect: bool | None = None,
        alias: Any = None,
    ) -> None:
        self._record("__init__", mapped_lun, tpg_lun.lun if isinstance(tpg_lun, LUN) else tpg_lun)
        if write_protect is not None or alias is not None:
            raise NotImplementedError("rtslib stand-in: write_protect and alias are not part of the contract")
        if not isinstance(parent_nodeacl, NodeACL):
            raise RTSLibError("The parent_nodeacl parameter must be a NodeACL object")
        if not parent_nodeacl.exists:
            raise RTSLibError("The parent_nodeacl does not exist")
        if int(mapped_lun) < 0:
            raise RTSLibError("Mapped LUN must be >= 0")
        self._path = f"{parent_nodeacl._path}/lun_{int(mapped_lun)}"
        if tpg_lun is None:
            self._create_in_cfs_ine("lookup")
            return
        number = tpg_lun.lun if isinstance(tpg_lun, LUN) else int(tpg_lun)
        target = f"{parent_nodeacl._tpg._path}/lun/lun_{number}"
        if target not in self._fs:
            raise RTSLibError(f"LUN {number} does not exist in this TPG")
        self._create_in_cfs_ine("create")
        self._fs[self._path].link = target


def _tpg_at(rts: RtslibStandIn, tpg_path: str) -> TPG:
    target_path, _, tpg_name = tpg_path.rpartition("/")
    target = rts.Target(rts.FabricModule("iscsi"), target_path.rsplit("/", 1)[1], "lookup")
    return rts.TPG(target, int(tpg_name.split("_")[1]), "lookup")


_CLASSES = (RTSRoot, FabricModule, Target, TPG, NetworkPortal, BlockStorageObject, LUN, NodeACL, MappedLUN)


class RtslibStandIn:
    """The module-like object: `rts.Target(...)`, `rts.RTSLibError`, ... bound to this instance's configfs."""

    RTSLibError = RTSLibError
    RTSLibNotInCFSError = RTSLibNotInCFSError
    RTSLibBrokenLink = RTSLibBrokenLink

    def __init__(self, *, configfs: bool = True, tpg_auth: bool = True) -> None:
        self.configfs = configfs
        # kernels before TPG-level auth files: rtslib then answers None for tpg.chap_userid
        self.tpg_auth = tpg_auth
        self.fail_save = False
        self.tree: dict[str, Node] = {}
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.saves: list[tuple[str | None, dict[str, Node]]] = []
        for cls in _CLASSES:
            # a subclass per stand-in, so two stand-ins are two hosts that share nothing
            setattr(self, cls.__name__, type(cls.__name__, (cls,), {"__slots__": (), "_rts": self}))

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"rtslib stand-in: {name} is not part of the contract LioTarget may use")

    # -- for assertions ----------------------------------------------------------------------------

    def names(self, prefix: str = "target") -> list[str]:
        return sorted(p for p in self.tree if p.startswith(prefix))

    def called(self, what: str) -> int:
        return sum(1 for name, _ in self.calls if name == what)

    def file(self, path: str, name: str) -> str:
        return self.tree[path].files[name]

    def link(self, path: str) -> str | None:
        return self.tree[path].link
