"""Nova's own volume layer, `nova.volume.cinder`, unmodified, run in .venvs/nova for tests/clients/test_nova.py.

Run as `python nova_api.py <tether base url>`. Nova is configured as a deployment without Keystone would be:
`[cinder] endpoint_template = <base>/v3/%(project_id)s`, and each call gets a RequestContext whose token is
Tether's noauth `<user>:<project>`. One JSON request per line on stdin,
`{"call": "<nova.volume.cinder.API method, or is_microversion_supported>", "user", "project", "args", "kwargs"}`,
one JSON answer per line on stdout: `{"result": …}` or `{"error": {"type", "message", "cause"}}`, where `cause`
is the cinderclient exception Nova translated (its class, HTTP code and message). Logs go to stderr only.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from importlib import metadata
from typing import Any

import nova.conf
from cinderclient import exceptions as cinder_exceptions
from nova import context as nova_context
from nova.volume import cinder

CONF = nova.conf.CONF


def configure(base: str) -> None:
    CONF([], project="nova", default_config_files=[])
    CONF.set_override("endpoint_template", f"{base}/v3/%(project_id)s", group="cinder")


def context(user: str, project: str) -> nova_context.RequestContext:
    return nova_context.RequestContext(
        user_id=user, project_id=project, auth_token=f"{user}:{project}", roles=["member", "reader"]
    )


def cause_of(error: BaseException) -> dict[str, Any] | None:
    """The cinderclient exception under Nova's translation, if there is one."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, cinder_exceptions.ClientException):
            return {"type": type(seen).__name__, "code": seen.code, "message": seen.message}
        seen = seen.__cause__ or seen.__context__
    return None


def answer(api: cinder.API, request: dict[str, Any]) -> dict[str, Any]:
    ctx = context(request["user"], request["project"])
    name = request["call"]
    function = cinder.is_microversion_supported if name == "is_microversion_supported" else getattr(api, name)
    try:
        result = function(ctx, *request.get("args", []), **request.get("kwargs", {}))
    except Exception as error:
        traceback.print_exc()
        return {"error": {"type": type(error).__name__, "message": str(error), "cause": cause_of(error)}}
    return {"result": result}


def main() -> None:
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # the real stdout carries answers only
    configure(sys.argv[1])
    api = cinder.API()

    def send(message: dict[str, Any]) -> None:
        answers.write(json.dumps(message, default=str) + "\n")
        answers.flush()

    send({"ready": True, "version": metadata.version("nova")})
    for line in sys.stdin:
        if line.strip():
            send(answer(api, json.loads(line)))


if __name__ == "__main__":
    main()
