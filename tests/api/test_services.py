"""GET /os-services, as `cinder service-list` reads it: the embedded node and the API host, up by heartbeat."""

from datetime import datetime, timedelta

from sqlalchemy import update

from app.db.models import Service, utcnow
from tests.conftest import Api, fault


async def test_admin_sees_the_embedded_node_and_the_api_host_up(api: Api) -> None:
    response = await api.as_(user="admin").get("/os-services")
    assert response.status_code == 200, response.text
    services = {(s["binary"], s["host"]): s for s in response.json()["services"]}
    node = services[("cinder-volume", "tether@default")]
    assert node["zone"] == "nova"
    assert node["status"] == "enabled"
    assert node["state"] == "up"
    assert node["disabled_reason"] is None
    assert datetime.fromisoformat(node["updated_at"]) > datetime.now() - timedelta(minutes=1)  # naive UTC, as Cinder
    assert any(binary == "cinder-scheduler" for binary, _ in services)


async def test_filters_by_binary_and_host(api: Api) -> None:
    admin = api.as_(user="admin")
    volumes = (await admin.get("/os-services?binary=cinder-volume")).json()["services"]
    assert {s["binary"] for s in volumes} == {"cinder-volume"}
    one = (await admin.get("/os-services?host=tether@default")).json()["services"]
    assert [(s["binary"], s["host"]) for s in one] == [("cinder-volume", "tether@default")]


async def test_a_node_whose_heartbeat_is_old_is_down(api: Api) -> None:
    async with api.app.state.db.write() as session:
        await session.execute(
            update(Service)
            .where(Service.name == "tether", Service.binary == "cinder-volume")  # type: ignore[arg-type]
            .values(heartbeat_at=utcnow() - timedelta(seconds=120))
        )
    try:
        services = (await api.as_(user="admin").get("/os-services?binary=cinder-volume")).json()["services"]
        assert [s["state"] for s in services if s["host"] == "tether@default"] == ["down"]
    finally:
        await api.app.state.nodes.heartbeat({"binary": "cinder-volume", "name": "tether", "availability_zone": "nova"})


async def test_members_are_refused(api: Api) -> None:
    fault(await api.get("/os-services"), 403)
