"""Ironic's own cinder helpers, `ironic.common.cinder`, unmodified, in .venvs/ironic for tests/clients/test_ironic.py.

Run as `python ironic_api.py <tether base url> <service token>`. Ironic's `[cinder]` options are set through
oslo.config from a config file, as a deployment without Keystone would: the `admin_token` auth plugin with the
service token (Tether's noauth `<user>:<project>`) and `endpoint_override = <base>/v3`. Ironic 39 builds an
openstacksdk block_storage proxy on a keystoneauth session from those options (`ironic.common.keystone`).

One JSON request per line on stdin, one JSON answer per line on stdout:
- `{"call": "connector", "node": {…}, "volume_connectors": [{"type", "connector_id"}, …]}`: the connector that
  Ironic's cinder storage interface builds from a node's volume connectors (`CinderStorage._generate_connector`);
- `{"call": "attach_volumes" | "detach_volumes", "node": {"uuid", "instance_uuid"?, "provision_state"?},
  "auth_token": <the user's token, or null for the conductor's own context>, "volumes": [ids], "connector": {…},
  "allow_errors"?: bool}`: `ironic.common.cinder.attach_volumes(task, volumes, connector)` / `detach_volumes(…)`.
Answers are `{"result": …, "warnings": [what Ironic logged at WARNING or above]}` or
`{"error": {"type", "message"}, "warnings": […]}`. Logs go to stderr only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import traceback
import uuid
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ironic import objects
from ironic.common import cinder
from ironic.common import context as ironic_context
from ironic.conf import CONF
from ironic.drivers.modules.storage import cinder as cinder_storage


class Collect(logging.Handler):
    """Keeps what Ironic logs at WARNING and above during one call: it reports some failures only there."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


def configure(base: str, service_token: str, folder: Path) -> None:
    conf = folder / "ironic.conf"
    conf.write_text(
        "[cinder]\n"
        "auth_type = admin_token\n"
        f"endpoint = {base}/v3\n"
        f"token = {service_token}\n"
        f"endpoint_override = {base}/v3\n"
    )
    CONF([], project="ironic", default_config_files=[str(conf)])
    objects.register_all()


def task_for(request: dict[str, Any]) -> Any:
    """What these helpers read of a TaskManager: the node, the request context and the node's volume connectors."""
    token = request.get("auth_token")
    ctx = ironic_context.RequestContext(auth_token=token, is_admin=token is None)
    given = request["node"]
    node = objects.Node(
        ctx,
        uuid=given["uuid"],
        instance_uuid=given.get("instance_uuid"),
        provision_state=given.get("provision_state", "deploying"),
    )
    connectors = [
        objects.VolumeConnector(ctx, uuid=str(uuid.uuid4()), node_id=1, type=c["type"], connector_id=c["connector_id"])
        for c in request.get("volume_connectors", [])
    ]
    return SimpleNamespace(node=node, context=ctx, volume_connectors=connectors)


def answer(request: dict[str, Any], collect: Collect) -> dict[str, Any]:
    collect.records = []
    task = task_for(request)
    try:
        if request["call"] == "connector":
            result: Any = cinder_storage.CinderStorage()._generate_connector(task)
        elif request["call"] == "attach_volumes":
            result = cinder.attach_volumes(task, request["volumes"], request["connector"])
        elif request["call"] == "detach_volumes":
            cinder.detach_volumes(
                task, request["volumes"], request["connector"], allow_errors=request.get("allow_errors", False)
            )
            result = None
        else:
            raise ValueError(f"unknown call {request['call']!r}")
    except Exception as error:
        traceback.print_exc()
        return {"error": {"type": type(error).__name__, "message": str(error)}, "warnings": collect.records}
    return {"result": result, "warnings": collect.records}


def main() -> None:
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # the real stdout carries answers only
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    collect = Collect()
    logging.getLogger("ironic").addHandler(collect)

    def send(message: dict[str, Any]) -> None:
        answers.write(json.dumps(message, default=str) + "\n")
        answers.flush()

    with tempfile.TemporaryDirectory(prefix="ironic-driver-") as folder:
        configure(sys.argv[1], sys.argv[2], Path(folder))
        send({"ready": True, "version": metadata.version("ironic")})
        for line in sys.stdin:
            if line.strip():
                send(answer(json.loads(line), collect))


if __name__ == "__main__":
    main()
