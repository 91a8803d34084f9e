"""Connector validation shared by every iSCSI target: nothing unchecked reaches a backend."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from app.backends.base import InvalidConnector

MAX_INITIATOR_BYTES = 223
# each key becomes an attachment_specs row, whose key column holds 255 characters
MAX_KEY_LENGTH = 255

# iqn.YYYY-MM.reversed.domain[:anything printable without spaces or shell metacharacters]
_IQN = re.compile(
    r"^iqn\.\d{4}-(0[1-9]|1[0-2])\.[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(:[A-Za-z0-9._:\-]+)?$"
)
_EUI = re.compile(r"^eui\.[0-9A-Fa-f]{16}$")
_NAA = re.compile(r"^naa\.([0-9A-Fa-f]{16}|[0-9A-Fa-f]{32})$")
_HOSTNAME_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def valid_initiator(value: object) -> bool:
    if not isinstance(value, str) or len(value.encode()) > MAX_INITIATOR_BYTES:
        return False
    # iSCSI names are case-insensitive in their iqn prefix; domains are lower-case by RFC 3720
    lowered = value[:4].lower() + value[4:]
    return bool(_IQN.fullmatch(lowered) or _EUI.fullmatch(value) or _NAA.fullmatch(value))


def valid_hostname(value: object) -> bool:
    if not isinstance(value, str) or not value or len(value) > 253:
        return False
    return all(_HOSTNAME_LABEL.fullmatch(label) for label in value.rstrip(".").split("."))


def validate_iscsi_connector(connector: Mapping[str, Any]) -> dict[str, Any]:
    """Check the keys a target acts on; keep every other key as given."""
    if not isinstance(connector, Mapping):
        raise InvalidConnector("connector", "must be an object")
    for key in connector:
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
            raise InvalidConnector("keys", f"must be 1 to {MAX_KEY_LENGTH} printable characters")
    initiator = connector.get("initiator")
    if initiator is None:
        raise InvalidConnector("initiator", "is required for iSCSI")
    if not valid_initiator(initiator):
        raise InvalidConnector("initiator", "must be an iqn., eui. or naa. iSCSI name")
    host = connector.get("host")
    if host is not None and not valid_hostname(host):
        raise InvalidConnector("host", "must be a host name")
    ip = connector.get("ip")
    if ip is not None:
        if not isinstance(ip, str):
            raise InvalidConnector("ip", "must be an IP address")
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise InvalidConnector("ip", "must be an IP address") from None
    return dict(connector)


def wants_multipath(connector: Mapping[str, Any]) -> bool:
    """cinderclient's CLI sends the flag as a string; os-brick as a boolean."""
    value = connector.get("multipath", False)
    return value is True or (isinstance(value, str) and value.lower() in ("true", "1", "yes"))
