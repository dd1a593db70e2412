"""The index of stored instances (studies → series → instances) and the storage intents."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update
from sqlalchemy.orm import InstrumentedAttribute

from fabricatord.db.engine import Database
from fabricatord.db.models import Instance, Patient, Series, StorageIntent, Study


@dataclass(frozen=True)
class IndexEntry:
    """What the index keeps of one instance; plain values, extracted by the DICOM layer."""

    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    sex: str
    study_instance_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    referring_physician_name: str
    series_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    body_part_examined: str
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    transfer_syntax_uid: str
    path: str
    size: int
    digest: str
    source: str
    source_ae: str = ""


@dataclass(frozen=True)
class StoredInstance:
    sop_instance_uid: str
    sop_class_uid: str
    path: str
    size: int
    digest: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class Intent:
    id: int
    sop_instance_uid: str
    path: str


@dataclass(frozen=True)
class StudySummary:
    study_instance_uid: str
    accession_number: str
    patient_id: str
    patient_name: str
    series: int
    instances: int
    size: int


_STORED_COLUMNS = (
    Instance.sop_instance_uid,
    Instance.sop_class_uid,
    Instance.path,
    Instance.size,
    Instance.digest,
    Instance.transfer_syntax_uid,
)


# Built once: on the per-instance path, making statements costs more than running them.
_FIND_INSTANCE = select(*_STORED_COLUMNS).where(Instance.sop_instance_uid == bindparam("uid"))
_FIND_SERIES = select(Series.id).where(Series.series_instance_uid == bindparam("uid"))
_INSERT_INSTANCE = insert(Instance)


IndexedHook = Callable[[Connection, list[IndexEntry]], None]
"""Called in the transaction that indexes instances (the routes queue their jobs there)."""


class InstanceIndex:
    def __init__(self, database: Database, on_indexed: IndexedHook | None = None) -> None:
        self._db = database
        self._on_indexed = on_indexed

    # lookup, add_intents and commit run once per received instance: Core statements on one
    # connection, because the ORM's unit of work cost more than the disk here.
    def lookup(self, sop_instance_uids: Iterable[str]) -> dict[str, StoredInstance]:
        uids = list(sop_instance_uids)
        with self._db.engine.connect() as connection:
            rows = connection.execute(select(*_STORED_COLUMNS).where(Instance.sop_instance_uid.in_(uids)))
            return {row[0]: StoredInstance(*row) for row in rows}

    def insert_unless_known(self, entry: IndexEntry, place: Callable[[], None]) -> StoredInstance | None:
        """In one write transaction: the instance already indexed under `entry`'s SOP Instance UID;
        or else `place()` (which puts its file where `entry.path` says) and its rows, committed.

        One transaction per received instance, where look-up, intent and index took three.
        """
        with self._db.writer.begin() as connection:
            found = connection.execute(_FIND_INSTANCE, {"uid": entry.sop_instance_uid}).first()
            if found is not None:
                return StoredInstance(*found)
            place()
            series_pk = connection.execute(_FIND_SERIES, {"uid": entry.series_instance_uid}).scalar_one_or_none()
            if series_pk is None:  # the first instance of its series: the study is looked up only now
                series_pk = _series_pk(connection, entry, _study_pk(connection, entry))
            connection.execute(_INSERT_INSTANCE, _instance_values(entry, series_pk))
            if self._on_indexed is not None:
                self._on_indexed(connection, [entry])
            return None

    def add_intents(self, entries: Iterable[tuple[str, str]]) -> list[int]:
        """Commit (SOP Instance UID, path) intents before their files are renamed into place."""
        with self._db.writer.begin() as connection:
            return [
                connection.execute(
                    insert(StorageIntent).values(sop_instance_uid=uid, path=path).returning(StorageIntent.id)
                ).scalar_one()
                for uid, path in entries
            ]

    def commit(self, entries: list[IndexEntry], intent_ids: Iterable[int]) -> None:
        """Index `entries` (insert or replace by SOP Instance UID) and retire their intents, atomically."""
        with self._db.writer.begin() as connection:
            studies: dict[str, int] = {}
            series: dict[str, int] = {}
            uids = [entry.sop_instance_uid for entry in entries]
            existing = set(
                connection.execute(
                    select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(uids))
                ).scalars()
            )
            new_rows: list[dict[str, object]] = []
            for entry in entries:
                study_pk = studies.get(entry.study_instance_uid)
                if study_pk is None:
                    study_pk = studies[entry.study_instance_uid] = _study_pk(connection, entry)
                series_pk = series.get(entry.series_instance_uid)
                if series_pk is None:
                    series_pk = series[entry.series_instance_uid] = _series_pk(connection, entry, study_pk)
                values = _instance_values(entry, series_pk)
                if entry.sop_instance_uid in existing:
                    connection.execute(
                        update(Instance).where(Instance.sop_instance_uid == entry.sop_instance_uid).values(**values)
                    )
                else:
                    new_rows.append(values)
            if new_rows:
                connection.execute(insert(Instance), new_rows)
            ids = list(intent_ids)
            if ids:
                connection.execute(delete(StorageIntent).where(StorageIntent.id.in_(ids)))
            if self._on_indexed is not None and entries:
                self._on_indexed(connection, entries)

    def total_size(self) -> int:
        """Bytes of every indexed file."""
        with self._db.reads() as session:
            return int(session.scalar(select(func.coalesce(func.sum(Instance.size), 0))) or 0)

    def intents(self) -> list[Intent]:
        with self._db.reads() as session:
            rows = session.scalars(select(StorageIntent).order_by(StorageIntent.id))
            return [Intent(r.id, r.sop_instance_uid, r.path) for r in rows]

    def settle_intent(self, intent: Intent, size: int | None, digest: str | None) -> None:
        """Retire an intent after a crash; `size`/`digest` refresh a row whose file was replaced."""
        with self._db.writes.begin() as session:
            if size is not None and digest is not None:
                row = session.scalars(
                    select(Instance).where(
                        Instance.sop_instance_uid == intent.sop_instance_uid,
                        Instance.path == intent.path,
                    )
                ).one_or_none()
                if row is not None:
                    row.size, row.digest = size, digest
            session.execute(delete(StorageIntent).where(StorageIntent.id == intent.id))

    def is_indexed(self, sop_instance_uid: str, path: str) -> bool:
        with self._db.reads() as session:
            found = session.scalar(
                select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid, Instance.path == path)
            )
            return found is not None

    def study_instances(self, study_instance_uid: str) -> list[StoredInstance]:
        with self._db.reads() as session:
            rows = session.scalars(
                select(Instance)
                .join(Series, Instance.series_pk == Series.id)
                .join(Study, Series.study_pk == Study.id)
                .where(Study.study_instance_uid == study_instance_uid)
                .order_by(Series.series_number, Instance.instance_number, Instance.id)
            )
            return [_stored(r) for r in rows]

    def study_summary(self, study_instance_uid: str) -> StudySummary | None:
        with self._db.reads() as session:
            study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).one_or_none()
            if study is None:
                return None
            counts = session.execute(
                select(
                    func.count(func.distinct(Series.id)),
                    func.count(Instance.id),
                    func.coalesce(func.sum(Instance.size), 0),
                )
                .select_from(Series)
                .join(Instance, Instance.series_pk == Series.id)
                .where(Series.study_pk == study.id)
            ).one()
            return StudySummary(
                study.study_instance_uid,
                study.accession_number,
                study.patient.patient_id,
                study.patient.name,
                counts[0],
                counts[1],
                counts[2],
            )


def reassign_studies(connection: Connection, from_patient_pk: int, to_patient_pk: int) -> int:
    """A merged-away patient's studies move to the survivor in the index (the files keep the
    identifiers they were stored with); how many."""
    result = connection.execute(
        update(Study).where(Study.patient_pk == from_patient_pk).values(patient_pk=to_patient_pk)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def _stored(row: Instance) -> StoredInstance:
    return StoredInstance(
        row.sop_instance_uid,
        row.sop_class_uid,
        row.path,
        row.size,
        row.digest,
        row.transfer_syntax_uid,
    )


def _pk(
    connection: Connection, key: InstrumentedAttribute[Any], value: object, row: Callable[[], dict[str, object]]
) -> int:
    """The primary key of the row whose `key` is `value`, inserted from `row()` when there is none."""
    table = key.class_
    found = connection.execute(select(table.id).where(key == value)).scalar_one_or_none()
    if found is None:
        found = connection.execute(insert(table).values(**row()).returning(table.id)).scalar_one()
    return int(found)


def _patient_pk(connection: Connection, entry: IndexEntry) -> int:
    found = connection.execute(
        select(Patient.id).where(Patient.patient_id == entry.patient_id, Patient.issuer == entry.issuer)
    ).scalar_one_or_none()
    if found is not None:
        return int(found)
    patient = {
        "patient_id": entry.patient_id,
        "issuer": entry.issuer,
        "name": entry.patient_name,
        "birth_date": entry.birth_date,
        "sex": entry.sex,
        "address": "",
        "phone": "",
        "synthetic": entry.source == "generated",
    }
    return int(connection.execute(insert(Patient).values(**patient).returning(Patient.id)).scalar_one())


def _study_pk(connection: Connection, entry: IndexEntry) -> int:
    return _pk(
        connection,
        Study.study_instance_uid,
        entry.study_instance_uid,
        lambda: {
            "study_instance_uid": entry.study_instance_uid,
            "patient_pk": _patient_pk(connection, entry),
            "study_date": entry.study_date,
            "study_time": entry.study_time,
            "accession_number": entry.accession_number,
            "study_id": entry.study_id,
            "study_description": entry.study_description,
            "referring_physician_name": entry.referring_physician_name,
        },
    )


def _series_pk(connection: Connection, entry: IndexEntry, study_pk: int) -> int:
    return _pk(
        connection,
        Series.series_instance_uid,
        entry.series_instance_uid,
        lambda: {
            "series_instance_uid": entry.series_instance_uid,
            "study_pk": study_pk,
            "modality": entry.modality,
            "series_number": entry.series_number,
            "series_description": entry.series_description,
            "body_part_examined": entry.body_part_examined,
        },
    )


def _instance_values(entry: IndexEntry, series_pk: int) -> dict[str, object]:
    return {
        "sop_instance_uid": entry.sop_instance_uid,
        "series_pk": series_pk,
        "sop_class_uid": entry.sop_class_uid,
        "instance_number": entry.instance_number,
        "transfer_syntax_uid": entry.transfer_syntax_uid,
        "path": entry.path,
        "size": entry.size,
        "digest": entry.digest,
        "source": entry.source,
        "source_ae": entry.source_ae,
        "created_at": datetime.now(UTC),  # to the microsecond, for `fabricatord trace`
    }
