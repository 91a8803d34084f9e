"""Shared fixtures: migrated SQLite and PostgreSQL databases, the app with its lifespan, a client per project.

Each test works in a project of its own, so tests never see each other's rows and no table is wiped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.db.migrate import upgrade
from app.main import create_app

IN_CI = os.environ.get("CI") == "true"
PG_ADMIN_DSN = os.environ.get("TETHER_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
ROOT = Path(__file__).resolve().parents[1]


def missing(reason: str) -> None:
    """A component the tests need is absent: a failure in CI, a skip elsewhere."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: required)")
    pytest.skip(reason)


async def _pg(sql: str, dsn: str = PG_ADMIN_DSN) -> None:
    import asyncpg

    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('sqlite')}/tether.db"
    upgrade(url)
    return url


def new_pg_database(prefix: str = "tether_test") -> str:
    """A new, empty PostgreSQL database (not migrated): its tether URL. No server: a failure in CI, else a skip."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        asyncio.run(_pg(f'CREATE DATABASE "{name}"'))
    except Exception as error:
        missing(f"PostgreSQL is not reachable at {PG_ADMIN_DSN}: {error}")
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return f"{base}/{name}"


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1].split("?", 1)[0]
    asyncio.run(_pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextmanager
def migrated_pg_database() -> Iterator[str]:
    """A new PostgreSQL database at the latest revision, dropped afterwards."""
    url = new_pg_database()
    upgrade(url)
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with migrated_pg_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "reconcile_on_start": False,
        "log_level": "WARNING",
        # one embedded node name for every test app, whatever the machine's hostname: pools `tether@default#default`
        "node_name": "tether",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Override in a module or test to change the app's settings."""
    return {}


@pytest.fixture
async def app(database_url: str, settings_overrides: dict[str, Any]) -> AsyncIterator[Any]:
    application = create_app(make_settings(database_url, **settings_overrides))
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tether.test") as c:
        yield c


@dataclass
class Api:
    """A caller: one user in one project, speaking one microversion."""

    client: httpx.AsyncClient
    app: Any
    project: str
    user: str = "alice"
    version: str | None = "3.71"

    def as_(self, *, user: str | None = None, project: str | None = None, version: str | None = "keep") -> Api:
        return Api(
            self.client,
            self.app,
            project or self.project,
            user or self.user,
            self.version if version == "keep" else version,
        )

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"X-Auth-Token": f"{self.user}:{self.project}"}
        if self.version is not None:
            headers["OpenStack-API-Version"] = f"volume {self.version}"
        headers.update(extra or {})
        return headers

    def url(self, path: str) -> str:
        return f"/v3/{self.project}{path}"

    async def get(self, path: str, **kw: Any) -> httpx.Response:
        return await self.client.get(self.url(path), headers=self.headers(kw.pop("headers", None)), **kw)

    async def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        return await self.client.post(self.url(path), json=body, headers=self.headers(kw.pop("headers", None)), **kw)

    async def put(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        return await self.client.put(self.url(path), json=body, headers=self.headers(kw.pop("headers", None)), **kw)

    async def delete(self, path: str, **kw: Any) -> httpx.Response:
        return await self.client.delete(self.url(path), headers=self.headers(kw.pop("headers", None)), **kw)

    async def settle(self) -> None:
        """Wait for background volume work (create, delete) to finish."""
        await self.app.state.work.idle()

    async def create_volume(self, size: int = 1, *, volume_type: str | None = None, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"size": size, **fields}
        if volume_type:
            body["volume_type"] = volume_type
        response = await self.post("/volumes", {"volume": body})
        assert response.status_code == 202, response.text
        await self.settle()
        shown = await self.get(f"/volumes/{response.json()['volume']['id']}")
        assert shown.status_code == 200, shown.text
        return shown.json()["volume"]  # type: ignore[no-any-return]

    async def volume(self, volume_id: str) -> dict[str, Any]:
        response = await self.get(f"/volumes/{volume_id}")
        assert response.status_code == 200, response.text
        return response.json()["volume"]  # type: ignore[no-any-return]

    async def multiattach_type(self) -> str:
        """A volume type (created by an admin) whose volumes are multiattach."""
        admin = self.as_(user="admin")
        name = f"multi-{uuid.uuid4().hex[:8]}"
        response = await admin.post(
            "/types", {"volume_type": {"name": name, "extra_specs": {"multiattach": "<is> True"}}}
        )
        assert response.status_code == 200, response.text
        return name


def fault(response: httpx.Response, code: int) -> str:
    """Assert a Cinder-style fault with this code and return its message."""
    assert response.status_code == code, response.text
    body = response.json()
    assert len(body) == 1, body
    (detail,) = body.values()
    assert detail["code"] == code
    assert isinstance(detail["message"], str)
    assert detail["message"]
    return str(detail["message"])


@pytest.fixture
def tether_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog on "tether", which does not propagate to the root logger (pytest attaches caplog to such loggers
    itself only when they existed before the test phase began; adding the same handler twice is a no-op), at INFO."""
    logger = logging.getLogger("tether")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.DEBUG)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield caplog
    finally:
        logger.setLevel(previous)
        logger.removeHandler(caplog.handler)


@pytest.fixture
def project() -> str:
    return f"p{uuid.uuid4().hex[:12]}"


@pytest.fixture
def api(client: httpx.AsyncClient, app: Any, project: str) -> Api:
    return Api(client, app, project)


# -- the real server process ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    base: str
    process: subprocess.Popen[bytes]
    env: dict[str, str]
    log: Path

    @property
    def endpoint(self) -> str:
        return f"{self.base}/v3"


class LiveCaller:
    """One user in one project speaking 3.71 to a live server over plain HTTP (synchronous)."""

    name_prefix = "live"

    def __init__(self, server: Server, project: str, user: str = "alice", *, timeout: float = 60) -> None:
        self.server = server
        self.project = project
        self.user = user
        self.http = httpx.Client(
            base_url=f"{server.endpoint}/{project}",
            headers={"X-Auth-Token": f"{user}:{project}", "OpenStack-API-Version": "volume 3.71"},
            timeout=timeout,
        )

    def close(self) -> None:
        self.http.close()

    def ok(self, method: str, path: str, body: Any = None, *, status: int = 200) -> Any:
        response = self.http.request(method, path, json=body)
        assert response.status_code == status, f"{method} {path}: {response.status_code} {response.text}"
        return response.json() if response.content else None

    def create_volume(self, volume_type: str | None = None, *, size: int = 1) -> dict[str, Any]:
        body: dict[str, Any] = {"size": size, "name": f"{self.name_prefix}-{uuid.uuid4().hex[:6]}"}
        if volume_type:
            body["volume_type"] = volume_type
        volume_id = self.ok("POST", "/volumes", {"volume": body}, status=202)["volume"]["id"]
        return self.wait_volume(volume_id, "available")

    def volume(self, volume_id: str) -> dict[str, Any]:
        return self.ok("GET", f"/volumes/{volume_id}")["volume"]  # type: ignore[no-any-return]

    def wait_volume(self, volume_id: str, status: str) -> dict[str, Any]:
        deadline = time.monotonic() + 20
        while True:
            volume = self.volume(volume_id)
            if volume["status"] == status:
                return volume
            assert volume["status"] not in ("error", "error_deleting"), volume
            assert time.monotonic() < deadline, f"volume {volume_id} stuck in {volume['status']}"
            time.sleep(0.05)

    def attachment(self, attachment_id: str) -> dict[str, Any]:
        return self.ok("GET", f"/attachments/{attachment_id}")["attachment"]  # type: ignore[no-any-return]


def start_server(tmp: Path, env_overrides: dict[str, str] | None = None, workers: int = 1) -> Server:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update(
        {
            "TETHER_DATABASE_URL": f"sqlite+aiosqlite:///{tmp}/server.db",
            "TETHER_LOG_LEVEL": "INFO",
            "TETHER_NODE_NAME": "tether",
        }
    )
    env.update(env_overrides or {})
    log = tmp / f"server-{port}.log"
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "tether"), "serve", "--port", str(port), "--workers", str(workers)],
        cwd=tmp,
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        # its own process group: killing the server kills its workers too (a killed supervisor's workers
        # live on as orphans, heartbeating into a database that is gone, and load the machine for the rest)
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tether serve exited: {log.read_text()}")
        try:
            if httpx.get(f"{base}/healthcheck", timeout=1).status_code == 200:
                return Server(base, process, env, log)
        except httpx.HTTPError:
            time.sleep(0.1)
    _kill_group(process)
    raise RuntimeError(f"tether serve did not start: {log.read_text()}")


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the server and every worker it started (they share its process group); called while the server
    is not reaped yet, so its group id is still its own."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        _kill_group(server.process)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = start_server(tmp_path)
    yield running
    stop_server(running)
