"""configure_logging(): plain or JSON lines, with the request id on every record and secrets masked."""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
_fields: ContextVar[dict[str, str]] = ContextVar("log_fields", default={})  # noqa: B039 - never mutated

LOG_FIELDS = ("project_id", "volume_id", "attachment_id", "node", "job_id", "operation")
# the access log's fields (app/middleware.py), given to its one call as `extra`
ACCESS_FIELDS = ("method", "path", "status", "duration_ms")


def begin_request(request_id: str) -> tuple[object, object]:
    """A request starts with its own id and no ids bound (one task may serve several requests)."""
    return request_id_var.set(request_id), _fields.set({})


def end_request(tokens: tuple[object, object]) -> None:
    request_token, fields_token = tokens
    request_id_var.reset(request_token)  # type: ignore[arg-type]
    _fields.reset(fields_token)  # type: ignore[arg-type]


def bind(**fields: str | None) -> None:
    """Attach ids (project_id, volume_id, attachment_id) to every record logged later in this task."""
    _fields.set({**_fields.get(), **{k: v for k, v in fields.items() if v}})


# "CHAP <user> <secret>", auth_password and secret keys in connectors or connection_info
_SECRET_PATTERNS = [
    (re.compile(r"(CHAP \S+ )\S+"), r"\1***"),
    (re.compile(r"""(["']?(?:auth_password|password|secret)["']?\s*[:=]\s*["']?)[^"',\s}]+"""), r"\1***"),
]


def mask(text: str) -> str:
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        for key, value in _fields.get().items():
            setattr(record, key, value)
        return True


class _MaskingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask(super().format(record))


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": mask(record.getMessage()),
        }
        for key in LOG_FIELDS:
            value = getattr(record, key, None)
            if value:
                entry[key] = value
        for key in ACCESS_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = mask(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["traceback"] = mask(self.formatException(record.exc_info))
        return json.dumps(entry)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at emit time (a redirected or captured stderr included)."""

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def configure_logging(level: str = "INFO", *, json_lines: bool = False) -> None:
    handler = _StderrHandler()
    handler.addFilter(_ContextFilter())
    if json_lines:
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(_MaskingFormatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    handler.setLevel(level.upper())
    root = logging.getLogger("tether")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # the backends log under their module names (app.backends.*: tgtadm argv, exports, ACLs); the handler's
    # level filters them, so the logger itself stays open to whoever else listens above it
    backends = logging.getLogger("app")
    backends.handlers[:] = [handler]
    backends.setLevel(logging.DEBUG)
