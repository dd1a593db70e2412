"""The HL7 message log: every message raw with its ACK, and the resend look-up."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, or_, select, update

from fabricatord.db import raw
from fabricatord.db.engine import Database
from fabricatord.db.models import Hl7Message, Hl7MessageOrder

SETTLED = ("AA", "AE")
"""Outcomes a resend must get again unchanged; an AR may be retried (HL7 v2 §2.9.2)."""


@dataclass(frozen=True)
class LoggedMessage:
    id: int
    received_at: datetime
    peer: str
    sending_application: str
    sending_facility: str
    control_id: str
    message_type: str
    version: str
    profile: str
    outcome: str
    error: str
    detail: str
    raw: bytes
    ack: bytes


_SETTLED = (
    select(Hl7Message.ack, Hl7Message.outcome)
    .where(
        Hl7Message.sending_application == bindparam("application"),
        Hl7Message.sending_facility == bindparam("facility"),
        Hl7Message.control_id == bindparam("control_id"),
        or_(*(Hl7Message.outcome == outcome for outcome in SETTLED)),
    )
    .order_by(Hl7Message.id)
    .limit(1)
)
_INSERT = insert(Hl7Message).returning(Hl7Message.id)
_LINK = insert(Hl7MessageOrder).inline()
_DESCRIBE = update(Hl7Message).where(Hl7Message.id == bindparam("pk")).values(detail=bindparam("detail"))


def _logged(row: Hl7Message) -> LoggedMessage:
    return LoggedMessage(**{name: getattr(row, name) for name in LoggedMessage.__dataclass_fields__})


class MessageLog:
    def __init__(self, database: Database) -> None:
        self._db = database

    @staticmethod
    def settled(
        connection: Connection, sending_application: str, sending_facility: str, control_id: str
    ) -> tuple[bytes, str] | None:
        """The ACK and outcome (AA or AE) of the settled message with this sender and control ID."""
        row = raw.first(
            connection,
            _SETTLED,
            {"application": sending_application, "facility": sending_facility, "control_id": control_id},
        )
        return None if row is None else (row[0], row[1])

    @staticmethod
    def add(connection: Connection, values: dict[str, Any]) -> int:
        """Keep a message in the caller's transaction; its key, for the orders it makes."""
        return int(raw.first(connection, _INSERT, values)[0])

    @staticmethod
    def link(connection: Connection, message_pk: int, order_pks: Iterable[int]) -> None:
        """The orders a message made or changed, in the caller's transaction."""
        rows = [{"message_pk": message_pk, "order_pk": pk} for pk in dict.fromkeys(order_pks)]
        if rows:
            raw.run_many(connection, _LINK, rows)

    @staticmethod
    def describe(connection: Connection, pk: int, detail: str) -> None:
        """What the message did, once it has done it."""
        raw.run(connection, _DESCRIBE, {"pk": pk, "detail": detail}).close()

    def recent(
        self,
        limit: int = 50,
        outcome: str = "",
        control_id: str = "",
        since: datetime | None = None,
    ) -> list[LoggedMessage]:
        """Newest first."""
        statement = select(Hl7Message).order_by(Hl7Message.id.desc()).limit(limit)
        if outcome:
            statement = statement.where(Hl7Message.outcome == outcome)
        if control_id:
            statement = statement.where(Hl7Message.control_id == control_id)
        if since is not None:
            statement = statement.where(Hl7Message.received_at >= since)
        with self._db.reads() as session:
            return [_logged(row) for row in session.scalars(statement)]

    def get(self, pk: int) -> LoggedMessage | None:
        with self._db.reads() as session:
            row = session.get(Hl7Message, pk)
            return _logged(row) if row else None
