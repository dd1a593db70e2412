"""The DICOM node: pynetdicom serves associations on its own threads; handlers turn events into
writer and workflow calls and answer with a DIMSE status.

Handlers never touch the Twisted reactor: they run on pynetdicom's association threads.
"""

from __future__ import annotations

import ipaddress
import itertools
import queue
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Any, TypeVar, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    build_context,
    dimse_messages,
    evt,
)
from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.dsutils import create_file_meta, encode
from pynetdicom.pdu_primitives import P_DATA

# Generated at import time by pynetdicom, so invisible to type checkers.
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from sqlalchemy.exc import SQLAlchemyError
from twisted.application.service import Service

from fabricatord import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from fabricatord.config import Settings
from fabricatord.config.values import is_valid_uid, parse_duration, parse_size
from fabricatord.db import Database, is_busy
from fabricatord.db.audit import AuditRecord
from fabricatord.db.jobs import Acquisitions
from fabricatord.db.worklist import Worklist
from fabricatord.dicom import answers, query, worklist
from fabricatord.dicom.guard import Limits, guard, refuse, refuse_vetted
from fabricatord.dicom.mpps import PROCESSING_FAILURE, MppsError
from fabricatord.dicom.scu import MAX_CONTEXTS, keep_stray_responses, nodelay, storage_contexts
from fabricatord.dicom.storage import INDEXED_TAGS, InstanceWriter, InvalidInstance, OutOfSpace
from fabricatord.dicom.walk import Malformed, read_received
from fabricatord.obs import metrics
from fabricatord.obs.logging import bind_context, get_logger
from fabricatord.workflow.audit import AuditTrail
from fabricatord.workflow.mpps import PerformedProcedureSteps

log = get_logger(__name__)

# PS3.4 B.2.3 and PS3.7 C: the statuses our C-STORE SCP answers with.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_PENDING = 0xFF00
STATUS_PENDING_UNSUPPORTED_KEYS = 0xFF01
STATUS_CANCEL = 0xFE00
STATUS_NOT_AUTHORIZED = 0x0124  # PS3.7 C.5: Refused, not authorized
STATUS_SUBOPERATIONS_REFUSED = 0xA702  # PS3.4 C.4.2.1.5, C.4.3.1.4: unable to perform sub-operations
STATUS_MOVE_DESTINATION_UNKNOWN = 0xA801
MAX_ERROR_COMMENT = 64  # Error Comment is LO
MAX_SUBOPERATIONS = 65535  # the sub-operation counts are US (PS3.7 C.4.2.1.4)
STUDY_ROOT_RETRIEVE = frozenset({"1.2.840.10008.5.1.4.1.2.2.2", "1.2.840.10008.5.1.4.1.2.2.3"})
# What each service needs of a `[[peers]]` entry, as Orthanc's AllowEcho/Store/Find/FindWorklist/Move/Get.
PERMISSIONS = {
    "C-ECHO": "allow_echo",
    "C-STORE": "allow_store",
    "C-FIND": "allow_find",
    "MWL": "allow_find_worklist",
    "C-MOVE": "allow_move",
    "C-GET": "allow_get",
    "MPPS": "allow_mpps",
}
_PENDING = (STATUS_PENDING, STATUS_PENDING_UNSUPPORTED_KEYS)
_MAX_QUEUED_PDUS = 32
# Queries are answered in the little-endian syntaxes only: `fabricatord.dicom.answers` encodes them.
QUERY_SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
_association_numbers = itertools.count(1)
T = TypeVar("T")


@dataclass
class _Association:
    """What the audit trail needs to know about one association while it lasts."""

    number: str
    calling_ae: str
    called_ae: str
    address: str
    started: float
    stored: int = 0
    bytes: int = 0
    operation: str = ""
    operation_started: float = 0.0
    operation_bytes: int = 0
    answers: int = 0
    detail: str = ""


class _SharedContexts(list[Any]):
    """The presentation contexts we support, given to each association as they are.

    pynetdicom deep-copies the server's contexts for every association it accepts: with every
    storage SOP class in all its transfer syntaxes that is thousands of UIDs, each validated
    again, and it took about half of the daemon's CPU under a stream of short associations.
    Negotiation only reads them, so every association can share one set (docs/upstream.md)."""

    def __deepcopy__(self, _memo: dict[int, Any]) -> list[Any]:
        return list(self)


LISTEN_BACKLOG = 128
"""Connections the kernel holds for the accept loop (DCMTK's is 50)."""
QUEUE_WAIT = 0.02
"""How long an association's thread waits on its message queue before it looks at the rest."""
DUL_IDLE_DELAY = 0.004
"""How long an association's DUL thread sleeps when its socket and queues had nothing."""


def _calm_reactors(assoc: Any) -> None:
    """pynetdicom polls: each association's thread looks at its message queue, and its DUL thread
    at the socket, every millisecond. Twenty associations are forty threads waking a thousand
    times a second for the GIL: most of a core, and a C-STORE three times slower. Here the
    association's thread waits on its queue instead (a message wakes it at once; a release or
    abort is seen within QUEUE_WAIT), and the DUL thread sleeps DUL_IDLE_DELAY when idle (the
    first PDU after a pause waits that long at most; a burst does not). docs/upstream.md."""
    dimse = assoc.dimse
    poll = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        if block:
            return poll(True)
        try:
            return dimse.msg_queue.get(timeout=QUEUE_WAIT)
        except queue.Empty:
            return None, None

    dimse.get_msg = get_msg
    assoc.dul._run_loop_delay = DUL_IDLE_DELAY


def _status(code: int, comment: str = "") -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:MAX_ERROR_COMMENT]
    return status


class DicomNode(Service):
    """The DICOM listener as a Twisted service: started and stopped with the rest of the daemon."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        writer: InstanceWriter,
        audit: AuditTrail | None = None,
        on_due: Callable[[], None] = lambda: None,
    ) -> None:
        """`on_due`: an `on_query` acquisition became due because a modality fetched its item."""
        self._settings = settings
        self._on_due = on_due
        self._acquisitions = Acquisitions(database)
        self._database = database
        self._writer = writer
        self._audit = audit
        self._worklist = Worklist(database)
        self._performed = PerformedProcedureSteps(database)
        self._background = ThreadPoolExecutor(1, thread_name_prefix="dicom-background")
        self._associations: dict[int, _Association] = {}
        self._server: Any = None
        self._peers = {p.ae_title: p for p in reversed(settings.peers)}  # the first entry wins
        self._networks = [ipaddress.ip_network(h, strict=False) for h in settings.dicom.allowed_hosts]
        self._active: set[int] = set()
        self._active_lock = threading.Lock()
        self._limits = Limits.of(settings.dicom.max_pdu, parse_size(settings.dicom.max_dataset_size))

    def reload(self, settings: Settings) -> None:
        """New `[[peers]]` and their permissions (SIGHUP), for the associations that follow."""
        self._settings = settings
        self._peers = {p.ae_title: p for p in reversed(settings.peers)}

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one the system chose for port 0)."""
        return int(self._server.server_address[1])

    def _application(self) -> AE:
        dicom = self._settings.dicom
        ae = AE(ae_title=self._settings.node.ae_title)
        ae.maximum_associations = dicom.max_associations
        ae.maximum_pdu_size = dicom.max_pdu
        ae.acse_timeout = parse_duration(dicom.acse_timeout)
        ae.dimse_timeout = parse_duration(dicom.dimse_timeout)
        ae.network_timeout = parse_duration(dicom.network_timeout)
        # PS3.8 9.3.1: an association for another AE title is rejected (RJ 1/1/7).
        ae.require_called_aet = True
        ae.add_supported_context(Verification)
        ae.add_supported_context(ModalityPerformedProcedureStep, QUERY_SYNTAXES)
        for find_model in (
            ModalityWorklistInformationFind,
            PatientRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelFind,
        ):
            ae.add_supported_context(find_model, QUERY_SYNTAXES)
        for model in (
            PatientRootQueryRetrieveInformationModelMove,
            StudyRootQueryRetrieveInformationModelMove,
            PatientRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelGet,
        ):
            ae.add_supported_context(model)
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            # scp_role: a C-GET requestor may take the Storage SCP role on this association
            # (PS3.7 D.3.3.4); without that role selection its C-GET gets no sub-operations.
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
        return ae

    def startService(self) -> None:
        dicom = self._settings.dicom
        _configure_pynetdicom(self._settings.tmp_dir)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_connect),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._named(self._on_echo)),
            (evt.EVT_N_CREATE, self._named(self._on_mpps_create)),
            (evt.EVT_N_SET, self._named(self._on_mpps_set)),
            (evt.EVT_C_STORE, self._named(self._on_store)),
            (evt.EVT_C_FIND, self._named(self._on_find_request)),
            (evt.EVT_C_MOVE, self._named(lambda event: _timed("C-MOVE", self._on_move(event)))),
            (evt.EVT_C_GET, self._named(lambda event: _timed("C-GET", self._on_get(event)))),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_ended),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_CONN_CLOSE, _remove_partial_dataset),
            (evt.EVT_DIMSE_RECV, self._on_request),
            (evt.EVT_DIMSE_SENT, self._on_response),
        ]
        self._server = self._application().start_server((dicom.host, dicom.port), block=False, evt_handlers=handlers)
        self._server.contexts = _SharedContexts(self._server.contexts)
        # socketserver listens with a backlog of 5: a burst of connections overflows it whenever
        # the accept loop waits a moment for the GIL, and the kernel drops SYNs that clients
        # resend only a second later. Linux takes a second listen() as the new backlog.
        self._server.socket.listen(LISTEN_BACKLOG)
        log.info("dicom listener started", host=dicom.host, port=self.port, ae_title=self._settings.node.ae_title)
        super().startService()

    def stopService(self) -> None:
        """No new associations; those under way get `[node] shutdown_grace` to finish (a C-STORE
        answered success is already kept), then the rest are aborted."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            deadline = time.monotonic() + parse_duration(self._settings.node.shutdown_grace)
            while server.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
            for association in server.active_associations:
                log.warning("association aborted at shutdown", calling_ae=str(association.requestor.ae_title))
                association.abort()
        self._background.shutdown(wait=True)
        super().stopService()

    def _named(self, handler: Callable[[Any], T]) -> Callable[[Any], T]:
        """`handler`, run with every log event of its thread (pynetdicom's too) naming the
        association, the calling AE and the operation, so that an operator can follow one
        association through the log."""

        def named(event: Any) -> T:
            state = self._association(event)
            bind_context(association=state.number, calling_ae=state.calling_ae, operation=state.operation)
            return handler(event)

        return named

    def _on_connect(self, event: Any) -> None:
        nodelay(event)
        _calm_reactors(event.assoc)
        guard(event.assoc, self._limits)
        if self._networks:
            address = ipaddress.ip_address(event.address[0])
            if not any(address in network for network in self._networks):
                log.warning("connection from a host not in allowed_hosts", address=str(address))
                metrics.ASSOCIATIONS_REFUSED.labels("host").inc()
                # Nothing has been read yet: closing the connection is the whole answer, as DCMTK
                # and Orthanc give it; pynetdicom's reader sees the closed socket and ends.
                event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)

    def _on_requested(self, event: Any) -> None:
        """With `require_known_ae`, a calling AE that is no `[[peers]]` ae_title is rejected 1/1/3,
        also when no peer is configured at all (pynetdicom's own check lets everyone in then)."""
        if self._settings.dicom.require_known_ae:
            calling = str(event.assoc.requestor.primitive.calling_ae_title).strip()  # the request's, not yet copied
            if calling not in self._peers:
                refuse(event.assoc, (1, 1, 3), f"calling_ae_unknown: {calling!r} is not a [[peers]] ae_title")
        refuse_vetted(event)

    def _on_established(self, event: Any) -> None:
        with self._active_lock:
            self._active.add(id(event.assoc))
        state = self._association(event)  # the audit state from the start: the duration is the whole association
        metrics.ASSOCIATIONS_ACTIVE.inc()
        metrics.ASSOCIATIONS.labels(self._peer_label(event), "established").inc()
        log.info(
            "association established",
            association=state.number,
            calling_ae=state.calling_ae,
            called_ae=state.called_ae,
            address=state.address,
        )

    def _on_ended(self, event: Any) -> None:
        result = {"EVT_REJECTED": "rejected", "EVT_RELEASED": "released"}.get(event.event.name, "aborted")
        metrics.ASSOCIATIONS.labels(self._peer_label(event), result).inc()
        with self._active_lock:  # an abort during negotiation ends what never was established
            was_active = id(event.assoc) in self._active
            self._active.discard(id(event.assoc))
            state = self._associations.pop(id(event.assoc), None) or self._new_association(event)
        if was_active:
            metrics.ASSOCIATIONS_ACTIVE.dec()
        if result == "rejected":
            state.detail = f"called AE {_called_ae(event)}"
        seconds = time.perf_counter() - state.started
        (log.info if result == "released" else log.warning)(
            f"association {result}",
            association=state.number,
            calling_ae=state.calling_ae,
            address=state.address,
            instances_stored=state.stored,
            seconds=round(seconds, 3),
        )
        self._record(state, "ASSOCIATION", result, state.stored, state.bytes, seconds)

    def _association(self, event: Any) -> _Association:
        """The audit state of this event's association, made on first use."""
        with self._active_lock:
            state = self._associations.get(id(event.assoc))
            if state is None:
                state = self._associations[id(event.assoc)] = self._new_association(event)
            return state

    def _new_association(self, event: Any) -> _Association:
        requestor = event.assoc.requestor
        return _Association(
            number=f"{next(_association_numbers):06x}",
            calling_ae=str(requestor.ae_title).strip(),
            called_ae=_called_ae(event),
            address=f"{requestor.address}:{requestor.port}",
            started=time.perf_counter(),
        )

    def _on_request(self, event: Any) -> None:
        """A request arrived: the operation the next final response of ours will conclude."""
        name = type(event.message).__name__
        if not name.endswith("_RQ") or name == "C_CANCEL_RQ":
            return
        state = self._association(event)
        operation = name[:-3].replace("_", "-")
        if (
            operation == "C-FIND"
            and str(event.message.command_set.AffectedSOPClassUID) == worklist.MODALITY_WORKLIST_FIND
        ):
            operation = "MWL"
        state.operation, state.operation_started, state.answers, state.detail = operation, time.perf_counter(), 0, ""
        state.operation_bytes = 0

    def _on_response(self, event: Any) -> None:
        """One of our responses left: pending ones are counted, a final one is audited."""
        name = type(event.message).__name__
        if not name.endswith("_RSP"):
            return
        state = self._association(event)
        command = event.message.command_set
        status = int(command.Status)
        if status in _PENDING:
            state.answers += 1
            return
        if name in ("C_MOVE_RSP", "C_GET_RSP"):
            state.answers = int(command.get("NumberOfCompletedSuboperations", 0) or 0)
            failed = int(command.get("NumberOfFailedSuboperations", 0) or 0)
            state.detail = f"{state.detail} failed={failed}".strip() if failed else state.detail
        elif name == "C_STORE_RSP":
            state.answers = 1 if status == STATUS_SUCCESS else 0
        self._record(
            state,
            state.operation or name[:-4].replace("_", "-"),
            f"0x{status:04X}",
            state.answers,
            state.operation_bytes,
            time.perf_counter() - state.operation_started,
        )

    def _record(
        self, state: _Association, operation: str, status: str, instances: int, size: int, seconds: float
    ) -> None:
        if self._audit is None or not self._settings.dicom.audit:
            return
        self._audit.record(
            AuditRecord(
                at=datetime.now(UTC),
                operation=operation,
                association=state.number,
                calling_ae=state.calling_ae[:16],
                called_ae=state.called_ae[:16],
                peer_address=state.address[:64],
                status=status,
                instances=instances,
                bytes=size,
                seconds=round(seconds, 6),
                detail=state.detail[:256],
            )
        )

    def _refused(self, event: Any, service: str) -> bool:
        """True when the calling AE is a `[[peers]]` entry that may not use `service`."""
        calling = str(event.assoc.requestor.ae_title).strip()
        peer = self._peers.get(calling)
        if peer is None or getattr(peer, PERMISSIONS[service]):
            return False
        log.warning("operation not allowed for this peer", service=service)
        metrics.DIMSE_OPERATIONS.labels(service, peer.name, "refused").inc()
        return True

    def _peer_label(self, event: Any) -> str:
        """A bounded metric label: the `[[peers]]` name of the calling AE, or `other`."""
        peer = self._peers.get(str(event.assoc.requestor.ae_title).strip())
        return peer.name if peer is not None else "other"

    def _on_echo(self, event: Any) -> int:
        if self._refused(event, "C-ECHO"):
            return STATUS_NOT_AUTHORIZED
        metrics.DIMSE_OPERATIONS.labels("C-ECHO", self._peer_label(event), "success").inc()
        return STATUS_SUCCESS

    def _on_mpps_create(self, event: Any) -> tuple[Dataset | int, Dataset | None]:
        if self._refused(event, "MPPS"):
            return _status(STATUS_NOT_AUTHORIZED, "this AE may not send MPPS here"), None
        uid = str(event.request.AffectedSOPInstanceUID or "")
        return self._mpps(event, lambda: self._performed.create(uid, event.attribute_list, self._calling(event)))

    def _on_mpps_set(self, event: Any) -> tuple[Dataset | int, Dataset | None]:
        if self._refused(event, "MPPS"):
            return _status(STATUS_NOT_AUTHORIZED, "this AE may not send MPPS here"), None
        uid = str(event.request.RequestedSOPInstanceUID or "")
        return self._mpps(event, lambda: self._performed.update(uid, event.modification_list, self._calling(event)))

    def _mpps(self, event: Any, apply: Callable[[], Dataset]) -> tuple[Dataset | int, Dataset | None]:
        """N-CREATE or N-SET applied; a refusal answers its PS3.7 status with an Error Comment."""
        peer = self._peer_label(event)
        try:
            attributes = apply()
        except MppsError as refusal:
            log.warning(
                "mpps refused",
                status=f"0x{refusal.status:04X}",
                reason=refusal.comment,
            )
            metrics.DIMSE_OPERATIONS.labels("MPPS", peer, "failure").inc()
            return refusal.status_dataset(), None
        except (SQLAlchemyError, OSError, ValueError) as exc:
            log.error("mpps not kept", error=str(exc))
            metrics.DIMSE_OPERATIONS.labels("MPPS", peer, "failure").inc()
            return _status(PROCESSING_FAILURE, "the Performed Procedure Step could not be kept"), None
        metrics.DIMSE_OPERATIONS.labels("MPPS", peer, "success").inc()
        return STATUS_SUCCESS, attributes

    @staticmethod
    def _calling(event: Any) -> str:
        return str(event.assoc.requestor.ae_title).strip()

    def _on_store(self, event: Any) -> Dataset:
        if self._refused(event, "C-STORE"):
            return _status(STATUS_NOT_AUTHORIZED, "this AE may not store here")
        started = time.perf_counter()
        code, comment, why = self._store(event)
        metrics.DIMSE_SECONDS.labels("C-STORE").observe(time.perf_counter() - started)
        outcome = "success" if code == STATUS_SUCCESS else "failure"
        metrics.DIMSE_OPERATIONS.labels("C-STORE", self._peer_label(event), outcome).inc()
        if comment:
            log.warning("c-store refused", why=why, status=f"0x{code:04X}", reason=comment)
        return _status(code, comment)

    def _store(self, event: Any) -> tuple[int, str, str]:
        """Write the instance durably; (status, Error Comment, why it was refused)."""
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            # pynetdicom wrote the request's dataset, as the peer sent it, behind our file meta
            # into data_dir/tmp (see `_configure_pynetdicom`): walk it, then rename the file.
            received = Path(event.dataset_path)
            ds = read_received(received, INDEXED_TAGS, self._limits.walk)
            _check_match(event.request, ds)
            dataset_bytes = received.stat().st_size - _dataset_offset(ds)
            metrics.RECEIVED_BYTES.inc(dataset_bytes)
            state = self._association(event)
            state.operation_bytes = dataset_bytes
            state.bytes += dataset_bytes
            result = self._writer.adopt(received, ds, "received", calling)
        except Exception as exc:
            return _store_refusal(exc)
        state.stored += 1
        log.info(
            "c-store",
            sop_instance_uid=result.sop_instance_uid,
            outcome=result.outcome,
            bytes=result.size,
        )
        return STATUS_SUCCESS, "", ""

    def _on_find_request(self, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        if str(event.request.AffectedSOPClassUID) == worklist.MODALITY_WORKLIST_FIND:
            return _timed("MWL", self._on_worklist(event))
        return _timed("C-FIND", self._on_find(event))

    def _on_worklist(self, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """Modality Worklist C-FIND (PS3.4 K): actionable steps from one SQL query; fetches recorded."""
        peer = self._peer_label(event)
        if self._refused(event, "MWL"):
            yield _status(STATUS_NOT_AUTHORIZED, "this AE may not query the worklist"), None
            return
        calling = str(event.assoc.requestor.ae_title).strip()

        def search(limit: int) -> tuple[worklist.WorklistQuery, list[Any]]:
            find = worklist.build(event.identifier, calling, self._settings.dicom.worklist_filter_by_calling_ae)
            return find, worklist.run(self._database, find, limit)

        result = self._matches(event, "MWL", search)
        if isinstance(result, Dataset):
            yield result, None
            return
        find, rows = result
        send = self._pending_sender(event, bool(find.unsupported))
        answered: list[int] = []
        try:
            for step_pk, answer in worklist.answers(find, rows, _implicit(event)):
                if event.is_cancelled or not event.assoc.is_established:
                    metrics.DIMSE_OPERATIONS.labels("MWL", peer, "cancel").inc()
                    yield STATUS_CANCEL, None
                    return
                answered.append(step_pk)
                send(answer)
        finally:
            # What was handed over counts as fetched, also when the query was cancelled part-way;
            # written off the association's thread, so that the modality does not wait for it.
            self._background.submit(self._record_fetches, answered, calling)
        metrics.DIMSE_OPERATIONS.labels("MWL", peer, "success").inc()
        metrics.MWL_QUERIES.labels(peer, "hit" if rows else "miss").inc()
        log.info("worklist query", items=len(rows), unsupported=find.unsupported or None)
        yield STATUS_SUCCESS, None

    def _record_fetches(self, step_pks: list[int], calling_ae: str) -> None:
        try:
            self._worklist.record_fetches(step_pks, calling_ae)
            if self._acquisitions.release(step_pks, ("on_query",)):
                self._on_due()
        except Exception as exc:  # the answers went out; only the record of them is missing
            log.error("worklist fetches could not be recorded", calling_ae=calling_ae, error=str(exc))

    def _on_find(self, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """Study and Patient Root C-FIND: pending answers from one SQL query, C-CANCEL honoured."""
        peer = self._peer_label(event)
        if self._refused(event, "C-FIND"):
            yield _status(STATUS_NOT_AUTHORIZED, "this AE may not query here"), None
            return

        def search(limit: int) -> tuple[query.FindQuery, list[Any]]:
            find = query.build(event.identifier, str(event.request.AffectedSOPClassUID))
            return find, query.run(self._database, find, limit)

        result = self._matches(event, "C-FIND", search)
        if isinstance(result, Dataset):
            yield result, None
            return
        find, rows = result
        send = self._pending_sender(event, bool(find.unsupported))
        for answer in query.answers(self._database, find, rows, self._settings.node.ae_title, _implicit(event)):
            if event.is_cancelled or not event.assoc.is_established:
                metrics.DIMSE_OPERATIONS.labels("C-FIND", peer, "cancel").inc()
                yield STATUS_CANCEL, None
                return
            send(answer)
        metrics.DIMSE_OPERATIONS.labels("C-FIND", peer, "success").inc()
        log.info("c-find", level=find.level, matches=len(rows), unsupported=find.unsupported or None)
        yield STATUS_SUCCESS, None

    def _matches(
        self, event: Any, service: str, search: Callable[[int], tuple[T, list[Any]]]
    ) -> tuple[T, list[Any]] | Dataset:
        """The query and its matches, or the failure status to answer with instead."""
        limit = self._settings.dicom.max_find_results
        try:
            found, rows = search(limit)
        except query.QueryError as exc:
            failure = _status(STATUS_IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc))
        except Exception as exc:
            log.error("query failed", service=service, error=str(exc))
            failure = _status(STATUS_CANNOT_UNDERSTAND, f"cannot process the query: {exc}")
        else:
            if len(rows) <= limit:
                return found, rows
            # C-FIND has no warning status: refusing is the only honest answer (PS3.4 C.4.1.1.4).
            failure = _status(STATUS_OUT_OF_RESOURCES, f"more than {limit} matches; narrow the query")
        metrics.DIMSE_OPERATIONS.labels(service, self._peer_label(event), "failure").inc()
        return failure

    def _pending_sender(self, event: Any, unsupported_keys: bool) -> Callable[[bytes], None]:
        """Send encoded identifiers as pending C-FIND responses, through pynetdicom's DUL queue but
        around its per-response message building (docs/upstream.md): the command set is the same
        for every match of a query and is encoded once. The final response stays pynetdicom's."""
        status = STATUS_PENDING_UNSUPPORTED_KEYS if unsupported_keys else STATUS_PENDING
        command = answers.find_response_command(
            str(event.request.AffectedSOPClassUID), int(event.request.MessageID), status
        )
        assoc, context_id = event.assoc, event.context.context_id
        state = self._association(event)

        def send(identifier: bytes) -> None:
            # A short queue keeps a C-CANCEL effective and memory flat however many matches.
            while assoc.dul.to_provider_queue.qsize() > _MAX_QUEUED_PDUS and assoc.is_established:
                time.sleep(0.0005)
            for value in answers.fragments(command, identifier, assoc.dimse.maximum_pdu_size):
                primitive = P_DATA()
                primitive.presentation_data_value_list.append((context_id, value))
                assoc.dul.send_pdu(primitive)
            state.answers += 1

        return send

    def _instances(self, event: Any) -> list[Any]:
        """The stored instances a C-MOVE or C-GET identifier names, at any level, relationally."""
        identifier = Dataset()
        identifier.update(event.identifier)
        level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
        if level not in query.LEVELS:
            raise query.QueryError(f"Query/Retrieve Level {level!r} is not PATIENT, STUDY, SERIES or IMAGE")
        if level == "PATIENT" and str(event.request.AffectedSOPClassUID) in STUDY_ROOT_RETRIEVE:
            raise query.QueryError("the Study Root model has no PATIENT level")
        identifier.QueryRetrieveLevel = "IMAGE"
        find = query.build(identifier, query.PATIENT_ROOT)
        return [row[-1] for row in query.run(self._database, find, MAX_SUBOPERATIONS)]

    def _sent_counter(self, event: Any, service: str, peer: str) -> Callable[[int], None]:
        """What counts the bytes of each sub-operation the peer accepted: metric and audit."""
        state = self._association(event)
        counter = metrics.SENT_BYTES.labels(service, peer)

        def sent(size: int) -> None:
            counter.inc(size)
            state.operation_bytes += size
            state.bytes += size

        return sent

    def _datasets(self, event: Any, instances: list[Any]) -> Iterator[tuple[int, Dataset | None]]:
        for instance in instances:
            if event.is_cancelled:
                yield STATUS_CANCEL, None
                return
            yield STATUS_PENDING, _StoredFile(self._settings.storage_dir / instance.path, instance)

    def _on_move(self, event: Any) -> Iterator[Any]:
        """C-MOVE to a `[[peers]]` AE title; pynetdicom runs the C-STORE sub-operations."""
        peer = self._peer_label(event)
        if self._refused(event, "C-MOVE"):
            _refuse_move(event.assoc, "this AE may not retrieve from here")
            yield None, None  # pynetdicom can only refuse a C-MOVE this early as 0xA801
            return
        # DESIGN.md: a C-MOVE destination is looked up by `[[peers]].ae_title`.
        destination = self._peers.get(str(event.move_destination).strip())
        if destination is None:
            metrics.DIMSE_OPERATIONS.labels("C-MOVE", peer, "failure").inc()
            log.warning("c-move to an unknown destination", destination=str(event.move_destination).strip())
            _refuse_move(event.assoc, "move destination unknown: no [[peers]] entry has its AE title")
            yield None, None  # pynetdicom answers 0xA801, move destination unknown
            return
        if destination.environment == "prod" and not self._settings.dicom.allow_move_to_prod:
            metrics.DIMSE_OPERATIONS.labels("C-MOVE", peer, "failure").inc()
            log.warning(
                "c-move to a production destination refused",
                why="prod_destination",
                destination=destination.name,
                hint="[dicom] allow_move_to_prod = true allows it",
            )
            _refuse_move(event.assoc, "production destination: [dicom] allow_move_to_prod is false")
            yield None, None  # 0xA801: a production peer is no destination of ours
            return
        try:
            instances = self._instances(event)
        except query.QueryError as exc:
            metrics.DIMSE_OPERATIONS.labels("C-MOVE", peer, "failure").inc()
            # pynetdicom takes a failure status only after it has associated with the
            # destination; a Verification context is all that association needs.
            yield destination.host, destination.port, {"contexts": [build_context(Verification)]}
            yield 1
            yield _status(STATUS_IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc)), None
            return
        sent = self._sent_counter(event, "C-MOVE", destination.name)
        pairs = [(i.sop_class_uid, i.transfer_syntax_uid) for i in instances]
        # One transfer syntax per context, so that each file can go as it is stored (a chunked
        # send cannot convert); when a syntax is declined, `_send_stored_files` converts.
        contexts = [
            build_context(sop_class, syntax) for sop_class, syntaxes in storage_contexts(pairs) for syntax in syntaxes
        ]
        if len(contexts) > MAX_CONTEXTS:
            contexts = [build_context(sop_class, syntaxes) for sop_class, syntaxes in storage_contexts(pairs)]
        handlers = [
            (evt.EVT_CONN_OPEN, nodelay),
            (evt.EVT_CONN_OPEN, keep_stray_responses),
            (evt.EVT_CONN_OPEN, lambda opened: _send_stored_files(opened.assoc, sent)),
        ]
        _expect_move(event.assoc, peer, destination.name, [i.sop_instance_uid for i in instances])
        yield destination.host, destination.port, {"contexts": contexts, "evt_handlers": handlers}
        yield len(instances)
        yield from self._datasets(event, instances)
        metrics.DIMSE_OPERATIONS.labels("C-MOVE", peer, "success").inc()
        log.info("c-move", destination=destination.name, instances=len(instances))

    def _on_get(self, event: Any) -> Iterator[Any]:
        """C-GET: the sub-operations go back over the requestor's own association."""
        peer = self._peer_label(event)
        if self._refused(event, "C-GET"):
            yield 1
            yield _status(STATUS_NOT_AUTHORIZED, "this AE may not retrieve from here"), None
            return
        try:
            instances = self._instances(event)
        except query.QueryError as exc:
            metrics.DIMSE_OPERATIONS.labels("C-GET", peer, "failure").inc()
            yield 1
            yield _status(STATUS_IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc)), None
            return
        sendable = {str(cx.abstract_syntax) for cx in event.assoc.accepted_contexts if cx.as_scu}
        if instances and not any(i.sop_class_uid in sendable for i in instances):
            # PS3.4 C.4.3.3: the sub-operations need a Storage context on which the requestor
            # took the SCP role; without one none can be attempted.
            metrics.DIMSE_OPERATIONS.labels("C-GET", peer, "failure").inc()
            log.warning("c-get refused", why="no_scp_role", instances=len(instances))
            failed = Dataset()
            failed.FailedSOPInstanceUIDList = [i.sop_instance_uid for i in instances]
            yield len(instances)
            yield _status(STATUS_SUBOPERATIONS_REFUSED, "no Storage context with the SCP role was negotiated"), failed
            return
        _send_stored_files(event.assoc, self._sent_counter(event, "C-GET", peer))
        yield len(instances)
        yield from self._datasets(event, instances)
        metrics.DIMSE_OPERATIONS.labels("C-GET", peer, "success").inc()
        log.info("c-get", instances=len(instances))


_MOVE = "_fabricatord_move"


def _expect_move(assoc: Any, peer: str, destination: str, instances: list[str]) -> None:
    """Tell `_answer_unreachable_moves` which known destination the C-MOVE under way goes to;
    the first C-MOVE of an association installs it, so that other associations' responses
    pass untouched."""
    _mark_move(assoc, (peer, destination, instances))


def _refuse_move(assoc: Any, comment: str) -> None:
    """Give the 0xA801 pynetdicom answers for a C-MOVE refused before its sub-operations the
    Error Comment that says why (at most 64 characters, an LO)."""
    _mark_move(assoc, comment[:64])


def _mark_move(assoc: Any, expected: tuple[str, str, list[str]] | str) -> None:
    if getattr(assoc, _MOVE, False) is False:
        _answer_unreachable_moves(assoc)
    setattr(assoc, _MOVE, expected)


def _answer_unreachable_moves(assoc: Any) -> None:
    """pynetdicom answers 0xA801 (move destination unknown) also when a destination we know does
    not accept the association. Say what happened instead, as DCMTK does: 0xA702 (unable to
    perform sub-operations), every sub-operation failed and counted (docs/upstream.md). A C-MOVE
    refused earlier (`_refuse_move`) keeps its 0xA801 and gets the Error Comment saying why."""
    dimse = assoc.dimse
    send = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        expected = getattr(assoc, _MOVE, None)
        if isinstance(primitive, C_MOVE) and expected is not None and primitive.Status not in _PENDING:
            setattr(assoc, _MOVE, None)
            if isinstance(expected, str):
                cast(Any, primitive).ErrorComment = expected  # typed None in pynetdicom
            elif primitive.Status == STATUS_MOVE_DESTINATION_UNKNOWN:
                peer, destination, instances = expected
                metrics.DIMSE_OPERATIONS.labels("C-MOVE", peer, "failure").inc()
                log.warning("c-move destination unreachable", why="destination_unreachable", destination=destination)
                _all_failed(primitive, destination, instances, assoc._accepted_cx[context_id].transfer_syntax[0])
        send(primitive, context_id)

    dimse.send_msg = send_msg


def _all_failed(response: Any, destination: str, instances: list[str], syntax: UID) -> None:
    response.Status = STATUS_SUBOPERATIONS_REFUSED
    response.ErrorComment = f"{destination[:40]} did not accept an association"
    response.NumberOfRemainingSuboperations = None
    response.NumberOfCompletedSuboperations = response.NumberOfWarningSuboperations = 0
    response.NumberOfFailedSuboperations = len(instances)
    failed = Dataset()
    failed.FailedSOPInstanceUIDList = instances
    encoded = encode(failed, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    response.Identifier = BytesIO(encoded or b"")


def _timed(service: str, answers: Iterator[Any]) -> Iterator[Any]:
    """The answers of a generator handler, timed from the first to the last."""
    started = time.perf_counter()
    try:
        yield from answers
    finally:
        metrics.DIMSE_SECONDS.labels(service).observe(time.perf_counter() - started)


class _Mismatch(ValueError):
    """The dataset does not belong to the request it came with (PS3.4 B.2.3)."""


def _check_match(request: Any, ds: Dataset) -> None:
    sop_instance = str(ds.get("SOPInstanceUID", ""))
    sop_class = str(ds.get("SOPClassUID", ""))
    if not is_valid_uid(sop_instance):
        raise _Mismatch("SOP Instance UID missing or not a UID")
    if not is_valid_uid(sop_class):
        raise _Mismatch("SOP Class UID missing or not a UID")
    if sop_instance != str(request.AffectedSOPInstanceUID):
        raise _Mismatch("SOP Instance UID differs from the command's")
    if sop_class != str(request.AffectedSOPClassUID):
        raise _Mismatch("SOP Class UID differs from the command's")


def _store_refusal(exc: Exception) -> tuple[int, str, str]:
    """The C-STORE status, Error Comment and counted reason for what stopped a store."""
    counted = True
    if isinstance(exc, Malformed):
        status, comment, why = STATUS_CANNOT_UNDERSTAND, str(exc), "malformed"
    elif isinstance(exc, _Mismatch):
        status, comment, why = STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc), "mismatch"
    elif isinstance(exc, InvalidInstance):  # counted by the writer
        status, comment, why, counted = STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc), "invalid", False
    elif isinstance(exc, OutOfSpace):  # counted by the writer
        status, comment, why, counted = STATUS_OUT_OF_RESOURCES, str(exc), "out_of_space", False
    elif isinstance(exc, OSError):
        status, comment, why = STATUS_OUT_OF_RESOURCES, f"cannot store: {exc.strerror}", "write"
    elif isinstance(exc, SQLAlchemyError):  # nothing was committed: the sender may send it again
        busy = is_busy(exc)
        why = "database_busy" if busy else "database"
        status = STATUS_OUT_OF_RESOURCES
        comment = "the database is busy: send it again" if busy else "the index cannot be written: send it again"
    else:  # pynetdicom would answer 0xC211 and log nothing
        status, comment, why = STATUS_CANNOT_UNDERSTAND, f"cannot store the dataset: {exc}", "exception"
    if counted:
        metrics.STORAGE_WRITE_FAILURES.labels(why).inc()
    if why in ("write", "database_busy", "database", "exception"):  # ours, not the peer's: the whole story
        log.exception("c-store failed", why=why, error=str(exc))  # called in the except block
    return status, comment, why


_TAKEN = frozenset({STATUS_SUCCESS, 0xB000, 0xB006, 0xB007})
"""C-STORE statuses that mean the peer kept the instance (PS3.4 B.2.3: success and the warnings)."""


class _StoredFile(Dataset):
    """A stored instance as a C-MOVE or C-GET sub-operation: pynetdicom's retrieve services take
    only datasets, and `_send_stored_files` has the association send the file itself."""

    def __init__(self, path: Path, instance: Any) -> None:
        super().__init__()
        self.stored_path = path
        self.stored_size = int(instance.size)
        self.SOPClassUID = instance.sop_class_uid
        self.SOPInstanceUID = instance.sop_instance_uid


def _send_stored_files(assoc: Any, sent: Callable[[int], None]) -> None:
    """Make `assoc` send a `_StoredFile` from its file in chunks, as stored: no decode and no
    encode of the pixel data. A file whose transfer syntax the peer declined is read and
    converted by pynetdicom, as any dataset would be. `sent` hears the size of each file the
    peer took (success or warning)."""
    send = assoc.send_c_store
    if getattr(send, "sends_stored_files", False):
        return

    def send_stored(dataset: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(dataset, _StoredFile):
            return send(dataset, *args, **kwargs)
        try:
            status = send(dataset.stored_path, *args, **kwargs)
        except ValueError:  # no context with the file's own transfer syntax
            status = send(dcmread(dataset.stored_path), *args, **kwargs)
        if getattr(status, "Status", None) in _TAKEN:
            sent(dataset.stored_size)
        return status

    send_stored.sends_stored_files = True  # type: ignore[attr-defined]
    assoc.send_c_store = send_stored


def _configure_pynetdicom(tmp_dir: Path) -> None:
    """Have pynetdicom write each received C-STORE dataset straight into a file in `tmp_dir`,
    behind a file meta that names us, so that storing it is a rename: no copy, no decode of
    the pixel data, and memory stays flat however large the instance. And switch off its
    standard logging handlers, which format every message sent and received (a third of the
    time of a C-FIND answer) even when nothing is logged: our handlers log what matters.

    pynetdicom offers the chunked receive as a process-wide switch, takes the folder from
    `tempfile`, and writes its own Implementation Class UID; docs/upstream.md proposes
    per-AE settings for all three. This process is the daemon, so the globals are ours.
    """
    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.STORE_SEND_CHUNKED_DATASET = True  # a path given to send_c_store goes as it is, in chunks
    _config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = str(tmp_dir)
    dimse_messages.create_file_meta = partial(  # type: ignore[attr-defined]
        create_file_meta,
        implementation_uid=UID(IMPLEMENTATION_CLASS_UID),
        implementation_version=IMPLEMENTATION_VERSION_NAME,
    )


def _remove_partial_dataset(event: Any) -> None:
    """A connection that ends in the middle of a C-STORE leaves the part pynetdicom received in a
    file in data_dir/tmp; nothing was acknowledged, so the file goes."""
    partial = getattr(getattr(event.assoc.dimse, "message", None), "_data_set_file", None)
    if partial is not None:
        partial.close()
        Path(partial.name).unlink(missing_ok=True)
        log.warning("connection closed during a c-store: the partial dataset was removed")


def _implicit(event: Any) -> bool:
    """Whether the request's presentation context is Implicit VR Little Endian."""
    return bool(event.context.transfer_syntax == ImplicitVRLittleEndian)


def _dataset_offset(ds: Dataset) -> int:
    """Where the dataset starts in a Part 10 file: preamble, DICM, the group length element, the group."""
    return 128 + 4 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)


def _called_ae(event: Any) -> str:
    """The AE title the requestor asked for (ours, unless the association was rejected for it)."""
    primitive = getattr(event.assoc.requestor, "primitive", None)
    called = getattr(primitive, "called_ae_title", None) or event.assoc.acceptor.ae_title
    return str(called).strip()
