"""Microversions: parsing the OpenStack-API-Version header and the versions that change what we serve."""

from __future__ import annotations

import re
from typing import NamedTuple

from app.errors import BadRequest, NotAcceptable

HEADER = "OpenStack-API-Version"
SERVICE = "volume"


class APIVersion(NamedTuple):
    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> APIVersion:
        match = _VERSION.match(text)
        if not match:
            raise BadRequest(f"Invalid API version request: {text!r}. A version looks like 3.27.")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


# at most 9 digits a part: a longer number is garbage, and int() refuses past 4300 digits (a ValueError, not a 400)
_VERSION = re.compile(r"^([1-9]\d{0,8})\.(0|[1-9]\d{0,8})$")

MIN = APIVersion(3, 0)
MAX = APIVersion(3, 71)

FILTERS_STRICT = APIVersion(3, 31)  # unknown list filters are a 400 from here on
NEW_ATTACH = APIVersion(3, 27)
NEW_ATTACH_COMPLETION = APIVersion(3, 44)
SUPPORT_COUNT_INFO = APIVersion(3, 45)
SHARED_TARGETS_AND_SERVICE_FIELDS = APIVersion(3, 48)
SUPPORT_VOLUME_SCHEMA_CHANGES = APIVersion(3, 53)
ATTACHMENT_CREATE_MODE_ARG = APIVersion(3, 54)
VOLUME_TYPE_ID_IN_VOLUME_DETAIL = APIVersion(3, 63)
USE_QUOTA = APIVersion(3, 65)
SHARED_TARGETS_TRISTATE = APIVersion(3, 69)


def from_header(value: str | None) -> APIVersion:
    """The version a request asks for; 400 when malformed, 406 when outside MIN..MAX."""
    if value is None:
        return MIN
    wanted: str | None = None
    for part in value.split(","):
        words = part.strip().split()
        if len(words) == 2 and words[0].lower() == SERVICE:
            wanted = words[1]
        elif len(words) == 1 and words[0].lower() == SERVICE:
            raise BadRequest(f"Invalid {HEADER} header: no version given for '{SERVICE}'.")
    if wanted is None:
        raise BadRequest(f"Invalid {HEADER} header {value!r}: it must name the '{SERVICE}' service.")
    if wanted.lower() == "latest":
        return MAX
    version = APIVersion.parse(wanted)
    if not MIN <= version <= MAX:
        raise NotAcceptable(f"Version {version} is not supported by the API. Minimum is {MIN} and maximum is {MAX}.")
    return version
