"""The DICOM node on the reactor: one listener, an upper-layer protocol per connection
(`fabricatord.dicom.ul`), and the services on a bounded pool of worker threads.

A connection costs no thread. A request is checked (its SOP Class against its context, its
identifier walked), then served on a worker; responses go out from the reactor as the worker
makes them, and the connection is not read while its operation runs (one operation at a time,
as we negotiate no asynchronous window). What each association did is logged, counted and
audited when it ends.
"""

from __future__ import annotations

import ipaddress
import itertools
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from io import BytesIO
from typing import Any

from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES, _config
from pynetdicom._globals import DEFAULT_TRANSFER_SYNTAXES

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
from twisted.application.service import Service
from twisted.internet import defer, protocol, threads
from twisted.internet.interfaces import IAddress

from fabricatord import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from fabricatord.config import PeerSettings, Settings
from fabricatord.config.values import parse_duration, parse_size
from fabricatord.db import Database
from fabricatord.db.audit import AuditRecord
from fabricatord.dicom import commitment as commitment_codes
from fabricatord.dicom.storage import STORAGE_CLASSES, InstanceWriter
from fabricatord.dicom.ul import pdu
from fabricatord.dicom.ul.dimse import (
    NO_DATASET,
    Command,
    CommandField,
    DatasetSink,
    Message,
    MessageLimits,
    encode_command,
)
from fabricatord.dicom.ul.negotiation import Negotiation, Policy, Refusal, negotiate, refusal
from fabricatord.dicom.ul.protocol import Association, PduLimits, State, Timers
from fabricatord.dicom.walk import Malformed, WalkLimits, walk
from fabricatord.obs import metrics
from fabricatord.obs.logging import get_logger, in_context
from fabricatord.servers import worker_pool
from fabricatord.servers.dicom import commitment, echo, find, mpps, retrieve, store
from fabricatord.servers.dicom.context import MAX_ERROR_COMMENT, Request, Response, Served, Status
from fabricatord.servers.listen import Listening, WorkerCounts
from fabricatord.servers.tls import ServerTls
from fabricatord.workflow.audit import AuditTrail
from fabricatord.workflow.commitment import StorageCommitment
from fabricatord.workflow.fhir import Exports
from fabricatord.workflow.mpps import PerformedProcedureSteps
from fabricatord.workflow.proxy import Proxies
from fabricatord.workflow.worklist import Fetches

log = get_logger(__name__)

LISTEN_BACKLOG = 128
"""Connections the kernel holds for the accept loop (DCMTK's is 50)."""
WORKERS = 8
"""Threads serving requests: they wait on fsync and the database far more than they compute,
so a few more than cores keep the disk busy; a request beyond them waits its turn."""
PENDING_IN_FLIGHT = 64
"""Pending responses a worker may have handed to the reactor and not yet seen written."""
QUERY_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
"""Queries are answered in the little-endian syntaxes only: `fabricatord.dicom.answers` encodes them."""
_association_numbers = itertools.count(1)

Service_ = Callable[[Request], Response]
_VERIFICATION = {str(Verification): {CommandField.C_ECHO_RQ: echo.serve}}
_QUERIES = {
    str(model): {CommandField.C_FIND_RQ: find.serve}
    for model in (
        ModalityWorklistInformationFind,
        PatientRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelFind,
    )
}
_RETRIEVES = {
    **{
        str(model): {CommandField.C_MOVE_RQ: retrieve.serve_move}
        for model in (PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove)
    },
    **{
        str(model): {CommandField.C_GET_RQ: retrieve.serve_get}
        for model in (PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet)
    },
}
_MPPS = {
    str(ModalityPerformedProcedureStep): {
        CommandField.N_CREATE_RQ: mpps.serve_create,
        CommandField.N_SET_RQ: mpps.serve_set,
    }
}
_COMMITMENT = {
    commitment_codes.SOP_CLASS: {
        CommandField.N_ACTION_RQ: commitment.serve_action,
        CommandField.N_EVENT_REPORT_RQ: commitment.serve_report,
    }
}
SERVICES: dict[str, dict[CommandField, Service_]] = {
    **_VERIFICATION,
    **_QUERIES,
    **_RETRIEVES,
    **_MPPS,
    **_COMMITMENT,
    **{sop_class: {CommandField.C_STORE_RQ: store.serve} for sop_class in STORAGE_CLASSES},
}
"""Every service, by the abstract syntax of its context and the request's Command Field."""

WRONG_CONTEXT = {
    CommandField.C_STORE_RQ: Status.DOES_NOT_MATCH_SOP_CLASS,
    CommandField.C_FIND_RQ: Status.DOES_NOT_MATCH_SOP_CLASS,
    CommandField.C_GET_RQ: Status.DOES_NOT_MATCH_SOP_CLASS,
    CommandField.C_MOVE_RQ: Status.DOES_NOT_MATCH_SOP_CLASS,
    CommandField.C_ECHO_RQ: Status.SOP_CLASS_NOT_SUPPORTED,
}
"""What a request on a context of another SOP Class gets: PS3.4's "does not match SOP Class" for
the composite services, "SOP Class not supported" for C-ECHO (PS3.7 C.3.5); the normalized
services "no such SOP Class" (0x0118)."""
MALFORMED = {CommandField.C_FIND_RQ: Status.CANNOT_UNDERSTAND, CommandField.C_GET_RQ: Status.CANNOT_UNDERSTAND,
             CommandField.C_MOVE_RQ: Status.CANNOT_UNDERSTAND}  # fmt: skip
"""An identifier that cannot be read: "unable to process" (PS3.4 C.4); "processing failure"
(0x0110) for the normalized services."""


ON_THE_REACTOR = frozenset({echo.serve})
"""Services that neither block nor take long, served where their request was read: a C-ECHO
went through two thread hand-offs for a status."""

TIMED = frozenset({"C-STORE", "C-FIND", "MWL", "C-MOVE", "C-GET"})
"""The services `fabricatord_dimse_seconds` times, from the request's turn to its final response."""
COUNTED_AS = {"N-CREATE": "MPPS", "N-SET": "MPPS", "N-ACTION": "COMMITMENT", "N-EVENT-REPORT": "COMMITMENT-RESULT"}
"""The `service` label of `fabricatord_dimse_operations_total` where it is not the operation's."""
WARNINGS = frozenset({0x0001, 0x0107, 0x0116})
"""Warning statuses outside 0xB000-0xBFFF (PS3.7 C): the operation was done."""


def outcome(status: int, refused: bool) -> str:
    """The `status` label of a final response: refused (by a `[[peers]]` permission), cancel,
    success (warnings included: a C-MOVE with failed sub-operations was still performed), or
    failure."""
    if refused:
        return "refused"
    if status == Status.CANCEL:
        return "cancel"
    if status == Status.SUCCESS or status in WARNINGS or 0xB000 <= status <= 0xBFFF:
        return "success"
    return "failure"


def proxy_policy(node_policy: Policy) -> Policy:
    """What a proxy's AE title accepts: verification, storage, and Study Root C-FIND and C-MOVE
    (relayed through its backend); other queries and retrieves find their contexts refused
    (abstract syntax not supported)."""
    kept = {
        str(Verification),
        str(StudyRootQueryRetrieveInformationModelFind),
        str(StudyRootQueryRetrieveInformationModelMove),
        *STORAGE_CLASSES,
    }
    contexts = {syntax: names for syntax, names in node_policy.contexts.items() if syntax in kept}
    return replace(node_policy, contexts=contexts, role_classes=())


def policy(settings: Settings) -> Policy:
    """What we accept: the conformance statement's SOP classes and transfer syntaxes."""
    contexts: dict[str, tuple[str, ...]] = {str(Verification): tuple(DEFAULT_TRANSFER_SYNTAXES)}
    contexts.update(dict.fromkeys(_QUERIES, QUERY_SYNTAXES))
    contexts[str(ModalityPerformedProcedureStep)] = QUERY_SYNTAXES
    contexts[commitment_codes.SOP_CLASS] = QUERY_SYNTAXES
    contexts.update({model: tuple(DEFAULT_TRANSFER_SYNTAXES) for model in _RETRIEVES})
    contexts.update({sop_class: tuple(ALL_TRANSFER_SYNTAXES) for sop_class in STORAGE_CLASSES})
    return Policy(
        ae_title=settings.node.ae_title,
        contexts=contexts,
        # A C-GET requestor may take the Storage SCP role (PS3.7 D.3.3.4); without that role
        # selection its C-GET gets no sub-operations. A Storage Commitment SCP reporting on an
        # association of its own takes the SCP role of the Push Model (PS3.4 J.3.3.1.3).
        role_classes=STORAGE_CLASSES | {commitment_codes.SOP_CLASS},
        max_length=settings.dicom.max_pdu,
        implementation_class_uid=IMPLEMENTATION_CLASS_UID,
        implementation_version_name=IMPLEMENTATION_VERSION_NAME,
        other_titles=frozenset(proxy.ae_title for proxy in settings.proxies),
    )


@dataclass
class Parts:
    """What the services use of the daemon."""

    database: Database
    writer: InstanceWriter
    performed: PerformedProcedureSteps
    fetches: Fetches
    walk_limits: WalkLimits
    peers: dict[str, PeerSettings] = field(default_factory=dict)
    proxies: Proxies | None = None
    """The anonymizing proxies whose AE titles we answer to."""
    commitments: StorageCommitment | None = None
    """Storage Commitment, both roles."""

    def peer_by_ae(self, ae_title: str) -> PeerSettings | None:
        return self.peers.get(ae_title)


_LIVE = (State.ESTABLISHED, State.RELEASE_REQUESTED)


class DicomNode(Service):
    """The DICOM listener as a Twisted service: started and stopped with the rest of the daemon."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        writer: InstanceWriter,
        audit: AuditTrail | None = None,
        on_due: Callable[[], None] = lambda: None,
        reactor: Any = None,
        inherited: Mapping[str, int] | None = None,
        counts: WorkerCounts | None = None,
        proxies: Proxies | None = None,
        exports: Exports | None = None,
        tls: ServerTls | None = None,
        commitments: StorageCommitment | None = None,
    ) -> None:
        """`on_due`: an `on_query` acquisition became due because a modality fetched its item.
        A worker process listens on the sockets `inherited` from its parent and counts its
        associations and connections in `counts`, beside its siblings'."""
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.settings = settings
        self.audit = audit
        self.parts = Parts(
            database,
            writer,
            PerformedProcedureSteps(database, exports.completed if exports is not None else None),
            Fetches(database, on_due),
            WalkLimits(inflated=parse_size(settings.dicom.max_dataset_size)),
            proxies=proxies,
            commitments=commitments,
        )
        self.reload(settings)
        self.sessions: set[Session] = set()
        self.pool = worker_pool("dicom", WORKERS)
        self.listening_on = Listening("dicom", inherited)
        self.tls = tls
        self.counts = counts
        self._networks = [ipaddress.ip_network(h, strict=False) for h in settings.dicom.allowed_hosts]

    def reload(self, settings: Settings) -> None:
        """New `[[peers]]` and their permissions (SIGHUP), for the associations that follow."""
        self.settings = settings
        self.parts.peers = {p.ae_title: p for p in reversed(settings.peers)}  # the first entry wins
        # The proxies' AE titles are those started with: one a SIGHUP adds has no key checked.
        titles = self.parts.proxies.titles() if self.parts.proxies is not None else frozenset()
        self.policy = replace(policy(settings), other_titles=titles)
        self.proxy_policy = proxy_policy(self.policy)

    @property
    def listening(self) -> bool:
        return bool(self.listening_on.ports)

    def live_associations(self) -> int:
        """A slot is an association: established ones, and one asking now. A connection that has
        not asked yet (idle ones, up to the ACSE timeout) or one that is over (A-RELEASE-RP
        sent, waiting for the peer's close) holds none, so neither can lock others out."""
        return sum(1 for session in self.sessions if session.association.state in _LIVE)

    @property
    def port(self) -> int:
        """The bound plain port (the configured one, or the one the system chose for port 0)."""
        return self.listening_on.number(tls=not self.settings.dicom.plain)

    def startService(self) -> None:
        dicom = self.settings.dicom
        # pynetdicom sends a C-MOVE's files: a path given to send_c_store goes as it is, in
        # chunks; its standard logging handlers format every message even when nothing is
        # logged. This process is the daemon, so these globals are ours.
        _config.STORE_SEND_CHUNKED_DATASET = True
        _config.LOG_HANDLER_LEVEL = "none"
        _config.LOG_REQUEST_IDENTIFIERS = _config.LOG_RESPONSE_IDENTIFIERS = False
        factory = _Factory(self)
        counts = self.counts
        busier = (lambda: counts.busier("dicom")) if counts is not None else (lambda: False)
        self.listening_on.open(self.reactor, factory, dicom, self.tls, busier, LISTEN_BACKLOG)
        if counts is not None:
            counts.set("dicom", 0)  # listening now: siblings may leave connections to us
        self.pool.start()  # after the port: a start that fails leaves no thread to wait for
        log.info(
            "dicom listener started",
            host=dicom.host,
            port=self.listening_on.number() if dicom.plain else None,
            tls_port=self.listening_on.number(tls=True) if self.tls else None,
            ae_title=self.settings.node.ae_title,
        )
        super().startService()

    def stopService(self) -> defer.Deferred[None]:
        """No new associations; those under way get `[node] shutdown_grace` to finish (a C-STORE
        answered success is already kept), then the rest are aborted."""
        super().stopService()
        stopped = self.listening_on.close()
        grace = parse_duration(self.settings.node.shutdown_grace)
        deadline = time.monotonic() + grace
        finished: defer.Deferred[None] = defer.Deferred()

        def check() -> None:
            if self.sessions and time.monotonic() < deadline:
                self.reactor.callLater(0.05, check)
                return
            for session in list(self.sessions):
                log.warning("association aborted at shutdown", calling_ae=session.served.calling_ae)
                session.association.shut_down()
            finished.callback(None)

        stopped.addCallback(lambda _: check())
        finished.addCallback(lambda _: threads.deferToThread(self._stop_workers))
        return finished

    def _stop_workers(self) -> None:
        self.pool.stop()
        self.parts.fetches.close()

    def allowed(self, address: IAddress) -> bool:
        """`[dicom] allowed_hosts`: the whole answer to another host is a closed connection."""
        if not self._networks:
            return True
        host = ipaddress.ip_address(getattr(address, "host", "0.0.0.0"))
        if any(host in network for network in self._networks):
            return True
        log.warning("connection from a host not in allowed_hosts", address=str(host))
        metrics.ASSOCIATIONS_REFUSED.labels("host").inc()
        return False


class _Factory(protocol.Factory):
    def __init__(self, node: DicomNode) -> None:
        self.node = node

    def buildProtocol(self, addr: Any) -> Association | None:
        node = self.node
        if not node.allowed(addr):
            return None
        dicom = node.settings.dicom
        session = Session(node)
        association = Association(
            session,
            PduLimits.of(dicom.max_pdu),
            Timers(parse_duration(dicom.acse_timeout), parse_duration(dicom.network_timeout)),
            node.reactor,
            MessageLimits(),
        )
        session.association = association
        node.sessions.add(session)
        if node.counts is not None:
            node.counts.set("dicom", len(node.sessions))
        return association


class Session:
    """One association's handler: negotiation, the requests served on the pool, the audit."""

    association: Association

    def __init__(self, node: DicomNode) -> None:
        self.node = node
        self.served = Served("", "", "", "", time.perf_counter())
        self.is_established = False
        self.stop = threading.Event()
        """Set by a C-CANCEL of the running operation, or when the association ends."""
        self.current: Message | None = None
        self.in_flight = threading.BoundedSemaphore(PENDING_IN_FLIGHT)

    # -- negotiation -------------------------------------------------------------------------

    def requested(self, association: Association, request: pdu.AssociateRequest) -> Negotiation | Refusal:
        node = self.node
        settings = node.settings
        self.served = Served(
            number=f"{next(_association_numbers):06x}",
            calling_ae=request.calling,
            called_ae=request.called,
            address=association.address,
            started=time.perf_counter(),
            peer=node.parts.peers.get(request.calling),
        )
        known = set(node.parts.peers) if settings.dicom.require_known_ae else None
        open_now = node.live_associations()
        limit = settings.dicom.max_associations
        full = not node.counts.admit(open_now, limit) if node.counts is not None else open_now >= limit
        proxy = node.parts.proxies.called(request.called) if node.parts.proxies is not None else None
        refused = refusal(request, node.policy, known, full)
        if refused is None and proxy is not None and not proxy.admits(request.calling, settings):
            name = proxy.settings.name
            refused = Refusal(
                pdu.AssociateReject(1, 1, 3), f"calling_ae: {request.calling!r} may not use proxy {name!r}"
            )
        if refused is not None:
            reject = refused.reject
            metrics.ASSOCIATIONS_REFUSED.labels(refused.why.split(":")[0]).inc()
            log.warning(
                "association request refused",
                why=refused.why,
                reject=f"{reject.result}/{reject.source}/{reject.reason}",
                address=association.address,
            )
            self.served.detail = f"called AE {request.called}"
            return refused
        if request.unusable_context_ids:
            metrics.PROTOCOL_ERRORS.labels("bad_context_id").inc()
            log.warning(
                "presentation contexts left unanswered",
                why="bad_context_id",
                context_ids=request.unusable_context_ids,
                address=association.address,
            )
        negotiation = negotiate(request, node.proxy_policy if proxy is not None else node.policy)
        self.served.negotiation = negotiation
        return negotiation

    def established(self, association: Association) -> None:
        self.is_established = True
        served = self.served
        metrics.ASSOCIATIONS_ACTIVE.inc()
        metrics.ASSOCIATIONS.labels(served.peer_label, "established").inc()
        log.info(
            "association established",
            association=served.number,
            calling_ae=served.calling_ae,
            called_ae=served.called_ae,
            address=served.address,
        )

    def ended(self, association: Association, how: str) -> None:
        self.stop.set()
        self.node.sessions.discard(self)
        if self.node.counts is not None:
            self.node.counts.set("associations", self.node.live_associations())
            self.node.counts.set("dicom", len(self.node.sessions))
        served = self.served
        if how == "closed" and not self.is_established:
            return  # a connection that never asked for an association
        metrics.ASSOCIATIONS.labels(served.peer_label, how).inc()
        if self.is_established:
            metrics.ASSOCIATIONS_ACTIVE.dec()
        seconds = time.perf_counter() - served.started
        (log.info if how == "released" else log.warning)(
            f"association {how}",
            association=served.number,
            calling_ae=served.calling_ae,
            address=served.address,
            instances_stored=served.stored,
            seconds=round(seconds, 3),
        )
        self._record("ASSOCIATION", how, served.stored, served.bytes, seconds)

    # -- requests ----------------------------------------------------------------------------

    def sink_for(self, association: Association, context_id: int, command: Command) -> tuple[DatasetSink, int] | None:
        if command.get("CommandField") != CommandField.C_STORE_RQ or self.served.negotiation is None:
            return None
        context = self.served.negotiation.contexts[context_id]
        settings = self.node.settings
        received = store.sink(settings.tmp_dir, command, context.transfer_syntax)
        return received, self.node.parts.walk_limits.inflated  # max_dataset_size: the walk caps inflating at it too

    def received(self, association: Association, message: Message) -> None:
        assert self.served.negotiation is not None
        context = self.served.negotiation.contexts[message.context_id]
        field_ = CommandField(message.field)
        served = self.served
        served.operation = _operation(field_, message)
        served.operation_started, served.answers, served.detail, served.operation_bytes = time.perf_counter(), 0, "", 0
        served.refused = False
        self.current = message
        self.stop.clear()
        sop_class = str(message.command.get("AffectedSOPClassUID") or message.command.get("RequestedSOPClassUID") or "")
        if sop_class != context.abstract_syntax:
            status = WRONG_CONTEXT.get(field_, Status.NO_SUCH_SOP_CLASS)
            self._refuse(
                message, status, f"the SOP Class is not the abstract syntax of context {context.id}", "wrong_context"
            )
            return
        service = SERVICES.get(context.abstract_syntax, {}).get(field_)
        if service is None:
            self._refuse(message, Status.UNRECOGNIZED_OPERATION, f"{field_.name} is not a service of this SOP Class",
                         "unrecognized_operation")  # fmt: skip
            return
        request = Request(
            parts=self.node.parts,
            settings=self.node.settings,
            served=served,
            message=message,
            context=context,
            pending=lambda response: self._pending(message, response),
            cancelled=self.stop,
            notify=lambda fields, dataset, answered: self._notify(message.context_id, fields, dataset, answered),
            sub_request=self._sub_request,
        )
        if service in ON_THE_REACTOR:
            self._run(service, request)
        else:
            self.node.pool.callInThread(self._run, service, request)

    def cancelled(self, association: Association, message: Message) -> None:
        current = self.current
        if current is not None and message.command.get("MessageIDBeingRespondedTo") == current.command.get("MessageID"):
            self.stop.set()

    def dropped(self, association: Association, message: Message) -> None:
        if message.stored is not None:
            message.stored.remove()  # a C-STORE's dataset, never answered

    def _refuse(self, message: Message, status: int, comment: str, why: str) -> None:
        """Answer a request with a failure status before any service ran."""
        metrics.PROTOCOL_ERRORS.labels(why).inc()
        log.warning(
            "request refused",
            why=why,
            message=CommandField(message.field).name,
            status=f"0x{status:04X}",
            reason=comment,
            address=self.served.address,
        )
        if message.stored is not None:
            message.stored.remove()  # a C-STORE's dataset, never stored
        self._final(message, Response(status, comment))

    def _run(self, service: Service_, request: Request) -> None:
        """On a worker (or the reactor, for ON_THE_REACTOR): the pre-service checks, the
        service, and its final response, handed to the reactor's next turn."""
        served = request.served
        started = time.perf_counter()
        with in_context(association=served.number, calling_ae=served.calling_ae, operation=served.operation):
            try:
                response = self._checked(request) or service(request)
            except Exception as exc:
                metrics.PROTOCOL_ERRORS.labels("exception").inc()
                log.exception("request failed", error=str(exc))
                response = Response(Status.PROCESSING_FAILURE, f"cannot process the request: {exc}")
        if served.operation in TIMED:
            metrics.DIMSE_SECONDS.labels(served.operation).observe(time.perf_counter() - started)
        self.node.reactor.callFromThread(self._final, request.message, response)

    def _checked(self, request: Request) -> Response | None:
        """An in-memory dataset that does not frame, or nests or counts past the limits, is
        answered with a failure before pydicom decodes it (leniently: garbage read as an
        empty identifier, a universal query) or recurses until it raises."""
        data = request.message.dataset
        if data is None:
            return None
        syntax = UID(request.context.transfer_syntax)
        try:
            walk(BytesIO(data), syntax, frozenset(), request.parts.walk_limits)
        except Malformed as exc:
            field_ = CommandField(request.message.field)
            metrics.PROTOCOL_ERRORS.labels("malformed").inc()
            log.warning("request refused", why="malformed", message=field_.name, reason=str(exc),
                        address=request.served.address)  # fmt: skip
            return Response(MALFORMED.get(field_, Status.PROCESSING_FAILURE), str(exc))
        return None

    def _pending(self, message: Message, response: Response) -> None:
        """From a worker: a pending response, sent by the reactor; waits while many are queued."""
        self.in_flight.acquire()
        if self.stop.is_set() and not self.association.connected:
            self.in_flight.release()
            return
        self.node.reactor.callFromThread(self._send_pending, message, response)

    def _send_pending(self, message: Message, response: Response) -> None:
        try:
            self._send(message, response)
            self.served.answers += 1
        finally:
            self.in_flight.release()

    def _final(self, message: Message, response: Response) -> None:
        """The last response of an operation: sent, audited, what follows it started, and the
        next request read."""
        try:
            self._finish(message, response)
            if response.then is not None:
                try:
                    response.then()
                except Exception as exc:  # what follows failed: the association goes on
                    log.exception("after the response", error=str(exc))
        finally:
            self.current = None
            self.association.done()

    def _finish(self, message: Message, response: Response) -> None:
        self._send(message, response)
        served = self.served
        field_ = CommandField(message.field)
        fields = response.fields
        if field_ in (CommandField.C_MOVE_RQ, CommandField.C_GET_RQ):
            served.answers = int(fields.get("NumberOfCompletedSuboperations") or 0)
            failed = int(fields.get("NumberOfFailedSuboperations") or 0)
            served.detail = f"{served.detail} failed={failed}".strip() if failed else served.detail
        elif field_ is CommandField.C_STORE_RQ:
            served.answers = 1 if response.status == Status.SUCCESS else 0
        service = COUNTED_AS.get(served.operation, served.operation)
        metrics.DIMSE_OPERATIONS.labels(service, served.peer_label, outcome(response.status, served.refused)).inc()
        self._record(
            served.operation,
            f"0x{response.status:04X}",
            served.answers,
            served.operation_bytes,
            time.perf_counter() - served.operation_started,
        )

    def _send(self, message: Message, response: Response) -> None:
        command = message.command
        fields: dict[str, Any] = {
            "AffectedSOPClassUID": command.get("AffectedSOPClassUID") or command.get("RequestedSOPClassUID"),
            "CommandField": message.field | 0x8000,
            "MessageIDBeingRespondedTo": command.get("MessageID", 0),
            "CommandDataSetType": NO_DATASET if response.identifier is None else 0x0000,
            "Status": int(response.status),
        }
        if response.comment:
            fields["ErrorComment"] = response.comment[:MAX_ERROR_COMMENT]
        if message.field == CommandField.C_STORE_RQ:
            fields["AffectedSOPInstanceUID"] = command.get("AffectedSOPInstanceUID")
        fields.update(response.fields)
        self.association.send(message.context_id, encode_command(fields), response.identifier)

    def _notify(
        self, context_id: int, fields: dict[str, Any], dataset: bytes, answered: Callable[[Message | None], None]
    ) -> None:
        """On the reactor: a request of ours, not waited for; `answered` gets its response on a
        worker, or None at once when the association is not open for it (released, asked to
        release, or gone)."""
        pool = self.node.pool
        if self.association.state is not State.ESTABLISHED:
            pool.callInThread(answered, None)
            return
        message_id = self.served.next_message_id()
        timeout = parse_duration(self.node.settings.dicom.dimse_timeout) or None
        waiting = self.association.expect_response(message_id, timeout)
        self.association.send(context_id, encode_command({**fields, "MessageID": message_id}), dataset)
        waiting.addCallback(lambda answer: pool.callInThread(answered, answer))

    def _sub_request(self, context_id: int, message_id: int, command: bytes, source: Any) -> Message | None:
        """From a worker: send a request of ours on this association and wait for its answer."""
        answered = threading.Event()
        result: list[Message | None] = [None]
        reactor = self.node.reactor
        timeout = parse_duration(self.node.settings.dicom.dimse_timeout)

        def answer(message: Message | None) -> None:
            result[0] = message
            answered.set()

        def begin() -> None:
            self.association.expect_response(message_id, timeout).addCallback(answer)
            self.association.send_fragment(context_id, 0x03, command)

        reactor.callFromThread(begin)
        self._stream(context_id, source)
        answered.wait()
        return result[0]

    def _stream(self, context_id: int, source: Any) -> None:
        """A dataset of ours to the peer, in fragments it can take, from bytes or a stored file."""
        size = max(self.association.peer_max_length - 6, 1)  # an announced 1 to 6 would never end
        reactor = self.node.reactor
        chunks = [source] if isinstance(source, bytes) else source.chunks()
        pending = b""
        for chunk in chunks:
            pending += chunk
            while len(pending) > size:
                piece, pending = pending[:size], pending[size:]
                self.in_flight.acquire()
                reactor.callFromThread(self._write_fragment, context_id, 0x00, piece)
        self.in_flight.acquire()
        reactor.callFromThread(self._write_fragment, context_id, 0x02, pending)

    def _write_fragment(self, context_id: int, control: int, data: bytes) -> None:
        try:
            self.association.send_fragment(context_id, control, data)
        finally:
            self.in_flight.release()

    def _record(self, operation: str, status: str, instances: int, size: int, seconds: float) -> None:
        audit = self.node.audit
        if audit is None or not self.node.settings.dicom.audit:
            return
        served = self.served
        audit.record(
            AuditRecord(
                at=datetime.now(UTC),
                operation=operation,
                association=served.number,
                calling_ae=served.calling_ae[:16],
                called_ae=served.called_ae[:16],
                peer_address=served.address[:64],
                status=status,
                instances=instances,
                bytes=size,
                seconds=round(seconds, 6),
                detail=served.detail[:256],
            )
        )


def _operation(field_: CommandField, message: Message) -> str:
    if field_ is CommandField.C_FIND_RQ and message.command.get("AffectedSOPClassUID") == str(
        ModalityWorklistInformationFind
    ):
        return "MWL"
    return field_.name[:-3].replace("_", "-")
