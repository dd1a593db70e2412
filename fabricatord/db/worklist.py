"""Orders, their requested procedures and scheduled steps: the worklist, and who fetched it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, bindparam, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fabricatord.db import raw
from fabricatord.db.engine import Database
from fabricatord.db.models import Order, Patient, RequestedProcedure, ScheduledStep, WorklistFetch

ACTIONABLE = ("SCHEDULED", "ARRIVED", "READY")
"""The step states a modality may still perform: what the worklist shows by default."""
STEP_STATES = (*ACTIONABLE, "STARTED", "COMPLETED", "DISCONTINUED", "CANCELED")

T = TypeVar("T")
PROCEDURE_COUNTER = "requested_procedure"
STEP_COUNTER = "scheduled_step"
"""The counters behind generated requested procedure and step IDs (`RP0000001`, `SPS0000001`)."""


@dataclass(frozen=True)
class StudyOrder:
    """The order a study was made for, as the FHIR export tells it."""

    placer_order_number: str
    filler_order_number: str
    accession_number: str
    status: str
    priority: str
    procedure_code: tuple[str, str, str]
    procedure_description: str
    requesting_physician: str
    authored: datetime


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
class ProcedurePlan:
    """One requested procedure (one study to be made) and its steps."""

    requested_procedure_id: str
    study_instance_uid: str
    steps: list[StepPlan]
    description: str = ""
    code: tuple[str, str, str] = ("", "", "")
    priority: str = ""


@dataclass(frozen=True)
class OrderPlan:
    """What an order holds; made by the workflow from a command line or an HL7 message."""

    patient_id: str
    issuer: str
    accession_number: str
    procedures: list[ProcedurePlan]
    placer_order_number: str = ""
    filler_order_number: str = ""
    referring_physician_name: str = ""
    requesting_physician: str = ""
    requesting_service: str = ""
    admission_id: str = ""
    current_patient_location: str = ""
    source: str = "cli"
    specific_character_set: str = ""
    hl7_message_pk: int | None = None


@dataclass(frozen=True)
class StepDetail:
    """One step with everything its order says: what the simulated modality reads."""

    step_pk: int
    status: str
    sps_id: str
    modality: str
    station_ae: str
    station_name: str
    step_description: str
    protocol_code: tuple[str, str, str]
    performing_physician: str
    requested_procedure_id: str
    study_instance_uid: str
    procedure_description: str
    procedure_code: tuple[str, str, str]
    accession_number: str
    referring_physician_name: str
    requesting_physician: str
    patient_id: str
    issuer: str
    order_pk: int


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

    # place, find and set_status run once per HL7 order: Core statements built once, because the
    # ORM's unit of work cost several times the commit here.
    @staticmethod
    def place(connection: Connection, plan: OrderPlan, patient_pk: int | None = None) -> int:
        """Add a new order in the caller's transaction; its key. `patient_pk`, when the caller
        knows it, saves looking the plan's patient up."""
        patient_pk = patient_pk or _patient_pk(connection, plan)
        now = datetime.now(UTC)
        order_pk = raw.first(
            connection,
            _INSERT_ORDER,
            {
                **{name: getattr(plan, name) for name in _ORDER_COLUMNS},
                "patient_pk": patient_pk,
                "status": "SCHEDULED",
                "source": plan.source,
                "hl7_message_pk": plan.hl7_message_pk,
                "created_at": now,
                "updated_at": now,
            },
        )[0]
        for procedure in plan.procedures:
            try:
                procedure_pk = raw.first(
                    connection, _INSERT_PROCEDURE, {"order_pk": order_pk, **_procedure_values(procedure)}
                )[0]
            except IntegrityError as exc:  # the unique Study Instance UID: cheaper than a look-up first
                uid = procedure.study_instance_uid
                raise DuplicateStudy(f"Study Instance UID {uid} belongs to another order") from exc
            steps = [
                {**_step_values(step), "procedure_pk": procedure_pk, "status": "SCHEDULED", "updated_at": now}
                for step in procedure.steps
            ]
            raw.run_many(connection, _INSERT_STEP, steps)
        return int(order_pk)

    @staticmethod
    def find(connection: Connection, placer_order_number: str, filler_order_number: str) -> int | None:
        """The newest order with this placer order number, else with this filler order number."""
        if not (placer_order_number or filler_order_number):
            return None
        found = raw.first(
            connection, _FIND_ORDER, {"placer": placer_order_number or None, "filler": filler_order_number or None}
        )
        return None if found is None else int(found[0])

    @staticmethod
    def step_pks(connection: Connection, order_pk: int) -> list[int]:
        """The order's steps, in the order they were made."""
        return [
            int(pk)
            for pk in connection.execute(
                select(ScheduledStep.id)
                .join(RequestedProcedure, ScheduledStep.procedure_pk == RequestedProcedure.id)
                .where(RequestedProcedure.order_pk == order_pk)
                .order_by(ScheduledStep.id)
            ).scalars()
        ]

    def detail(self, step_pk: int) -> StepDetail | None:
        with self._db.reads() as session:
            row = session.execute(
                select(ScheduledStep, RequestedProcedure, Order, Patient)
                .join(RequestedProcedure, ScheduledStep.procedure_pk == RequestedProcedure.id)
                .join(Order, RequestedProcedure.order_pk == Order.id)
                .join(Patient, Order.patient_pk == Patient.id)
                .where(ScheduledStep.id == step_pk)
            ).first()
        if row is None:
            return None
        step, procedure, order, patient = row
        return StepDetail(
            step_pk=step.id,
            status=step.status,
            sps_id=step.sps_id,
            modality=step.modality,
            station_ae=step.station_ae,
            station_name=step.station_name,
            step_description=step.description,
            protocol_code=(step.protocol_code_value, step.protocol_code_scheme, step.protocol_code_meaning),
            performing_physician=step.performing_physician,
            requested_procedure_id=procedure.requested_procedure_id,
            study_instance_uid=procedure.study_instance_uid,
            procedure_description=procedure.description,
            procedure_code=(procedure.code_value, procedure.code_scheme, procedure.code_meaning),
            accession_number=order.accession_number,
            referring_physician_name=order.referring_physician_name,
            requesting_physician=order.requesting_physician,
            patient_id=patient.patient_id,
            issuer=patient.issuer,
            order_pk=order.id,
        )

    def order_of_study(self, study_instance_uid: str) -> StudyOrder | None:
        """The order whose requested procedure is this study; None for a study no order asked for."""
        with self._db.reads() as session:
            row = session.execute(
                select(RequestedProcedure, Order)
                .join(Order, RequestedProcedure.order_pk == Order.id)
                .where(RequestedProcedure.study_instance_uid == study_instance_uid)
            ).first()
            if row is None:
                return None
            procedure, order = row
            steps = set(session.scalars(select(ScheduledStep.status).where(ScheduledStep.procedure_pk == procedure.id)))
            # The order's own status moves with HL7; its steps move with MPPS: all performed is done.
            done = order.status not in ("CANCELED", "DISCONTINUED") and steps == {"COMPLETED"}
            return StudyOrder(
                placer_order_number=order.placer_order_number,
                filler_order_number=order.filler_order_number,
                accession_number=order.accession_number,
                status="COMPLETED" if done else order.status,
                priority=procedure.priority,
                procedure_code=(procedure.code_value, procedure.code_scheme, procedure.code_meaning),
                procedure_description=procedure.description,
                requesting_physician=order.requesting_physician,
                authored=order.created_at,
            )

    def steps_named(self, name: str) -> list[int]:
        """Steps whose SPS ID, or whose order's accession number, is `name`."""
        with self._db.engine.connect() as connection:
            return [
                int(pk)
                for pk in connection.execute(
                    select(ScheduledStep.id)
                    .join(RequestedProcedure, ScheduledStep.procedure_pk == RequestedProcedure.id)
                    .join(Order, RequestedProcedure.order_pk == Order.id)
                    .where(or_(ScheduledStep.sps_id == name, Order.accession_number == name))
                    .order_by(ScheduledStep.id)
                ).scalars()
            ]

    @staticmethod
    def accession(connection: Connection, order_pk: int) -> str:
        return str(connection.execute(_ACCESSION, {"pk": order_pk}).scalar_one())

    @staticmethod
    def revise(connection: Connection, order_pk: int, plan: OrderPlan) -> None:
        """Change an order to what `plan` says; what it leaves empty stays. Procedures and steps
        are paired by ID, else by position, so that a message that never named them still
        updates the ones it made."""
        # The ORM walks the tree here; its changes go into a savepoint of the caller's transaction.
        with Session(bind=connection, join_transaction_mode="create_savepoint") as session:
            order = session.get_one(Order, order_pk)
            order.patient_pk = _patient_pk(connection, plan)
            _order_fields(order, plan, only_given=True)
            procedures = sorted(order.procedures, key=lambda p: p.id)
            for index, procedure_plan in enumerate(plan.procedures):
                procedure = _pair(procedures, index, "requested_procedure_id", procedure_plan.requested_procedure_id)
                if procedure is None:
                    order.procedures.append(_procedure(session, procedure_plan))
                    continue
                _procedure_fields(session, procedure, procedure_plan, only_given=True)
                steps = sorted(procedure.steps, key=lambda s: s.id)
                for step_index, step_plan in enumerate(procedure_plan.steps):
                    step = _pair(steps, step_index, "sps_id", step_plan.sps_id)
                    if step is None:
                        procedure.steps.append(_step(step_plan))
                    else:
                        _step_fields(step, step_plan, only_given=True)
            order.updated_at = datetime.now(UTC)
            session.commit()

    @staticmethod
    def set_status(connection: Connection, order_pk: int, status: str) -> int:
        """The order and every one of its steps to `status`; how many steps changed."""
        now = datetime.now(UTC)
        connection.execute(update(Order).where(Order.id == order_pk).values(status=status, updated_at=now))
        result = connection.execute(
            update(ScheduledStep)
            .where(
                ScheduledStep.procedure_pk.in_(
                    select(RequestedProcedure.id).where(RequestedProcedure.order_pk == order_pk)
                ),
                ScheduledStep.status != status,
            )
            .values(status=status, updated_at=now)
        )
        return int(getattr(result, "rowcount", 0) or 0)

    @staticmethod
    def set_step_status(connection: Connection, step_pks: list[int], status: str) -> int:
        """These steps (not their order's others) to `status`; how many changed."""
        if not step_pks:
            return 0
        result = connection.execute(
            update(ScheduledStep)
            .where(ScheduledStep.id.in_(step_pks), ScheduledStep.status != status)
            .values(status=status, updated_at=datetime.now(UTC))
        )
        return int(getattr(result, "rowcount", 0) or 0)

    @staticmethod
    def perform(connection: Connection, sps_ids: tuple[str, ...], study_instance_uid: str, status: str) -> int:
        """The steps a Modality Performed Procedure Step names (by SPS ID, within its study when it
        names one) move to `status`; how many."""
        if not sps_ids:
            return 0
        statement = update(ScheduledStep).where(ScheduledStep.sps_id.in_(sps_ids))
        if study_instance_uid:
            statement = statement.where(
                ScheduledStep.procedure_pk.in_(
                    select(RequestedProcedure.id).where(RequestedProcedure.study_instance_uid == study_instance_uid)
                )
            )
        result = connection.execute(statement.values(status=status, updated_at=datetime.now(UTC)))
        return int(getattr(result, "rowcount", 0) or 0)

    @staticmethod
    def arrive(connection: Connection, patient_pk: int, day: str) -> int:
        """The patient's SCHEDULED steps of `day` (YYYYMMDD) become ARRIVED; how many."""
        procedure_pks = (
            select(RequestedProcedure.id)
            .join(Order, RequestedProcedure.order_pk == Order.id)
            .where(Order.patient_pk == patient_pk)
        )
        result = connection.execute(
            update(ScheduledStep)
            .where(
                ScheduledStep.procedure_pk.in_(procedure_pks),
                ScheduledStep.start_date == day,
                ScheduledStep.status == "SCHEDULED",
            )
            .values(status="ARRIVED", updated_at=datetime.now(UTC))
        )
        return int(getattr(result, "rowcount", 0) or 0)

    @staticmethod
    def reassign(connection: Connection, from_patient_pk: int, to_patient_pk: int) -> int:
        """Every order of one patient moves to another (a merge); how many."""
        result = connection.execute(
            update(Order).where(Order.patient_pk == from_patient_pk).values(patient_pk=to_patient_pk)
        )
        return int(getattr(result, "rowcount", 0) or 0)

    @staticmethod
    def update_visit(connection: Connection, patient_pk: int, admission_id: str, location: str) -> None:
        """An admission's number and the patient's location onto the patient's open orders."""
        values = {
            name: value
            for name, value in (("admission_id", admission_id), ("current_patient_location", location))
            if value
        }
        if values:
            connection.execute(
                update(Order)
                .where(Order.patient_pk == patient_pk, Order.status.in_(("SCHEDULED", "STARTED")))
                .values(**values)
            )

    def items(
        self,
        statuses: Iterable[str] = ACTIONABLE,
        station_ae: str = "",
        start_date: str = "",
        limit: int = 100,
        patient_id: str = "",
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
        if patient_id:
            statement = statement.where(Patient.patient_id == patient_id)
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


class DuplicateStudy(LookupError):
    """A new requested procedure names a Study Instance UID another order holds."""


def _patient_pk(connection: Connection, plan: OrderPlan) -> int:
    patient_pk = connection.execute(_FIND_PATIENT, {"id": plan.patient_id, "issuer": plan.issuer}).scalar_one_or_none()
    if patient_pk is None:
        raise UnknownPatient(f"no patient {plan.patient_id!r} (issuer {plan.issuer!r})")
    return int(patient_pk)


_FIND_PATIENT = select(Patient.id).where(Patient.patient_id == bindparam("id"), Patient.issuer == bindparam("issuer"))
_FIND_ORDER = (
    select(Order.id)
    .where(or_(Order.placer_order_number == bindparam("placer"), Order.filler_order_number == bindparam("filler")))
    .order_by((Order.placer_order_number == bindparam("placer")).desc(), Order.id.desc())
    .limit(1)
)
"""One look-up for both numbers (None matches nothing); a placer match ranks first."""
_ACCESSION = select(Order.accession_number).where(Order.id == bindparam("pk"))
_INSERT_ORDER = insert(Order).returning(Order.id)
_INSERT_PROCEDURE = insert(RequestedProcedure).returning(RequestedProcedure.id)
_INSERT_STEP = insert(ScheduledStep).inline()


def _procedure_values(plan: ProcedurePlan) -> dict[str, Any]:
    return {
        "requested_procedure_id": plan.requested_procedure_id,
        "study_instance_uid": plan.study_instance_uid,
        "description": plan.description,
        "priority": plan.priority,
        **_code("code_", plan.code),
    }


def _step_values(plan: StepPlan) -> dict[str, Any]:
    return {
        "sps_id": plan.sps_id,
        "station_ae": plan.station_ae,
        "station_name": plan.station_name,
        "location": plan.location,
        "modality": plan.modality,
        "start_date": plan.start_date,
        "start_time": plan.start_time,
        "start_datetime": start_datetime(plan.start_date, plan.start_time),
        "performing_physician": plan.performing_physician,
        "description": plan.description,
        "premedication": "",
        "contrast_agent": "",
        **_code("protocol_code_", plan.protocol_code),
    }


def _assign(row: object, values: dict[str, Any], only_given: bool) -> None:
    """Set the row's attributes; with `only_given`, an empty value keeps what the row holds."""
    for name, value in values.items():
        if value or not only_given:
            setattr(row, name, value)


def _code(prefix: str, code: tuple[str, str, str]) -> dict[str, str]:
    """A code as its three columns, all empty unless the code value is given."""
    return dict(
        zip((f"{prefix}value", f"{prefix}scheme", f"{prefix}meaning"), code if code[0] else ("", "", ""), strict=True)
    )


def _order_fields(order: Order, plan: OrderPlan, only_given: bool = False) -> None:
    values = {name: getattr(plan, name) for name in _ORDER_COLUMNS}
    _assign(order, values, only_given)
    order.source = plan.source
    order.hl7_message_pk = plan.hl7_message_pk


_ORDER_COLUMNS = (
    "placer_order_number",
    "filler_order_number",
    "accession_number",
    "referring_physician_name",
    "requesting_physician",
    "requesting_service",
    "admission_id",
    "current_patient_location",
    "specific_character_set",
)


def _procedure(session: Session, plan: ProcedurePlan) -> RequestedProcedure:
    procedure = RequestedProcedure()
    _procedure_fields(session, procedure, plan)
    procedure.steps = [_step(step) for step in plan.steps]
    return procedure


def _procedure_fields(
    session: Session, procedure: RequestedProcedure, plan: ProcedurePlan, only_given: bool = False
) -> None:
    wanted_uid = plan.study_instance_uid
    if wanted_uid and procedure.study_instance_uid != wanted_uid:
        holder = session.scalar(
            select(RequestedProcedure.id).where(RequestedProcedure.study_instance_uid == wanted_uid)
        )
        if holder is not None:
            raise DuplicateStudy(f"Study Instance UID {wanted_uid} belongs to another order")
    _assign(procedure, _procedure_values(plan), only_given)


def _pair(existing: list[T], index: int, id_attribute: str, wanted: str) -> T | None:
    """The row whose ID is `wanted`, else the one at `index` (a message that never named its IDs)."""
    for row in existing:
        if getattr(row, id_attribute) == wanted:
            return row
    return existing[index] if index < len(existing) else None


def _step(plan: StepPlan) -> ScheduledStep:
    step = ScheduledStep(status="SCHEDULED")
    _step_fields(step, plan)
    return step


def _step_fields(step: ScheduledStep, plan: StepPlan, only_given: bool = False) -> None:
    values = _step_values(plan)
    for unused in ("start_datetime", "premedication", "contrast_agent"):
        del values[unused]
    _assign(step, values, only_given)
    step.start_datetime = start_datetime(step.start_date, step.start_time)


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
