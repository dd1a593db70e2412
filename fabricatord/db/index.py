"""The index of stored instances (studies → series → instances) and the storage intents."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, bindparam, delete, exists, func, insert, or_, select, update

from fabricatord.db import raw
from fabricatord.db.audit import AuditRecord
from fabricatord.db.engine import Database, aware, hold_keys, patient_key
from fabricatord.db.models import (
    Acquisition,
    AuditEvent,
    Commitment,
    CommitmentItem,
    FhirJob,
    Instance,
    Patient,
    RequestedProcedure,
    RouteJob,
    ScheduledStep,
    Series,
    StorageIntent,
    Study,
)
from fabricatord.db.sequences import Sequences


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
    called_ae: str = ""
    """The AE title it was sent to, when not the node's own (a proxy's): for routes, not kept."""


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
class Forgotten:
    """A study's rows, removed: where its files are, the delete intents committed with the
    removal, and the bytes its instances took."""

    paths: list[str]
    intents: list[int]
    bytes: int


@dataclass(frozen=True)
class Eligible:
    """What makes a study deletable by cleanup, checked again as it is deleted."""

    arrived_before: datetime | None
    committed_since: datetime | None = None


@dataclass(frozen=True)
class Candidate:
    """A study cleanup may delete: none of its jobs is pending."""

    study_instance_uid: str
    last_arrival: datetime
    instances: int
    bytes: int


@dataclass(frozen=True)
class StudySummary:
    study_instance_uid: str
    accession_number: str
    patient_id: str
    patient_name: str
    series: int
    instances: int
    size: int


@dataclass(frozen=True)
class InstanceNode:
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    transfer_syntax_uid: str
    size: int
    source: str
    source_ae: str


@dataclass(frozen=True)
class SeriesNode:
    series_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    body_part_examined: str
    instances: list[InstanceNode]


@dataclass(frozen=True)
class StudyTree:
    study_instance_uid: str
    accession_number: str
    study_date: str
    study_time: str
    study_description: str
    referring_physician_name: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    series: list[SeriesNode]


_STORED_COLUMNS = (
    Instance.sop_instance_uid,
    Instance.sop_class_uid,
    Instance.path,
    Instance.size,
    Instance.digest,
    Instance.transfer_syntax_uid,
)


# Module constants, so `raw` compiles each once per dialect: on the per-instance path, making
# and compiling statements cost more than running them.
_FIND_INSTANCE = select(*_STORED_COLUMNS).where(Instance.sop_instance_uid == bindparam("uid"))
_FIND_PATIENT = select(Patient.id).where(Patient.patient_id == bindparam("pid"), Patient.issuer == bindparam("issuer"))
_FIND_STUDY = select(Study.id).where(Study.study_instance_uid == bindparam("uid"))
_FIND_SERIES = select(Series.id).where(Series.series_instance_uid == bindparam("uid"))
_INSERT_PATIENT = insert(Patient).returning(Patient.id)
_INSERT_STUDY = insert(Study).returning(Study.id)
_INSERT_SERIES = insert(Series).returning(Series.id)
_INSERT_INSTANCE = insert(Instance).inline()


IndexedHook = Callable[[Connection, list[IndexEntry]], None]
"""Called in the transaction that indexes instances (the routes queue their jobs there)."""


class InstanceIndex:
    def __init__(self, database: Database, on_indexed: IndexedHook | None = None, node: str = "") -> None:
        self._db = database
        self._on_indexed = on_indexed
        self._node = node
        """Whose storage intents these are: recovery settles this node's only."""
        self._held: Connection | None = None
        """The connection received instances are indexed on, kept between batches (a pool
        checkout cost more than the statements); only the group commit's leader uses it."""

    def lookup(self, sop_instance_uids: Iterable[str]) -> dict[str, StoredInstance]:
        uids = list(sop_instance_uids)
        with self._db.engine.connect() as connection:
            rows = connection.execute(select(*_STORED_COLUMNS).where(Instance.sop_instance_uid.in_(uids)))
            return {row[0]: StoredInstance(*row) for row in rows}

    def insert_unless_known(
        self, entries: Sequence[IndexEntry], place: Callable[[int], None]
    ) -> list[StoredInstance | None]:
        """In one write transaction, for each entry: the instance already indexed under its SOP
        Instance UID; or else None, after `place(i)` (which puts the i-th file where its entry
        says) and its rows, committed with the others. Route jobs join the same transaction.

        The received instances of every association share this one commit (`GroupCommit`), so
        one caller at a time.
        """
        if self._held is None:
            self._held = self._db.writer.connect()
        connection = self._held
        try:
            with connection.begin():
                return self._insert_unless_known(connection, entries, place)
        except BaseException:
            self._held = None  # a connection the failure may have broken is not reused
            connection.close()
            raise

    def _insert_unless_known(
        self, connection: Connection, entries: Sequence[IndexEntry], place: Callable[[int], None]
    ) -> list[StoredInstance | None]:
        results: list[StoredInstance | None] = []
        new: list[IndexEntry] = []
        _serialize(connection, entries)
        for position, entry in enumerate(entries):
            found = raw.first(connection, _FIND_INSTANCE, {"uid": entry.sop_instance_uid})
            if found is not None:
                results.append(StoredInstance(*found))
                continue
            place(position)
            raw.run(connection, _INSERT_INSTANCE, _instance_values(entry, _series_pk(connection, entry))).close()
            new.append(entry)
            results.append(None)
        if self._on_indexed is not None and new:
            self._on_indexed(connection, new)
        return results

    def add_intents(self, entries: Iterable[tuple[str, str]]) -> list[int]:
        """Commit (SOP Instance UID, path) intents before their files are renamed into place."""
        with self._db.writer.begin() as connection:
            return [
                connection.execute(
                    insert(StorageIntent)
                    .values(sop_instance_uid=uid, path=path, node=self._node)
                    .returning(StorageIntent.id)
                ).scalar_one()
                for uid, path in entries
            ]

    def commit(self, entries: list[IndexEntry], intent_ids: Iterable[int]) -> None:
        """Index `entries` (insert or replace by SOP Instance UID) and retire their intents, atomically."""
        with self._db.writer.begin() as connection:
            _serialize(connection, entries)
            series: dict[str, int] = {}
            uids = [entry.sop_instance_uid for entry in entries]
            existing = set(
                connection.execute(
                    select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(uids))
                ).scalars()
            )
            new_rows: list[dict[str, object]] = []
            for entry in entries:
                series_pk = series.get(entry.series_instance_uid)
                if series_pk is None:
                    series_pk = series[entry.series_instance_uid] = _series_pk(connection, entry)
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
            # Another node's intent is a file it is writing now; rows from before nodes had names are ours.
            rows = session.scalars(
                select(StorageIntent).where(StorageIntent.node.in_((self._node, ""))).order_by(StorageIntent.id)
            )
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

    def study_tree(self, study_instance_uid: str) -> StudyTree | None:
        """A study with its patient, series and instances, for the console and the API."""
        with self._db.reads() as session:
            study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).one_or_none()
            if study is None:
                return None
            rows = session.execute(
                select(Series, Instance)
                .join(Instance, Instance.series_pk == Series.id)
                .where(Series.study_pk == study.id)
                .order_by(Series.series_number, Series.id, Instance.instance_number, Instance.id)
            ).all()
            series: dict[int, SeriesNode] = {}
            for row_series, row_instance in rows:
                node = series.get(row_series.id)
                if node is None:
                    node = series[row_series.id] = SeriesNode(
                        row_series.series_instance_uid,
                        row_series.modality,
                        row_series.series_number,
                        row_series.series_description,
                        row_series.body_part_examined,
                        [],
                    )
                node.instances.append(
                    InstanceNode(
                        row_instance.sop_instance_uid,
                        row_instance.sop_class_uid,
                        row_instance.instance_number,
                        row_instance.transfer_syntax_uid,
                        row_instance.size,
                        row_instance.source,
                        row_instance.source_ae,
                    )
                )
            patient = study.patient
            return StudyTree(
                study.study_instance_uid,
                study.accession_number,
                study.study_date,
                study.study_time,
                study.study_description,
                study.referring_physician_name,
                patient.patient_id,
                patient.issuer,
                patient.name,
                patient.birth_date,
                patient.sex,
                list(series.values()),
            )

    def forget_study(
        self, study_instance_uid: str, eligible: Eligible | None = None, audit: AuditRecord | None = None
    ) -> Forgotten | None:
        """Remove a study's rows (the patient stays) and commit, with them, a delete intent for
        each file the caller is to unlink, and `audit`; None when no such study, or when it is
        no longer `eligible` for cleanup (an instance, a route job or an acquisition came since
        it was chosen). Rows go first: a row without its file would be a lie, and a crash
        before the unlinks leaves intents that `recover` finishes."""
        with self._db.writes.begin() as session:
            # A store of this study in another process finishes first, or waits for the deletion.
            hold_keys(session.connection(), [f"s{study_instance_uid}"])
            study_pk = session.scalar(select(Study.id).where(Study.study_instance_uid == study_instance_uid))
            if study_pk is None:
                return None
            if eligible is not None:
                query = _candidates(eligible.arrived_before, eligible.committed_since).where(Study.id == study_pk)
                if session.execute(query).first() is None:
                    return None
            if audit is not None:
                session.execute(insert(AuditEvent), [asdict(audit)])
            series_pks = select(Series.id).where(Series.study_pk == study_pk)
            rows = session.execute(
                select(Instance.sop_instance_uid, Instance.path, Instance.size).where(
                    Instance.series_pk.in_(series_pks)
                )
            ).all()
            intents = [
                session.execute(
                    insert(StorageIntent)
                    .values(sop_instance_uid=uid, path=path, node=self._node)
                    .returning(StorageIntent.id)
                ).scalar_one()
                for uid, path, _ in rows
            ]
            session.execute(delete(Instance).where(Instance.series_pk.in_(series_pks)))
            session.execute(delete(Series).where(Series.study_pk == study_pk))
            session.execute(delete(Study).where(Study.id == study_pk))
            return Forgotten([path for _, path, _ in rows], intents, sum(size for _, _, size in rows))

    def settle_intents(self, ids: Sequence[int]) -> None:
        """The files of a deletion are gone: its intents are done."""
        if ids:
            with self._db.writes.begin() as session:
                session.execute(delete(StorageIntent).where(StorageIntent.id.in_(list(ids))))

    def path_indexed(self, path: str) -> bool:
        """Whether an instance is indexed at `path` (whichever it is)."""
        return bool(self.indexed_paths([path]))

    def indexed_paths(self, paths: Sequence[str]) -> set[str]:
        """Which of `paths` an instance is indexed at, in one query."""
        with self._db.reads() as session:
            return set(session.scalars(select(Instance.path).where(Instance.path.in_(list(paths)))))

    def next_file_number(self) -> int:
        """The next value of the counter `sequence` file names are made from."""
        return Sequences(self._db).take("storage_file", 1, 1)[0]

    def cleanup_candidates(
        self, arrived_before: datetime | None = None, excluding: str = "", committed_since: datetime | None = None
    ) -> list[Candidate]:
        """Studies cleanup may delete, oldest last arrival first: with `arrived_before`, only
        those whose last instance arrived earlier; never `excluding` (the study being stored),
        nor one with an instance we committed to (Storage Commitment) since `committed_since`."""
        query = _candidates(arrived_before, committed_since).where(Study.study_instance_uid != excluding)
        with self._db.reads() as session:
            return [
                Candidate(uid, aware(arrived), int(count), int(size))
                for uid, arrived, count, size in session.execute(query)
            ]


def _candidates(arrived_before: datetime | None, committed_since: datetime | None = None) -> Any:
    """Studies with their last arrival, instances and bytes, none with a route or FHIR job
    pending or being sent, nor one an acquisition is about to make or making, nor (with
    `committed_since`) one with an instance we committed to since then."""
    last = func.max(Instance.created_at)
    busy_routes = select(RouteJob.id).where(
        RouteJob.study_instance_uid == Study.study_instance_uid, RouteJob.state.in_(("pending", "sending"))
    )
    busy_exports = select(FhirJob.id).where(
        FhirJob.study_instance_uid == Study.study_instance_uid, FhirJob.state.in_(("pending", "sending"))
    )
    busy_acquisitions = (
        select(Acquisition.id)
        .join(ScheduledStep, Acquisition.step_pk == ScheduledStep.id)
        .join(RequestedProcedure, ScheduledStep.procedure_pk == RequestedProcedure.id)
        .where(
            Acquisition.state.in_(("waiting", "pending", "running")),
            or_(
                RequestedProcedure.study_instance_uid == Study.study_instance_uid,
                Acquisition.study_instance_uid == Study.study_instance_uid,
            ),
        )
    )
    query = (
        select(Study.study_instance_uid, last, func.count(Instance.id), func.coalesce(func.sum(Instance.size), 0))
        .join(Series, Series.study_pk == Study.id)
        .join(Instance, Instance.series_pk == Series.id)
        .where(~exists(busy_routes), ~exists(busy_exports), ~exists(busy_acquisitions))
        .group_by(Study.id, Study.study_instance_uid)
        .order_by(last, Study.id)
    )
    if committed_since is not None:
        committed = (
            select(CommitmentItem.id)
            .join(Commitment, CommitmentItem.commitment_pk == Commitment.id)
            .where(
                CommitmentItem.study_instance_uid == Study.study_instance_uid,
                CommitmentItem.failure_reason == 0,
                Commitment.direction == "in",
                Commitment.created_at >= committed_since,
            )
        )
        query = query.where(~exists(committed))
    return query.having(last < arrived_before) if arrived_before is not None else query


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


def _inserted_id(connection: Connection, statement: Any, values: dict[str, object]) -> int:
    cursor = raw.run(connection, statement, values)
    try:
        return int(cursor.fetchone()[0])
    finally:
        cursor.close()


def _serialize(connection: Connection, entries: Sequence[IndexEntry]) -> None:
    """Two writers of one SOP Instance UID in two processes would both find it new, and the
    loser's clean-up would unlink the winner's file; two first instances of one study, or of one
    patient, would both create it: each waits for the other's transaction instead. A study or a
    patient already indexed needs no waiting (most are, after their first instance): only new
    ones are held, so that a patient's studies arriving on several associations do not queue."""
    if connection.dialect.name != "postgresql":
        return
    names = {f"i{entry.sop_instance_uid}" for entry in entries}
    known_studies = set()
    for study in {entry.study_instance_uid for entry in entries}:
        if raw.first(connection, _FIND_STUDY, {"uid": study}) is None:
            names.add(f"s{study}")
        else:  # shared: stores into it go on together; its deletion waits for them, or they for it
            known_studies.add(f"s{study}")
    for patient_id, issuer in {(entry.patient_id, entry.issuer) for entry in entries}:
        if raw.first(connection, _FIND_PATIENT, {"pid": patient_id, "issuer": issuer}) is None:
            names.add(patient_key(patient_id, issuer))
    hold_keys(connection, names, known_studies)


def _patient_pk(connection: Connection, entry: IndexEntry) -> int:
    found = raw.first(connection, _FIND_PATIENT, {"pid": entry.patient_id, "issuer": entry.issuer})
    if found is not None:
        return int(found[0])
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
    return _inserted_id(connection, _INSERT_PATIENT, patient)


def _study_pk(connection: Connection, entry: IndexEntry) -> int:
    found = raw.first(connection, _FIND_STUDY, {"uid": entry.study_instance_uid})
    if found is not None:
        return int(found[0])
    study = {
        "study_instance_uid": entry.study_instance_uid,
        "patient_pk": _patient_pk(connection, entry),
        "study_date": entry.study_date,
        "study_time": entry.study_time,
        "accession_number": entry.accession_number,
        "study_id": entry.study_id,
        "study_description": entry.study_description,
        "referring_physician_name": entry.referring_physician_name,
    }
    return _inserted_id(connection, _INSERT_STUDY, study)


def _series_pk(connection: Connection, entry: IndexEntry) -> int:
    found = raw.first(connection, _FIND_SERIES, {"uid": entry.series_instance_uid})
    if found is not None:
        return int(found[0])
    series = {  # the first instance of its series: the study is looked up only now
        "series_instance_uid": entry.series_instance_uid,
        "study_pk": _study_pk(connection, entry),
        "modality": entry.modality,
        "series_number": entry.series_number,
        "series_description": entry.series_description,
        "body_part_examined": entry.body_part_examined,
    }
    return _inserted_id(connection, _INSERT_SERIES, series)


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
