"""C-FIND against the index: a query identifier becomes one SQL statement, never a scan in Python.

Matching follows PS3.4 C.2.2.2: single value, universal (empty), wildcard (`*`, `?`), range
(DA, TM, DT), list of UIDs (and of code strings, as Orthanc allows). A key we hold no column
for is matched as universal and reported, so that the handler can answer 0xFF01 (PS3.4
C.4.1.1.4: optional keys not supported). Counts and Modalities in Study are computed for the
page of matches in one grouped query each.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from sqlalchemy import ColumnElement, Select, and_, func, select
from sqlalchemy.orm import InstrumentedAttribute

from fabricatord.db import Database
from fabricatord.db.models import Instance, Patient, Series, Study
from fabricatord.dicom.answers import encode as encode_answer

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
PATIENT_ROOT = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.1"


class QueryError(ValueError):
    """The identifier cannot be answered (wrong level, malformed value); the text says why."""


@dataclass(frozen=True)
class _Key:
    level: str
    column: InstrumentedAttribute[Any]


# The attributes the index holds, by the level they belong to.
KEYS: dict[str, _Key] = {
    "PatientName": _Key("PATIENT", Patient.name),
    "PatientID": _Key("PATIENT", Patient.patient_id),
    "IssuerOfPatientID": _Key("PATIENT", Patient.issuer),
    "PatientBirthDate": _Key("PATIENT", Patient.birth_date),
    "PatientSex": _Key("PATIENT", Patient.sex),
    "StudyInstanceUID": _Key("STUDY", Study.study_instance_uid),
    "StudyDate": _Key("STUDY", Study.study_date),
    "StudyTime": _Key("STUDY", Study.study_time),
    "AccessionNumber": _Key("STUDY", Study.accession_number),
    "StudyID": _Key("STUDY", Study.study_id),
    "StudyDescription": _Key("STUDY", Study.study_description),
    "ReferringPhysicianName": _Key("STUDY", Study.referring_physician_name),
    "SeriesInstanceUID": _Key("SERIES", Series.series_instance_uid),
    "Modality": _Key("SERIES", Series.modality),
    "SeriesNumber": _Key("SERIES", Series.series_number),
    "SeriesDescription": _Key("SERIES", Series.series_description),
    "BodyPartExamined": _Key("SERIES", Series.body_part_examined),
    "SOPInstanceUID": _Key("IMAGE", Instance.sop_instance_uid),
    "SOPClassUID": _Key("IMAGE", Instance.sop_class_uid),
    "InstanceNumber": _Key("IMAGE", Instance.instance_number),
}
# Computed per match, at the level named; ModalitiesInStudy can also be matched.
COMPUTED = {
    "NumberOfPatientRelatedStudies": "PATIENT",
    "NumberOfPatientRelatedSeries": "PATIENT",
    "NumberOfPatientRelatedInstances": "PATIENT",
    "NumberOfStudyRelatedSeries": "STUDY",
    "NumberOfStudyRelatedInstances": "STUDY",
    "ModalitiesInStudy": "STUDY",
    "NumberOfSeriesRelatedInstances": "SERIES",
}
_COLUMNS: dict[str, list[tuple[str, str]]] = {
    level: [(keyword, key.column.key) for keyword, key in KEYS.items() if key.level == level] for level in LEVELS
}
_ALWAYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle"}
_ENTITY = {"PATIENT": Patient, "STUDY": Study, "SERIES": Series, "IMAGE": Instance}


@dataclass
class FindQuery:
    level: str
    statement: Select[Any]
    requested: list[str]
    """Keywords of the identifier, in its order: what each answer carries."""
    unsupported: list[str] = field(default_factory=list)
    """Keys with a value that we matched as universal (answer 0xFF01)."""


def element_text(element: DataElement) -> str:
    """The value of a query key as the text matching reads."""
    value = element.value
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _time_bound(text: str, upper: bool) -> str:
    """A TM bound padded to HHMMSS(.ffffff) so that strings compare as times do."""
    text = text.replace(":", "")
    digits, _, fraction = text.partition(".")
    if not digits.isdigit() or len(digits) % 2 or len(digits) > 6:
        raise QueryError(f"malformed time {text!r}")
    if upper:  # "12" and "1200" both mean up to the last second of that hour or minute
        return f"{digits}{'5959'[: 6 - len(digits)]}.{fraction or '999999'}"
    return digits.ljust(6, "0") + (f".{fraction}" if fraction else "")


def condition(column: InstrumentedAttribute[Any], vr: str, text: str) -> ColumnElement[bool] | None:
    """The SQL condition of one matching key; None for universal matching."""
    if text in ("", "*"):
        return None
    where: ColumnElement[bool]
    if vr in ("DA", "TM", "DT") and "-" in text:
        where = _range(column, vr, text)  # PS3.4 C.2.2.2.5: range matching
    elif "\\" in text and vr in ("UI", "CS", "SH", "LO", "AE"):
        where = column.in_(text.split("\\"))  # PS3.4 C.2.2.2.2: list of UIDs
    elif ("*" in text or "?" in text) and vr not in ("UI", "DA", "TM", "DT"):
        # PS3.4 C.2.2.2.4: wild card matching; person names case-insensitively, as Orthanc does
        if vr == "PN":
            where = func.lower(column).like(_like(text).lower(), escape="\\")
        else:
            where = column.like(_like(text), escape="\\")
    elif vr == "PN":
        where = func.lower(column) == text.lower()
    elif vr == "IS":
        if not text.strip().lstrip("+-").isdigit():
            raise QueryError(f"malformed integer {text!r}")
        where = column == int(text)
    else:
        where = column == text  # PS3.4 C.2.2.2.1: single value matching
    return where


def _range(column: InstrumentedAttribute[Any], vr: str, text: str) -> ColumnElement[bool]:
    low, _, high = text.partition("-")
    if vr == "TM":
        low, high = (_time_bound(low, False) if low else ""), (_time_bound(high, True) if high else "")
    elif vr == "DA" and not all(part.isdigit() and len(part) == 8 for part in (low, high) if part):
        raise QueryError(f"malformed date range {text!r}")
    if not low and not high:
        raise QueryError(f"empty range {text!r}")
    parts = [column >= low] if low else []
    parts += [column <= high] if high else []
    return and_(*parts)


def build(identifier: Dataset, model: str) -> FindQuery:
    """The statement that finds what `identifier` asks for in the `model` information model."""
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in LEVELS:
        raise QueryError(f"Query/Retrieve Level {level!r} is not PATIENT, STUDY, SERIES or IMAGE")
    if model == STUDY_ROOT and level == "PATIENT":
        raise QueryError("the Study Root model has no PATIENT level")
    depth = LEVELS.index(level)
    entities: list[Any] = [_ENTITY[name] for name in LEVELS[: depth + 1]]
    statement: Select[Any] = select(*entities)
    if depth >= 1:
        statement = statement.join(Study, Study.patient_pk == Patient.id)
    else:
        statement = statement.where(Patient.id.in_(select(Study.patient_pk)))
    if depth >= 2:
        statement = statement.join(Series, Series.study_pk == Study.id)
    if depth >= 3:
        statement = statement.join(Instance, Instance.series_pk == Series.id)
    query = FindQuery(level, statement, [])
    for element in identifier:
        keyword = keyword_for_tag(element.tag) or ""
        if keyword in _ALWAYS or element.tag.is_private or element.tag.element == 0:
            continue
        query.requested.append(keyword or str(element.tag))
        text = element_text(element) if element.VR != "SQ" else ""
        key = KEYS.get(keyword)
        if key is not None and LEVELS.index(key.level) <= depth:
            where = condition(key.column, dictionary_VR(element.tag), text)
            if where is not None:
                query.statement = query.statement.where(where)
        elif keyword == "ModalitiesInStudy" and depth >= 1 and text:
            modalities = select(Series.study_pk).where(Series.modality.in_(text.split("\\")))
            query.statement = query.statement.where(Study.id.in_(modalities))
        elif text or (element.VR == "SQ" and element.value and any(len(item) for item in element.value)):
            query.unsupported.append(keyword or str(element.tag))
    query.statement = query.statement.order_by(*(e.id for e in entities))
    return query


def run(database: Database, query: FindQuery, limit: int) -> list[Any]:
    """The matching rows, at most `limit` + 1 so that the caller can tell there were too many."""
    with database.reads() as session:
        return list(session.execute(query.statement.limit(limit + 1)).all())


def answers(database: Database, query: FindQuery, rows: list[Any], retrieve_ae: str, implicit: bool) -> Iterator[bytes]:
    """One encoded identifier per row, with every requested key: held values filled, others empty."""
    computed = _computed(database, query, rows)
    for row in rows:
        pairs: list[tuple[str, Any]] = [("QueryRetrieveLevel", query.level), ("RetrieveAETitle", retrieve_ae)]
        yield encode_answer([*pairs, *_requested(query, row, computed)], implicit)


def _requested(query: FindQuery, row: Any, computed: dict[str, dict[int, Any]]) -> Iterator[tuple[str, Any]]:
    values: dict[str, Any] = {}
    for level, entity in zip(LEVELS, row, strict=False):
        values.update({keyword: getattr(entity, name) for keyword, name in _COLUMNS[level]})
    for keyword in query.requested:
        if keyword.startswith("("):  # a tag without a keyword: returned empty
            continue
        value = values.get(keyword)
        if keyword in computed:
            value = computed[keyword].get(row[LEVELS.index(COMPUTED[keyword])].id)
        yield keyword, _returned(keyword, value)


@dataclass(frozen=True)
class StudyPage:
    total: int
    studies: list[dict[str, Any]]


STUDY_COLUMNS = (
    *(keyword for keyword, key in KEYS.items() if key.level in ("PATIENT", "STUDY")),
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
"""What the console and the API show of each study: every patient and study key we hold."""


def search_studies(database: Database, identifier: Dataset, limit: int, offset: int) -> StudyPage:
    """A page of the studies a study-level identifier matches, newest first, as the console and
    the API list them: the same matching as a C-FIND, with the total for paging."""
    for keyword in STUDY_COLUMNS:
        if keyword not in identifier:
            setattr(identifier, keyword, None)
    query = build(identifier, STUDY_ROOT)
    counted = select(func.count()).select_from(query.statement.order_by(None).subquery())
    page = query.statement.order_by(None).order_by(Study.study_date.desc(), Study.study_time.desc(), Study.id.desc())
    with database.reads() as session:
        total = int(session.scalar(counted) or 0)
        rows = list(session.execute(page.limit(limit).offset(offset)).all())
    computed = _computed(database, query, rows)
    return StudyPage(
        total,
        [
            {k: ("" if v is None else v) for k, v in _requested(query, row, computed) if k in STUDY_COLUMNS}
            for row in rows
        ],
    )


def _returned(keyword: str, value: Any) -> Any:
    if value is None:
        return [] if dictionary_VR(keyword) == "SQ" else None
    if keyword == "ModalitiesInStudy":
        return sorted(value)
    return value


def _computed(database: Database, query: FindQuery, rows: list[Any]) -> dict[str, dict[int, Any]]:
    """Counts and Modalities in Study for the matched rows, one grouped query per key asked for."""
    wanted = [k for k in query.requested if k in COMPUTED and LEVELS.index(COMPUTED[k]) <= LEVELS.index(query.level)]
    if not wanted or not rows:
        return {}
    result: dict[str, dict[int, Any]] = {}
    with database.reads() as session:
        for keyword in wanted:
            level = COMPUTED[keyword]
            ids = list({row[LEVELS.index(level)].id for row in rows})
            if keyword == "ModalitiesInStudy":
                pairs = session.execute(
                    select(Series.study_pk, Series.modality).where(Series.study_pk.in_(ids)).distinct()
                )
                modalities: dict[int, list[str]] = {}
                for study_pk, modality in pairs:
                    modalities.setdefault(study_pk, []).append(modality)
                result[keyword] = modalities
                continue
            owner, counted = _COUNTS[keyword]
            statement = select(owner, func.count(func.distinct(counted))).group_by(owner).where(owner.in_(ids))
            statement = _join_for_count(statement, keyword)
            result[keyword] = {pk: str(n) for pk, n in session.execute(statement)}
    return result


_COUNTS: dict[str, tuple[Any, Any]] = {
    "NumberOfPatientRelatedStudies": (Study.patient_pk, Study.id),
    "NumberOfPatientRelatedSeries": (Study.patient_pk, Series.id),
    "NumberOfPatientRelatedInstances": (Study.patient_pk, Instance.id),
    "NumberOfStudyRelatedSeries": (Series.study_pk, Series.id),
    "NumberOfStudyRelatedInstances": (Series.study_pk, Instance.id),
    "NumberOfSeriesRelatedInstances": (Instance.series_pk, Instance.id),
}


def _join_for_count(statement: Select[Any], keyword: str) -> Select[Any]:
    if keyword == "NumberOfPatientRelatedStudies":
        return statement.select_from(Study)
    if keyword == "NumberOfPatientRelatedSeries":
        return statement.select_from(Study).join(Series, Series.study_pk == Study.id)
    if keyword == "NumberOfPatientRelatedInstances":
        return (
            statement.select_from(Study)
            .join(Series, Series.study_pk == Study.id)
            .join(Instance, Instance.series_pk == Series.id)
        )
    if keyword == "NumberOfStudyRelatedSeries":
        return statement.select_from(Series)
    if keyword == "NumberOfStudyRelatedInstances":
        return statement.select_from(Series).join(Instance, Instance.series_pk == Series.id)
    return statement.select_from(Instance)
