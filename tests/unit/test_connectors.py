"""Connector validation: what may reach a target, and what is refused before any state change."""

import pytest

from app.backends.base import InvalidConnector
from app.backends.connectors import validate_iscsi_connector, wants_multipath

GOOD = "iqn.1993-08.org.debian:01:abcdef123"


@pytest.mark.parametrize(
    "initiator",
    [
        GOOD,
        "iqn.2004-10.com.ubuntu:01:7f3a",
        "iqn.2010-10.org.openstack",
        "eui.02004567A425678D",
        "naa.52004567BA64678D",
    ],
)
def test_valid_initiators(initiator: str) -> None:
    assert validate_iscsi_connector({"initiator": initiator})["initiator"] == initiator


@pytest.mark.parametrize(
    "initiator",
    [
        "",
        "iqn",
        "iqn.1993-13.org.debian:01:x",
        "iqn.1993-08.org.debian:01:abc; rm -rf /",
        "iqn.1993-08.org.debian:01:a b",
        "iqn.1993-08.org.debian:01:$(reboot)",
        "iqn.1993-08.org.debian:01:x\n",
        "iqn.1993-08.org.debian:" + "a" * 300,
        "eui.123",
        42,
        None,
    ],
)
def test_invalid_initiators(initiator: object) -> None:
    with pytest.raises(InvalidConnector) as caught:
        validate_iscsi_connector({"initiator": initiator, "host": "h1"})
    assert caught.value.key == "initiator"


@pytest.mark.parametrize(("key", "value"), [("host", "bad host"), ("host", "h;1"), ("ip", "300.1.1.1"), ("ip", 7)])
def test_invalid_other_keys(key: str, value: object) -> None:
    with pytest.raises(InvalidConnector) as caught:
        validate_iscsi_connector({"initiator": GOOD, key: value})
    assert caught.value.key == key


def test_other_keys_are_kept_as_given() -> None:
    connector = {"initiator": GOOD, "ip": "::1", "host": "compute-1.example.org", "platform": "x86_64", "x": [1]}
    assert validate_iscsi_connector(connector) == connector


@pytest.mark.parametrize(("value", "expected"), [(True, True), ("True", True), ("false", False), (False, False)])
def test_multipath_flag(value: object, expected: bool) -> None:
    assert wants_multipath({"multipath": value}) is expected


def test_a_remote_api_tier_checks_connectors_as_its_nodes_targets_would() -> None:
    """An API tier without a target of its own: LIO's rule as soon as one node is LIO (its names are stricter)."""
    from app.backends.factory import connector_validator

    connector = {"initiator": "iqn.2004-10.com.example:host_1"}  # an underscore: tgt takes it, LIO does not
    targets = {"tgt"}
    check = connector_validator(lambda: targets)
    assert check(connector)["initiator"] == "iqn.2004-10.com.example:host_1"
    targets.add("lio")
    with pytest.raises(InvalidConnector) as refused:
        check(connector)
    assert refused.value.key == "initiator"
