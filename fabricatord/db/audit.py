"""The transaction log: associations and DIMSE operations, appended in batches, read by `fabricatord audit`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from sqlalchemy import insert, select

from fabricatord.db.engine import Database
from fabricatord.db.models import AuditEvent


@dataclass(frozen=True)
class AuditRecord:
    at: datetime
    operation: str
    association: str = ""
    calling_ae: str = ""
    called_ae: str = ""
    peer_address: str = ""
    status: str = ""
    instances: int = 0
    bytes: int = 0
    seconds: float = 0.0
    detail: str = ""
    username: str = ""
    """The console or API user who took the action."""


class AuditLog:
    def __init__(self, database: Database) -> None:
        self._db = database

    def append(self, records: Sequence[AuditRecord]) -> None:
        if records:
            with self._db.writes.begin() as session:
                session.execute(insert(AuditEvent), [asdict(record) for record in records])

    def search(
        self,
        operation: str = "",
        calling_ae: str = "",
        association: str = "",
        since: datetime | None = None,
        failures_only: bool = False,
        limit: int = 100,
        username: str = "",
    ) -> list[AuditRecord]:
        """The newest events first, filtered."""
        statement = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        if operation:
            statement = statement.where(AuditEvent.operation == operation.upper())
        if calling_ae:
            statement = statement.where(AuditEvent.calling_ae == calling_ae)
        if association:
            statement = statement.where(AuditEvent.association == association)
        if username:
            statement = statement.where(AuditEvent.username == username)
        if since is not None:
            statement = statement.where(AuditEvent.at >= since)
        if failures_only:
            statement = statement.where(AuditEvent.status.not_in(("0x0000", "released")))
        with self._db.reads() as session:
            return [
                AuditRecord(
                    at=row.at if row.at.tzinfo else row.at.replace(tzinfo=UTC),  # SQLite keeps no zone
                    operation=row.operation,
                    association=row.association,
                    calling_ae=row.calling_ae,
                    called_ae=row.called_ae,
                    peer_address=row.peer_address,
                    status=row.status,
                    instances=row.instances,
                    bytes=row.bytes,
                    seconds=row.seconds,
                    detail=row.detail,
                    username=row.username,
                )
                for row in session.scalars(statement)
            ]
