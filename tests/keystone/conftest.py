"""The session's Keystone (started once; under CI=true one that cannot start fails the tests, elsewhere they
are skipped), its users, and the app in keystone mode against it."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import make_settings, missing
from tests.keystone.keystone import PASSWORD, VENV, Cloud, Keystone, make_cloud


@pytest.fixture(scope="session")
def keystone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keystone]:
    if not (VENV / "bin" / "gunicorn").exists():
        missing(f"{VENV} is missing: run scripts/client-venvs")
    running = Keystone(tmp_path_factory.mktemp("keystone"))
    try:
        running.install()
        running.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        running.stop()
        missing(f"Keystone cannot start: {error}")
    yield running
    running.stop()


@pytest.fixture(scope="session")
def cloud(keystone: Keystone) -> Iterator[Cloud]:
    with httpx.Client(timeout=30) as http:
        yield make_cloud(keystone, http)


def keystone_settings(database_url: str, cloud: Cloud, **overrides: Any) -> Any:
    """Settings of an app in keystone mode against the test Keystone, validating as the user `tether`."""
    values: dict[str, Any] = {
        "auth": "keystone",
        "keystone_auth_url": cloud.url,
        "keystone_username": "tether",
        "keystone_password": PASSWORD,
        "keystone_project_name": "service",
    }
    values.update(overrides)
    return make_settings(database_url, **values)


@pytest.fixture
async def keystone_app(sqlite_url: str, cloud: Cloud, settings_overrides: dict[str, Any]) -> AsyncIterator[Any]:
    """The app in keystone mode (SQLite: what differs here is who calls, not where rows go)."""
    from app.main import create_app

    application = create_app(keystone_settings(sqlite_url, cloud, **settings_overrides))
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def kclient(keystone_app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=keystone_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tether.test") as c:
        yield c
