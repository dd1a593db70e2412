"""The tables, typed. Each table has one owner module in this package.

Columns that hold a DICOM attribute name its tag, VR and VM, so that the mapping between the
index and the standard is read here and nowhere else.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Patient(Base):
    """Owner: `fabricatord.db.patients`."""

    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer", name="uq_patients_id_issuer"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))  # (0010,0020) Patient ID | LO, 1
    issuer: Mapped[str] = mapped_column(String(64), default="")  # (0010,0021) Issuer of Patient ID | LO, 1
    name: Mapped[str] = mapped_column(String(324), index=True)  # (0010,0010) Patient's Name | PN, 1
    birth_date: Mapped[str] = mapped_column(String(8), default="")  # (0010,0030) Patient's Birth Date | DA, 1
    sex: Mapped[str] = mapped_column(String(1), default="")  # (0010,0040) Patient's Sex | CS, 1
    address: Mapped[str] = mapped_column(String(64), default="")  # (0010,1040) Patient's Address | LO, 1
    phone: Mapped[str] = mapped_column(String(64), default="")  # (0010,2154) Patient's Telephone Numbers | SH, 1-n
    synthetic: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Sequence(Base):
    """Owner: `fabricatord.db.sequences`. One persisted counter per generated identifier."""

    __tablename__ = "sequences"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    next_value: Mapped[int] = mapped_column(BigInteger)


class Study(Base):
    """Owner: `fabricatord.db.index`."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)  # (0020,000D) | UI, 1
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    study_date: Mapped[str] = mapped_column(String(8), default="", index=True)  # (0008,0020) | DA, 1
    study_time: Mapped[str] = mapped_column(String(16), default="")  # (0008,0030) | TM, 1
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)  # (0008,0050) | SH, 1
    study_id: Mapped[str] = mapped_column(String(16), default="")  # (0020,0010) | SH, 1
    study_description: Mapped[str] = mapped_column(String(64), default="")  # (0008,1030) | LO, 1
    referring_physician_name: Mapped[str] = mapped_column(String(324), default="")  # (0008,0090) | PN, 1
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    """Owner: `fabricatord.db.index`."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)  # (0020,000E) | UI, 1
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="", index=True)  # (0008,0060) | CS, 1
    series_number: Mapped[int | None] = mapped_column(Integer)  # (0020,0011) | IS, 1
    series_description: Mapped[str] = mapped_column(String(64), default="")  # (0008,103E) | LO, 1
    body_part_examined: Mapped[str] = mapped_column(String(16), default="")  # (0018,0015) | CS, 1

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """Owner: `fabricatord.db.index`. `path` is relative to `data_dir/storage`."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)  # (0008,0018) | UI, 1
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))  # (0008,0016) | UI, 1
    instance_number: Mapped[int | None] = mapped_column(Integer)  # (0020,0013) | IS, 1
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))  # (0002,0010) | UI, 1
    path: Mapped[str] = mapped_column(String(512))
    size: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(String(64))
    """SHA-256 of the file, so that a resent identical instance is recognised; empty for a received
    file until a duplicate of it arrives and hashes it (hashing every arrival costs too much)."""
    source: Mapped[str] = mapped_column(String(16))  # generated | received
    source_ae: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    series: Mapped[Series] = relationship(back_populates="instances")


class StorageIntent(Base):
    """Owner: `fabricatord.db.index`. A file about to be renamed into storage.

    Committed before the rename and deleted with the index row's commit: after a crash, an
    intent that is still here names a final file that may lack its row, and recovery settles it.
    """

    __tablename__ = "storage_intents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512))
    node: Mapped[str] = mapped_column(String(64), default="", index=True)
    """The node writing the file: only it settles the intent after its crash (another node's
    intent is a file being written right now)."""


class Order(Base):
    """Owner: `fabricatord.db.worklist`. An imaging order, as the order filler keeps it."""

    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    placer_order_number: Mapped[str] = mapped_column(String(64), default="", index=True)  # ORC-2 / OBR-2
    filler_order_number: Mapped[str] = mapped_column(String(64), default="", index=True)  # ORC-3 / OBR-3
    accession_number: Mapped[str] = mapped_column(String(16), index=True)  # (0008,0050) | SH, 1
    status: Mapped[str] = mapped_column(String(16), default="SCHEDULED")
    referring_physician_name: Mapped[str] = mapped_column(String(324), default="")  # (0008,0090) | PN, 1
    requesting_physician: Mapped[str] = mapped_column(String(324), default="")  # (0032,1032) | PN, 1-n
    requesting_service: Mapped[str] = mapped_column(String(64), default="")  # (0032,1033) | LO, 1
    admission_id: Mapped[str] = mapped_column(String(64), default="")  # (0038,0010) | LO, 1
    current_patient_location: Mapped[str] = mapped_column(String(64), default="")  # (0038,0300) | LO, 1
    source: Mapped[str] = mapped_column(String(16), default="cli")  # cli | hl7
    specific_character_set: Mapped[str] = mapped_column(String(64), default="")  # (0008,0005) | CS, 1-n
    """What the order's message declared (MSH-18), as DICOM names it; the worklist answers in it."""
    hl7_message_pk: Mapped[int | None] = mapped_column(Integer)
    """The HL7 message that made (or last changed) the order."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    patient: Mapped[Patient] = relationship()
    procedures: Mapped[list[RequestedProcedure]] = relationship(back_populates="order")


class RequestedProcedure(Base):
    """Owner: `fabricatord.db.worklist`. One study to be made for an order."""

    __tablename__ = "requested_procedures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    order_pk: Mapped[int] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"), index=True)
    requested_procedure_id: Mapped[str] = mapped_column(String(16), index=True)  # (0040,1001) | SH, 1
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)  # (0020,000D) | UI, 1
    description: Mapped[str] = mapped_column(String(64), default="")  # (0032,1060) | LO, 1
    code_value: Mapped[str] = mapped_column(String(16), default="")  # (0032,1064) > (0008,0100)
    code_scheme: Mapped[str] = mapped_column(String(16), default="")  # > (0008,0102)
    code_meaning: Mapped[str] = mapped_column(String(64), default="")  # > (0008,0104)
    priority: Mapped[str] = mapped_column(String(16), default="")  # (0040,1003) | SH, 1

    order: Mapped[Order] = relationship(back_populates="procedures")
    steps: Mapped[list[ScheduledStep]] = relationship(back_populates="procedure")


class ScheduledStep(Base):
    """Owner: `fabricatord.db.worklist`. A worklist item: one Scheduled Procedure Step.

    `start_datetime` is date and time as one sortable string (YYYYMMDDHHMMSS), for the
    combined date-time range matching of PS3.4 C.2.2.2.5.
    """

    __tablename__ = "scheduled_steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    procedure_pk: Mapped[int] = mapped_column(ForeignKey("requested_procedures.id", ondelete="CASCADE"), index=True)
    sps_id: Mapped[str] = mapped_column(String(16), index=True)  # (0040,0009) | SH, 1
    station_ae: Mapped[str] = mapped_column(String(16), default="", index=True)  # (0040,0001) | AE, 1-n
    station_name: Mapped[str] = mapped_column(String(16), default="")  # (0040,0010) | SH, 1-n
    location: Mapped[str] = mapped_column(String(16), default="")  # (0040,0011) | SH, 1
    modality: Mapped[str] = mapped_column(String(16), index=True)  # (0008,0060) | CS, 1
    start_date: Mapped[str] = mapped_column(String(8), index=True)  # (0040,0002) | DA, 1
    start_time: Mapped[str] = mapped_column(String(16))  # (0040,0003) | TM, 1
    start_datetime: Mapped[str] = mapped_column(String(14), index=True)
    performing_physician: Mapped[str] = mapped_column(String(324), default="")  # (0040,0006) | PN, 1
    description: Mapped[str] = mapped_column(String(64), default="")  # (0040,0007) | LO, 1
    protocol_code_value: Mapped[str] = mapped_column(String(16), default="")  # (0040,0008) > (0008,0100)
    protocol_code_scheme: Mapped[str] = mapped_column(String(16), default="")
    protocol_code_meaning: Mapped[str] = mapped_column(String(64), default="")
    premedication: Mapped[str] = mapped_column(String(64), default="")  # (0040,0012) | LO, 1
    contrast_agent: Mapped[str] = mapped_column(String(64), default="")  # (0032,1070) | LO, 1
    status: Mapped[str] = mapped_column(String(16), default="SCHEDULED", index=True)  # (0040,0020) | CS, 1
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    procedure: Mapped[RequestedProcedure] = relationship(back_populates="steps")


class WorklistFetch(Base):
    """Owner: `fabricatord.db.worklist`. A worklist item answered to a calling AE (for `on_query`)."""

    __tablename__ = "worklist_fetches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    step_pk: Mapped[int] = mapped_column(ForeignKey("scheduled_steps.id", ondelete="CASCADE"), index=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    fetched_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class AuditEvent(Base):
    """Owner: `fabricatord.db.audit`. One association or DIMSE operation, kept for `fabricatord audit`."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    association: Mapped[str] = mapped_column(String(16), default="", index=True)
    """Our short ID of the association: ties its operations together."""
    operation: Mapped[str] = mapped_column(String(32), index=True)  # ASSOCIATION, C-STORE, C-FIND …
    calling_ae: Mapped[str] = mapped_column(String(16), default="", index=True)
    called_ae: Mapped[str] = mapped_column(String(16), default="")
    peer_address: Mapped[str] = mapped_column(String(64), default="")
    status: Mapped[str] = mapped_column(String(32), default="")  # 0x0000, released, rejected …
    instances: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    detail: Mapped[str] = mapped_column(String(256), default="")
    username: Mapped[str] = mapped_column(String(64), default="", index=True)
    """The console or API user who took the action (empty for DICOM and HL7 peers)."""


class Hl7Message(Base):
    """Owner: `fabricatord.db.messages`. Every HL7 message received, raw, with its ACK and outcome.

    A message whose MSH-3, MSH-4 and MSH-10 were seen with outcome AA or AE is a resend: it gets
    the stored ACK and changes nothing.
    """

    __tablename__ = "hl7_messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    peer: Mapped[str] = mapped_column(String(64), default="")
    sending_application: Mapped[str] = mapped_column(String(227), default="")  # MSH-3
    sending_facility: Mapped[str] = mapped_column(String(227), default="")  # MSH-4
    control_id: Mapped[str] = mapped_column(String(199), default="")  # MSH-10
    message_type: Mapped[str] = mapped_column(String(16), default="")  # MSH-9.1^MSH-9.2
    version: Mapped[str] = mapped_column(String(16), default="")  # MSH-12
    profile: Mapped[str] = mapped_column(String(64), default="")
    outcome: Mapped[str] = mapped_column(String(2), default="", index=True)  # AA | AE | AR
    error: Mapped[str] = mapped_column(String(512), default="")
    detail: Mapped[str] = mapped_column(String(512), default="")
    """What the message did: the orders and steps it made or changed."""
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    ack: Mapped[bytes] = mapped_column(LargeBinary, default=b"")


class Hl7MessageOrder(Base):
    """Owner: `fabricatord.db.messages`. An order an HL7 message made or changed (`trace`)."""

    __tablename__ = "hl7_message_orders"

    message_pk: Mapped[int] = mapped_column(ForeignKey("hl7_messages.id", ondelete="CASCADE"), primary_key=True)
    order_pk: Mapped[int] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"), primary_key=True, index=True)


class PerformedStep(Base):
    """Owner: `fabricatord.db.performed`. A Modality Performed Procedure Step (PS3.4 F), as the
    modality reported it by N-CREATE and N-SET."""

    __tablename__ = "performed_steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)  # (0008,0018) | UI, 1
    status: Mapped[str] = mapped_column(String(16), index=True)  # (0040,0252) IN PROGRESS | COMPLETED | DISCONTINUED
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    performed_station_ae: Mapped[str] = mapped_column(String(16), default="")  # (0040,0241) | AE, 1
    modality: Mapped[str] = mapped_column(String(16), default="")  # (0008,0060) | CS, 1
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)  # in (0040,0270)
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)  # in (0040,0270)
    sps_ids: Mapped[str] = mapped_column(String(512), default="")
    """The Scheduled Procedure Step IDs it performs, backslash-separated (empty: unscheduled)."""
    started: Mapped[str] = mapped_column(String(14), default="")  # (0040,0244)+(0040,0245) YYYYMMDDHHMMSS
    ended: Mapped[str] = mapped_column(String(14), default="")  # (0040,0250)+(0040,0251)
    attributes: Mapped[str] = mapped_column(Text, default="")
    """The whole object as DICOM JSON (PS3.18 F), N-SET modifications merged in."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Acquisition(Base):
    """Owner: `fabricatord.db.jobs`. A worklist step the simulated modality is to perform: a
    durable job, so that a restart neither loses nor repeats it."""

    __tablename__ = "acquisitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    step_pk: Mapped[int] = mapped_column(ForeignKey("scheduled_steps.id", ondelete="CASCADE"), unique=True)
    policy: Mapped[str] = mapped_column(String(16))  # immediate | delay | on_query | manual
    state: Mapped[str] = mapped_column(String(16), index=True)  # waiting | pending | running | done | failed | canceled
    due_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(String(512), default="")
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    performed_step_uid: Mapped[str] = mapped_column(String(64), default="")
    instances: Mapped[int] = mapped_column(Integer, default=0)
    leased_by: Mapped[str] = mapped_column(String(64), default="")
    """The node that runs (or last ran) the job."""
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """While running: the node renews this; once past, another node may take the job."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class RouteJob(Base):
    """Owner: `fabricatord.db.jobs`. One stored instance to be sent to one peer by a route."""

    __tablename__ = "route_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    peer: Mapped[str] = mapped_column(String(64))
    route: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[str] = mapped_column(String(16))  # pending | sending | done | failed | canceled
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str] = mapped_column(String(512), default="")
    verified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """When the peer's C-FIND counted the study's instances (routes with `verify = true`)."""
    leased_by: Mapped[str] = mapped_column(String(64), default="")
    """The node that runs (or last ran) the job."""
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """While running: the node renews this; once past, another node may take the job."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class FhirJob(Base):
    """Owner: `fabricatord.db.jobs`. One complete study to be sent to one FHIR destination. A
    received study's job waits `[fhir] stable_age` after its last arrival; each new arrival
    pushes that back."""

    __tablename__ = "fhir_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)  # pending | sending | done | failed | canceled
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str] = mapped_column(String(512), default="")
    leased_by: Mapped[str] = mapped_column(String(64), default="")
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Commitment(Base):
    """Owner: `fabricatord.db.commitments`. One Storage Commitment transaction (PS3.4 J): asked of
    us by a peer (`in`: the report we owe it, a durable job until the peer answers it), or asked
    by us of a peer (`out`: the report we wait for)."""

    __tablename__ = "commitments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transaction_uid: Mapped[str] = mapped_column(String(64))
    direction: Mapped[str] = mapped_column(String(3))  # in | out
    peer_ae: Mapped[str] = mapped_column(String(16))
    """The calling AE title of the request (in), or the called one (out)."""
    peer: Mapped[str] = mapped_column(String(64), default="")
    """Its `[[peers]]` name, or empty for an AE title no entry has."""
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    """The study we asked about (out); empty for a request of a peer's, which may span studies."""
    state: Mapped[str] = mapped_column(String(16), index=True)
    """in: pending | sending | done | failed; out: requested | committed | failed | refused."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str] = mapped_column(String(512), default="")
    leased_by: Mapped[str] = mapped_column(String(64), default="")
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    reported_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """When the report was answered (in) or arrived (out)."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class CommitmentItem(Base):
    """Owner: `fabricatord.db.commitments`. One instance of a Storage Commitment transaction."""

    __tablename__ = "commitment_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    commitment_pk: Mapped[int] = mapped_column(ForeignKey("commitments.id", ondelete="CASCADE"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    failure_reason: Mapped[int | None] = mapped_column(Integer)
    """0: committed; a Failure Reason (0008,1197); None: no report yet."""
    route_job_pk: Mapped[int | None] = mapped_column(Integer)
    """The route job that sent it (a route with `verify = "commitment"`)."""


class User(Base):
    """Owner: `fabricatord.db.users`. Someone who may use the console and the API."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # admin | test_write | test_read | prod_write | prod_read
    password_hash: Mapped[str] = mapped_column(String(256), default="")
    """argon2id; empty until a password is set (a user with only tokens)."""
    disabled: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Credential(Base):
    """Owner: `fabricatord.db.users`. A console session or an API token: a random secret of which
    only the SHA-256 is kept, so that a copy of the database signs nobody in."""

    __tablename__ = "credentials"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_pk: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # session | token
    csrf_token: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class LoginFailure(Base):
    """Owner: `fabricatord.db.users`. Failed sign-ins by user name, for the lockout."""

    __tablename__ = "login_failures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


Index("ix_patients_patient_id", Patient.patient_id)
Index("ix_commitments_direction_transaction", Commitment.direction, Commitment.transaction_uid, unique=True)
Index("ix_login_failures_name_at", LoginFailure.name, LoginFailure.at)
Index(
    "ix_hl7_messages_sender_control_id",
    Hl7Message.sending_application,
    Hl7Message.sending_facility,
    Hl7Message.control_id,
)
Index("ix_scheduled_steps_start_date_station_ae", ScheduledStep.start_date, ScheduledStep.station_ae)
Index("ix_route_jobs_state_next_attempt_at", RouteJob.state, RouteJob.next_attempt_at)


class Node(Base):
    """Owner: `fabricatord.db.nodes`. A daemon that shares this database, as it last said."""

    __tablename__ = "nodes"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    version: Mapped[str] = mapped_column(String(32), default="")
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Lease(Base):
    """Owner: `fabricatord.db.nodes`. A role one node holds for all until it stops renewing it
    (`leader`: the periodic work)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ProxyKey(Base):
    """Owner: `fabricatord.db.proxies`. Which key a proxy's records are sealed with: a keyed
    hash of a fixed text, so that a node with another key refuses to start."""

    __tablename__ = "proxy_keys"

    proxy: Mapped[str] = mapped_column(String(64), primary_key=True)
    check_value: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ProxyRecord(Base):
    """Owner: `fabricatord.db.proxies`. One de-identified instance: its new UIDs, and sealed
    (encrypted with the proxy's key) every attribute removed or replaced; the original file's
    path under data_dir when the proxy keeps originals."""

    __tablename__ = "proxy_records"
    __table_args__ = (UniqueConstraint("proxy", "sop_instance_uid", name="uq_proxy_records_instance"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    proxy: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    original_file: Mapped[str] = mapped_column(String(512), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
