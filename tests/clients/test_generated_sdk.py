"""A client generated from the checked-in spec with openapi-python-client drives a full attach flow."""

import importlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import IN_CI, Server

SPEC = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"
VERSION = "volume 3.71"


@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    generator = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))
    if generator is None:
        if IN_CI:
            pytest.fail("openapi-python-client is not installed (CI=true: required)")
        pytest.skip("openapi-python-client is not installed")
    where = tmp_path_factory.mktemp("sdk")
    result = subprocess.run(
        [generator, "generate", "--path", str(SPEC), "--output-path", str(where / "client"), "--meta", "none"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (where / "client" / "__init__.py").exists(), result.stdout + result.stderr
    sys.path.insert(0, str(where))
    try:
        yield importlib.import_module("client")
    finally:
        sys.path.remove(str(where))
        for name in [m for m in sys.modules if m == "client" or m.startswith("client.")]:
            del sys.modules[name]


def call(sdk: ModuleType, tag: str, operation: str, **kwargs: Any) -> Any:
    module = importlib.import_module(f"client.api.{tag}.{operation}")
    return module.sync_detailed(open_stack_api_version=VERSION, **kwargs)


def model(name: str, data: dict[str, Any]) -> Any:
    return getattr(importlib.import_module("client.models"), name).from_dict(data)


def test_generated_client_attaches_a_volume(sdk: ModuleType, server: Server) -> None:
    project = "sdkproject"
    client = sdk.Client(
        base_url=server.base, headers={"X-Auth-Token": f"sdkuser:{project}"}, raise_on_unexpected_status=True
    )

    created = call(
        sdk,
        "volumes",
        "create_volume",
        project_id=project,
        client=client,
        body=model("VolumeCreateRequest", {"volume": {"size": 1, "name": "from-sdk"}}),
    )
    assert created.status_code == 202
    volume_id = created.parsed.volume.id
    for _ in range(100):
        shown = call(sdk, "volumes", "show_volume", project_id=project, volume_id=volume_id, client=client)
        if shown.parsed.volume.status == "available":
            break
        time.sleep(0.05)
    assert shown.parsed.volume.status == "available"
    assert shown.parsed.volume.name == "from-sdk"

    connector = {"initiator": "iqn.1993-08.org.debian:01:sdk", "host": "sdk-host", "ip": "127.0.0.1"}
    attached = call(
        sdk,
        "attachments",
        "create_attachment",
        project_id=project,
        client=client,
        body=model("AttachmentCreateRequest", {"attachment": {"volume_uuid": volume_id, "connector": connector}}),
    )
    assert attached.status_code == 200, attached.content
    attachment = attached.parsed.attachment
    assert attachment.status == "attaching"
    assert attachment.connection_info.target_iqn.endswith(f"volume-{volume_id}")
    assert attachment.connection_info.auth_method == "CHAP"

    completed = call(
        sdk,
        "attachments",
        "complete_attachment",
        project_id=project,
        attachment_id=attachment.id,
        client=client,
        body=model("AttachmentActionRequest", {"os-complete": None}),
    )
    assert completed.status_code == 204

    shown = call(sdk, "attachments", "show_attachment", project_id=project, attachment_id=attachment.id, client=client)
    assert shown.parsed.attachment.status == "attached"
    listed = call(sdk, "attachments", "list_attachments", project_id=project, client=client)
    assert [a.id for a in listed.parsed.attachments] == [attachment.id]
    volume = call(sdk, "volumes", "show_volume", project_id=project, volume_id=volume_id, client=client)
    assert volume.parsed.volume.status == "in-use"

    deleted = call(
        sdk, "attachments", "delete_attachment", project_id=project, attachment_id=attachment.id, client=client
    )
    assert deleted.status_code == 200
    assert deleted.parsed.attachments == []
    volume = call(sdk, "volumes", "show_volume", project_id=project, volume_id=volume_id, client=client)
    assert volume.parsed.volume.status == "available"

    missing = call(
        sdk, "attachments", "show_attachment", project_id=project, attachment_id=attachment.id, client=client
    )
    assert missing.status_code == 404
    assert missing.parsed.item_not_found.code == 404
