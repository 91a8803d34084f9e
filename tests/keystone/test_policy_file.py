"""TETHER_POLICY_FILE in keystone mode: a Cinder policy.yaml overrides the rules it names, and only those."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import fault
from tests.keystone.callers import Caller
from tests.keystone.keystone import Cloud


@pytest.fixture
def settings_overrides(tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "policy.yaml"
    # attachments only for admins, and the project's readers may create volumes
    path.write_text(
        '"volume:attachment_create": "rule:admin_api"\n"volume:create": "role:reader and project_id:%(project_id)s"\n'
    )
    return {"policy_file": str(path)}


async def test_a_policy_file_overrides_cinders_defaults(
    kclient: httpx.AsyncClient, keystone_app: Any, cloud: Cloud
) -> None:
    alice, rita, admin = (Caller(kclient, cloud.users[name]) for name in ("alice", "rita", "admin"))
    volume = await rita.create_volume(keystone_app)
    fault(await alice.post("/attachments", {"attachment": {"volume_uuid": volume["id"]}}), 403)
    created = await admin.post("/attachments", {"attachment": {"volume_uuid": volume["id"]}})
    assert created.status_code == 200, created.text
    # the rules the file does not name keep Cinder's defaults
    fault(await rita.delete(f"/volumes/{volume['id']}"), 403)
    assert (await alice.get(f"/volumes/{volume['id']}")).status_code == 200
