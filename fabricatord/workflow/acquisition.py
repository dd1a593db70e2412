"""The simulated modality: worklist steps become studies, as a real modality would make them.

When an order is scheduled, each of its steps gets an acquisition job whose policy says when it
runs: `immediate`, after a `delay`, once a modality has fetched it (`on_query`), or when a user
says so (`manual`: `fabricatord acquire`). A worker thread runs due jobs: it reads the item,
reports MPPS IN PROGRESS to `[synth] mpps_peer`, generates the study the order describes,
stores it (which queues its routes), and reports MPPS COMPLETED listing the series it made. The
study's UIDs are drawn from its Study Instance UID, so a job run again after a crash makes the
same instances, which storage then keeps once.
"""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime, timedelta

from pydicom.dataset import Dataset

from fabricatord.config import Settings
from fabricatord.config.values import parse_duration
from fabricatord.db import Database
from fabricatord.db.jobs import AcquisitionRecord, Acquisitions
from fabricatord.db.worklist import StepDetail, Worklist
from fabricatord.dicom import scu
from fabricatord.dicom.storage import InstanceWriter
from fabricatord.obs import metrics
from fabricatord.obs.faults import faultpoint
from fabricatord.obs.logging import get_logger, in_context
from fabricatord.synth.builder import OrderContext
from fabricatord.synth.templates import TEMPLATES
from fabricatord.synth.uids import UidFactory
from fabricatord.workflow.fhir import Exports
from fabricatord.workflow.generation import GeneratedStudy, GenerateOptions, StudyGenerator

log = get_logger(__name__)

RETRY_AFTER = timedelta(seconds=30)
MAX_ATTEMPTS = 5


class SimulatedModality:
    """Performs one worklist step: MPPS, the study, MPPS again."""

    def __init__(self, settings: Settings, database: Database, writer: InstanceWriter, exports: Exports) -> None:
        self._settings = settings
        self._database = database
        self._writer = writer
        self._exports = exports
        self._generator = StudyGenerator(settings, database, writer)

    def perform(self, item: StepDetail) -> tuple[GeneratedStudy, str]:
        """The study made for `item`, and the MPPS SOP Instance UID it was reported under."""
        chosen = self._settings.synth.procedure_templates.get(item.procedure_code[0], item.modality).upper()
        modality = chosen if chosen in TEMPLATES else "SC"
        station_ae = (item.station_ae or f"{modality}01")[:16]
        mpps_uid = UidFactory(self._settings.node.uid_root, random.Random()).new()
        peer = self._mpps_peer()
        attributes = _in_progress(item, modality, station_ae, datetime.now())
        scu.performed_procedure_step(
            peer, station_ae, mpps_uid, attributes, create=True, timeouts=scu.Timeouts.of(self._settings.dicom)
        )
        if peer.name != "self":  # our own MPPS SCP moves the step when MPPS comes to us
            self._mark(item, "STARTED")
        order = OrderContext(
            requested_procedure_id=item.requested_procedure_id,
            sps_id=item.sps_id,
            requested_procedure_description=item.procedure_description,
            procedure_code=item.procedure_code,
            sps_description=item.step_description,
            protocol_code=item.protocol_code,
            requesting_physician=item.requesting_physician,
            performing_physician=item.performing_physician,
            performed_step_uid=mpps_uid,
            performed_step_id=item.sps_id,
        )
        study = self._generator.generate(
            GenerateOptions(
                modality=modality,
                patient_id=item.patient_id,
                issuer=item.issuer,
                accession_number=item.accession_number,
                study_instance_uid=item.study_instance_uid,
                study_id=item.requested_procedure_id,
                study_description=item.procedure_description,
                referring_physician=item.referring_physician_name,
                station_name=item.station_name,
                order=order,
            )
        )
        faultpoint("acquire.after_store")
        done = _completed(study, datetime.now())
        scu.performed_procedure_step(
            peer, station_ae, mpps_uid, done, create=False, timeouts=scu.Timeouts.of(self._settings.dicom)
        )
        if peer.name != "self":
            self._mark(item, "COMPLETED")
        return study, mpps_uid

    def reload(self, settings: Settings) -> None:
        self._settings = settings
        self._generator = StudyGenerator(settings, self._database, self._writer)

    def _mark(self, item: StepDetail, status: str) -> None:
        """What our MPPS SCP does when the MPPS comes to us, for MPPS sent to another peer."""
        with self._database.writer.begin() as connection:
            Worklist.perform(connection, (item.sps_id,), item.study_instance_uid, status)
            if status == "COMPLETED":
                self._exports.completed(connection, [item.study_instance_uid])

    def _mpps_peer(self) -> scu.Peer:
        """Where MPPS goes: our own node (`self`) or a `[[peers]]` entry."""
        name = self._settings.synth.mpps_peer
        if name == "self":
            return scu.Peer.own(self._settings.node.ae_title, self._settings.dicom)
        peer = self._settings.peer(name)
        assert peer is not None  # the config loader checked the name
        return scu.Peer.of(peer)


def _in_progress(item: StepDetail, modality: str, station_ae: str, started: datetime) -> Dataset:
    """The N-CREATE a modality sends when it starts a scheduled step (PS3.4 F.7.2.1)."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepID = item.sps_id
    ds.PerformedStationAETitle = station_ae
    ds.PerformedStationName = item.station_name
    ds.PerformedProcedureStepStartDate = f"{started:%Y%m%d}"
    ds.PerformedProcedureStepStartTime = f"{started:%H%M%S}"
    ds.PerformedProcedureStepDescription = item.procedure_description
    ds.Modality = modality
    ds.PatientID = item.patient_id
    ds.IssuerOfPatientID = item.issuer
    ds.StudyID = item.requested_procedure_id
    step = Dataset()
    step.StudyInstanceUID = item.study_instance_uid
    step.AccessionNumber = item.accession_number
    step.RequestedProcedureID = item.requested_procedure_id
    step.RequestedProcedureDescription = item.procedure_description
    step.ScheduledProcedureStepID = item.sps_id
    step.ScheduledProcedureStepDescription = item.step_description
    ds.ScheduledStepAttributesSequence = [step]
    return ds


def _completed(study: GeneratedStudy, ended: datetime) -> Dataset:
    """The N-SET that ends the step, with the Performed Series Sequence of what was made."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "COMPLETED"
    ds.PerformedProcedureStepEndDate = f"{ended:%Y%m%d}"
    ds.PerformedProcedureStepEndTime = f"{ended:%H%M%S}"
    series: dict[str, Dataset] = {}
    for instance in study.made:
        item = series.get(instance.series_instance_uid)
        if item is None:
            item = series[instance.series_instance_uid] = Dataset()
            item.SeriesInstanceUID = instance.series_instance_uid
            item.SeriesDescription = instance.series_description
            item.ProtocolName = instance.series_description
            item.RetrieveAETitle = ""
            item.PerformingPhysicianName = ""
            item.OperatorsName = ""
            item.ReferencedImageSequence = []
        reference = Dataset()
        reference.ReferencedSOPClassUID = instance.sop_class_uid
        reference.ReferencedSOPInstanceUID = instance.sop_instance_uid
        item.ReferencedImageSequence.append(reference)
    ds.PerformedSeriesSequence = list(series.values())
    return ds


class Acquirer:
    """The worker thread that runs due acquisition jobs, one at a time."""

    def __init__(self, settings: Settings, database: Database, writer: InstanceWriter, exports: Exports) -> None:
        self._jobs = Acquisitions(database, settings.node_name, timedelta(seconds=parse_duration(settings.node.lease)))
        self._worklist = Worklist(database)
        self._modality = SimulatedModality(settings, database, writer, exports)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        recovered = self._jobs.recover()
        if recovered:
            log.info("acquisitions resumed after a restart", jobs=recovered)
        self._thread = threading.Thread(target=self._run, name="acquisition", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def wake(self) -> None:
        """Something may be due now (a new order, a release): look without waiting."""
        self._wake.set()

    def reload(self, settings: Settings) -> None:
        """New `[synth]` and `[[peers]]` (SIGHUP): the next acquisition uses them."""
        self._modality.reload(settings)

    def _run(self) -> None:
        while not self._stop.is_set():
            jobs = self._jobs.claim(1)
            if not jobs:
                self._wake.wait(timeout=_seconds_until(self._jobs.next_due()))
                self._wake.clear()
                continue
            with in_context(job=f"a{jobs[0].id}"):  # as `fabricatord jobs show` names it
                self._acquire(jobs[0])

    def _acquire(self, job: AcquisitionRecord) -> None:
        started = time.perf_counter()
        modality = "unknown"
        try:
            item = self._worklist.detail(job.step_pk)
            if item is None or item.status in ("CANCELED", "DISCONTINUED", "COMPLETED"):
                self._jobs.finish(job.id, "canceled", f"the step is {item.status if item else 'gone'}")
                return
            modality = item.modality or "unknown"
            study, mpps_uid = self._modality.perform(item)
        except Exception as exc:  # a peer down, a full disk: retried, then kept as failed
            failed = job.attempts >= MAX_ATTEMPTS
            metrics.ACQUISITIONS.labels(modality, "failed" if failed else "retry").inc()
            log.warning("acquisition failed", step=job.step_pk, attempt=job.attempts, error=str(exc), final=failed)
            retry_at = None if failed else datetime.now(UTC) + RETRY_AFTER * job.attempts
            self._jobs.finish(job.id, "failed" if failed else "pending", str(exc), retry_at=retry_at)
            return
        self._jobs.finish(job.id, "done", "", study.study_instance_uid, mpps_uid, len(study.files))
        metrics.ACQUISITIONS.labels(study.modality, "done").inc()
        metrics.ACQUISITION_SECONDS.labels(study.modality).observe(time.perf_counter() - started)
        log.info(
            "acquired",
            sps_id=item.sps_id,
            accession=item.accession_number,
            study_instance_uid=study.study_instance_uid,
            instances=len(study.files),
            seconds=round(study.seconds, 3),
        )


def _seconds_until(when: datetime | None) -> float:
    # At most a second: a job scheduled by another process (`worklist add`) cannot wake us.
    if when is None:
        return 1.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.05, min(1.0, (when - datetime.now(UTC)).total_seconds()))
