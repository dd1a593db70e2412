"""SCU operations: echo, store, find, move, MPPS, Storage Commitment both ways, and the C-FIND
count that confirms a delivery.

Each opens its own association. TCP_NODELAY is set on every connection: with Nagle's
algorithm and delayed ACKs a small PDU stalls ~40 ms on Linux, which caps a C-STORE stream to
DCMTK or Orthanc at about 11 instances/s.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt

# Generated at import time by pynetdicom, so invisible to type checkers.
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from fabricatord.config.schema import DicomSettings, PeerSettings
from fabricatord.config.values import parse_duration
from fabricatord.dicom import commitment
from fabricatord.dicom.mpps import MPPS_SOP_CLASS
from fabricatord.dicom.stored import outgoing
from fabricatord.dicom.ul.requestor import AssociationLost, AssociationRefused, Requestor
from fabricatord.dicom.ul.requestor import Timeouts as RequestorTimeouts
from fabricatord.obs import metrics
from fabricatord.obs.logging import get_logger

log = get_logger(__name__)
_ADDRESS = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")
MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1–255
SEND_ATTEMPTS = 2
STATUS_SUCCESS = 0x0000
STATUS_PENDING = frozenset({0xFF00, 0xFF01})


class ScuError(RuntimeError):
    """The peer could not be reached or refused the association. `permanent`: the same request
    would be refused again (a rejection with result 1, no presentation context accepted), so a
    retry needs someone to change something first."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int
    name: str = "other"
    """The `[[peers]]` name, or `other` for an address typed on the command line (metric label)."""
    tls: bool = False
    """Associations to it use TLS, with the context `use_tls` gave."""

    @classmethod
    def of(cls, peer: PeerSettings) -> Peer:
        """A `[[peers]]` entry, to associate with."""
        return cls(peer.ae_title, peer.host, peer.port, peer.name, peer.tls)

    @classmethod
    def own(cls, ae_title: str, dicom: DicomSettings, name: str = "self") -> Peer:
        """Our own node as a client reaches it: a wildcard bind on loopback, and on its TLS
        port when the plain one is closed."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(dicom.host, dicom.host)
        return cls(ae_title, host, dicom.port if dicom.plain else dicom.tls_port, name, not dicom.plain)


_CLIENT_TLS: list[ssl.SSLContext | None] = [None]


def use_tls(context: ssl.SSLContext | None) -> None:
    """The context of every TLS association this process opens (`[tls]`, at start and on SIGHUP)."""
    _CLIENT_TLS[0] = context


def client_tls() -> ssl.SSLContext | None:
    """The process's client context (MLLP to our own TLS port uses it too)."""
    return _CLIENT_TLS[0]


def tls_for(peer: Peer | PeerSettings) -> ssl.SSLContext | None:
    """The context for an association with `peer`: None for a plain one; ScuError (permanent)
    when it wants TLS and this process has none."""
    if not peer.tls:
        return None
    if _CLIENT_TLS[0] is None:
        raise ScuError(f"{peer.name} wants TLS, and [tls] has no certificate, key and ca", True)
    return _CLIENT_TLS[0]


@dataclass(frozen=True)
class Timeouts:
    connect: float = 10.0
    acse: float = 30.0
    dimse: float | None = 30.0
    """None: wait as long as the peer takes (a C-MOVE whose source sends no pending responses)."""
    network: float | None = 60.0

    @classmethod
    def of(cls, dicom: DicomSettings) -> Timeouts:
        """The `[dicom]` timeouts, for associations we request."""
        return cls(
            parse_duration(dicom.connect_timeout),
            parse_duration(dicom.acse_timeout),
            parse_duration(dicom.dimse_timeout),
            parse_duration(dicom.network_timeout),
        )


@dataclass
class SendReport:
    sent: int = 0
    warnings: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    permanent: set[Path] = field(default_factory=set)
    """Failed files whose refusal a resend would meet again (see `is_permanent`)."""
    resent: int = 0
    """Files sent again on a new association after getting no response."""
    bytes: int = 0
    seconds: float = 0.0


def parse_address(text: str) -> Peer | None:
    """`AET@host:port` → a Peer; anything else → None."""
    match = _ADDRESS.match(text)
    if match is None or not 0 < int(match.group("port")) < 65536:
        return None
    return Peer(match.group("ae").strip(), match.group("host"), int(match.group("port")))


class _ConnectErrors(logging.Filter):
    """Why a TCP connect failed. pynetdicom logs it ("TCP Initialisation Error: [Errno 111]
    Connection refused") and keeps it nowhere else; the connect runs on the association's own
    DUL thread, so the reason is kept under that thread for `_associate` to read. Its two
    ERROR lines are dropped: the failure is reported once, by whoever asked for the association
    (a peer down would otherwise log two errors a minute from the peer monitor alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: weakref.WeakKeyDictionary[threading.Thread, str] = weakref.WeakKeyDictionary()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(_TCP_ERROR):
            reason = re.sub(r"^\[Errno -?\d+\] ", "", message[len(_TCP_ERROR) :]).strip()
            self.failures[threading.current_thread()] = reason[:1].lower() + reason[1:] if reason else "unknown"
            return False
        return message != "Association request failed: unable to connect to remote"


_TCP_ERROR = "TCP Initialisation Error: "
_CONNECT_ERRORS = _ConnectErrors()
logging.getLogger("pynetdicom.transport").addFilter(_CONNECT_ERRORS)


def nodelay(event: Any) -> None:
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def keep_stray_responses(event: Any) -> None:
    """Guard a requestor association against pynetdicom 3.0.4's reactor race (docs/upstream.md):
    a response its reactor takes off the DIMSE queue just before a `send_*()` waits for it goes
    back on the queue instead of being dropped, so the sender gets it instead of a timeout."""
    assoc = event.assoc
    serve = assoc._serve_request

    def serve_request(message: Any, context_id: int) -> None:
        if not message.is_valid_request and not assoc._sent_release:
            assoc.dimse.msg_queue.put((context_id, message))
            return
        serve(message, context_id)

    assoc._serve_request = serve_request


_HANDLERS: list[Any] = [(evt.EVT_CONN_OPEN, nodelay), (evt.EVT_CONN_OPEN, keep_stray_responses)]


def _application(calling_ae: str, timeouts: Timeouts) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeouts.acse
    ae.dimse_timeout = timeouts.dimse
    ae.network_timeout = timeouts.network
    ae.connection_timeout = timeouts.connect
    return ae


def _associate(ae: AE, peer: Peer, handlers: Sequence[Any] = (), ext_neg: Sequence[Any] | None = None) -> Any:
    context = tls_for(peer)
    try:
        assoc = ae.associate(
            peer.host,
            peer.port,
            ae_title=peer.ae_title,
            ext_neg=list(ext_neg) if ext_neg else None,
            evt_handlers=[*_HANDLERS, *handlers],
            tls_args=(context, peer.host) if context is not None else None,  # the name is SNI only
        )
    except OSError as exc:  # the host name does not resolve
        metrics.SCU_OPERATIONS.labels("associate", peer.name, "failure").inc()
        raise ScuError(f"association with {peer.ae_title}@{peer.host}:{peer.port} failed: {exc.strerror}") from exc
    if not assoc.is_established:
        answer = getattr(assoc.acceptor, "primitive", None)
        result = getattr(answer, "result", None)
        permanent = False
        if assoc.is_rejected:
            # PS3.8 9.3.4: result 1 is rejected-permanent, 2 rejected-transient.
            permanent = result == 1
            source, diagnostic = getattr(answer, "result_source", "?"), getattr(answer, "diagnostic", "?")
            reason = f"rejected {'permanently' if permanent else 'transiently'} ({result}/{source}/{diagnostic})"
        elif assoc.is_aborted and result == 0:  # accepted, but not one presentation context
            permanent, reason = True, "no presentation context was accepted"
        elif assoc.dul in _CONNECT_ERRORS.failures:
            reason = f"cannot connect: {_CONNECT_ERRORS.failures.pop(assoc.dul)}"
        elif assoc.is_aborted:
            reason = "the peer closed or aborted the connection before accepting the association"
        else:
            reason = f"no answer to the association request within {ae.acse_timeout:g} s"
        metrics.SCU_OPERATIONS.labels("associate", peer.name, "failure").inc()
        raise ScuError(f"association with {peer.ae_title}@{peer.host}:{peer.port} failed: {reason}", permanent)
    return assoc


def is_permanent(status: int | None) -> bool:
    """Whether a C-STORE failure would be met again by a resend of the same file: everything but
    no answer at all, Out of Resources (0xA7xx), Resource Limitation (0x0213) and Cancel."""
    if status is None or _status_class(status) != "failure":
        return False
    return not (0xA700 <= status <= 0xA7FF or status in (0x0213, 0xFE00))


def _status_class(status: int | None) -> str:
    if status is None:
        return "none"
    if status == STATUS_SUCCESS:
        return "success"
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return "warning"
    return "failure"


def _succeeded(service: str, peer: Peer, status: Dataset | None, refused: bool = False, what: str = "") -> None:
    """The one response of a C-ECHO or N-service, counted; ScuError with its status and Error
    Comment unless it is success (`refused`: a failure status is the peer's refusal for good;
    `what`: how the error names the operation, `service` by default)."""
    code = int(status.Status) if status and "Status" in status else None
    metrics.SCU_OPERATIONS.labels(service, peer.name, _status_class(code)).inc()
    if code != STATUS_SUCCESS:
        comment = str(status.get("ErrorComment", "")) if status else ""
        raise ScuError(f"{what or service} answered {_show_status(code)}{f': {comment}' if comment else ''}",
                       refused and code is not None)  # fmt: skip


def echo(peer: Peer, calling_ae: str, timeouts: Timeouts = Timeouts()) -> float:
    """C-ECHO; returns the round trip in seconds including association set-up."""
    ae = _application(calling_ae, timeouts)
    ae.add_requested_context(Verification)
    started = time.perf_counter()
    assoc = _associate(ae, peer)
    try:
        _succeeded("C-ECHO", peer, assoc.send_c_echo())
    finally:
        assoc.release()
    return time.perf_counter() - started


def storage_contexts(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """One presentation context per SOP class and stored transfer syntax; native ones also
    offer both little-endian syntaxes, so a peer that declines one still gets the file."""
    contexts: list[tuple[str, list[str]]] = []
    native = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
    for sop_class, syntax in dict.fromkeys(pairs):
        syntaxes: list[str] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian] if syntax in native else [syntax]
        if (sop_class, syntaxes) not in contexts:
            contexts.append((sop_class, syntaxes))
    if len(contexts) > MAX_CONTEXTS:
        raise ScuError(f"{len(contexts)} SOP class / transfer syntax pairs; one association holds {MAX_CONTEXTS}")
    return contexts


def send(
    peer: Peer,
    calling_ae: str,
    files: Sequence[Path],
    timeouts: Timeouts = Timeouts(),
    progress: Callable[[int], None] | None = None,
) -> SendReport:
    """C-STORE every file, each as it is stored (no re-encoding), over one association of our
    own requestor (`dicom.ul.requestor`).

    A file that gets no response at all (the association was aborted or timed out) is sent once
    more on a new association: C-STORE of the same instance is idempotent at any archive.
    """
    headers = {path: _header(path) for path in files}
    contexts = storage_contexts((sop_class, syntax) for sop_class, _, syntax in headers.values())
    report = SendReport()
    started = time.perf_counter()
    requestor = _request(peer, calling_ae, contexts, timeouts)
    message_id = 0
    try:
        for path in files:
            for attempt in range(1, SEND_ATTEMPTS + 1):
                if not requestor.established:
                    requestor = _request(peer, calling_ae, contexts, timeouts)
                message_id = message_id % 0xFFFF + 1
                code, why = _store_one(requestor, path, headers[path], peer, message_id)
                if code is not None or attempt == SEND_ATTEMPTS:
                    break
                report.resent += 1
            outcome = _status_class(code)
            if why is not None or outcome in {"failure", "none"}:
                report.failed.append((path, why or _show_status(code)))
                if is_permanent(code):
                    report.permanent.add(path)
            else:
                report.sent += 1
                report.warnings += outcome == "warning"
                report.bytes += path.stat().st_size
            if progress is not None:
                progress(1)
    finally:
        requestor.release()
    report.seconds = time.perf_counter() - started
    return report


def _header(path: Path) -> tuple[str, str, str]:
    """(SOP Class, SOP Instance, transfer syntax) of a Part 10 file, from its file meta group."""
    meta = read_file_meta_info(path)
    return str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID)


def _request(peer: Peer, calling_ae: str, contexts: list[tuple[str, list[str]]], timeouts: Timeouts) -> Requestor:
    """An association for sending, or ScuError (permanent when the same request would be
    refused again: rejected-permanent, or not one presentation context accepted)."""
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    try:
        requestor = Requestor.open(
            peer.host,
            peer.port,
            peer.ae_title,
            calling_ae,
            contexts,
            RequestorTimeouts(timeouts.connect, timeouts.acse, timeouts.dimse),
            tls_for(peer),
        )
    except AssociationRefused as exc:
        metrics.SCU_OPERATIONS.labels("associate", peer.name, "failure").inc()
        raise ScuError(f"association with {where} failed: {exc}", exc.permanent) from exc
    if not requestor.contexts:
        requestor.abort()
        metrics.SCU_OPERATIONS.labels("associate", peer.name, "failure").inc()
        raise ScuError(f"association with {where} failed: no presentation context was accepted", True)
    return requestor


def _store_one(
    requestor: Requestor, path: Path, header: tuple[str, str, str], peer: Peer, message_id: int
) -> tuple[int | None, str | None]:
    """(status, None) for an answer; (None, None) for none; (status, reason) when the file
    cannot go on this association."""
    sop_class, sop_instance, syntax = header
    try:
        found = outgoing(requestor.contexts, sop_class, syntax, path)
    except (OSError, ValueError) as exc:
        metrics.SCU_OPERATIONS.labels("C-STORE", peer.name, "failure").inc()
        return 0xA900, f"cannot read {path.name}: {exc}"
    if found is None:  # no accepted context for this file's class and syntax
        metrics.SCU_OPERATIONS.labels("C-STORE", peer.name, "failure").inc()
        return 0xA900, f"no accepted presentation context for {sop_class} in {syntax}"
    context, source = found
    data = source if isinstance(source, bytes) else source.chunks()
    try:
        code = requestor.store(context.id, sop_class, sop_instance, message_id, data)
    except AssociationLost:  # the association ended under us (a timeout, the peer's abort): no answer
        metrics.SCU_OPERATIONS.labels("C-STORE", peer.name, "none").inc()
        return None, None
    metrics.SCU_OPERATIONS.labels("C-STORE", peer.name, _status_class(code)).inc()
    return code, None


def count_study_instances(peer: Peer, calling_ae: str, study_instance_uid: str, timeouts: Timeouts = Timeouts()) -> int:
    """How many instances of the study the peer holds, by Study Root C-FIND.

    Counted series by series at IMAGE level, the hierarchical query every archive answers
    (NumberOfStudyRelatedInstances is optional and DCMTK's dcmqrscp does not compute it).
    """
    ae = _application(calling_ae, timeouts)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = _associate(ae, peer)
    try:
        series_query = Dataset()
        series_query.QueryRetrieveLevel = "SERIES"
        series_query.StudyInstanceUID = study_instance_uid
        series_query.SeriesInstanceUID = ""
        series_uids = [str(i.SeriesInstanceUID) for i in _find(assoc, series_query, peer)]
        total = 0
        for series_uid in series_uids:
            image_query = Dataset()
            image_query.QueryRetrieveLevel = "IMAGE"
            image_query.StudyInstanceUID = study_instance_uid
            image_query.SeriesInstanceUID = series_uid
            image_query.SOPInstanceUID = ""
            total += len(_find(assoc, image_query, peer))
        return total
    finally:
        if assoc.is_established:
            assoc.release()


def find(
    peer: Peer, calling_ae: str, query: Dataset, timeouts: Timeouts = Timeouts(), deadline: float | None = None
) -> list[Dataset]:
    """Study Root C-FIND: every match the peer answers. `deadline` (a `time.monotonic()` value)
    bounds the whole query: an answer still coming in then is aborted and counts as failed."""
    ae = _application(calling_ae, timeouts)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = _associate(ae, peer)
    try:
        return _find(assoc, query, peer, deadline)
    finally:
        if assoc.is_established:
            assoc.release()


@dataclass
class MoveReport:
    """What a C-MOVE did, from its pending responses and its final one."""

    remaining: int | None = None
    completed: int = 0
    failed: int = 0
    warnings: int = 0
    status: int | None = None
    """The final status; None while the move goes on (or when no final response came)."""
    comment: str = ""
    failed_instances: list[str] = field(default_factory=list)
    seconds: float = 0.0
    counted: bool = False
    """Whether any response carried sub-operation counts (they are optional in a final one)."""

    @property
    def attempted(self) -> int:
        """Sub-operations done or left, as far as the responses said."""
        return self.completed + self.failed + self.warnings + (self.remaining or 0)

    @property
    def outcome(self) -> str:
        return _status_class(self.status)


def move(
    peer: Peer,
    calling_ae: str,
    destination_ae: str,
    query: Dataset,
    timeouts: Timeouts = Timeouts(),
    progress: Callable[[MoveReport], None] | None = None,
) -> MoveReport:
    """Study Root C-MOVE: `peer` sends what `query` names to `destination_ae`, an AE title it
    must know. `progress` sees the report after each pending response (a peer may send none)."""
    ae = _application(calling_ae, timeouts)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    report = MoveReport()
    started = time.perf_counter()
    assoc = _associate(ae, peer)
    try:
        responses = assoc.send_c_move(query, destination_ae, StudyRootQueryRetrieveInformationModelMove)
    except ValueError as exc:  # pynetdicom could not encode the identifier or the AE title
        assoc.release()
        raise ScuError(f"C-MOVE not sent: {exc}") from exc
    try:
        for status, identifier in responses:
            code = int(status.Status) if status and "Status" in status else None
            if code not in STATUS_PENDING:
                report.remaining = None  # a final response leaves nothing remaining unless it says so
            for attribute, name in (
                ("remaining", "NumberOfRemainingSuboperations"),
                ("completed", "NumberOfCompletedSuboperations"),
                ("failed", "NumberOfFailedSuboperations"),
                ("warnings", "NumberOfWarningSuboperations"),
            ):
                value = status.get(name) if status else None
                if value is not None:
                    setattr(report, attribute, int(value))
                    report.counted = True
            if code in STATUS_PENDING:
                if progress is not None:
                    progress(report)
                continue
            report.status = code
            report.comment = str(status.get("ErrorComment", "")) if status else ""
            if identifier is not None and "FailedSOPInstanceUIDList" in identifier:
                failed = identifier.FailedSOPInstanceUIDList
                uids = [failed] if isinstance(failed, str) else list(failed or [])
                report.failed_instances = [str(uid) for uid in uids]
                report.failed = max(report.failed, len(report.failed_instances))
            metrics.SCU_OPERATIONS.labels("C-MOVE", peer.name, _status_class(code)).inc()
    finally:
        if assoc.is_established:
            assoc.release()
    report.seconds = time.perf_counter() - started
    return report


def performed_procedure_step(
    peer: Peer,
    calling_ae: str,
    sop_instance_uid: str,
    attributes: Dataset,
    create: bool,
    timeouts: Timeouts = Timeouts(),
) -> None:
    """MPPS N-CREATE (`create`) or N-SET of one performed step, as a modality sends them."""
    ae = _application(calling_ae, timeouts)
    ae.add_requested_context(MPPS_SOP_CLASS)
    assoc = _associate(ae, peer)
    service = "N-CREATE" if create else "N-SET"
    try:
        if create:
            status, _ = assoc.send_n_create(attributes, MPPS_SOP_CLASS, sop_instance_uid)
        else:
            status, _ = assoc.send_n_set(attributes, MPPS_SOP_CLASS, sop_instance_uid)
        _succeeded(service, peer, status, what=f"MPPS {service}")
    finally:
        if assoc.is_established:
            assoc.release()


def request_commitment(
    peer: Peer,
    calling_ae: str,
    action: Dataset,
    timeouts: Timeouts,
    on_report: Callable[[int, Dataset], int],
    settled: Callable[[], bool],
    wait: float,
) -> None:
    """Storage Commitment N-ACTION (PS3.4 J.3.2) of `action` (its Action Information), then the
    association kept open for the report: up to `wait` seconds, until `settled()` says it came
    (here, or on our listener), or until the peer ends it. A report on this association goes to
    `on_report(event type, event information)`, whose status answers it. ScuError when the peer
    refuses the association or the request."""
    ae = _application(calling_ae, timeouts)
    ae.add_requested_context(commitment.SOP_CLASS, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])

    def reported(event: Any) -> tuple[int, None]:
        try:
            return on_report(int(event.request.EventTypeID), event.event_information), None
        except Exception as exc:  # an answer the peer can act on, never a dead reactor thread
            log.warning("storage commitment report not taken", error=str(exc))
            return commitment.PROCESSING_FAILURE, None

    assoc = _associate(ae, peer, [(evt.EVT_N_EVENT_REPORT, reported)])
    try:
        status, _ = assoc.send_n_action(action, commitment.REQUEST_COMMITMENT, commitment.SOP_CLASS,
                                        commitment.SOP_INSTANCE)  # fmt: skip
        _succeeded("N-ACTION", peer, status, refused=True)
    except BaseException:
        if assoc.is_established:
            assoc.release()
        raise
    # Accepted: from here nothing is raised, whatever the wait or the release meet.
    deadline = time.monotonic() + wait
    while assoc.is_established and time.monotonic() < deadline and not _settled(settled):
        time.sleep(0.2)
    with suppress(Exception):
        if assoc.is_established:
            assoc.release()


def _settled(settled: Callable[[], bool]) -> bool:
    try:
        return settled()
    except Exception as exc:  # the database, for a moment: the report may still come here
        log.warning("storage commitment report not looked for", error=str(exc))
        return False


def report_commitment(peer: Peer, calling_ae: str, event_type: int, information: Dataset, timeouts: Timeouts) -> None:
    """A Storage Commitment N-EVENT-REPORT on an association of our own, as PS3.4 J.3.3 has the
    SCP do once the requesting one is gone: the Push Model proposed with us in the SCP role
    (SCU-role 0, SCP-role 1). ScuError when it is not answered with success."""
    ae = _application(calling_ae, timeouts)
    ae.add_requested_context(commitment.SOP_CLASS, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    role = build_role(commitment.SOP_CLASS, scu_role=False, scp_role=True)
    assoc = _associate(ae, peer, ext_neg=[role])
    try:
        status = assoc.send_n_event_report(information, event_type, commitment.SOP_CLASS, commitment.SOP_INSTANCE)[0]
        _succeeded("N-EVENT-REPORT", peer, status)
    finally:
        if assoc.is_established:
            assoc.release()


def _find(assoc: Any, query: Dataset, peer: Peer, deadline: float | None = None) -> list[Dataset]:
    answers: list[Dataset] = []
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        code = int(status.Status) if status and "Status" in status else None
        if code in STATUS_PENDING and identifier is None:
            assoc.abort()
            metrics.SCU_OPERATIONS.labels("C-FIND", peer.name, "failure").inc()
            raise ScuError(f"a match could not be decoded ({len(answers)} decoded before it)")
        if code in STATUS_PENDING:
            answers.append(identifier)
            if deadline is not None and time.monotonic() > deadline:
                assoc.abort()
                metrics.SCU_OPERATIONS.labels("C-FIND", peer.name, "none").inc()
                raise ScuError(f"the answer was not complete in time ({len(answers)} matches so far)")
            continue
        metrics.SCU_OPERATIONS.labels("C-FIND", peer.name, _status_class(code)).inc()
        if code != STATUS_SUCCESS:
            comment = str(status.get("ErrorComment", "")) if status else ""
            raise ScuError(f"C-FIND answered {_show_status(code)}{f': {comment}' if comment else ''}")
    return answers


def _show_status(code: int | None) -> str:
    return "no response (timeout or abort)" if code is None else f"status 0x{code:04X}"
