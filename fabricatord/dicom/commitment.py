"""Storage Commitment Push Model (PS3.4 J): the N-ACTION's Action Information a requester sends,
and the N-EVENT-REPORT's Event Information that answers it, both ways.

What is committed is decided by the caller, which knows the index; this module checks what a
peer sent and says it back in DICOM.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from fabricatord.config.values import is_valid_uid

SOP_CLASS = "1.2.840.10008.1.20.1"
"""Storage Commitment Push Model SOP Class."""
SOP_INSTANCE = "1.2.840.10008.1.20.1.1"
"""Its well-known SOP Instance, which every N-ACTION and N-EVENT-REPORT names."""
REQUEST_COMMITMENT = 1
"""Action Type ID of "Request Storage Commitment"."""
ALL_COMMITTED, SOME_FAILED = 1, 2
"""Event Type IDs of the report: every instance committed, or some not."""

# PS3.4 J.3.3.1.1: the Failure Reasons (0008,1197) of the Failed SOP Sequence.
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
RESOURCE_LIMITATION = 0x0213
CLASS_NOT_SUPPORTED = 0x0122
CLASS_INSTANCE_CONFLICT = 0x0119
DUPLICATE_TRANSACTION = 0x0131
FAILURE_REASONS = {
    PROCESSING_FAILURE: "processing failure",
    NO_SUCH_OBJECT_INSTANCE: "no such object instance",
    RESOURCE_LIMITATION: "resource limitation",
    CLASS_NOT_SUPPORTED: "referenced SOP Class not supported",
    CLASS_INSTANCE_CONFLICT: "class / instance conflict",
    DUPLICATE_TRANSACTION: "duplicate transaction UID",
}

# Statuses of the N-ACTION and N-EVENT-REPORT answers used here (PS3.7 10.1.4.1.10, 10.1.1.1.8):
# Action or Event Information missing an attribute, or with one that is not right, is an
# invalid argument value, the attribute named in the Error Comment.
INVALID_ARGUMENT_VALUE = 0x0115
NO_SUCH_ACTION = 0x0123
NO_SUCH_EVENT_TYPE = 0x0113


def reason_text(reason: int) -> str:
    """A Failure Reason as people read it: `0x0112 (no such object instance)`."""
    name = FAILURE_REASONS.get(reason)
    return f"0x{reason:04X} ({name})" if name else f"0x{reason:04X}"


class CommitmentError(ValueError):
    """An N-ACTION or N-EVENT-REPORT refused with `status`; the message names the attribute."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status


@dataclass(frozen=True)
class Reference:
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Request:
    """What a requester asks to be committed."""

    transaction_uid: str
    references: list[Reference]


@dataclass(frozen=True)
class Report:
    """What a report says: each instance committed, or failed with its reason."""

    transaction_uid: str
    committed: list[Reference]
    failed: list[tuple[Reference, int]]

    @property
    def event_type(self) -> int:
        return SOME_FAILED if self.failed else ALL_COMMITTED


def action_information(transaction_uid: str, references: Iterable[Reference]) -> Dataset:
    """The N-ACTION's dataset for a request of ours."""
    dataset = Dataset()
    dataset.TransactionUID = transaction_uid
    dataset.ReferencedSOPSequence = Sequence([_item(reference) for reference in references])
    return dataset


def read_request(dataset: Dataset) -> Request:
    """A requester's Action Information, checked; CommitmentError names what is wrong."""
    transaction_uid = _uid(dataset, "TransactionUID", "Transaction UID (0008,1195)")
    if "ReferencedSOPSequence" not in dataset:
        raise CommitmentError(INVALID_ARGUMENT_VALUE, "Referenced SOP Sequence (0008,1199) is missing")
    references = [
        _reference(item, f"Referenced SOP Sequence item {number}")
        for number, item in enumerate(dataset.ReferencedSOPSequence, 1)
    ]
    if not references:
        raise CommitmentError(INVALID_ARGUMENT_VALUE, "Referenced SOP Sequence (0008,1199) is empty")
    return Request(transaction_uid, references)


def event_information(report: Report, retrieve_ae_title: str) -> Dataset:
    """The N-EVENT-REPORT's dataset: Referenced SOP Sequence only when something was committed,
    Failed SOP Sequence only when something failed (PS3.4 J.3.3.1.1)."""
    dataset = Dataset()
    dataset.TransactionUID = report.transaction_uid
    if report.committed:
        dataset.RetrieveAETitle = retrieve_ae_title
        dataset.ReferencedSOPSequence = Sequence([_item(reference) for reference in report.committed])
    if report.failed:
        failed = []
        for reference, reason in report.failed:
            item = _item(reference)
            item.FailureReason = reason
            failed.append(item)
        dataset.FailedSOPSequence = Sequence(failed)
    return dataset


def read_report(event_type: int, dataset: Dataset) -> Report:
    """A peer's Event Information, checked; CommitmentError names what is wrong."""
    if event_type not in (ALL_COMMITTED, SOME_FAILED):
        raise CommitmentError(NO_SUCH_EVENT_TYPE, f"Event Type ID {event_type} is not 1 or 2")
    transaction_uid = _uid(dataset, "TransactionUID", "Transaction UID (0008,1195)")
    committed = [
        _reference(item, f"Referenced SOP Sequence item {number}")
        for number, item in enumerate(dataset.get("ReferencedSOPSequence") or [], 1)
    ]
    failed = []
    for number, item in enumerate(dataset.get("FailedSOPSequence") or [], 1):
        where = f"Failed SOP Sequence item {number}"
        reason = item.get("FailureReason")
        if reason is None or reason == "":
            raise CommitmentError(INVALID_ARGUMENT_VALUE, f"{where}: Failure Reason (0008,1197) is missing")
        if int(reason) == 0:
            raise CommitmentError(INVALID_ARGUMENT_VALUE, f"{where}: Failure Reason (0008,1197) is 0, not a failure")
        failed.append((_reference(item, where), int(reason)))
    return Report(transaction_uid, committed, failed)


def decide(
    references: Iterable[Reference], held: Mapping[str, str], storage_classes: Iterable[str]
) -> list[tuple[Reference, int]]:
    """Each reference with its outcome: 0 when `held` (SOP Instance UID → the class we hold it
    as) has it as the same class; else the Failure Reason."""
    known_classes = frozenset(storage_classes)
    outcomes = []
    for reference in references:
        ours = held.get(reference.sop_instance_uid)
        if ours is None:
            reason = NO_SUCH_OBJECT_INSTANCE if reference.sop_class_uid in known_classes else CLASS_NOT_SUPPORTED
        elif ours != reference.sop_class_uid:
            reason = CLASS_INSTANCE_CONFLICT
        else:
            reason = 0
        outcomes.append((reference, reason))
    return outcomes


def _item(reference: Reference) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = reference.sop_class_uid
    item.ReferencedSOPInstanceUID = reference.sop_instance_uid
    return item


def _reference(item: Dataset, where: str) -> Reference:
    return Reference(
        _uid(item, "ReferencedSOPClassUID", f"{where}: Referenced SOP Class UID (0008,1150)"),
        _uid(item, "ReferencedSOPInstanceUID", f"{where}: Referenced SOP Instance UID (0008,1155)"),
    )


def _uid(dataset: Dataset, keyword: str, name: str) -> str:
    value = dataset.get(keyword)
    if value is None or str(value).strip() == "":
        raise CommitmentError(INVALID_ARGUMENT_VALUE, f"{name} is missing")
    text = str(value).strip()
    if not is_valid_uid(text):
        raise CommitmentError(INVALID_ARGUMENT_VALUE, f"{name} is not a UID: {text[:64]!r}")
    return text
