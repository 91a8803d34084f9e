"""Ironic's own cinder helpers, `ironic.common.cinder` from the ironic package, unmodified, against a live server.

The driver (tests/clients/drivers/ironic_api.py) runs Ironic in .venvs/ironic with its `[cinder]` options
(admin_token auth, endpoint_override) and calls attach_volumes / detach_volumes, Ironic's legacy-action path
for booting a bare-metal node from volumes: reserve, initialize_connection with the node's connector, attach,
label the volume with metadata; begin_detaching, terminate_connection, detach, label again.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.clients.conftest import Driver, DriverError, Tether, assert_logs_in, assert_refused
from tests.conftest import Server

IQN_PREFIX = "iqn.2010-10.org.openstack:volume-"
NODE_IQN = "iqn.2017-01.org.example.baremetal:node-7"
NODE_IP = "192.0.2.77"


class Ironic:
    """`ironic.common.cinder` in the driver process."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.warnings: list[str] = []

    def call(self, call: str, **fields: Any) -> Any:
        answer = self.driver.request({"call": call, **fields})
        self.warnings = answer["warnings"]
        if "error" in answer:
            raise DriverError(answer["error"])
        return answer["result"]


@pytest.fixture
def start_ironic(live_server: Server, tmp_path: Path) -> Iterator[Callable[[str], Ironic]]:
    """Ironic with this service token in `[cinder]` (admin_token): sent alone when the conductor acts on its own
    behalf, and as X-Service-Token beside the user's token otherwise."""
    drivers: list[Driver] = []

    def start(service_token: str) -> Ironic:
        log = tmp_path / f"ironic-{len(drivers)}.log"
        drivers.append(Driver("ironic", "ironic_api.py", [live_server.base, service_token], log))
        return Ironic(drivers[-1])

    yield start
    for driver in drivers:
        driver.close()


@pytest.fixture
def ironic(start_ironic: Callable[[str], Ironic], project: str) -> Ironic:
    return start_ironic(f"ironic:{project}")


@pytest.fixture
def tgt_ironic(tgt_server: Server, project: str, tmp_path: Path) -> Iterator[Ironic]:
    driver = Driver("ironic", "ironic_api.py", [tgt_server.base, f"ironic:{project}"], tmp_path / "ironic.log")
    yield Ironic(driver)
    driver.close()


def new_node(*, with_instance: bool = True) -> dict[str, Any]:
    return {
        "uuid": str(uuid.uuid4()),
        "instance_uuid": str(uuid.uuid4()) if with_instance else None,
        "provision_state": "deploying",
    }


def node_connector(ironic: Ironic, node: dict[str, Any]) -> dict[str, Any]:
    """The connector Ironic's cinder storage interface builds from the node's volume connectors."""
    connectors = [{"type": "iqn", "connector_id": NODE_IQN}, {"type": "ip", "connector_id": NODE_IP}]
    return ironic.call("connector", node=node, volume_connectors=connectors)  # type: ignore[no-any-return]


def label(volume: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Ironic's metadata on the volume for this node, decoded."""
    raw = volume["metadata"].get(f"ironic_node_{node['uuid']}")
    assert raw is not None, f"no ironic_node_ label in {volume['metadata']}"
    return json.loads(raw)  # type: ignore[no-any-return]


def test_connector_from_the_nodes_volume_connectors(ironic: Ironic) -> None:
    assert ironic.driver.version == "39.0.0"
    node = new_node()
    assert node_connector(ironic, node) == {
        "initiator": NODE_IQN,
        "ip": NODE_IP,
        "host": node["uuid"],
        "multipath": True,  # two volume connectors
    }


@pytest.mark.parametrize("as_user", [True, False], ids=["user-token-and-service-token", "conductor-service-token"])
def test_attach_and_detach_two_volumes(
    start_ironic: Callable[[str], Ironic], tether: Tether, project: str, as_user: bool
) -> None:
    """Deploy (attach) and tear down (detach) a node booting from two volumes. With the user's token, Ironic
    sends it beside its own service token (keystoneauth's ServiceTokenAuthWrapper), and the user's project is
    the one that counts: the service user lives in another project. Without one (the conductor's own context)
    only the service's admin_token is sent, so it must be in the volumes' project."""
    ironic = start_ironic("ironic:service" if as_user else f"ironic:{project}")
    node = new_node(with_instance=as_user)
    instance = node["instance_uuid"] or node["uuid"]  # Ironic attaches to the node when there is no instance
    token = f"alice:{project}" if as_user else None
    connector = node_connector(ironic, node)
    volumes = [tether.create_volume()["id"], tether.create_volume(size=2)["id"]]

    connected = ironic.call("attach_volumes", node=node, auth_token=token, volumes=volumes, connector=connector)
    assert len(connected) == 2
    for volume_id, connection in zip(volumes, connected, strict=True):
        assert connection["driver_volume_type"] == "iscsi"
        data = connection["data"]
        # what Ironic's iPXE boot-from-volume script is built from (pxe_utils.get_volume_pxe_options)
        assert data["target_iqn"] == IQN_PREFIX + volume_id
        assert data["target_lun"] == 1
        assert data["target_portal"]
        assert data["auth_method"] == "CHAP"
        assert data["auth_username"]
        assert data["auth_password"]
        assert data["volume_id"] == volume_id
        assert data["ironic_volume_uuid"] == volume_id
        # the node asked for multipath
        assert data["target_iqns"] == [data["target_iqn"]]
        assert data["target_portals"] == [data["target_portal"]]
        assert data["target_luns"] == [1]
        assert "already_attached" not in connection

        shown = tether.volume(volume_id)
        assert shown["status"] == "in-use"
        assert [(a["server_id"], a["device"]) for a in shown["attachments"]] == [(instance, "ironic_mountpoint")]
        (attachment,) = tether.attachments(volume_id).values()
        assert attachment["status"] == "attached"
        assert attachment["instance"] == instance
    # Ironic labels each volume with POST /volumes/{id}/metadata; a failure there is only a warning to it
    assert ironic.warnings == []
    for volume_id in volumes:
        labelled = label(tether.volume(volume_id), node)
        assert labelled["instance_uuid"] == instance
        assert labelled["last_action"] == "attached"

    # asked again (a retried deploy), Ironic finds its attachments in the volumes' `attachments` and skips them
    again = ironic.call("attach_volumes", node=node, auth_token=token, volumes=volumes, connector=connector)
    assert [c.get("already_attached") for c in again] == [True, True]
    assert [len(tether.attachments(v)) for v in volumes] == [1, 1]

    assert ironic.call("detach_volumes", node=node, auth_token=token, volumes=volumes, connector=connector) is None
    assert ironic.warnings == []
    for volume_id in volumes:
        shown = tether.volume(volume_id)
        assert shown["status"] == "available"
        assert shown["attachments"] == []
        assert tether.attachments(volume_id) == {}
        assert label(shown, node)["last_action"] == "detached"

    # nothing attached any more: detach skips both volumes
    assert ironic.call("detach_volumes", node=node, auth_token=token, volumes=volumes, connector=connector) is None
    assert [tether.volume(v)["status"] for v in volumes] == ["available", "available"]


def test_attach_fails_on_a_volume_another_server_uses(ironic: Ironic, tether: Tether, project: str) -> None:
    node = new_node()
    connector = node_connector(ironic, node)
    busy = tether.create_volume()["id"]
    other = {"volume_uuid": busy, "instance_uuid": str(uuid.uuid4())}
    taken = tether.ok("POST", "/attachments", {"attachment": other})["attachment"]

    with pytest.raises(DriverError) as failed:
        ironic.call("attach_volumes", node=node, auth_token=f"alice:{project}", volumes=[busy], connector=connector)
    assert failed.value.kind == "StorageError"
    assert "Failed to reserve volume" in failed.value.message
    assert tether.volume(busy)["status"] == "reserved"
    assert list(tether.attachments(busy)) == [taken["id"]]


def test_detach_of_a_missing_volume_is_an_error_unless_errors_are_allowed(ironic: Ironic, project: str) -> None:
    node = new_node()
    connector = node_connector(ironic, node)
    gone = [str(uuid.uuid4())]
    with pytest.raises(DriverError) as failed:
        ironic.call("detach_volumes", node=node, auth_token=f"alice:{project}", volumes=gone, connector=connector)
    assert failed.value.kind == "StorageError"
    assert "Failed to get volume" in failed.value.message
    assert (
        ironic.call(
            "detach_volumes",
            node=node,
            auth_token=f"alice:{project}",
            volumes=gone,
            connector=connector,
            allow_errors=True,
        )
        is None
    )
    assert any("Failed to get volume" in w for w in ironic.warnings)


@pytest.mark.storage
def test_on_tgt_the_node_logs_in_to_both_volumes(tgt_ironic: Ironic, tgt_tether: Tether, project: str) -> None:
    """File volumes exported by a private tgtd: the node's initiator logs in with what Ironic was given."""
    ironic, tether = tgt_ironic, tgt_tether
    node = new_node()
    connector = node_connector(ironic, node)
    volumes = [tether.create_volume()["id"], tether.create_volume(size=2)["id"]]
    token = f"alice:{project}"
    connected = ironic.call("attach_volumes", node=node, auth_token=token, volumes=volumes, connector=connector)
    for size, connection in zip((1, 2), connected, strict=True):
        assert_logs_in(connection["data"], NODE_IQN, size_gib=size)
        assert_refused(connection["data"], "iqn.2017-01.org.example.baremetal:another-node")

    ironic.call("detach_volumes", node=node, auth_token=token, volumes=volumes, connector=connector)
    assert ironic.warnings == []
    for connection in connected:
        assert_refused(connection["data"], NODE_IQN)
    assert [tether.volume(v)["status"] for v in volumes] == ["available", "available"]
