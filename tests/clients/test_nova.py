"""Nova's own volume layer, `nova.volume.cinder.API` from the nova package, unmodified, against a live server.

The driver (tests/clients/drivers/nova_api.py) runs Nova in .venvs/nova; each test walks the calls that
Nova's compute manager makes for one operation, in Nova's order (attach, detach, resize, multiattach, live
migration and its rollback), and after each step reads the volume and its attachments through Tether's API.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.clients.conftest import Driver, DriverError, Tether, assert_logs_in, assert_refused
from tests.conftest import Server

IQN_PREFIX = "iqn.2010-10.org.openstack:volume-"


def host_connector(n: int) -> dict[str, Any]:
    """What Nova's libvirt driver sends for compute host n: os-brick's connector properties for iSCSI."""
    return {
        "platform": "x86_64",
        "os_type": "linux",
        "ip": f"192.0.2.{10 + n}",
        "host": f"compute-{n}",
        "multipath": False,
        "enforce_multipath": False,
        "initiator": f"iqn.1993-08.org.debian:01:compute-{n}",
        "do_local_attach": False,
        "nvme_native_multipath": False,
    }


class Nova:
    """`nova.volume.cinder.API` in the driver process, called as one user of one project."""

    def __init__(self, driver: Driver, user: str, project: str) -> None:
        self.driver = driver
        self.user = user
        self.project = project

    def __getattr__(self, call: str) -> Any:
        def invoke(*args: Any, **kwargs: Any) -> Any:
            request = {"call": call, "user": self.user, "project": self.project, "args": args, "kwargs": kwargs}
            answer = self.driver.request(request)
            if "error" in answer:
                raise DriverError(answer["error"])
            return answer["result"]

        return invoke


@pytest.fixture
def nova(live_server: Server, project: str, tmp_path: Path) -> Iterator[Nova]:
    driver = Driver("nova", "nova_api.py", [live_server.base], tmp_path / "nova.log")
    yield Nova(driver, "alice", project)
    driver.close()


@pytest.fixture
def tgt_nova(tgt_server: Server, project: str, tmp_path: Path) -> Iterator[Nova]:
    driver = Driver("nova", "nova_api.py", [tgt_server.base], tmp_path / "nova.log")
    yield Nova(driver, "alice", project)
    driver.close()


def attach(nova: Nova, volume_id: str, instance: str, host: int, device: str = "/dev/vdb") -> dict[str, Any]:
    """Nova's attach: reserve (API), connect with the host's connector and complete (compute manager)."""
    reserved = nova.attachment_create(volume_id, instance)
    nova.get(volume_id, microversion="3.69")  # the compute manager reads shared_targets before connecting
    connected = nova.attachment_update(reserved["id"], host_connector(host), device)
    nova.attachment_complete(reserved["id"])
    return connected  # type: ignore[no-any-return]


def assert_iscsi(connection_info: dict[str, Any], volume_id: str) -> None:
    """The connection_info Nova hands to os-brick: its legacy shape, `driver_volume_type` beside `data`."""
    assert connection_info["driver_volume_type"] == "iscsi"
    data = connection_info["data"]
    assert data["target_iqn"] == IQN_PREFIX + volume_id
    assert data["target_portal"]
    assert data["target_lun"] == 1
    assert data["volume_id"] == volume_id
    assert data["auth_method"] == "CHAP"
    assert len(data["auth_username"]) == 20
    assert len(data["auth_password"]) == 16
    assert data["access_mode"] == "rw"
    assert data["encrypted"] is False
    assert data["target_discovered"] is False
    assert "attachment_id" not in data  # Nova pops it


def live(tether: Tether, volume_id: str) -> dict[str, str]:
    """The volume's attachments as Tether shows them: id -> status."""
    return {a["id"]: a["status"] for a in tether.attachments(volume_id).values()}


def test_microversions_get_and_check_attached(nova: Nova, tether: Tether) -> None:
    assert nova.driver.version == "34.0.0"
    for version in ("3.44", "3.48", "3.69", "3.71"):
        assert nova.is_microversion_supported(version) is None
    with pytest.raises(DriverError) as unavailable:
        nova.is_microversion_supported("3.72")
    assert unavailable.value.kind == "CinderAPIVersionNotAvailable"

    volume = tether.create_volume(size=2)
    seen = nova.get(volume["id"], microversion="3.69")
    assert seen["id"] == volume["id"]
    assert seen["status"] == "available"
    assert seen["attach_status"] == "detached"
    assert seen["size"] == 2
    assert seen["multiattach"] is False
    assert seen["availability_zone"] == volume["availability_zone"]
    assert seen["bootable"] is False
    assert "attachments" not in seen
    assert seen["shared_targets"] is False  # 3.48+ (tri-state from 3.69): no host lock needed
    assert seen["service_uuid"]
    assert "shared_targets" not in nova.get(volume["id"])  # 3.0

    with pytest.raises(DriverError) as not_attached:
        nova.check_attached(seen)
    assert not_attached.value.kind == "InvalidVolume"

    with pytest.raises(DriverError) as gone:
        nova.get(str(uuid.uuid4()))
    assert gone.value.kind == "VolumeNotFound"
    assert gone.value.code == 404
    other = Nova(nova.driver, "bob", f"p{uuid.uuid4().hex[:12]}")
    with pytest.raises(DriverError) as hidden:
        other.get(volume["id"])
    assert hidden.value.kind == "VolumeNotFound"


def test_attach_and_detach(nova: Nova, tether: Tether) -> None:
    volume = tether.create_volume()
    instance = str(uuid.uuid4())

    reserved = nova.attachment_create(volume["id"], instance)
    assert reserved["status"] == "reserved"
    assert reserved["instance"] == instance
    assert reserved["volume_id"] == volume["id"]
    assert reserved["connection_info"] == {}  # nothing connected yet
    assert tether.volume(volume["id"])["status"] == "reserved"
    assert live(tether, volume["id"]) == {reserved["id"]: "reserved"}

    connected = nova.attachment_update(reserved["id"], host_connector(1), "/dev/vdb")
    assert connected["id"] == reserved["id"]
    assert connected["attach_mode"] == "rw"
    info = connected["connection_info"]
    assert_iscsi(info, volume["id"])
    assert info["status"] == "attaching"
    assert info["instance"] == instance
    assert info["attached_at"]
    assert tether.volume(volume["id"])["status"] == "attaching"

    assert nova.attachment_complete(reserved["id"]) is None
    shown = tether.volume(volume["id"])
    assert shown["status"] == "in-use"
    assert [(a["attachment_id"], a["server_id"]) for a in shown["attachments"]] == [(reserved["id"], instance)]
    assert tether.attachment(reserved["id"])["status"] == "attached"

    seen = nova.get(volume["id"], microversion="3.69")
    assert seen["status"] == "in-use"
    assert seen["attach_status"] == "attached"
    assert list(seen["attachments"]) == [instance]
    assert seen["attachments"][instance]["attachment_id"] == reserved["id"]
    assert nova.check_attached(seen) is None
    again = nova.attachment_get(reserved["id"])
    assert again["connection_info"]["status"] == "attached"
    assert again["connection_info"]["data"] == info["data"]

    # detach: the compute manager disconnects the host, then deletes the attachment
    assert nova.attachment_delete(reserved["id"]) is None
    assert tether.volume(volume["id"])["status"] == "available"
    assert tether.volume(volume["id"])["attachments"] == []
    assert live(tether, volume["id"]) == {}
    assert nova.get(volume["id"])["attach_status"] == "detached"
    assert nova.attachment_delete(reserved["id"]) is None  # Nova treats the 404 of a second delete as done
    with pytest.raises(DriverError) as gone:
        nova.attachment_get(reserved["id"])
    assert gone.value.kind == "VolumeAttachmentNotFound"


@pytest.mark.parametrize("with_create", [False, True], ids=["update", "create-with-connector"])
def test_the_device_and_host_come_from_novas_connector(nova: Nova, tether: Tether, with_create: bool) -> None:
    """Nova passes the device name inside the connector (`mountpoint`); Cinder's attachment_update records it
    and the connector's host on the attachment (volume_attached), so the volume shows where it is attached."""
    volume = tether.create_volume()
    instance = str(uuid.uuid4())
    if with_create:
        created = nova.attachment_create(volume["id"], instance, connector=host_connector(1), mountpoint="/dev/vdb")
        nova.attachment_complete(created["id"])
    else:
        attach(nova, volume["id"], instance, host=1, device="/dev/vdb")
    assert nova.get(volume["id"])["attachments"][instance]["mountpoint"] == "/dev/vdb"
    (as_admin,) = tether.volume_as_admin(volume["id"])["attachments"]
    assert (as_admin["host_name"], as_admin["device"]) == ("compute-1", "/dev/vdb")


def test_attachment_create_with_connector_connects_at_once(nova: Nova, tether: Tether) -> None:
    volume = tether.create_volume()
    instance = str(uuid.uuid4())
    created = nova.attachment_create(volume["id"], instance, connector=host_connector(1), mountpoint="/dev/vdc")
    assert created["connection_info"]["status"] == "attaching"
    assert_iscsi(created["connection_info"], volume["id"])
    assert tether.volume(volume["id"])["status"] == "attaching"
    nova.attachment_complete(created["id"])
    assert nova.get(volume["id"])["status"] == "in-use"
    nova.attachment_delete(created["id"])
    assert tether.volume(volume["id"])["status"] == "available"


def test_a_second_instance_cannot_attach_a_plain_volume(nova: Nova, tether: Tether) -> None:
    volume = tether.create_volume()
    first = attach(nova, volume["id"], str(uuid.uuid4()), host=1)
    with pytest.raises(DriverError) as refused:
        nova.attachment_create(volume["id"], str(uuid.uuid4()))
    assert refused.value.kind == "InvalidInput"  # Nova's translation of cinderclient's BadRequest
    assert refused.value.code == 400
    assert live(tether, volume["id"]) == {first["id"]: "attached"}
    with pytest.raises(DriverError) as failed:
        nova.attachment_complete(str(uuid.uuid4()))
    assert failed.value.kind == "VolumeAttachmentNotFound"


def test_resize_moves_the_attachment_to_the_new_host(nova: Nova, tether: Tether) -> None:
    """Resize: _terminate_volume_connections reserves a second attachment for the same instance while the
    first exists (SPEC 5's exception), deletes the first; finish_resize connects and completes the second."""
    volume = tether.create_volume()
    instance = str(uuid.uuid4())
    source = attach(nova, volume["id"], instance, host=1)

    second = nova.attachment_create(volume["id"], instance)
    assert second["status"] == "reserved"
    assert second["instance"] == instance
    assert tether.volume(volume["id"])["status"] == "in-use"  # the status is left alone
    assert live(tether, volume["id"]) == {source["id"]: "attached", second["id"]: "reserved"}

    nova.attachment_delete(source["id"])
    assert tether.volume(volume["id"])["status"] == "reserved"
    assert live(tether, volume["id"]) == {second["id"]: "reserved"}

    moved = nova.attachment_update(second["id"], host_connector(2), "/dev/vdb")
    assert_iscsi(moved["connection_info"], volume["id"])
    nova.attachment_complete(second["id"])
    shown = tether.volume(volume["id"])
    assert shown["status"] == "in-use"
    assert [a["attachment_id"] for a in shown["attachments"]] == [second["id"]]
    assert nova.get(volume["id"])["attachments"][instance]["attachment_id"] == second["id"]

    nova.attachment_delete(second["id"])
    assert tether.volume(volume["id"])["status"] == "available"


def test_multiattach_from_two_hosts(nova: Nova, tether: Tether) -> None:
    volume = tether.create_volume(volume_type=tether.multiattach_type())
    assert nova.get(volume["id"])["multiattach"] is True
    one, two = str(uuid.uuid4()), str(uuid.uuid4())

    first = attach(nova, volume["id"], one, host=1)
    second = attach(nova, volume["id"], two, host=2)
    assert first["connection_info"]["data"]["target_iqn"] == second["connection_info"]["data"]["target_iqn"]
    shown = tether.volume(volume["id"])
    assert shown["status"] == "in-use"
    assert {a["server_id"]: a["attachment_id"] for a in shown["attachments"]} == {one: first["id"], two: second["id"]}
    seen = nova.get(volume["id"])
    assert {server: a["attachment_id"] for server, a in seen["attachments"].items()} == {
        one: first["id"],
        two: second["id"],
    }
    # different hosts, different initiators: no shared connection
    assert tether.attachment(first["id"])["shared_connections_by_attachment"] == []

    nova.attachment_delete(first["id"])
    shown = tether.volume(volume["id"])
    assert shown["status"] == "in-use"
    assert [a["server_id"] for a in shown["attachments"]] == [two]
    nova.attachment_delete(second["id"])
    assert tether.volume(volume["id"])["status"] == "available"


def connect_destination(nova: Nova, tether: Tether, volume_id: str, instance: str) -> dict[str, Any]:
    """pre_live_migration on the destination: an attachment created with the destination's connector while
    the source's is connected. Cinder accepts it (its create-with-connector skips the duplicate-connector
    check), and so must Tether (SPEC 5); like Cinder's volume_attached(mark_attached=False), the volume is
    `attaching` until the destination completes."""
    source_before = tether.attachments(volume_id)
    destination = nova.attachment_create(volume_id, instance, connector=host_connector(2), mountpoint="/dev/vdb")
    assert destination["connection_info"]["instance"] == instance
    assert destination["connection_info"]["status"] == "attaching"
    assert_iscsi(destination["connection_info"], volume_id)
    assert tether.volume(volume_id)["status"] == "attaching"
    now = tether.attachments(volume_id)
    assert now[destination["id"]]["status"] == "attaching"
    assert {k: v for k, v in now.items() if k != destination["id"]} == source_before  # the source untouched
    return destination  # type: ignore[no-any-return]


def test_live_migration(nova: Nova, tether: Tether) -> None:
    volume = tether.create_volume()
    instance = str(uuid.uuid4())
    source = attach(nova, volume["id"], instance, host=1)

    destination = connect_destination(nova, tether, volume["id"], instance)
    nova.attachment_complete(destination["id"])
    assert live(tether, volume["id"]) == {source["id"]: "attached", destination["id"]: "attached"}
    assert tether.volume(volume["id"])["status"] == "in-use"
    found = nova.attachment_get_all(instance_id=instance)
    assert {a["id"] for a in found} == {source["id"], destination["id"]}
    assert {a["id"] for a in nova.attachment_get_all(volume_id=volume["id"])} == {source["id"], destination["id"]}

    # post_live_migration on the source: its attachment goes, the destination's stays connected
    nova.attachment_delete(source["id"])
    shown = tether.volume(volume["id"])
    assert shown["status"] == "in-use"
    assert [a["attachment_id"] for a in shown["attachments"]] == [destination["id"]]
    assert live(tether, volume["id"]) == {destination["id"]: "attached"}
    kept = nova.attachment_get(destination["id"])
    assert kept["connection_info"]["data"] == destination["connection_info"]["data"]

    nova.attachment_delete(destination["id"])
    assert tether.volume(volume["id"])["status"] == "available"


@pytest.mark.parametrize("completed", [False, True], ids=["pre-live-migration-failed", "migration-failed"])
def test_live_migration_rollback_leaves_the_source_as_it_was(nova: Nova, tether: Tether, completed: bool) -> None:
    """Nova deletes the destination's attachment when pre_live_migration fails (before it completes) or when
    the migration fails later (_rollback_volume_bdms, after it completed); the source is untouched."""
    volume = tether.create_volume()
    instance = str(uuid.uuid4())
    source = attach(nova, volume["id"], instance, host=1)
    volume_before = tether.volume(volume["id"])
    source_before = tether.attachment(source["id"])
    nova_before = nova.attachment_get(source["id"])

    destination = connect_destination(nova, tether, volume["id"], instance)
    if completed:
        nova.attachment_complete(destination["id"])
    nova.attachment_delete(destination["id"])

    assert tether.attachment(source["id"]) == source_before
    volume_after = tether.volume(volume["id"])
    assert volume_after["status"] == "in-use"
    assert volume_after["attachments"] == volume_before["attachments"]
    assert live(tether, volume["id"]) == {source["id"]: "attached"}
    assert nova.attachment_get(source["id"]) == nova_before
    nova.attachment_delete(source["id"])
    assert tether.volume(volume["id"])["status"] == "available"


# -- file volumes exported by a private tgtd: the hosts' initiators really log in --------------------------------


def initiator(host: int) -> str:
    return str(host_connector(host)["initiator"])


@pytest.mark.storage
def test_on_tgt_attach_and_live_migration_with_real_logins(tgt_nova: Nova, tgt_tether: Tether) -> None:
    nova, tether = tgt_nova, tgt_tether
    volume = tether.create_volume()
    instance = str(uuid.uuid4())
    source = attach(nova, volume["id"], instance, host=1)
    data = source["connection_info"]["data"]
    assert_logs_in(data, initiator(1))
    assert_refused(data, initiator(2))

    destination = connect_destination(nova, tether, volume["id"], instance)
    assert destination["connection_info"]["data"]["target_iqn"] == data["target_iqn"]
    assert_logs_in(destination["connection_info"]["data"], initiator(2))
    assert_logs_in(data, initiator(1))  # the source keeps its ACL while the guest runs there
    nova.attachment_complete(destination["id"])

    nova.attachment_delete(source["id"])
    assert_refused(data, initiator(1))
    assert_logs_in(destination["connection_info"]["data"], initiator(2))

    nova.attachment_delete(destination["id"])
    assert_refused(destination["connection_info"]["data"], initiator(2))
    assert tether.volume(volume["id"])["status"] == "available"


@pytest.mark.storage
def test_on_tgt_rollback_keeps_the_source_logged_in(tgt_nova: Nova, tgt_tether: Tether) -> None:
    nova, tether = tgt_nova, tgt_tether
    volume = tether.create_volume()
    instance = str(uuid.uuid4())
    source = attach(nova, volume["id"], instance, host=1)
    destination = connect_destination(nova, tether, volume["id"], instance)
    assert_logs_in(destination["connection_info"]["data"], initiator(2))

    nova.attachment_delete(destination["id"])
    assert_refused(destination["connection_info"]["data"], initiator(2))
    assert_logs_in(source["connection_info"]["data"], initiator(1))
    assert tether.volume(volume["id"])["status"] == "in-use"
    nova.attachment_delete(source["id"])
    assert_refused(source["connection_info"]["data"], initiator(1))
