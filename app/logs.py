"""configure_logging(): plain or JSON lines, with the request id on every record and secrets masked."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

from app.middleware import request_id_var

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
        return True


class _MaskingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask(super().format(record))


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": mask(record.getMessage()),
        }
        for key in ("project_id", "volume_id", "attachment_id"):
            value = getattr(record, key, None)
            if value:
                entry[key] = value
        if record.exc_info:
            entry["traceback"] = mask(self.formatException(record.exc_info))
        return json.dumps(entry)


def configure_logging(level: str = "INFO", *, json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    if json_lines:
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(_MaskingFormatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger("tether")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
