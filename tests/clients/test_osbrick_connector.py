"""Bare-metal path: the connector os-brick builds on this machine is accepted as is on POST /attachments."""

import json
import subprocess
import sys

import pytest

from tests.conftest import IN_CI, Api

# os-brick pulls in eventlet; keep it out of the test process
_PROBE = """
import json
from os_brick import privileged
privileged.default.set_client_mode(False)
from os_brick.initiator import connector
print(json.dumps(connector.get_connector_properties('', '127.0.0.1', False, False)))
"""


@pytest.fixture(scope="module")
def brick_connector() -> dict[str, object]:
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        reason = f"os-brick could not build a connector: {result.stderr.strip().splitlines()[-1:]}"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    connector: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return connector


async def test_os_brick_connector_is_accepted_unmodified(api: Api, brick_connector: dict[str, object]) -> None:
    assert str(brick_connector["initiator"]).startswith("iqn.")
    assert {"platform", "os_type", "ip", "host", "multipath", "enforce_multipath", "do_local_attach"} <= set(
        brick_connector
    )
    volume = await api.create_volume()
    response = await api.post(
        "/attachments", {"attachment": {"volume_uuid": volume["id"], "connector": brick_connector}}
    )
    assert response.status_code == 200, response.text
    attachment = response.json()["attachment"]
    info = attachment["connection_info"]
    assert info["driver_volume_type"] == "iscsi"
    assert info["target_iqn"] == f"iqn.2010-10.org.openstack:volume-{volume['id']}"
    assert info["target_portal"]
    assert info["target_lun"] == 1
    assert info["auth_method"] == "CHAP"
    assert len(info["auth_password"]) == 16
    assert info["enforce_multipath"] is False
    assert api.app.state.backends.target.acls(volume["id"]) == {brick_connector["initiator"]}

    # the connector is kept key by key and read back whole for detach
    from sqlalchemy import select

    from app.db.models import AttachmentSpec

    async with api.app.state.db.read() as session:
        rows = await session.execute(
            select(AttachmentSpec.key, AttachmentSpec.value).where(AttachmentSpec.attachment_id == attachment["id"])
        )
        stored = {key: json.loads(value) for key, value in rows.all()}
    assert stored == brick_connector
