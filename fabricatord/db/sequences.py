"""Persisted counters behind `{Ndigits}`: never reused, never reset, safe across processes."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from fabricatord.db.engine import Database
from fabricatord.db.models import Sequence


class Sequences:
    def __init__(self, database: Database) -> None:
        self._db = database

    def take(self, name: str, start: int, step: int, count: int = 1) -> list[int]:
        """Reserve `count` consecutive values; `start` only matters the first time a counter is used."""
        insert = pg_insert if self._db.dialect == "postgresql" else sqlite_insert
        with self._db.writes.begin() as session:
            session.execute(insert(Sequence).values(name=name, next_value=start).on_conflict_do_nothing())
            # One UPDATE … RETURNING is atomic under both SQLite's write lock and PostgreSQL's row
            # lock, so two processes never read the same value.
            after = session.execute(
                update(Sequence)
                .where(Sequence.name == name)
                .values(next_value=Sequence.next_value + step * count)
                .returning(Sequence.next_value)
            ).scalar_one()
        first = after - step * count
        return [first + step * i for i in range(count)]

    def peek(self, name: str, start: int) -> int:
        """The value the next `take` would return, without taking it."""
        with self._db.reads() as session:
            value = session.execute(select(Sequence.next_value).where(Sequence.name == name)).scalar_one_or_none()
        return start if value is None else value
