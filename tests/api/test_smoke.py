"""The basic life of a volume, on both databases."""

from tests.conftest import Api, fault


async def test_create_show_delete(api: Api) -> None:
    volume = await api.create_volume(2, name="first")
    assert volume["status"] == "available"
    assert volume["size"] == 2
    response = await api.delete(f"/volumes/{volume['id']}")
    assert response.status_code == 202
    await api.settle()
    fault(await api.get(f"/volumes/{volume['id']}"), 404)
