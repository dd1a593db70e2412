"""Modality Performed Procedure Steps as received, and the listing `fabricatord mpps` shows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update

from fabricatord.db.engine import Database
from fabricatord.db.models import PerformedStep

_COLUMNS = (
    "sop_instance_uid",
    "status",
    "calling_ae",
    "performed_station_ae",
    "modality",
    "study_instance_uid",
    "accession_number",
    "sps_ids",
    "started",
    "ended",
)


@dataclass(frozen=True)
class PerformedRecord:
    sop_instance_uid: str
    status: str
    calling_ae: str
    performed_station_ae: str
    modality: str
    study_instance_uid: str
    accession_number: str
    sps_ids: str
    started: str
    ended: str


_FIND = select(PerformedStep.attributes).where(PerformedStep.sop_instance_uid == bindparam("uid"))


class PerformedSteps:
    def __init__(self, database: Database) -> None:
        self._db = database

    @staticmethod
    def attributes(connection: Connection, sop_instance_uid: str) -> str | None:
        """The stored object as DICOM JSON; None for an unknown SOP Instance UID."""
        return connection.execute(_FIND, {"uid": sop_instance_uid}).scalar_one_or_none()

    @staticmethod
    def add(connection: Connection, record: PerformedRecord, attributes: str) -> None:
        now = datetime.now(UTC)
        connection.execute(
            insert(PerformedStep),
            {**record.__dict__, "attributes": attributes, "created_at": now, "updated_at": now},
        )

    @staticmethod
    def replace(connection: Connection, record: PerformedRecord, attributes: str) -> None:
        values: dict[str, Any] = {name: getattr(record, name) for name in _COLUMNS if name != "calling_ae"}
        connection.execute(
            update(PerformedStep)
            .where(PerformedStep.sop_instance_uid == record.sop_instance_uid)
            .values(**values, attributes=attributes, updated_at=datetime.now(UTC))
        )

    def recent(self, limit: int = 50, status: str = "") -> list[PerformedRecord]:
        """Newest first."""
        statement = select(*(getattr(PerformedStep, name) for name in _COLUMNS)).order_by(PerformedStep.id.desc())
        if status:
            statement = statement.where(PerformedStep.status == status)
        with self._db.engine.connect() as connection:
            return [PerformedRecord(*row) for row in connection.execute(statement.limit(limit))]
