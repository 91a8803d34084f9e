"""List queries shared by volumes and attachments: filters, sort keys, keyset pagination, counts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, false, or_
from sqlalchemy.sql.elements import ColumnElement

from app.auth import Context
from app.errors import InvalidInput
from app.microversions import FILTERS_STRICT, APIVersion

MAX_LIMIT = 1000
# LIMIT and OFFSET are 64-bit integers in both databases; a larger number is an error there, not an empty page
MAX_NUMBER = 2**63 - 1
PAGING_KEYS = frozenset({"limit", "marker", "sort", "sort_key", "sort_dir", "offset", "with_count"})
TRUE_WORDS = frozenset({"1", "true", "yes", "on", "t", "y"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", "f", "n"})


def parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    raise InvalidInput(f"Invalid value '{value}' for {name}: it must be a boolean.")


@dataclass
class ListParams:
    limit: int | None = None
    marker: str | None = None
    offset: int = 0
    sort: list[tuple[str, str]] = field(default_factory=list)
    with_count: bool = False
    all_tenants: bool = False
    filters: dict[str, str] = field(default_factory=dict)


T = TypeVar("T")


@dataclass
class Page(Generic[T]):
    items: list[T]
    limit: int
    count: int | None = None

    @property
    def full(self) -> bool:
        return len(self.items) >= self.limit


def _int(name: str, value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise InvalidInput(f"Invalid {name} '{value}': it must be an integer.") from None
    if number < minimum:
        raise InvalidInput(f"Invalid {name} '{value}': it must be at least {minimum}.")
    if number > MAX_NUMBER:
        raise InvalidInput(f"Invalid {name} '{value}': it must be at most {MAX_NUMBER}.")
    return number


def parse_list_params(
    query: Mapping[str, str],
    *,
    ctx: Context,
    version: APIVersion,
    filters: frozenset[str],
    sort_keys: frozenset[str],
    count_allowed: bool,
) -> ListParams:
    params = ListParams()
    if "limit" in query:
        params.limit = _int("limit", query["limit"], 0)
    if "offset" in query:
        params.offset = _int("offset", query["offset"], 0)
    params.marker = query.get("marker") or None
    if "sort" in query and ("sort_key" in query or "sort_dir" in query):
        raise InvalidInput("The 'sort_key' and 'sort_dir' parameters are deprecated and cannot be used with 'sort'.")
    if "sort" in query:
        for item in query["sort"].split(","):
            key, _, direction = item.strip().partition(":")
            params.sort.append((key.strip(), (direction or "desc").strip().lower()))
    elif "sort_key" in query or "sort_dir" in query:
        params.sort.append((query.get("sort_key", "created_at"), query.get("sort_dir", "desc").lower()))
    for key, direction in params.sort:
        if key not in sort_keys:
            raise InvalidInput(f"Invalid sort key '{key}'.")
        if direction not in ("asc", "desc"):
            raise InvalidInput(f"Invalid sort direction '{direction}': it must be 'asc' or 'desc'.")
    if not params.sort:
        params.sort = [("created_at", "desc")]
    if "with_count" in query:
        if count_allowed:
            params.with_count = parse_bool("with_count", query["with_count"])
        elif version >= FILTERS_STRICT:
            raise InvalidInput("Invalid filter keys: with_count")

    unknown: list[str] = []
    for key, value in query.items():
        if key in PAGING_KEYS:
            continue
        if key == "all_tenants":
            if ctx.all_projects:
                params.all_tenants = parse_bool("all_tenants", value)
            continue
        if key in filters or (ctx.all_projects and key == "project_id"):
            params.filters[key] = value
        else:
            unknown.append(key)
    if unknown and version >= FILTERS_STRICT:
        raise InvalidInput(f"Invalid filter keys: {', '.join(sorted(unknown))}")
    return params


def keyset_after(columns: list[tuple[ColumnElement[Any], str]], marker_values: list[Any]) -> ColumnElement[bool]:
    """Rows that sort strictly after the marker row, for any mix of directions."""
    clauses: list[ColumnElement[bool]] = []
    for i, (column, direction) in enumerate(columns):
        value = marker_values[i]
        equal_before = [col == marker_values[j] for j, (col, _) in enumerate(columns[:i])]
        beyond = column > value if direction == "asc" else column < value
        clauses.append(and_(*equal_before, beyond))
    return or_(false(), *clauses)


def apply_order(stmt: Select[Any], columns: list[tuple[ColumnElement[Any], str]]) -> Select[Any]:
    return stmt.order_by(*[col.asc() if d == "asc" else col.desc() for col, d in columns])
