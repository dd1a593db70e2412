"""HL7 messages to worklist items and patient updates, each acknowledged after its commit.

`Inbox.receive` takes one MLLP frame and returns the frames to send back. A message's effects,
its raw text and its ACK are committed in one transaction before the ACK is returned, so an
acknowledged message is never lost and a message that was not committed is never answered AA.
A resend (same MSH-3, MSH-4, MSH-10) of a settled message gets the stored ACK and changes
nothing. Everything runs on the caller's thread; the MLLP server calls it from one worker thread
so that HL7 writes never wait on each other.
"""

from __future__ import annotations

import itertools
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from fabricatord.config import Settings
from fabricatord.config.schema import Hl7Profile
from fabricatord.config.values import parse_size
from fabricatord.db import Database, PatientRecord, PatientRegistry, Sequences, is_busy
from fabricatord.db.index import reassign_studies
from fabricatord.db.jobs import Acquisitions
from fabricatord.db.messages import MessageLog
from fabricatord.db.worklist import (
    STEP_COUNTER,
    DuplicateStudy,
    OrderPlan,
    ProcedurePlan,
    StepPlan,
    UnknownPatient,
    Worklist,
)
from fabricatord.hl7.ack import acknowledgment, answer_code, batch_acknowledgment
from fabricatord.hl7.codec import (
    PROCESSING_IDS,
    VERSIONS,
    Batch,
    Decoded,
    ErrorCondition,
    Header,
    Hl7Error,
    Parsed,
    decode,
    header,
    split,
)
from fabricatord.hl7.mapping import ItemData, Mapper, OrderData, PatientData, choose_profile
from fabricatord.obs import metrics
from fabricatord.obs.faults import faultpoint
from fabricatord.obs.logging import get_logger, in_context
from fabricatord.synth.uids import UidFactory
from fabricatord.workflow.generation import StudyGenerator

log = get_logger(__name__)

ORDER_MESSAGES = {"ORM": ("O01",), "OMI": ("O23",)}
PATIENT_EVENTS = ("A01", "A04", "A08", "A31", "A40", "A47", "A10")
SUPPORTED = {**ORDER_MESSAGES, "ADT": PATIENT_EVENTS, "ORU": ("R01",)}

CONTROL_TABLE: dict[tuple[str, str], str] = {
    **{("NW", status): "create" for status in ("", "SC", "IP")},
    **{("XO", status): "update" for status in ("", "SC")},
    ("XO", "CM"): "COMPLETED",
    ("SC", "CM"): "COMPLETED",
    ("SC", "IP"): "STARTED",
    ("SC", "DC"): "DISCONTINUED",
    **{(control, status): "CANCELED" for control in ("CA", "OC") for status in ("", "CA")},
    **{(control, status): "DISCONTINUED" for control in ("DC", "OD") for status in ("", "CA", "DC")},
}
"""(ORC-1, ORC-5) → what happens to the order's steps: create, update, or the new status."""


@dataclass(frozen=True)
class Preview:
    """What a message would do, without committing anything."""

    message_type: str
    profile: str
    orders: list[tuple[str, OrderPlan]]
    """(effect, the order as it would be kept)."""
    patient: PatientData | None


_Prepared = Callable[[Connection, int], str]
"""A message's effects, mapped and checked, to be applied in the transaction that keeps it."""


class _Draw(Protocol):
    """Where the identifiers a new order lacks come from."""

    def accession(self) -> str: ...
    def step_id(self) -> str: ...
    def study_uid(self) -> str: ...


class _Counters:
    """The daemon's own counters (each draw commits on its own) and UIDs under `uid_root`."""

    def __init__(self, generator: StudyGenerator, sequences: Sequences, uid_root: str) -> None:
        self._generator = generator
        self._sequences = sequences
        self._uids = UidFactory(uid_root, random.Random())

    def accession(self) -> str:
        return self._generator.next_accession(random.Random())

    def step_id(self) -> str:
        return f"SPS{self._sequences.take(STEP_COUNTER, 1, 1)[0]:07d}"

    def study_uid(self) -> str:
        return self._uids.new()


class _Placeholders:
    """What `hl7 preview` shows instead of drawing: nothing is committed."""

    def accession(self) -> str:
        return "(generated)"

    def step_id(self) -> str:
        return "(generated)"

    def study_uid(self) -> str:
        return "(generated)"


@dataclass
class _Pending:
    """One message between its parse and its commit."""

    head: Header
    decoded: Decoded
    row: dict[str, Any]
    apply: _Prepared | None = None
    error: Hl7Error | None = None
    ack: str = ""
    log_pk: int | None = None
    """Its row in the message log, once added."""
    outcome: str = ""
    """AA, AE, AR, or resend."""


@dataclass(frozen=True)
class Frame:
    raw: bytes
    peer: str = ""
    oversized: bool = False
    """Cut short at `[hl7] max_message_bytes`: answered AR from what its first bytes say."""


_ATTEMPTS = 3


class Inbox:
    def __init__(
        self,
        settings: Settings,
        database: Database,
        clock: Callable[[], datetime] = datetime.now,
        on_due: Callable[[], None] = lambda: None,
    ) -> None:
        """`on_due` is called after a commit that made acquisitions due at once (the daemon
        wakes its simulated modality with it)."""
        self._settings = settings
        self._on_due = on_due
        self._due = False
        self._db = database
        self._draw = _Counters(StudyGenerator(settings, database), Sequences(database), settings.node.uid_root)
        self._clock = clock
        self._control_ids = itertools.count(1)
        self._control_prefix = f"{int(time.time()):x}"
        self._min_free = parse_size(settings.dicom.min_free_space)

    def reload(self, settings: Settings) -> None:
        """New `[hl7]` profiles and tables (SIGHUP): the next message is read with them."""
        self._settings = settings
        self._min_free = parse_size(settings.dicom.min_free_space)

    # --- frames ------------------------------------------------------------------------------

    def receive(self, raw: bytes, peer: str = "") -> list[bytes]:
        """One frame in, the frames to send back out (none for an empty frame)."""
        return self.receive_all([Frame(raw, peer)])[0]

    def receive_all(self, frames: list[Frame]) -> list[list[bytes]]:
        """Frames from any connections, committed together (a group commit): each message still
        succeeds or fails alone, in a savepoint of its own, and every reply waits for the commit."""
        started = time.perf_counter()
        parts: list[tuple[Decoded, Batch, list[_Pending]] | None] = []
        for frame in frames:
            decoded = decode(frame.raw, self._settings.hl7.default_charset)
            if not decoded.text.strip():
                parts.append(None)
                continue
            batch = split(decoded.text)
            if frame.oversized:
                parts.append((decoded, Batch([decoded.text]), [self._oversized(frame, decoded)]))
                continue
            single = len(batch.messages) == 1 and not (batch.batch_header or batch.file_header)
            pendings = [
                self._prepare(text, frame.raw if single else _encoded(text, decoded), decoded, frame.peer)
                for text in batch.messages
            ]
            parts.append((decoded, batch, pendings))
        self._commit([pending for part in parts if part for pending in part[2]])
        replies = [self._replies(part) if part else [] for part in parts]
        seconds = (time.perf_counter() - started) / max(len(frames), 1)
        for part in parts:
            for pending in part[2] if part else []:
                metrics.HL7_MESSAGES.labels(pending.row["message_type"] or "unknown", pending.outcome).inc()
                metrics.HL7_SECONDS.observe(seconds)
        return replies

    def _replies(self, part: tuple[Decoded, Batch, list[_Pending]]) -> list[bytes]:
        decoded, batch, pendings = part
        answers = [answer for pending in pendings for answer in self._answers(pending)]
        if batch.batch_header or batch.file_header:
            answers = [batch_acknowledgment(answers, batch.batch_header, batch.file_header, self._clock())]
        elif len(answers) > 1:  # messages in one frame without a batch envelope: one frame back
            answers = ["\r".join(answers)]
        return [_encoded(answer, decoded) for answer in answers]

    def preview(self, raw: bytes) -> list[Preview]:
        """The orders each message of a frame would make, as the listener would map them."""
        decoded = decode(raw, self._settings.hl7.default_charset)
        previews = []
        for text in split(decoded.text).messages:
            head = header(text)
            mapper = self._read(text, head, decoded)
            profile = mapper.profile
            kind = head.message_type
            orders: list[tuple[str, OrderPlan]] = []
            patient = mapper.patient() if mapper.parsed.has("PID") else None
            if kind in ORDER_MESSAGES and patient is not None:
                arrived = self._clock()
                for order in mapper.orders():
                    effect = _effect(order)
                    plan = self._plan(order, patient, profile, mapper, decoded, arrived, _Placeholders())
                    orders.append((effect, plan))
            previews.append(Preview(f"{kind}^{head.trigger}", profile.name, orders, patient))
        return previews

    # --- one message -------------------------------------------------------------------------

    def _prepare(self, text: str, raw: bytes, decoded: Decoded, peer: str) -> _Pending:
        """Parse, map and check: everything that needs no write transaction."""
        head = header(text)
        pending = _Pending(head, decoded, _row(head, raw, peer))
        try:
            mapper = self._read(text, head, decoded)
            pending.row["profile"] = mapper.profile.name[:64]
            pending.apply = self._handler(head)(mapper, mapper.profile, decoded)
        except Hl7Error as error:
            pending.error = error
        except (SQLAlchemyError, OSError) as exc:  # drawing a counter failed
            pending.error = _database_error(exc)
        return pending

    def _read(self, text: str, head: Header, decoded: Decoded) -> Mapper:
        """Checked, parsed and ready to map through the sender's profile; Hl7Error says why not."""
        self._check_header(head, decoded)
        return Mapper(Parsed(text), choose_profile(self._settings.hl7.profiles, head))

    def _oversized(self, frame: Frame, decoded: Decoded) -> _Pending:
        head = header(decoded.text)
        pending = _Pending(head, decoded, _row(head, frame.raw, frame.peer))
        limit = self._settings.hl7.max_message_bytes
        pending.error = Hl7Error(
            ErrorCondition.APPLICATION_INTERNAL_ERROR,
            f"the message is larger than max_message_bytes ({limit} bytes): not read",
        )
        return pending

    def _commit(self, pendings: list[_Pending]) -> None:
        """Apply every message in one transaction; no ACK text is final before the commit."""
        if not pendings:
            return
        try:
            self._check_space()
            with self._db.writer.begin() as connection:
                for pending in pendings:
                    self._apply(connection, pending)
                faultpoint("hl7.before_commit")
            faultpoint("hl7.after_commit")
            if self._due:
                self._due = False
                self._on_due()
        except (SQLAlchemyError, OSError) as exc:
            failure = _database_error(exc)
            log.error(
                "hl7 messages not kept",
                control_ids=[pending.head.control_id for pending in pendings],
                error=str(exc),
            )
            for pending in pendings:
                pending.error = failure
                self._refuse(pending)
            if (
                failure.code == ErrorCondition.APPLICATION_RECORD_LOCKED
            ):  # logging them would wait out the same lock again
                return
            try:
                with self._db.writer.begin() as connection:
                    for pending in pendings:
                        MessageLog.add(connection, pending.row)
            except SQLAlchemyError as again:
                log.error("hl7 messages not logged", messages=len(pendings), error=str(again))
            return
        for pending in pendings:
            # The log row's key (`fabricatord hl7 log --show`), the sender's control ID and the
            # connection name the message on every line about it.
            with in_context(message=pending.log_pk, control_id=pending.head.control_id, peer=pending.row["peer"]):
                self._report(pending)

    def _check_space(self) -> None:
        if self._min_free and shutil.disk_usage(self._settings.node.data_dir).free < self._min_free:
            raise _LowOnSpace(f"free space is below [dicom] min_free_space ({self._settings.dicom.min_free_space})")

    def _apply(self, connection: Connection, pending: _Pending, attempt: int = 1) -> None:
        head, row = pending.head, pending.row
        settled = (
            MessageLog.settled(connection, head.sending_application, head.sending_facility, head.control_id)
            if head.control_id
            else None
        )
        if settled is not None:
            stored, outcome = settled
            pending.ack, pending.outcome = stored.decode(pending.decoded.charset.codec, errors="replace"), "resend"
            row.update(outcome=outcome, detail="resend of a settled message: nothing changed", ack=stored)
            pending.log_pk = MessageLog.add(connection, row)
            return
        if pending.apply is not None:
            pending.ack, pending.outcome = self._ack(head, "AA", []), "AA"
            row.update(outcome="AA", ack=self._encoded(pending))
            try:
                # A savepoint: a message that fails half-way leaves nothing behind, and its group
                # commits without it.
                with connection.begin_nested():
                    pk = pending.log_pk = MessageLog.add(connection, row)
                    row["detail"] = pending.apply(connection, pk)[:512]
                    MessageLog.describe(connection, pk, row["detail"])
                return
            except Hl7Error as error:
                pending.error = error
            except IntegrityError as exc:
                if attempt < _ATTEMPTS:
                    # Another process (a worker, a node) committed the same new patient, order or
                    # control ID a moment ago: its row is visible now, so look again.
                    self._apply(connection, pending, attempt + 1)
                    return
                pending.error = Hl7Error(
                    ErrorCondition.APPLICATION_INTERNAL_ERROR, f"the database refused the change: {exc.orig}"
                )
        self._refuse(pending)
        pending.log_pk = MessageLog.add(connection, row)

    def _refuse(self, pending: _Pending) -> None:
        """AE or AR with the error: the ACK and the log row."""
        error = pending.error
        assert error is not None
        pending.outcome = error.acknowledgment
        pending.ack = self._ack(pending.head, pending.outcome, [error])
        pending.row.update(
            outcome=pending.outcome, error=f"{error.code} {error}"[:512], detail="", ack=self._encoded(pending)
        )

    def _report(self, pending: _Pending) -> None:
        head = pending.head
        if pending.outcome == "AA":
            log.info(
                "hl7 message accepted",
                type=pending.row["message_type"],
                sender=head.sending_application,
                detail=pending.row["detail"],
            )
        elif pending.outcome == "resend":
            log.info("hl7 resend answered with the stored ACK")
        elif pending.error is not None:
            log.warning(
                "hl7 message refused",
                ack=pending.outcome,
                error=pending.error.code,
                where=pending.error.location,
                reason=pending.error.text,
                sender=head.sending_application,
            )

    def _answers(self, pending: _Pending) -> list[str]:
        """What the sender gets back (`answer_code` says which); a resend its stored ACK."""
        if pending.outcome == "resend":
            return [pending.ack]
        code = answer_code(pending.head, pending.outcome)
        if code is None:
            return []
        if code == pending.outcome:
            return [pending.ack]
        return [self._ack(pending.head, code, [pending.error] if pending.error else [])]

    def _encoded(self, pending: _Pending) -> bytes:
        return _encoded(pending.ack, pending.decoded)

    def _check_header(self, head: Header, decoded: Decoded) -> None:
        if head.misplaced:
            raise Hl7Error(
                ErrorCondition.SEGMENT_SEQUENCE_ERROR, "MSH is not the first segment of the message", "MSH", 1
            )
        if not head.message_type:
            raise Hl7Error(ErrorCondition.SEGMENT_SEQUENCE_ERROR, "no MSH segment with a message type", "MSH", 1, 9)
        if decoded.charset_error is not None:
            raise decoded.charset_error
        if head.version not in VERSIONS:
            raise Hl7Error(
                ErrorCondition.UNSUPPORTED_VERSION_ID,
                f"version {head.version!r} (supported: {', '.join(VERSIONS)})",
                "MSH",
                1,
                12,
            )
        if head.processing_id[:1] not in PROCESSING_IDS:
            raise Hl7Error(
                ErrorCondition.UNSUPPORTED_PROCESSING_ID, f"processing ID {head.processing_id!r}", "MSH", 1, 11
            )

    def _ack(self, head: Header, code: str, errors: list[Hl7Error]) -> str:
        control_id = f"{self._control_prefix}{next(self._control_ids):06d}"
        return acknowledgment(head, code, errors, control_id, self._clock(), self._settings.node.ae_title)

    # --- what each message does --------------------------------------------------------------

    def _handler(self, head: Header) -> Callable[[Mapper, Hl7Profile, Decoded], _Prepared]:
        events = SUPPORTED.get(head.message_type)
        if events is None:
            raise Hl7Error(
                ErrorCondition.UNSUPPORTED_MESSAGE_TYPE,
                f"message type {head.message_type!r} is not handled",
                "MSH",
                1,
                9,
            )
        if head.trigger not in events:
            raise Hl7Error(
                ErrorCondition.UNSUPPORTED_EVENT_CODE,
                f"event {head.trigger!r} of {head.message_type} is not handled",
                "MSH",
                1,
                9,
                2,
            )
        if head.message_type in ORDER_MESSAGES:
            return self._orders
        if head.message_type == "ORU":
            return self._result
        return {"A40": self._merge, "A47": self._change_id, "A10": self._arrival}.get(head.trigger, self._patient)

    def _orders(self, mapper: Mapper, profile: Hl7Profile, decoded: Decoded) -> _Prepared:
        patient = mapper.patient()
        orders = mapper.orders()
        effects = [_effect(order) for order in orders]
        arrived = self._clock()
        # An update keeps what the message leaves out; a new order gets it drawn now, before the
        # transaction, because the counters commit on their own.
        given = [self._plan(order, patient, profile, mapper, decoded, arrived, None) for order in orders]
        filled = [
            self._plan(order, patient, profile, mapper, decoded, arrived, self._draw) if effect == "create" else None
            for order, effect in zip(orders, effects, strict=True)
        ]

        def apply(connection: Connection, message_pk: int) -> str:
            patient_pk = PatientRegistry.upsert(connection, _patient_record(patient))
            done = []
            touched = []
            for order, effect, update, new in zip(orders, effects, given, filled, strict=True):
                existing = Worklist.find(connection, order.placer_order_number, order.filler_order_number)
                try:
                    if existing is None:
                        if new is None:
                            raise Hl7Error(
                                ErrorCondition.UNKNOWN_KEY_IDENTIFIER,
                                f"order control {order.control} for an unknown order",
                                "ORC",
                                order.sequence,
                                2,
                            )
                        order_pk = Worklist.place(connection, replace(new, hl7_message_pk=message_pk), patient_pk)
                        if Acquisitions.schedule_order(connection, order_pk, self._settings):
                            self._due = True
                        touched.append(order_pk)
                        done.append(f"order {new.accession_number} created")
                        continue
                    touched.append(existing)
                    if effect in ("create", "update"):
                        Worklist.revise(connection, existing, replace(update, hl7_message_pk=message_pk))
                        note = " (NW for a known order: updated)" if effect == "create" else ""
                        done.append(f"order {Worklist.accession(connection, existing)} updated{note}")
                    else:
                        changed = Worklist.set_status(connection, existing, effect)
                        if effect in ("CANCELED", "DISCONTINUED"):  # a pending acquisition stops here
                            Acquisitions.cancel(connection, Worklist.step_pks(connection, existing))
                        done.append(f"order {Worklist.accession(connection, existing)} {effect} ({changed} steps)")
                except DuplicateStudy as exc:
                    raise _place(
                        profile,
                        mapper,
                        "study_instance_uid",
                        order.sequence,
                        ErrorCondition.DUPLICATE_KEY_IDENTIFIER,
                        str(exc),
                    ) from exc
                except UnknownPatient as exc:
                    raise Hl7Error(ErrorCondition.UNKNOWN_KEY_IDENTIFIER, str(exc), "PID", 1, 3) from exc
            MessageLog.link(connection, message_pk, touched)
            return "; ".join(done)

        return apply

    def _plan(
        self,
        order: OrderData,
        patient: PatientData,
        profile: Hl7Profile,
        mapper: Mapper,
        decoded: Decoded,
        arrived: datetime,
        draw: _Draw | None,
    ) -> OrderPlan:
        """The order as it will be kept; with `draw` (a new order), what the message lacks is
        drawn or refused; without, what it lacks stays as the order has it."""
        items = [self._filled(item, order, profile, mapper, arrived, draw) for item in order.items]
        procedures: dict[str, ProcedurePlan] = {}
        for item in items:
            procedure = procedures.get(item.requested_procedure_id)
            if procedure is None:
                uid = item.study_instance_uid
                if not uid and draw is not None:
                    uid = draw.study_uid()
                description = item.procedure_code[2]
                procedure = ProcedurePlan(
                    item.requested_procedure_id, uid, [], description, item.procedure_code, item.priority
                )
                procedures[item.requested_procedure_id] = procedure
            sps_id = item.sps_id
            if not sps_id and draw is not None:
                sps_id = f"{item.requested_procedure_id}.{len(procedure.steps) + 1}"
                if len(sps_id) > 16:
                    sps_id = draw.step_id()
            procedure.steps.append(
                StepPlan(
                    sps_id=sps_id,
                    modality=item.modality,
                    start_date=item.start.strftime("%Y%m%d") if item.start else "",
                    start_time=item.start.strftime("%H%M%S") if item.start else "",
                    station_ae=item.station_ae,
                    station_name=item.station_name,
                    location=item.step_location,
                    performing_physician=item.performing_physician,
                    description=item.protocol_code[2] or procedure.description,
                    protocol_code=item.protocol_code,
                )
            )
        return OrderPlan(
            patient_id=patient.patient_id,
            issuer=patient.issuer,
            accession_number=items[0].accession_number if items else "",
            procedures=list(procedures.values()),
            placer_order_number=order.placer_order_number,
            filler_order_number=order.filler_order_number,
            referring_physician_name=order.referring_physician,
            requesting_physician=order.requesting_physician,
            admission_id=order.admission_id,
            current_patient_location=order.location,
            source="hl7",
            specific_character_set=decoded.charset.dicom,
        )

    def _filled(
        self,
        item: ItemData,
        order: OrderData,
        profile: Hl7Profile,
        mapper: Mapper,
        arrived: datetime,
        draw: _Draw | None,
    ) -> ItemData:
        """Defaults for what a new order's item lacks (docs/hl7.md, "What the message lacks")."""
        hl7 = self._settings.hl7
        modality = item.modality or hl7.procedure_modality.get(item.procedure_code[0], "")
        station = item.station_ae or hl7.modality_station.get(modality, "")
        if draw is None:
            return replace(item, modality=modality, station_ae=station)
        accession = item.accession_number
        if not accession:
            if profile.accession_number == "reject":
                raise _place(
                    profile,
                    mapper,
                    "accession_number",
                    order.sequence,
                    ErrorCondition.REQUIRED_FIELD_MISSING,
                    "no accession number",
                )
            accession = draw.accession()
        if not item.study_instance_uid and profile.study_instance_uid == "reject":
            raise _place(
                profile,
                mapper,
                "study_instance_uid",
                order.sequence,
                ErrorCondition.REQUIRED_FIELD_MISSING,
                "no Study Instance UID",
            )
        if not modality:
            raise _place(
                profile,
                mapper,
                "modality",
                order.sequence,
                ErrorCondition.REQUIRED_FIELD_MISSING,
                "no modality (name one in the message or map the procedure code in [hl7.procedure_modality])",
            )
        return replace(
            item,
            accession_number=accession,
            requested_procedure_id=item.requested_procedure_id or accession[:16],
            modality=modality,
            station_ae=station,
            start=item.start or arrived.replace(microsecond=0),
        )

    def _patient(self, mapper: Mapper, profile: Hl7Profile, decoded: Decoded) -> _Prepared:
        patient = mapper.patient()
        admission = mapper.text("admission_id", limit=64)
        location = mapper.text("location")[:64]

        def apply(connection: Connection, message_pk: int) -> str:
            pk = PatientRegistry.upsert(connection, _patient_record(patient))
            Worklist.update_visit(connection, pk, admission, location)
            return f"patient {patient.patient_id} updated"

        return apply

    def _merge(self, mapper: Mapper, profile: Hl7Profile, decoded: Decoded) -> _Prepared:
        patient = mapper.patient()
        prior_id, prior_issuer = mapper.prior_patient()

        def apply(connection: Connection, message_pk: int) -> str:
            prior = PatientRegistry.pk(connection, prior_id, prior_issuer or patient.issuer)
            if prior is None:
                raise Hl7Error(ErrorCondition.UNKNOWN_KEY_IDENTIFIER, f"no patient {prior_id!r} to merge", "MRG", 1, 1)
            survivor = PatientRegistry.upsert(connection, _patient_record(patient))
            if survivor == prior:
                return f"patient {prior_id} merged into itself: nothing to do"
            orders = Worklist.reassign(connection, prior, survivor)
            studies = reassign_studies(connection, prior, survivor)
            PatientRegistry.remove(connection, prior)
            return f"patient {prior_id} merged into {patient.patient_id} ({orders} orders, {studies} studies)"

        return apply

    def _change_id(self, mapper: Mapper, profile: Hl7Profile, decoded: Decoded) -> _Prepared:
        patient = mapper.patient()
        prior_id, prior_issuer = mapper.prior_patient()

        def apply(connection: Connection, message_pk: int) -> str:
            prior = PatientRegistry.pk(connection, prior_id, prior_issuer or patient.issuer)
            if prior is None:
                raise Hl7Error(ErrorCondition.UNKNOWN_KEY_IDENTIFIER, f"no patient {prior_id!r} to change", "MRG", 1, 1)
            holder = PatientRegistry.pk(connection, patient.patient_id, patient.issuer)
            if holder is not None and holder != prior:
                raise Hl7Error(
                    ErrorCondition.DUPLICATE_KEY_IDENTIFIER,
                    f"patient ID {patient.patient_id!r} is already in use",
                    "PID",
                    1,
                    3,
                )
            PatientRegistry.change_id(connection, prior, patient.patient_id, patient.issuer)
            PatientRegistry.upsert(connection, _patient_record(patient))
            return f"patient {prior_id} is now {patient.patient_id}"

        return apply

    def _arrival(self, mapper: Mapper, profile: Hl7Profile, decoded: Decoded) -> _Prepared:
        patient = mapper.patient()
        evn = mapper.parsed.first_segments().get("EVN")
        occurred = mapper.parsed.value(evn, 6) or mapper.parsed.value(evn, 2)
        day = occurred[:8] if occurred[:8].isdigit() and len(occurred) >= 8 else self._clock().strftime("%Y%m%d")

        def apply(connection: Connection, message_pk: int) -> str:
            pk = PatientRegistry.pk(connection, patient.patient_id, patient.issuer)
            if pk is None:
                raise Hl7Error(ErrorCondition.UNKNOWN_KEY_IDENTIFIER, f"no patient {patient.patient_id!r}", "PID", 1, 3)
            arrived = Worklist.arrive(connection, pk, day)
            return f"patient {patient.patient_id} arrived: {arrived} steps of {day} ARRIVED"

        return apply

    def _result(self, mapper: Mapper, profile: Hl7Profile, decoded: Decoded) -> _Prepared:
        orders = mapper.orders()
        complete = self._settings.hl7.oru == "complete"

        def apply(connection: Connection, message_pk: int) -> str:
            if not complete:
                return "result acknowledged ([hl7] oru = ignore)"
            done = []
            touched: list[int] = []
            for order in orders:
                existing = Worklist.find(connection, order.placer_order_number, order.filler_order_number)
                if existing is None:
                    raise Hl7Error(
                        ErrorCondition.UNKNOWN_KEY_IDENTIFIER, "a result for an unknown order", "OBR", order.sequence, 2
                    )
                changed = Worklist.set_status(connection, existing, "COMPLETED")
                touched.append(existing)
                done.append(f"order {Worklist.accession(connection, existing)} COMPLETED ({changed} steps)")
            MessageLog.link(connection, message_pk, touched)
            return "; ".join(done)

        return apply


def _row(head: Header, raw: bytes, peer: str) -> dict[str, Any]:
    """The log row of a message, before we know what became of it."""
    return {
        "received_at": datetime.now(UTC),
        "peer": peer[:64],
        "sending_application": head.sending_application[:227],
        "sending_facility": head.sending_facility[:227],
        "control_id": head.control_id[:199],
        "message_type": f"{head.message_type}^{head.trigger}".strip("^")[:16],
        "version": head.version[:16],
        "profile": "",
        "outcome": "",
        "error": "",
        "detail": "",
        "raw": raw,
        "ack": b"",
    }


def _encoded(text: str, decoded: Decoded) -> bytes:
    """Text back in the charset its frame came in (what it cannot hold becomes ?)."""
    return text.encode(decoded.charset.codec, errors="replace")


class _LowOnSpace(OSError):
    """The disk of data_dir is below its watermark: nothing more is accepted until space returns."""


def _database_error(exc: Exception) -> Hl7Error:
    """AR 206 when the database stayed locked past the busy timeout, AR 207 for anything else."""
    if isinstance(exc, _LowOnSpace):
        return Hl7Error(ErrorCondition.APPLICATION_INTERNAL_ERROR, f"{exc}: nothing was kept, send it again later")
    if is_busy(exc):
        return Hl7Error(
            ErrorCondition.APPLICATION_RECORD_LOCKED, "the database is busy: nothing was kept, send it again"
        )
    return Hl7Error(ErrorCondition.APPLICATION_INTERNAL_ERROR, "internal error: nothing was kept, send it again")


def _effect(order: OrderData) -> str:
    effect = CONTROL_TABLE.get((order.control, order.status))
    if effect is None:
        raise Hl7Error(
            ErrorCondition.TABLE_VALUE_NOT_FOUND,
            f"order control {order.control!r} with order status {order.status!r} is not in the control table",
            "ORC",
            order.sequence,
            1,
        )
    return effect


def _place(profile: Hl7Profile, mapper: Mapper, name: str, sequence: int, code: ErrorCondition, text: str) -> Hl7Error:
    """An error located where the profile reads `name` in a message like this one."""
    first = mapper.locate(name)
    if first is None:
        return Hl7Error(code, text)
    return first.error(code, text, sequence if first.segment in ("ORC", "OBR", "IPC") else 1)


def _patient_record(patient: PatientData) -> PatientRecord:
    return PatientRecord(
        patient.patient_id,
        patient.issuer,
        patient.name,
        patient.birth_date,
        patient.sex,
        patient.address,
        patient.phone,
    )
