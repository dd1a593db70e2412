"""Putting orders on the worklist: identifiers from the counters, patients from the registry.

`fabricatord worklist add` comes here today; the HL7 listener will hand its orders to the same
code, so that an item made either way looks the same to a modality.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

from fabricatord.config import Settings
from fabricatord.db import Database, Sequences
from fabricatord.db.jobs import Acquisitions
from fabricatord.db.worklist import (
    PROCEDURE_COUNTER,
    STEP_COUNTER,
    STEP_STATES,
    OrderPlan,
    ProcedurePlan,
    StepPlan,
    Worklist,
)
from fabricatord.hl7.orders import OrderMessage
from fabricatord.obs.logging import get_logger
from fabricatord.synth.patients import Demographics
from fabricatord.synth.templates import TEMPLATES
from fabricatord.synth.uids import UidFactory
from fabricatord.workflow.generation import StudyGenerator

log = get_logger(__name__)


@dataclass(frozen=True)
class WorklistRequest:
    modality: str
    station_ae: str = ""
    station_name: str = ""
    location: str = ""
    start: datetime | None = None
    """None: now."""
    patient_id: str = ""
    """A registered patient; empty makes a synthetic one."""
    accession_number: str = ""
    procedure_description: str = ""
    procedure_code: tuple[str, str, str] = ("", "", "")
    step_description: str = ""
    protocol_code: tuple[str, str, str] = ("", "", "")
    referring_physician: str = ""
    requesting_physician: str = ""
    performing_physician: str = ""
    priority: str = ""


@dataclass(frozen=True)
class ScheduledOrder:
    accession_number: str
    requested_procedure_id: str
    sps_id: str
    study_instance_uid: str
    patient: Demographics
    start: datetime


def parse_code(text: str) -> tuple[str, str, str]:
    """`VALUE^SCHEME^MEANING` (HL7 CE order) as a code triplet; empty text, no code."""
    if not text:
        return "", "", ""
    parts = [*text.split("^"), "", ""][:3]
    if len(parts[0]) > 16 or not parts[1]:
        raise ValueError(f"a code is VALUE^SCHEME^MEANING with a value of at most 16 characters, not {text!r}")
    return parts[0], parts[1], parts[2]


class Scheduler:
    def __init__(self, settings: Settings, database: Database) -> None:
        self._settings = settings
        self._generator = StudyGenerator(settings, database)
        self._sequences = Sequences(database)
        self._database = database

    def add(self, request: WorklistRequest) -> ScheduledOrder:
        """Plan the order and put it on the worklist."""
        plan, patient, start = self.plan(request)
        with self._database.writer.begin() as connection:
            order_pk = Worklist.place(connection, plan)
            Acquisitions.schedule_order(connection, order_pk, self._settings)
        procedure = plan.procedures[0]
        return ScheduledOrder(
            plan.accession_number,
            procedure.requested_procedure_id,
            procedure.steps[0].sps_id,
            procedure.study_instance_uid,
            patient,
            start,
        )

    def order_text(self, request: WorklistRequest, version: str = "2.5.1") -> tuple[str, str]:
        """(control ID, a realistic ORM^O01 for the order `request` plans): `hl7 orm` and the
        console send it; its patient is registered, its identifiers drawn, nothing scheduled."""
        import hl7

        from fabricatord.hl7.orders import orm_o01

        plan, patient, start = self.plan(request)
        control_id = hl7.generate_message_control_id()
        return control_id, orm_o01(order_message(plan, patient, start), control_id, datetime.now(), version)

    def change_step(self, sps_id: str, status: str) -> int:
        """A step's status set by hand (the console, the API); a step canceled or discontinued
        is not acquired. How many steps changed; LookupError when no step has this SPS ID."""
        if status not in STEP_STATES:
            raise ValueError(f"status {status!r} is not one of {', '.join(STEP_STATES)}")
        with self._database.writer.begin() as connection:
            pks = [pk for pk in Worklist(self._database).steps_named(sps_id) if pk]
            if not pks:
                raise LookupError(f"no worklist step has the SPS ID {sps_id!r}")
            changed = Worklist.set_step_status(connection, pks, status)
            if status in ("CANCELED", "DISCONTINUED"):
                Acquisitions.cancel(connection, pks)
            return changed

    def plan(self, request: WorklistRequest) -> tuple[OrderPlan, Demographics, datetime]:
        """An order with its identifiers drawn and its patient registered, not yet scheduled:
        what `worklist add` schedules and `hl7 orm` writes as a message."""
        modality = request.modality.upper()
        if modality not in TEMPLATES:
            raise ValueError(f"unknown modality {request.modality!r} (known: {', '.join(TEMPLATES)})")
        template = TEMPLATES[modality]
        patient, _ = self._generator.new_patient(request.patient_id, template.patient_sex)
        procedure_number = self._sequences.take(PROCEDURE_COUNTER, 1, 1)[0]
        step_number = self._sequences.take(STEP_COUNTER, 1, 1)[0]
        # Under a seed, order n draws the same accession letters and study UID in every run.
        seed = self._settings.synth.seed
        rng = random.Random() if seed is None else random.Random(f"{seed}:order:{procedure_number}")
        accession = request.accession_number or self._generator.next_accession(rng)
        study_uid = UidFactory(self._settings.node.uid_root, rng).new()
        start = (request.start or datetime.now()).replace(microsecond=0)
        description = (
            request.procedure_description
            or request.procedure_code[2]
            or self._settings.modality(modality).study_description
            or template.study_description
        )
        step = StepPlan(
            sps_id=f"SPS{step_number:07d}",
            modality=modality,
            start_date=start.strftime("%Y%m%d"),
            start_time=start.strftime("%H%M%S"),
            station_ae=request.station_ae,
            station_name=request.station_name,
            location=request.location,
            performing_physician=request.performing_physician,
            description=request.step_description or description,
            protocol_code=request.protocol_code,
        )
        plan = OrderPlan(
            patient_id=patient.patient_id,
            issuer=patient.issuer,
            accession_number=accession,
            referring_physician_name=request.referring_physician,
            requesting_physician=request.requesting_physician,
            procedures=[
                ProcedurePlan(
                    requested_procedure_id=f"RP{procedure_number:07d}",
                    study_instance_uid=study_uid,
                    description=description,
                    code=request.procedure_code,
                    priority=request.priority,
                    steps=[step],
                )
            ],
        )
        return plan, patient, start


def order_message(plan: OrderPlan, patient: Demographics, start: datetime) -> OrderMessage:
    """The ORM^O01 an order placer would have sent for `plan`: placer order number from the
    requested procedure's counter, filler order number the accession, as order fillers assign."""
    procedure = plan.procedures[0]
    step = procedure.steps[0]
    return OrderMessage(
        patient_id=patient.patient_id,
        issuer=patient.issuer,
        patient_name=patient.name,
        birth_date=patient.birth_date,
        sex=patient.sex,
        address=patient.address,
        phone=patient.phone,
        accession_number=plan.accession_number,
        requested_procedure_id=procedure.requested_procedure_id,
        sps_id=step.sps_id,
        study_instance_uid=procedure.study_instance_uid,
        modality=step.modality,
        start=start,
        placer_order_number=plan.placer_order_number or "PO" + procedure.requested_procedure_id.removeprefix("RP"),
        filler_order_number=plan.filler_order_number or plan.accession_number,
        procedure_code=procedure.code,
        procedure_description=procedure.description,
        referring_physician=plan.referring_physician_name,
        requesting_physician=plan.requesting_physician,
        performing_physician=step.performing_physician,
    )


class Fetches:
    """Worklist items handed to a modality: recorded as fetched, and the `on_query` acquisitions
    of their steps made due. Written on a thread of its own, so that the modality does not wait
    for it; what was answered counts, also when the query was cancelled part-way."""

    def __init__(self, database: Database, on_due: Callable[[], None]) -> None:
        self._worklist = Worklist(database)
        self._acquisitions = Acquisitions(database)
        self._on_due = on_due
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="worklist-fetches")

    def record(self, step_pks: list[int], calling_ae: str) -> None:
        self._thread.submit(self._record, step_pks, calling_ae)

    def _record(self, step_pks: list[int], calling_ae: str) -> None:
        try:
            self._worklist.record_fetches(step_pks, calling_ae)
            if self._acquisitions.release(step_pks, ("on_query",)):
                self._on_due()
        except Exception as exc:  # the answers went out; only the record of them is missing
            log.error("worklist fetches could not be recorded", calling_ae=calling_ae, error=str(exc))

    def close(self) -> None:
        """Wait for what was handed over to be recorded."""
        self._thread.shutdown(wait=True)
