"""Parsing the OpenStack-API-Version header."""

import pytest

from app import microversions
from app.errors import BadRequest, NotAcceptable
from app.microversions import APIVersion


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, (3, 0)),
        ("volume 3.27", (3, 27)),
        ("VOLUME 3.71", (3, 71)),
        ("volume latest", (3, 71)),
        ("compute 2.1, volume 3.44", (3, 44)),
        ("volume  3.5 ", (3, 5)),
    ],
)
def test_accepted(header: str | None, expected: tuple[int, int]) -> None:
    assert microversions.from_header(header) == APIVersion(*expected)


@pytest.mark.parametrize("header", ["volume 3", "volume 3.x", "volume 3.01", "garbage", "compute 2.1", "volume", ""])
def test_malformed_is_400(header: str) -> None:
    with pytest.raises(BadRequest):
        microversions.from_header(header)


@pytest.mark.parametrize("header", ["volume 2.0", "volume 3.72", "volume 4.0"])
def test_out_of_range_is_406(header: str) -> None:
    with pytest.raises(NotAcceptable) as caught:
        microversions.from_header(header)
    version = header.split()[1]
    assert caught.value.message == (
        f"Version {version} is not supported by the API. Minimum is 3.0 and maximum is 3.71."
    )


def test_versions_order_numerically() -> None:
    assert APIVersion(3, 9) < APIVersion(3, 10) < APIVersion(3, 27)
    assert str(APIVersion.parse("3.44")) == "3.44"
