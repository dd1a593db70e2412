"""Core statements compiled once per dialect and run on the DBAPI cursor of a SQLAlchemy
transaction: on the per-instance and per-message paths, building and compiling a statement cost
more than SQLite took to run it (0.4 ms a statement against 30 µs; benchmarks/dicom.py).

The statement is still written in SQLAlchemy Core, so the SQL and its types stay in one place;
only the work SQLAlchemy repeats on every call is done once here. Values go through each bind's
type processor, so a row written here reads back as one SQLAlchemy wrote.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from sqlalchemy import Connection, Dialect
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler


class Compiled:
    """One statement ready for a dialect's cursor: its SQL text, its binds in the order the
    paramstyle wants, and the converters of the binds whose type needs one (DateTime on SQLite)."""

    def __init__(self, statement: ClauseElement, dialect: Dialect, columns: Sequence[str] | None = None) -> None:
        compiled = cast(
            SQLCompiler, statement.compile(dialect=dialect, column_keys=list(columns) if columns is not None else None)
        )
        if "POSTCOMPILE" in compiled.string:
            raise ValueError(f"an IN list is expanded per execution, which this does not do: {compiled.string}")
        self.sql = compiled.string
        self._names: Sequence[str] | None = compiled.positiontup
        self._processors: dict[str, Callable[[Any], Any]] = {}
        # Binds the statement holds a value for (a LIMIT, a literal) need none from the caller.
        self._fixed: dict[str, Any] = {}
        required = set()
        for bind, name in compiled.bind_names.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self._processors[name] = processor
            if bind.required:
                required.add(name)
            else:
                self._fixed[name] = bind.effective_value
        self._binds = frozenset(required)

    def parameters(self, values: Mapping[str, Any]) -> Sequence[Any] | Mapping[str, Any]:
        if missing := self._binds.difference(values):  # a default SQLAlchemy would have filled in
            raise ValueError(f"no value for {', '.join(sorted(missing))} in: {self.sql}")
        given = {**self._fixed, **values} if self._fixed else values
        processed = {
            name: self._processors[name](value) if name in self._processors else value for name, value in given.items()
        }
        if self._names is None:
            return processed
        return tuple(processed[name] for name in self._names)


def run(connection: Connection, statement: ClauseElement, values: Mapping[str, Any]) -> Any:
    """Execute `statement` (a module constant: compiled once per dialect) with `values`; the
    DBAPI cursor, for its rows. An INSERT binds exactly the columns `values` names."""
    compiled = _compiled(connection.dialect, statement, tuple(values) if _is_insert(statement) else None)
    parameters = compiled.parameters(values)
    cursor = connection.connection.cursor()
    try:
        cursor.execute(compiled.sql, parameters)
    except connection.dialect.loaded_dbapi.Error as error:
        cursor.close()
        raise _wrapped(connection, compiled.sql, parameters, error) from error
    return cursor


def first(connection: Connection, statement: ClauseElement, values: Mapping[str, Any]) -> Any:
    """The first row `statement` gives, or None."""
    cursor = run(connection, statement, values)
    try:
        return cursor.fetchone()
    finally:
        cursor.close()


def run_many(connection: Connection, statement: ClauseElement, rows: Sequence[Mapping[str, Any]]) -> None:
    """Execute `statement` once for each of `rows`, which all name the same columns."""
    if not rows:
        return
    compiled = _compiled(connection.dialect, statement, tuple(rows[0]) if _is_insert(statement) else None)
    parameters = [compiled.parameters(row) for row in rows]
    cursor = connection.connection.cursor()
    try:
        cursor.executemany(compiled.sql, parameters)  # type: ignore[arg-type]
    except connection.dialect.loaded_dbapi.Error as error:
        raise _wrapped(connection, compiled.sql, parameters, error) from error
    finally:
        cursor.close()


def _wrapped(connection: Connection, sql: str, parameters: Any, error: Exception) -> StatementError:
    """The driver's error as SQLAlchemy would have raised it (IntegrityError, OperationalError…),
    so that callers tell a duplicate key or a locked database apart as they always did."""
    return DBAPIError.instance(
        sql, parameters, error, connection.dialect.loaded_dbapi.Error, dialect=connection.dialect
    )


_cache: dict[tuple[str, int, tuple[str, ...] | None], Compiled] = {}


def _compiled(dialect: Dialect, statement: ClauseElement, columns: tuple[str, ...] | None) -> Compiled:
    key = (dialect.name, id(statement), columns)
    found = _cache.get(key)
    if found is None:
        # A race builds it twice; both are equal.
        found = _cache[key] = Compiled(statement, dialect, columns)
    return found


def _is_insert(statement: ClauseElement) -> bool:
    return getattr(statement, "is_insert", False) is True
