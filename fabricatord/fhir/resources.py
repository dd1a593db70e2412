"""A stored study as the FHIR R4B resources an EHR's imaging feed expects, in one transaction
Bundle, validated by `fhir.resources`.

We own the ImagingStudy, so it is a conditional update by its Study Instance UID: a resend, or
the study grown by a late series, updates the one resource. The Patient and the ServiceRequest
belong to the EHR (the order placer), so they are conditional creates by identifier: made when
the server lacks them, never overwritten. Every entry has a `urn:uuid` full URL drawn from its
identifier, so the same study always makes the same Bundle, and the server resolves the
references to whichever resource each condition found."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

from fabricatord.db.engine import aware
from fabricatord.db.index import StudyTree
from fabricatord.db.worklist import StudyOrder

FHIR_VERSION = "4.3.0"
"""R4B, as `fhir.resources.R4B` models it."""
DICOM_UID_SYSTEM = "urn:dicom:uid"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
URI_SYSTEM = "urn:ietf:rfc:3986"
CODING_SCHEMES = {
    "DCM": DCM,
    "LN": "http://loinc.org",
    "SCT": "http://snomed.info/sct",
    "SRT": "http://snomed.info/sct",
    "RADLEX": "http://radlex.org",
    "RADLEX_PLAYBOOK": "http://www.radlex.org",
    "ICD10": "http://hl7.org/fhir/sid/icd-10",
    "CPT": "http://www.ama-assn.org/go/cpt",
}
"""DICOM Coding Scheme Designators (PS3.16 8) → FHIR code system URIs; a local designator has
no system, and its code is kept with its meaning."""
SEX = {"M": "male", "F": "female", "O": "other"}
ORDER_STATUS = {"COMPLETED": "completed", "CANCELED": "revoked", "DISCONTINUED": "revoked", "HOLD": "on-hold"}
PRIORITY = {"STAT": "stat", "HIGH": "urgent"}


@dataclass(frozen=True)
class Systems:
    """The identifier systems of the values that are not UIDs (`[fhir]` *_system)."""

    patient_id: str
    accession: str
    placer: str
    filler: str
    issuers: dict[str, str] = field(default_factory=dict)
    """Issuer of Patient ID → the system of the IDs it assigns (`[fhir] issuer_systems`)."""

    def of_patient(self, issuer: str) -> str:
        return self.issuers.get(issuer, self.patient_id)


def transaction(tree: StudyTree, order: StudyOrder | None, systems: Systems) -> dict[str, Any]:
    """The study as a transaction Bundle, JSON-ready; ValueError when `fhir.resources` finds a
    resource invalid (a mapping bug: nothing is sent)."""
    from fhir.resources.R4B.bundle import Bundle

    if not tree.patient_id.strip():
        raise ValueError(f"study {tree.study_instance_uid} has no Patient ID: no Patient can be found or made for it")
    system = systems.of_patient(tree.issuer_of_patient_id)
    patient_identifier = _identifier(system, tree.patient_id, "MR")
    if tree.issuer_of_patient_id:
        patient_identifier["assigner"] = {"display": tree.issuer_of_patient_id}
    patient_url = _full_url(system, tree.patient_id)
    entries = [_entry(patient_url, _patient(tree, patient_identifier), "POST", "Patient", patient_identifier)]
    accession = _identifier(systems.accession, tree.accession_number, "ACSN") if tree.accession_number else None
    based_on: list[dict[str, str]] = []
    if order is not None:
        request = _service_request(order, systems, patient_url)
        condition = request["identifier"][0]
        request_url = _full_url(condition["system"], condition["value"])
        entries.append(_entry(request_url, request, "POST", "ServiceRequest", condition))
        based_on = [{"reference": request_url}]
    study_identifier = {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{tree.study_instance_uid}"}
    study = _imaging_study(tree, order, [study_identifier, *([accession] if accession else [])], patient_url, based_on)
    study_url = _full_url(DICOM_UID_SYSTEM, tree.study_instance_uid)
    entries.append(_entry(study_url, study, "PUT", "ImagingStudy", study_identifier))
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    try:
        return Bundle.model_validate(bundle).model_dump(mode="json", exclude_none=True)
    except Exception as exc:  # pydantic's ValidationError, named without importing pydantic here
        raise ValueError(f"the FHIR resources of study {tree.study_instance_uid} are invalid: {exc}") from exc


def _entry(full_url: str, resource: dict[str, Any], method: str, kind: str, key: dict[str, Any]) -> dict[str, Any]:
    """One entry, conditional on `key`: POST with ifNoneExist (create unless one matches) or
    PUT to a search URL (update the one that matches, create when none does)."""
    search = f"identifier={_token(key['system'])}|{_token(key['value'])}"
    request = {"method": method, "url": kind, "ifNoneExist": search} if method == "POST" else {"method": method}
    if method == "PUT":
        request["url"] = f"{kind}?{search}"
    return {"fullUrl": full_url, "resource": resource, "request": request}


def _token(text: str) -> str:
    """One half of a token search's `system|value`: FHIR's escapes (\\ | , $) first, then the
    URL's, so that an ID with `&`, `+`, `#` or a space finds the resource made for it."""
    for special in ("\\", "|", ",", "$"):
        text = text.replace(special, "\\" + special)
    return quote(text, safe=":/.-_~")


def _full_url(system: str, value: str) -> str:
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{system}|{value}')}"


def _identifier(system: str, value: str, type_code: str) -> dict[str, Any]:
    return {"type": {"coding": [{"system": IDENTIFIER_TYPE, "code": type_code}]}, "system": system, "value": value}


def _patient(tree: StudyTree, identifier: dict[str, Any]) -> dict[str, Any]:
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [identifier],
        "gender": SEX.get(tree.patient_sex.upper(), "unknown"),
    }
    name = human_name(tree.patient_name)
    if name:
        patient["name"] = [name]
    born = fhir_date(tree.patient_birth_date)
    if born:
        patient["birthDate"] = born
    return patient


def _service_request(order: StudyOrder, systems: Systems, patient_url: str) -> dict[str, Any]:
    """The order, identified first by its accession number (what the study carries too), then
    by its placer and filler numbers."""
    identifiers = [_identifier(systems.accession, order.accession_number, "ACSN")]
    if order.placer_order_number:
        identifiers.append(_identifier(systems.placer, order.placer_order_number, "PLAC"))
    if order.filler_order_number:
        identifiers.append(_identifier(systems.filler, order.filler_order_number, "FILL"))
    request: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "identifier": identifiers,
        "status": ORDER_STATUS.get(order.status, "active"),
        "intent": "order",
        "priority": PRIORITY.get(order.priority.upper(), "routine"),
        "subject": {"reference": patient_url},
        "authoredOn": aware(order.authored).astimezone().isoformat(timespec="seconds"),
    }
    code = _concept(order.procedure_code, order.procedure_description)
    if code:
        request["code"] = code
    requester = human_name(order.requesting_physician.split("\\")[0])
    if requester:
        request["requester"] = {"display": requester["text"]}
    return request


def _imaging_study(
    tree: StudyTree,
    order: StudyOrder | None,
    identifiers: list[dict[str, Any]],
    patient_url: str,
    based_on: list[dict[str, str]],
) -> dict[str, Any]:
    modalities = list(dict.fromkeys(s.modality for s in tree.series if s.modality))
    study: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "identifier": identifiers,
        "status": "available" if any(s.instances for s in tree.series) else "registered",
        "modality": [{"system": DCM, "code": m} for m in modalities],
        "subject": {"reference": patient_url},
        "numberOfSeries": len(tree.series),
        "numberOfInstances": sum(len(s.instances) for s in tree.series),
    }
    started = fhir_datetime(tree.study_date, tree.study_time)
    if started:
        study["started"] = started
    if based_on:
        study["basedOn"] = based_on
    if order is not None:
        code = _concept(order.procedure_code, order.procedure_description)
        if code:
            study["procedureCode"] = [code]
    if tree.study_description:
        study["description"] = tree.study_description
    study["series"] = [
        {
            "uid": s.series_instance_uid,
            **({"number": s.series_number} if _unsigned(s.series_number) else {}),
            "modality": {"system": DCM, "code": s.modality or "OT"},
            **({"description": s.series_description} if s.series_description else {}),
            "numberOfInstances": len(s.instances),
            "instance": [
                {
                    "uid": i.sop_instance_uid,
                    "sopClass": {"system": URI_SYSTEM, "code": f"urn:oid:{i.sop_class_uid}"},
                    **({"number": i.instance_number} if _unsigned(i.instance_number) else {}),
                }
                for i in s.instances
            ],
        }
        for s in tree.series
    ]
    return study


def _unsigned(number: int | None) -> bool:
    """FHIR's numbers are unsignedInt; DICOM's IS may be negative, which FHIR has no place for."""
    return number is not None and number >= 0


def _concept(code: tuple[str, str, str], text: str) -> dict[str, Any] | None:
    value, scheme, meaning = code
    concept: dict[str, Any] = {}
    if value:
        coding = {"code": value, **({"display": meaning} if meaning else {})}
        system = CODING_SCHEMES.get(scheme.upper())
        concept["coding"] = [{"system": system, **coding} if system else coding]
    if text or meaning:
        concept["text"] = text or meaning
    return concept or None


def human_name(pn: str) -> dict[str, Any] | None:
    """A DICOM Person Name's alphabetic group (Family^Given^Middle^Prefix^Suffix) as a HumanName."""
    parts = (pn.split("=", maxsplit=1)[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (p.strip() for p in parts)
    if not any((family, given, middle, prefix, suffix)):
        return None
    name: dict[str, Any] = {"text": " ".join(p for p in (prefix, given, middle, family, suffix) if p)}
    if family:
        name["family"] = family
    if given or middle:
        name["given"] = [g for g in (given, middle) if g]
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    return name


def fhir_date(da: str) -> str:
    """DICOM DA (YYYYMMDD) as a FHIR date; empty when it is not a real date."""
    try:
        return datetime.strptime(da.strip(), "%Y%m%d").date().isoformat()
    except ValueError:
        return ""


def fhir_datetime(da: str, tm: str) -> str:
    """DICOM DA and TM as a FHIR dateTime: with a time, the offset of this machine's time zone
    on that day (FHIR requires one); a date alone stays a date."""
    day = fhir_date(da)
    digits = tm.strip().split(".")[0]
    if not day or len(digits) < 2 or not digits.isdigit():
        return day
    digits = digits.ljust(6, "0")[:6]
    try:
        moment = datetime.strptime(f"{da.strip()}{digits}", "%Y%m%d%H%M%S").astimezone()
    except ValueError:
        return day
    return moment.isoformat(timespec="seconds")
