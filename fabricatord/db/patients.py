"""The patient registry: synthetic patients, reused by Patient ID."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fabricatord.db import raw
from fabricatord.db.engine import Database, hold_keys, patient_key
from fabricatord.db.models import Instance, Patient, Series, Study


@dataclass(frozen=True)
class PatientRecord:
    patient_id: str
    issuer: str
    name: str
    birth_date: str
    sex: str
    address: str = ""
    phone: str = ""


@dataclass(frozen=True)
class PatientSummary:
    patient: PatientRecord
    studies: int
    instances: int


@dataclass(frozen=True)
class RegistryStats:
    patients: int
    by_sex: dict[str, int]
    studies: int
    instances: int


_COLUMNS = ("patient_id", "issuer", "name", "birth_date", "sex", "address", "phone")
_FIND = select(Patient.id, *(getattr(Patient, name) for name in _COLUMNS)).where(
    Patient.patient_id == bindparam("id"), Patient.issuer == bindparam("issuer")
)
_INSERT = insert(Patient).returning(Patient.id)


def _record(row: Patient) -> PatientRecord:
    return PatientRecord(row.patient_id, row.issuer, row.name, row.birth_date, row.sex, row.address, row.phone)


class PatientRegistry:
    def __init__(self, database: Database) -> None:
        self._db = database

    def get(self, patient_id: str, issuer: str) -> PatientRecord | None:
        with self._db.reads() as session:
            row = self._find(session, patient_id, issuer)
            return _record(row) if row else None

    def add(self, patient: PatientRecord) -> PatientRecord:
        """Insert `patient`, or return the one already registered under its ID and issuer."""
        try:
            with self._db.writes.begin() as session:
                existing = self._find(session, patient.patient_id, patient.issuer)
                if existing is not None:
                    return _record(existing)
                session.add(Patient(**patient.__dict__, synthetic=True))
        except IntegrityError:  # another process added it between our look-up and insert
            found = self.get(patient.patient_id, patient.issuer)
            if found is None:
                raise
            return found
        return patient

    def page(self, limit: int = 50, offset: int = 0) -> list[PatientRecord]:
        with self._db.reads() as session:
            rows = session.scalars(select(Patient).order_by(Patient.id).limit(limit).offset(offset))
            return [_record(r) for r in rows]

    def search(self, text: str, limit: int = 50) -> list[PatientRecord]:
        """Patients whose ID or name contains `text`, case-insensitively; `*` and `?` are wildcards."""
        like = "%" + text.replace("*", "%").replace("?", "_") + "%"
        with self._db.reads() as session:
            rows = session.scalars(
                select(Patient)
                .where(or_(Patient.patient_id.ilike(like), Patient.name.ilike(like)))
                .order_by(Patient.id)
                .limit(limit)
            )
            return [_record(r) for r in rows]

    def summary(self, patient_id: str, issuer: str | None = None) -> list[PatientSummary]:
        with self._db.reads() as session:
            query = select(Patient).where(Patient.patient_id == patient_id)
            if issuer is not None:
                query = query.where(Patient.issuer == issuer)
            result = []
            for row in session.scalars(query):
                studies = session.scalar(select(func.count(Study.id)).where(Study.patient_pk == row.id)) or 0
                instances = (
                    session.scalar(
                        select(func.count(Instance.id))
                        .join(Series, Instance.series_pk == Series.id)
                        .join(Study, Series.study_pk == Study.id)
                        .where(Study.patient_pk == row.id)
                    )
                    or 0
                )
                result.append(PatientSummary(_record(row), studies, instances))
            return result

    def stats(self) -> RegistryStats:
        with self._db.reads() as session:
            by_sex = {
                sex or "": n for sex, n in session.execute(select(Patient.sex, func.count()).group_by(Patient.sex))
            }
            return RegistryStats(
                patients=sum(by_sex.values()),
                by_sex=by_sex,
                studies=session.scalar(select(func.count(Study.id))) or 0,
                instances=session.scalar(select(func.count(Instance.id))) or 0,
            )

    # upsert runs once per HL7 message: Core statements built once, on the caller's connection.
    @staticmethod
    def upsert(connection: Connection, patient: PatientRecord) -> int:
        """Register `patient` or update the one with its ID and issuer, in the caller's transaction.

        Empty values leave what is known; `""` (HL7's explicit null) clears it."""
        given = {name: ("" if value == '""' else value) for name, value in patient.__dict__.items() if value}
        found = raw.first(connection, _FIND, {"id": patient.patient_id, "issuer": patient.issuer})
        if found is None:  # a new patient: another process may be registering it too (the index does)
            hold_keys(connection, [patient_key(patient.patient_id, patient.issuer)])
            found = raw.first(connection, _FIND, {"id": patient.patient_id, "issuer": patient.issuer})
        if found is None:
            values = {name: ("" if value == '""' else value) for name, value in patient.__dict__.items()}
            return int(raw.first(connection, _INSERT, {**values, "synthetic": False})[0])
        known = dict(zip(_COLUMNS, found[1:], strict=True))
        changed = {name: value for name, value in given.items() if known[name] != value}
        if changed:
            connection.execute(update(Patient).where(Patient.id == found[0]).values(**changed))
        return int(found[0])

    @staticmethod
    def pk(connection: Connection, patient_id: str, issuer: str) -> int | None:
        found = raw.first(connection, _FIND, {"id": patient_id, "issuer": issuer})
        return int(found[0]) if found else None

    @staticmethod
    def remove(connection: Connection, pk: int) -> None:
        """Forget a patient that nothing refers to any more (the loser of a merge)."""
        connection.execute(delete(Patient).where(Patient.id == pk))

    @staticmethod
    def change_id(connection: Connection, pk: int, patient_id: str, issuer: str) -> None:
        connection.execute(update(Patient).where(Patient.id == pk).values(patient_id=patient_id, issuer=issuer))

    @staticmethod
    def _find(session: Session, patient_id: str, issuer: str) -> Patient | None:
        return session.scalars(
            select(Patient).where(Patient.patient_id == patient_id, Patient.issuer == issuer)
        ).one_or_none()
