"""Modality Performed Procedure Steps received from modalities: kept, checked against the state
rules of PS3.4 F, and carried onto the worklist steps they perform, in one transaction each."""

from __future__ import annotations

from collections.abc import Callable

from pydicom.dataset import Dataset
from sqlalchemy import Connection

from fabricatord.db import Database
from fabricatord.db.performed import PerformedRecord, PerformedSteps
from fabricatord.db.worklist import Worklist
from fabricatord.dicom.mpps import (
    DUPLICATE_SOP_INSTANCE,
    FINAL,
    NO_SUCH_OBJECT_INSTANCE,
    MppsError,
    Summary,
    check_create,
    merge_set,
)
from fabricatord.obs.logging import get_logger

log = get_logger(__name__)

STEP_STATUS = {"IN PROGRESS": "STARTED", "COMPLETED": "COMPLETED", "DISCONTINUED": "DISCONTINUED"}
"""Performed Procedure Step Status → the status of the scheduled steps it performs."""


Completed = Callable[[Connection, list[str]], None]
"""Told, in the N-SET's transaction, which studies an MPPS COMPLETED finished (FHIR export)."""


class PerformedProcedureSteps:
    def __init__(self, database: Database, on_completed: Completed | None = None) -> None:
        self._db = database
        self._on_completed = on_completed

    def create(self, sop_instance_uid: str, attributes: Dataset, calling_ae: str) -> Dataset:
        """N-CREATE: the step IN PROGRESS, its scheduled steps STARTED. MppsError says why not."""
        summary = check_create(sop_instance_uid, attributes)
        with self._db.writer.begin() as connection:
            if PerformedSteps.attributes(connection, sop_instance_uid) is not None:
                raise MppsError(DUPLICATE_SOP_INSTANCE, "this Performed Procedure Step exists already")
            PerformedSteps.add(connection, _record(sop_instance_uid, summary, calling_ae), attributes.to_json())
            started = Worklist.perform(connection, summary.sps_ids, summary.study_instance_uid, "STARTED")
        log.info(
            "mpps created",
            sop_instance_uid=sop_instance_uid,
            calling_ae=calling_ae,
            sps_ids=list(summary.sps_ids),
            steps_started=started,
        )
        return attributes

    def update(self, sop_instance_uid: str, modifications: Dataset, calling_ae: str) -> Dataset:
        """N-SET: the modifications merged in; COMPLETED or DISCONTINUED carried onto the steps."""
        with self._db.writer.begin() as connection:
            stored = PerformedSteps.attributes(connection, sop_instance_uid)
            if stored is None:
                raise MppsError(NO_SUCH_OBJECT_INSTANCE, "no such Performed Procedure Step")
            merged, summary = merge_set(Dataset.from_json(stored), modifications)
            PerformedSteps.replace(connection, _record(sop_instance_uid, summary, calling_ae), merged.to_json())
            changed = 0
            if summary.status in FINAL:
                changed = Worklist.perform(
                    connection, summary.sps_ids, summary.study_instance_uid, STEP_STATUS[summary.status]
                )
                if summary.status == "COMPLETED" and summary.study_instance_uid and self._on_completed:
                    self._on_completed(connection, [summary.study_instance_uid])
        log.info(
            "mpps updated",
            sop_instance_uid=sop_instance_uid,
            calling_ae=calling_ae,
            status=summary.status,
            steps_changed=changed,
        )
        return merged


def _record(sop_instance_uid: str, summary: Summary, calling_ae: str) -> PerformedRecord:
    return PerformedRecord(
        sop_instance_uid=sop_instance_uid,
        status=summary.status,
        calling_ae=calling_ae[:16],
        performed_station_ae=summary.performed_station_ae,
        modality=summary.modality,
        study_instance_uid=summary.study_instance_uid,
        accession_number=summary.accession_number,
        sps_ids="\\".join(summary.sps_ids)[:512],
        started=summary.started,
        ended=summary.ended,
    )
