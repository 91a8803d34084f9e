"""CHAP secrets at rest: sealed in the database when TETHER_SECRET_KEY is set, never changed for clients.

These tests use a database of their own: rows sealed with a key must not meet apps of other tests that
run without it.
"""

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from app.db.migrate import upgrade
from app.db.models import Attachment, Volume
from app.main import create_app
from tests.conftest import Api, fault, make_settings

KEY = "an operator passphrase for tests"
CONNECTOR = {"initiator": "iqn.1993-08.org.debian:01:atrest", "host": "h1"}


async def stored(api: Api, volume_id: str) -> tuple[str, list[str]]:
    async with api.app.state.db.read() as session:
        auth = (await session.execute(select(Volume.provider_auth).where(Volume.id == volume_id))).scalar_one()
        infos = (
            await session.execute(select(Attachment.connection_info).where(Attachment.volume_id == volume_id))
        ).scalars()
        return auth, [i for i in infos if i]


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path}/sealed.db"
    upgrade(url)
    return url


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"secret_key": KEY}


async def test_secrets_are_sealed_and_clients_see_them_plain(api: Api) -> None:
    volume = await api.create_volume()
    created = await api.post("/attachments", {"attachment": {"volume_uuid": volume["id"], "connector": CONNECTOR}})
    assert created.status_code == 200
    secret = created.json()["attachment"]["connection_info"]["auth_password"]
    assert len(secret) == 16
    auth, infos = await stored(api, volume["id"])
    assert auth.startswith("CHAP ")
    assert " fernet:" in auth
    assert secret not in auth
    assert all(secret not in info for info in infos)
    shown = await api.get(f"/attachments/{created.json()['attachment']['id']}")
    assert shown.json()["attachment"]["connection_info"]["auth_password"] == secret
    assert api.app.state.backends.target.targets[volume["id"]].chap.secret == secret


async def test_secrets_stored_before_the_key_are_sealed_by_reconcile(database_url: str, project: str) -> None:
    import httpx

    plain_app = create_app(make_settings(database_url))
    async with (
        plain_app.router.lifespan_context(plain_app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=plain_app), base_url="http://t") as client,
    ):
        api = Api(client, plain_app, project)
        volume = await api.create_volume()
        body = {"attachment": {"volume_uuid": volume["id"], "connector": CONNECTOR}}
        secret = (await api.post("/attachments", body)).json()["attachment"]["connection_info"]["auth_password"]
        auth, _ = await stored(api, volume["id"])
        assert auth.endswith(f" {secret}")

    sealed_app = create_app(make_settings(database_url, secret_key=KEY, reconcile_on_start=True))
    async with (
        sealed_app.router.lifespan_context(sealed_app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=sealed_app), base_url="http://t") as client,
    ):
        api = Api(client, sealed_app, project)
        auth, infos = await stored(api, volume["id"])
        assert " fernet:" in auth
        assert secret not in auth
        assert infos
        assert all(secret not in info for info in infos)
        listed = await api.get(f"/attachments/detail?volume_id={volume['id']}")
        (attachment,) = listed.json()["attachments"]
        assert attachment["connection_info"]["auth_password"] == secret


async def test_a_server_without_the_key_says_so_instead_of_a_bare_500(api: Api, database_url: str) -> None:
    import httpx

    volume = await api.create_volume()
    created = await api.post("/attachments", {"attachment": {"volume_uuid": volume["id"], "connector": CONNECTOR}})
    attachment_id = created.json()["attachment"]["id"]

    keyless = create_app(make_settings(database_url))  # TETHER_SECRET_KEY lost from the configuration
    async with (
        keyless.router.lifespan_context(keyless),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=keyless), base_url="http://t") as client,
    ):
        shown = await Api(client, keyless, api.project).get(f"/attachments/{attachment_id}")
    assert "check TETHER_SECRET_KEY" in fault(shown, 500)
