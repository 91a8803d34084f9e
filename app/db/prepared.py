"""The attach cycle's hot statements on the driver's own connection (PostgreSQL, issue 17).

A statement here is still written once, as a SQLAlchemy Core statement on the tables; `Prepared` compiles it once,
for the asyncpg dialect, into the SQL text SQLAlchemy itself would send, and runs it with asyncpg's `fetch` on a
connection checked out of the engine's own pool. What it leaves out is SQLAlchemy's execution layer around each
statement (the session, its transaction bookkeeping, the execution context, the result objects): on this kind of
machine ~0.25 ms of CPU per statement, as much as the round trip itself (`benchmarks/statement_cost.py`). The
column types' own conversions (UTC datetimes, arrays) are applied as SQLAlchemy would apply them.

Only the few statements of the cycle's common case run this way; SQLite and every other path use the session.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

_DIALECT = asyncpg_dialect()  # type: ignore[no-untyped-call]
Processor = Callable[[Any], Any] | None


def _impl(type_: Any) -> Any:
    """The type as the dialect runs it (asyncpg's own variants of some), whose conversions SQLAlchemy applies."""
    return type_.dialect_impl(_DIALECT)


class Prepared:
    """A Core statement compiled once for asyncpg; `rows()` runs it and gives its rows as named tuples."""

    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement
        compiled = cast(SQLCompiler, statement.compile(dialect=_DIALECT))
        if compiled.post_compile_params or compiled.literal_execute_params:
            # an IN list's or a literal's parameters are rendered into the SQL on each execution, by SQLAlchemy
            raise ValueError("a statement with parameters rendered per execution cannot be prepared once")
        self.sql: str = compiled.string
        # each positional parameter: its name, whether the caller must give it, the value written into the statement
        # (its literal statuses and flags), the type's conversion
        self._params: list[tuple[str, bool, Any, Processor]] = []
        for name in compiled.positiontup or []:
            bind = compiled.binds[name]
            self._params.append((name, bind.required, bind.effective_value, _impl(bind.type).bind_processor(_DIALECT)))
        columns: Sequence[Any] = getattr(statement, "exported_columns", ())
        self._results: list[Processor] = [_impl(column.type).result_processor(_DIALECT, None) for column in columns]
        self._convert = any(p is not None for p in self._results)
        self._row: Any = namedtuple("Row", [column.key for column in columns], rename=True)  # type: ignore[misc]

    def args(self, values: Mapping[str, Any]) -> list[Any]:
        out = []
        for name, required, fixed, process in self._params:
            if name in values:
                value = values[name]
            elif required:
                raise KeyError(f"the statement needs a value for {name!r}")
            else:
                value = fixed
            out.append(process(value) if process is not None and value is not None else value)
        return out

    async def rows(self, on: AsyncSession | Any, values: Mapping[str, Any]) -> list[Any]:
        """The statement's rows (named tuples, in its column order), run on `on`: a session's statement inside its
        transaction goes through the session; an asyncpg connection (Database.statements()) runs it directly."""
        args = self.args(values)  # a missing value refused here, on either path
        if isinstance(on, AsyncSession):
            return [self._row._make(row) for row in (await on.execute(self.statement, values)).all()]
        records = await on.fetch(self.sql, *args)
        if not self._convert:
            return [self._row._make(record) for record in records]
        return [
            self._row._make(
                p(v) if p is not None and v is not None else v for p, v in zip(self._results, record, strict=True)
            )
            for record in records
        ]
