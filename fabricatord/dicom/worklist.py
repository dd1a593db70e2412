"""Modality Worklist C-FIND (PS3.4 K) against the database: one SQL statement per query.

The matching keys are those DCMTK's wlmscpfs supports and more: patient, order and requested
procedure attributes at the top level, the scheduled step's inside the Scheduled Procedure Step
Sequence. SPS Start Date and Time are matched as one date-time range when both carry a value
(PS3.4 C.2.2.2.5), as wlmscpfs does. A step that is no longer actionable (started, completed,
discontinued, canceled) is only returned when the query asks for an SPS Status itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from sqlalchemy import ColumnElement, Select, and_, select
from sqlalchemy.orm import InstrumentedAttribute

from fabricatord.db import Database
from fabricatord.db.models import Order, Patient, RequestedProcedure, ScheduledStep
from fabricatord.db.worklist import ACTIONABLE
from fabricatord.dicom.answers import encode as encode_answer
from fabricatord.dicom.query import QueryError, condition, element_text

MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"
STEP_SEQUENCE = "ScheduledProcedureStepSequence"

TOP_KEYS: dict[str, InstrumentedAttribute[Any]] = {
    "PatientName": Patient.name,
    "PatientID": Patient.patient_id,
    "IssuerOfPatientID": Patient.issuer,
    "PatientBirthDate": Patient.birth_date,
    "PatientSex": Patient.sex,
    "AccessionNumber": Order.accession_number,
    "ReferringPhysicianName": Order.referring_physician_name,
    "RequestingPhysician": Order.requesting_physician,
    "RequestingService": Order.requesting_service,
    "AdmissionID": Order.admission_id,
    "CurrentPatientLocation": Order.current_patient_location,
    "PlacerOrderNumberImagingServiceRequest": Order.placer_order_number,
    "FillerOrderNumberImagingServiceRequest": Order.filler_order_number,
    "RequestedProcedureID": RequestedProcedure.requested_procedure_id,
    "StudyInstanceUID": RequestedProcedure.study_instance_uid,
    "RequestedProcedureDescription": RequestedProcedure.description,
    "RequestedProcedurePriority": RequestedProcedure.priority,
}
STEP_KEYS: dict[str, InstrumentedAttribute[Any]] = {
    "ScheduledStationAETitle": ScheduledStep.station_ae,
    "ScheduledProcedureStepStartDate": ScheduledStep.start_date,
    "ScheduledProcedureStepStartTime": ScheduledStep.start_time,
    "Modality": ScheduledStep.modality,
    "ScheduledPerformingPhysicianName": ScheduledStep.performing_physician,
    "ScheduledProcedureStepDescription": ScheduledStep.description,
    "ScheduledStationName": ScheduledStep.station_name,
    "ScheduledProcedureStepLocation": ScheduledStep.location,
    "ScheduledProcedureStepID": ScheduledStep.sps_id,
    "ScheduledProcedureStepStatus": ScheduledStep.status,
    "PreMedication": ScheduledStep.premedication,
    "RequestedContrastAgent": ScheduledStep.contrast_agent,
}
# Code sequences built from three columns each: returned, not matched.
CODES = {
    "RequestedProcedureCodeSequence": ("code_value", "code_scheme", "code_meaning"),
    "ScheduledProtocolCodeSequence": ("protocol_code_value", "protocol_code_scheme", "protocol_code_meaning"),
}
_IGNORED = {"SpecificCharacterSet"}
_ENTITY_INDEX: dict[Any, int] = {Patient: 0, Order: 1, RequestedProcedure: 2, ScheduledStep: 3}


_Rows = Select[ScheduledStep, RequestedProcedure, Order, Patient]


@dataclass
class WorklistQuery:
    statement: _Rows
    top: list[str] = field(default_factory=list)
    """Top-level keywords asked for, in order."""
    step: list[str] | None = None
    """Keywords of the SPS Sequence item; None: the sequence was not asked for."""
    unsupported: list[str] = field(default_factory=list)


def build(identifier: Dataset, calling_ae: str = "", filter_by_calling_ae: bool = False) -> WorklistQuery:
    """The statement for a worklist identifier; `filter_by_calling_ae` stands in for a missing station AE."""
    statement: _Rows = (
        select(ScheduledStep, RequestedProcedure, Order, Patient)
        .join(RequestedProcedure, ScheduledStep.procedure_pk == RequestedProcedure.id)
        .join(Order, RequestedProcedure.order_pk == Order.id)
        .join(Patient, Order.patient_pk == Patient.id)
    )
    query = WorklistQuery(statement)
    wheres: list[ColumnElement[bool]] = []
    step_values: dict[str, str] = {}
    for element in identifier:
        keyword = keyword_for_tag(element.tag) or ""
        if keyword in _IGNORED or element.tag.is_private or element.tag.element == 0:
            continue
        if keyword == STEP_SEQUENCE:
            items = list(element.value or [])
            if len(items) > 1:
                raise QueryError("the Scheduled Procedure Step Sequence of a query holds one item")
            query.step = []
            for inner in items[0] if items else []:
                inner_keyword = keyword_for_tag(inner.tag) or str(inner.tag)
                query.step.append(inner_keyword)
                text = element_text(inner) if inner.VR != "SQ" else ""
                if inner_keyword in STEP_KEYS:
                    step_values[inner_keyword] = text
                elif _has_value(inner):
                    query.unsupported.append(f"{STEP_SEQUENCE}>{inner_keyword}")
            continue
        query.top.append(keyword or str(element.tag))
        column = TOP_KEYS.get(keyword)
        if column is not None:
            where = condition(column, dictionary_VR(element.tag), element_text(element))
            if where is not None:
                wheres.append(where)
        elif _has_value(element):
            query.unsupported.append(keyword or str(element.tag))
    wheres += _step_conditions(step_values)
    if not step_values.get("ScheduledProcedureStepStatus"):
        wheres.append(ScheduledStep.status.in_(ACTIONABLE))
    if filter_by_calling_ae and not step_values.get("ScheduledStationAETitle"):
        wheres.append(ScheduledStep.station_ae == calling_ae)
    query.statement = statement.where(*wheres).order_by(ScheduledStep.start_datetime, ScheduledStep.id)
    return query


def _has_value(element: Any) -> bool:
    if element.VR == "SQ":
        return bool(element.value) and any(len(item) for item in element.value)
    return bool(element_text(element))


def _step_conditions(values: dict[str, str]) -> list[ColumnElement[bool]]:
    date = values.get("ScheduledProcedureStepStartDate", "")
    time = values.get("ScheduledProcedureStepStartTime", "")
    wheres: list[ColumnElement[bool]] = []
    combined = date and "-" in time
    if combined:
        wheres.append(_datetime_range(date, time))
    for keyword, text in values.items():
        if combined and keyword in ("ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime"):
            continue
        where = condition(STEP_KEYS[keyword], dictionary_VR(keyword), text)
        if where is not None:
            wheres.append(where)
    return wheres


def _datetime_range(date: str, time: str) -> ColumnElement[bool]:
    """Date and time range as one: 20250101-20250102 with 0800-1700 runs from the 1st at 8 to the 2nd at 17."""
    low_date, _, high_date = date.partition("-") if "-" in date else (date, "", date)
    low_time, _, high_time = time.partition("-")
    for part in (low_date, high_date):
        if part and not (part.isdigit() and len(part) == 8):
            raise QueryError(f"malformed date {date!r}")
    parts = []
    if low_date:
        parts.append(ScheduledStep.start_datetime >= low_date + _hhmmss(low_time, upper=False))
    if high_date:
        parts.append(ScheduledStep.start_datetime <= high_date + _hhmmss(high_time, upper=True))
    return and_(*parts)


def _hhmmss(text: str, upper: bool) -> str:
    digits = text.replace(":", "").partition(".")[0]
    if digits and (not digits.isdigit() or len(digits) % 2 or len(digits) > 6):
        raise QueryError(f"malformed time {text!r}")
    return digits + ("235959"[len(digits) :] if upper else "000000"[len(digits) :])


def run(database: Database, query: WorklistQuery, limit: int) -> list[Any]:
    """The matching rows, at most `limit` + 1 so that the caller can tell there were too many."""
    with database.reads() as session:
        return list(session.execute(query.statement.limit(limit + 1)).all())


def answers(query: WorklistQuery, rows: list[Any], implicit: bool) -> Iterator[tuple[int, bytes]]:
    """(scheduled step key, encoded identifier) per row, with every requested key (PS3.4 K.6.1.2.2)."""
    for step, procedure, order, patient in rows:
        entities = (patient, order, procedure, step)
        pairs: list[tuple[str, Any]] = [
            (keyword, _value(keyword, TOP_KEYS, entities)) for keyword in query.top if not keyword.startswith("(")
        ]
        if query.step is not None:
            # An empty sequence in the query asks for the whole item (universal sequence matching).
            asked = query.step or [*STEP_KEYS, "ScheduledProtocolCodeSequence"]
            item = [(keyword, _value(keyword, STEP_KEYS, entities)) for keyword in asked if not keyword.startswith("(")]
            pairs.append((STEP_SEQUENCE, [item]))
        yield step.id, encode_answer(pairs, implicit, order.specific_character_set)


def _value(keyword: str, keys: dict[str, InstrumentedAttribute[Any]], entities: tuple[Any, ...]) -> Any:
    """The value held for `keyword`; None (returned empty) when we hold none."""
    column = keys.get(keyword)
    if column is not None:
        return getattr(entities[_ENTITY_INDEX[column.class_]], column.key)
    if keyword in CODES:
        owner = entities[3] if keyword == "ScheduledProtocolCodeSequence" else entities[2]
        code_value, scheme, meaning = (getattr(owner, name) for name in CODES[keyword])
        if not code_value:
            return []
        return [[("CodeValue", code_value), ("CodingSchemeDesignator", scheme), ("CodeMeaning", meaning)]]
    return [] if dictionary_VR(keyword) == "SQ" else None
