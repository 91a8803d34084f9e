"""A small HTTP/1.1 keep-alive client for load generation: one connection per simulated client.

httpx's async pool costs the driver 1.5 ms of CPU per request at 1 connection and 5.6 ms at 32 (measured
on the 2-core developers' machine against `/healthcheck`: 515 req/s at 1 client, 179 req/s at 32, while
`wrk` drove the same server to 3,784 req/s), so a benchmark driven by it measures httpx, not Tether.
This client writes a request and reads exactly one response (status line, headers, Content-Length
body) on its own connection; it supports only what Tether's answers use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any
from urllib.parse import urlsplit


class WireError(RuntimeError):
    pass


class Connection:
    """One keep-alive connection. Not safe for concurrent use: one request at a time, like a client."""

    def __init__(self, base: str, headers: dict[str, str]) -> None:
        parts = urlsplit(base)
        if parts.scheme != "http" or parts.hostname is None:
            raise WireError(f"only http:// bases are supported, not {base!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.fixed = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{self.host}:{self.port}", **headers}.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self.reader, self.writer

    async def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        """Sends one request (with `headers` besides the connection's own); returns (status, parsed JSON or None)."""
        reader, writer = await self._open()
        payload = b"" if body is None else json.dumps(body).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = f"{method} {path} HTTP/1.1\r\n{self.fixed}{extra}Content-Length: {len(payload)}\r\n"
        if payload:
            head += "Content-Type: application/json\r\n"
        writer.write(head.encode() + b"\r\n" + payload)
        status_line = await reader.readline()
        if not status_line:
            raise WireError("connection closed by the server")
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        close = False
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
            elif name == b"transfer-encoding":
                raise WireError("chunked responses are not supported by this driver")
        data = await reader.readexactly(length) if length else b""
        if close:
            await self.close()
        return status, (json.loads(data) if data else None)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None
