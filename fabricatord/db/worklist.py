"""Orders, their requested procedures and scheduled steps: the worklist, and who fetched it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from fabricatord.db.engine import Database
from fabricatord.db.models import Order, Patient, RequestedProcedure, ScheduledStep, WorklistFetch

ACTIONABLE = ("SCHEDULED", "ARRIVED", "READY")
"""The step states a modality may still perform: what the worklist shows by default."""
STEP_STATES = (*ACTIONABLE, "STARTED", "COMPLETED", "DISCONTINUED", "CANCELED")


class UnknownPatient(LookupError):
    """An order names a patient the registry does not hold."""


@dataclass(frozen=True)
class StepPlan:
    sps_id: str
    modality: str
    start_date: str
    start_time: str
    station_ae: str = ""
    station_name: str = ""
    location: str = ""
    performing_physician: str = ""
    description: str = ""
    protocol_code: tuple[str, str, str] = ("", "", "")
    """Code value, coding scheme designator, code meaning."""


@dataclass(frozen=True)
class OrderPlan:
    """What a new order holds; made by the workflow from a command line or an HL7 message."""

    patient_id: str
    issuer: str
    accession_number: str
    requested_procedure_id: str
    study_instance_uid: str
    steps: list[StepPlan]
    procedure_description: str = ""
    procedure_code: tuple[str, str, str] = ("", "", "")
    priority: str = ""
    placer_order_number: str = ""
    filler_order_number: str = ""
    referring_physician_name: str = ""
    requesting_physician: str = ""
    requesting_service: str = ""
    admission_id: str = ""
    current_patient_location: str = ""
    source: str = "cli"


@dataclass(frozen=True)
class WorklistItem:
    """One scheduled step with its order and patient, flat, for listing."""

    sps_id: str
    status: str
    modality: str
    station_ae: str
    start: str
    accession_number: str
    requested_procedure_id: str
    study_instance_uid: str
    description: str
    patient_id: str
    patient_name: str
    fetched_by: list[str] = field(default_factory=list)


def start_datetime(start_date: str, start_time: str) -> str:
    """Date and TM as YYYYMMDDHHMMSS, so that one string comparison orders both."""
    digits = start_time.replace(":", "").partition(".")[0]
    return start_date + digits.ljust(6, "0")[:6]


class Worklist:
    def __init__(self, database: Database) -> None:
        self._db = database

    def schedule(self, plan: OrderPlan) -> int:
        """Store the order with its procedure and steps in one transaction; the order's key."""
        with self._db.writes.begin() as session:
            patient_pk = session.scalar(
                select(Patient.id).where(Patient.patient_id == plan.patient_id, Patient.issuer == plan.issuer)
            )
            if patient_pk is None:
                raise UnknownPatient(f"no patient {plan.patient_id!r} (issuer {plan.issuer!r})")
            order = Order(
                patient_pk=patient_pk,
                placer_order_number=plan.placer_order_number,
                filler_order_number=plan.filler_order_number,
                accession_number=plan.accession_number,
                status="SCHEDULED",
                referring_physician_name=plan.referring_physician_name,
                requesting_physician=plan.requesting_physician,
                requesting_service=plan.requesting_service,
                admission_id=plan.admission_id,
                current_patient_location=plan.current_patient_location,
                source=plan.source,
            )
            code_value, code_scheme, code_meaning = plan.procedure_code
            procedure = RequestedProcedure(
                requested_procedure_id=plan.requested_procedure_id,
                study_instance_uid=plan.study_instance_uid,
                description=plan.procedure_description,
                code_value=code_value,
                code_scheme=code_scheme,
                code_meaning=code_meaning,
                priority=plan.priority,
            )
            procedure.steps = [_step(step) for step in plan.steps]
            order.procedures = [procedure]
            session.add(order)
            session.flush()
            return order.id

    def items(
        self,
        statuses: Iterable[str] = ACTIONABLE,
        station_ae: str = "",
        start_date: str = "",
        limit: int = 100,
    ) -> list[WorklistItem]:
        """Steps by start time, with the AEs that fetched each."""
        statement = (
            select(ScheduledStep, RequestedProcedure, Order, Patient)
            .join(RequestedProcedure, ScheduledStep.procedure_pk == RequestedProcedure.id)
            .join(Order, RequestedProcedure.order_pk == Order.id)
            .join(Patient, Order.patient_pk == Patient.id)
            .where(ScheduledStep.status.in_(list(statuses)))
            .order_by(ScheduledStep.start_datetime, ScheduledStep.id)
            .limit(limit)
        )
        if station_ae:
            statement = statement.where(ScheduledStep.station_ae == station_ae)
        if start_date:
            statement = statement.where(ScheduledStep.start_date == start_date)
        with self._db.reads() as session:
            rows = session.execute(statement).all()
            fetched = _fetchers(session, [step.id for step, *_ in rows])
            return [
                WorklistItem(
                    sps_id=step.sps_id,
                    status=step.status,
                    modality=step.modality,
                    station_ae=step.station_ae,
                    start=step.start_datetime,
                    accession_number=order.accession_number,
                    requested_procedure_id=procedure.requested_procedure_id,
                    study_instance_uid=procedure.study_instance_uid,
                    description=step.description or procedure.description,
                    patient_id=patient.patient_id,
                    patient_name=patient.name,
                    fetched_by=fetched.get(step.id, []),
                )
                for step, procedure, order, patient in rows
            ]

    def record_fetches(self, step_pks: list[int], calling_ae: str) -> None:
        """Remember that `calling_ae` was answered these steps (the `on_query` acquisition reads it)."""
        if not step_pks:
            return
        now = datetime.now(UTC)
        with self._db.writes.begin() as session:
            session.execute(
                insert(WorklistFetch),
                [{"step_pk": pk, "calling_ae": calling_ae, "fetched_at": now} for pk in step_pks],
            )


def _step(plan: StepPlan) -> ScheduledStep:
    code_value, code_scheme, code_meaning = plan.protocol_code
    return ScheduledStep(
        sps_id=plan.sps_id,
        station_ae=plan.station_ae,
        station_name=plan.station_name,
        location=plan.location,
        modality=plan.modality,
        start_date=plan.start_date,
        start_time=plan.start_time,
        start_datetime=start_datetime(plan.start_date, plan.start_time),
        performing_physician=plan.performing_physician,
        description=plan.description,
        protocol_code_value=code_value,
        protocol_code_scheme=code_scheme,
        protocol_code_meaning=code_meaning,
        status="SCHEDULED",
    )


def _fetchers(session: Session, step_pks: list[int]) -> dict[int, list[str]]:
    if not step_pks:
        return {}
    rows = session.execute(
        select(WorklistFetch.step_pk, WorklistFetch.calling_ae)
        .where(WorklistFetch.step_pk.in_(step_pks))
        .distinct()
        .order_by(WorklistFetch.step_pk, WorklistFetch.calling_ae)
    )
    fetched: dict[int, list[str]] = {}
    for step_pk, calling_ae in rows:
        fetched.setdefault(step_pk, []).append(calling_ae)
    return fetched
