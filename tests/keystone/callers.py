"""A caller with a real Keystone token, speaking 3.71 to the in-process app; and what each test makes with it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.api.attaching import connector
from tests.keystone.keystone import User


@dataclass
class Caller:
    client: httpx.AsyncClient
    user: User
    token: str = ""
    service_token: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.token = self.token or self.user.token

    def with_service(self, service_token: str) -> Caller:
        return Caller(self.client, self.user, self.token, service_token, dict(self.extra))

    def headers(self) -> dict[str, str]:
        headers = {"X-Auth-Token": self.token, "OpenStack-API-Version": "volume 3.71", **self.extra}
        if self.service_token:
            headers["X-Service-Token"] = self.service_token
        return headers

    def url(self, path: str) -> str:
        return f"/v3/{self.user.project_id}{path}"

    async def get(self, path: str) -> httpx.Response:
        return await self.client.get(self.url(path), headers=self.headers())

    async def post(self, path: str, body: Any = None) -> httpx.Response:
        return await self.client.post(self.url(path), json=body, headers=self.headers())

    async def put(self, path: str, body: Any = None) -> httpx.Response:
        return await self.client.put(self.url(path), json=body, headers=self.headers())

    async def delete(self, path: str) -> httpx.Response:
        return await self.client.delete(self.url(path), headers=self.headers())

    async def action(self, volume_id: str, name: str, value: Any = None) -> httpx.Response:
        return await self.post(f"/volumes/{volume_id}/action", {name: value})

    async def create_volume(self, app: Any) -> dict[str, Any]:
        response = await self.post("/volumes", {"volume": {"size": 1, "name": f"ks-{uuid.uuid4().hex[:6]}"}})
        assert response.status_code == 202, response.text
        await app.state.work.idle()
        shown = await self.get(f"/volumes/{response.json()['volume']['id']}")
        assert shown.status_code == 200, shown.text
        assert shown.json()["volume"]["status"] == "available"
        return shown.json()["volume"]  # type: ignore[no-any-return]

    async def attach(self, volume_id: str, *, instance: str | None = None, host: str = "compute1") -> dict[str, Any]:
        """Nova's way: reserve for the instance, connect, complete; the attachment as it then is."""
        body: dict[str, Any] = {"volume_uuid": volume_id}
        if instance is not None:
            body["instance_uuid"] = instance
        created = await self.post("/attachments", {"attachment": body})
        assert created.status_code == 200, created.text
        attachment_id = created.json()["attachment"]["id"]
        connected = await self.put(f"/attachments/{attachment_id}", {"attachment": {"connector": connector(host)}})
        assert connected.status_code == 200, connected.text
        completed = await self.post(f"/attachments/{attachment_id}/action", {"os-complete": None})
        assert completed.status_code == 204, completed.text
        shown = await self.get(f"/attachments/{attachment_id}")
        assert shown.status_code == 200, shown.text
        return shown.json()["attachment"]  # type: ignore[no-any-return]
