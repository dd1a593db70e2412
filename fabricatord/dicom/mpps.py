"""Modality Performed Procedure Step objects (PS3.4 F.7): what an N-CREATE must carry, what an
N-SET may change, and the few values the worklist and the database need of them."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.tag import Tag

from fabricatord.config.values import is_valid_uid

MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
FINAL = (COMPLETED, DISCONTINUED)

# PS3.7 C.4.1.1.4 / C.4.2.1.4 status codes used here.
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_OBJECT_INSTANCE = 0x0112
MISSING_ATTRIBUTE = 0x0120
MISSING_ATTRIBUTE_VALUE = 0x0121

# PS3.4 F.7.2.1: what the SCU must send with a value in N-CREATE (type 1 for the SCU).
REQUIRED_ON_CREATE = (
    "PerformedProcedureStepID",
    "PerformedStationAETitle",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "PerformedProcedureStepStatus",
    "Modality",
    "ScheduledStepAttributesSequence",
)
# PS3.4 F.7.2.2.2: what must have a value once the step is COMPLETED or DISCONTINUED.
REQUIRED_WHEN_FINAL = ("PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime")


class MppsError(Exception):
    """A request refused with this status; `comment` goes into the Error Comment."""

    def __init__(self, status: int, comment: str, keywords: tuple[str, ...] = ()) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment
        self.keywords = keywords

    def status_dataset(self) -> Dataset:
        status = Dataset()
        status.Status = self.status
        status.ErrorComment = self.comment[:64]
        if self.keywords:
            status.AttributeIdentifierList = [Tag(keyword) for keyword in self.keywords]
        if self.status == PROCESSING_FAILURE:
            status.ErrorID = 0xA710  # PS3.4 F.7.2.2.4.1: may no longer be updated
        return status


@dataclass(frozen=True)
class Summary:
    """What the worklist and the database keep of a performed step, beside the whole object."""

    status: str
    performed_station_ae: str
    modality: str
    study_instance_uid: str
    accession_number: str
    sps_ids: tuple[str, ...]
    started: str
    ended: str


def check_create(sop_instance_uid: str, attributes: Dataset) -> Summary:
    """The N-CREATE's Attribute List checked against PS3.4 F.7.2.1."""
    if not is_valid_uid(sop_instance_uid):
        raise MppsError(INVALID_ATTRIBUTE_VALUE, "Affected SOP Instance UID is not a valid UID")
    missing = tuple(keyword for keyword in REQUIRED_ON_CREATE if keyword not in attributes)
    if missing:
        raise MppsError(MISSING_ATTRIBUTE, f"missing {', '.join(missing)}", missing)
    empty = tuple(keyword for keyword in REQUIRED_ON_CREATE if _empty(attributes, keyword))
    if empty:
        raise MppsError(MISSING_ATTRIBUTE_VALUE, f"no value for {', '.join(empty)}", empty)
    status = str(attributes.PerformedProcedureStepStatus)
    if status != IN_PROGRESS:
        raise MppsError(
            INVALID_ATTRIBUTE_VALUE,
            f"a new step must be IN PROGRESS, not {status}",
            ("PerformedProcedureStepStatus",),
        )
    return summary(attributes)


def merge_set(current: Dataset, modifications: Dataset) -> tuple[Dataset, Summary]:
    """The object after an N-SET, checked against the state rules of PS3.4 F.7.2.2."""
    status = str(current.get("PerformedProcedureStepStatus", ""))
    if status in FINAL:
        raise MppsError(PROCESSING_FAILURE, f"Performed Procedure Step is {status}: it may no longer be updated")
    merged = Dataset()
    merged.update(current)
    for element in modifications:
        merged[element.tag] = element
    new_status = str(merged.get("PerformedProcedureStepStatus", ""))
    if new_status not in (IN_PROGRESS, *FINAL):
        raise MppsError(
            INVALID_ATTRIBUTE_VALUE,
            f"status {new_status!r} is not IN PROGRESS, COMPLETED or DISCONTINUED",
            ("PerformedProcedureStepStatus",),
        )
    if new_status in FINAL:
        empty = tuple(keyword for keyword in REQUIRED_WHEN_FINAL if _empty(merged, keyword))
        if empty:
            raise MppsError(MISSING_ATTRIBUTE_VALUE, f"a {new_status} step needs {', '.join(empty)}", empty)
    return merged, summary(merged)


def summary(attributes: Dataset) -> Summary:
    items = list(attributes.get("ScheduledStepAttributesSequence", []) or [])
    first = items[0] if items else Dataset()
    return Summary(
        status=str(attributes.get("PerformedProcedureStepStatus", "")),
        performed_station_ae=str(attributes.get("PerformedStationAETitle", "")).strip()[:16],
        modality=str(attributes.get("Modality", ""))[:16],
        study_instance_uid=str(first.get("StudyInstanceUID", ""))[:64],
        accession_number=str(first.get("AccessionNumber", ""))[:16],
        sps_ids=tuple(str(item.ScheduledProcedureStepID) for item in items if item.get("ScheduledProcedureStepID")),
        started=_date_time(attributes, "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime"),
        ended=_date_time(attributes, "PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime"),
    )


def _empty(attributes: Dataset, keyword: str) -> bool:
    element = attributes.get(keyword)
    return element is None or element == "" or (isinstance(element, list) and not element)


def _date_time(attributes: Dataset, date_keyword: str, time_keyword: str) -> str:
    date = str(attributes.get(date_keyword, "") or "")
    time = str(attributes.get(time_keyword, "") or "").replace(":", "").partition(".")[0]
    return (date + time.ljust(6, "0")[:6])[:14] if date else ""
