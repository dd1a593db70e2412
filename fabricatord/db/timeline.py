"""One order's life across the tables, for `fabricatord trace`: read-only, it owns no table."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, case, func, select

from fabricatord.db.engine import Database
from fabricatord.db.models import (
    Acquisition,
    Commitment,
    CommitmentItem,
    Hl7Message,
    Hl7MessageOrder,
    Instance,
    Order,
    PerformedStep,
    RequestedProcedure,
    RouteJob,
    ScheduledStep,
    Series,
    Study,
)


@dataclass(frozen=True)
class Event:
    at: datetime
    what: str


@dataclass(frozen=True)
class Timeline:
    accession_number: str
    study_instance_uids: list[str]
    events: list[Event]


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def timeline(database: Database, accession_number: str) -> Timeline | None:
    """Every recorded step of the order with this accession number, oldest first; None if unknown."""
    events: list[Event] = []
    with database.engine.connect() as connection:
        orders = connection.execute(
            select(Order.id, Order.created_at, Order.source).where(Order.accession_number == accession_number)
        ).all()
        if not orders:
            return None
        order_pks = [row.id for row in orders]
        for row in orders:
            events.append(Event(_utc(row.created_at), f"order made ({row.source})"))
        for message in connection.execute(
            select(Hl7Message.received_at, Hl7Message.message_type, Hl7Message.control_id, Hl7Message.outcome,
                   Hl7Message.sending_application, Hl7Message.detail, Hl7Message.error)
            .where(Hl7Message.id.in_(
                select(Hl7MessageOrder.message_pk).where(Hl7MessageOrder.order_pk.in_(order_pks))))
            .order_by(Hl7Message.id)
        ):  # fmt: skip
            said = message.detail or message.error
            events.append(
                Event(
                    _utc(message.received_at),
                    f"HL7 {message.message_type} {message.control_id} from {message.sending_application}: "
                    f"{message.outcome} ({said})",
                )
            )
        steps = connection.execute(
            select(ScheduledStep.id, ScheduledStep.sps_id, ScheduledStep.modality, ScheduledStep.station_ae,
                   ScheduledStep.status, ScheduledStep.updated_at, RequestedProcedure.study_instance_uid)
            .join(RequestedProcedure, ScheduledStep.procedure_pk == RequestedProcedure.id)
            .where(RequestedProcedure.order_pk.in_(order_pks))
        ).all()  # fmt: skip
        studies = sorted({step.study_instance_uid for step in steps})
        for step in steps:
            station = step.station_ae or "any station"
            now = f"worklist step {step.sps_id} {step.modality} at {station}: now {step.status}"
            events.append(Event(_utc(step.updated_at), now))
        for job in connection.execute(
            select(Acquisition.id, Acquisition.policy, Acquisition.state, Acquisition.created_at,
                   Acquisition.updated_at, Acquisition.attempts, Acquisition.instances, Acquisition.last_error)
            .where(Acquisition.step_pk.in_([step.id for step in steps]))
        ):  # fmt: skip
            events.append(Event(_utc(job.created_at), f"acquisition a{job.id} queued ({job.policy})"))
            outcome = f"{job.instances} instances" if job.state == "done" else job.last_error or job.state
            done = f"acquisition a{job.id} {job.state} after {job.attempts} attempt(s): {outcome}"
            events.append(Event(_utc(job.updated_at), done))
        for performed in connection.execute(
            select(PerformedStep.created_at, PerformedStep.updated_at, PerformedStep.status, PerformedStep.calling_ae)
            .where(PerformedStep.accession_number == accession_number)
        ):  # fmt: skip
            events.append(Event(_utc(performed.created_at), f"MPPS IN PROGRESS from {performed.calling_ae}"))
            if performed.status != "IN PROGRESS":
                events.append(Event(_utc(performed.updated_at), f"MPPS {performed.status} from {performed.calling_ae}"))
        stored = connection.execute(
            select(func.count(Instance.id), func.min(Instance.created_at), func.max(Instance.created_at))
            .join(Series, Instance.series_pk == Series.id)
            .join(Study, Series.study_pk == Study.id)
            .where(Study.study_instance_uid.in_(studies))
        ).one()
        if stored[0]:
            events.append(Event(_utc(stored[1]), f"first of {stored[0]} instances stored"))
            events.append(Event(_utc(stored[2]), f"last of {stored[0]} instances stored"))
        for route in connection.execute(
            select(RouteJob.peer, RouteJob.state, func.count(RouteJob.id), func.min(RouteJob.created_at),
                   func.max(RouteJob.updated_at), func.max(RouteJob.attempts), func.max(RouteJob.verified_at))
            .where(RouteJob.study_instance_uid.in_(studies))
            .group_by(RouteJob.peer, RouteJob.state)
        ):  # fmt: skip
            peer, state, count, first, last, attempts, verified = route
            events.append(Event(_utc(first), f"{count} route job(s) to {peer} queued"))
            events.append(Event(_utc(last), f"{count} route job(s) to {peer} {state} (at most {attempts} attempt(s))"))
            if verified is not None:
                events.append(Event(_utc(verified), f"{count} instance(s) verified at {peer}"))
        events += _commitments(connection, studies)
    events.sort(key=lambda event: event.at)
    return Timeline(accession_number, studies, events)


def _commitments(connection: Connection, studies: list[str]) -> list[Event]:
    """Storage Commitment of the studies' instances: asked of peers by us, and of us by peers."""
    events: list[Event] = []
    committed = func.sum(case((CommitmentItem.failure_reason == 0, 1), else_=0))
    for row in connection.execute(
        select(Commitment.direction, Commitment.peer_ae, Commitment.state, Commitment.created_at,
               Commitment.updated_at, Commitment.reported_at, Commitment.last_error, func.count(CommitmentItem.id),
               committed)
        .join(CommitmentItem, CommitmentItem.commitment_pk == Commitment.id)
        .where(CommitmentItem.study_instance_uid.in_(studies))
        .group_by(Commitment.id)  # the columns above depend on the primary key (PostgreSQL allows it)
    ):  # fmt: skip
        direction, peer_ae, state, created, updated, reported, error, count, held = row
        if direction == "out":
            events.append(Event(_utc(created), f"storage commitment of {count} instance(s) asked of {peer_ae}"))
            if reported is not None:
                events.append(Event(_utc(reported), f"{peer_ae} committed {held} of {count} instance(s)"))
            elif state == "refused":
                events.append(Event(_utc(updated), f"{peer_ae} refused the storage commitment request: {error}"))
        else:
            events.append(Event(_utc(created), f"{peer_ae} asked us to commit {count} instance(s); {held} held"))
            if reported is not None:
                events.append(Event(_utc(reported), f"storage commitment reported to {peer_ae}"))
            elif state == "failed":
                events.append(Event(_utc(updated), f"storage commitment report to {peer_ae} failed: {error}"))
    return events
