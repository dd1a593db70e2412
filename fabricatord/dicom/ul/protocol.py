"""One accepted association as a Twisted protocol: the PS3.8 state machine of the acceptor on
the reactor, so that a connection costs no thread.

The states are PS3.8's (9.2, table 9-10) that an acceptor reaches: Sta2 awaiting the
A-ASSOCIATE-RQ (ARTIM running), Sta6 established, Sta8 a release asked for while an operation
still runs, Sta13 awaiting the close (ARTIM running). We never ask for a release ourselves, so
the collision states cannot occur. Whatever a peer sends that the state does not allow, or that
does not decode, ends in an A-ABORT, a log line and a counted reason; a PDU longer than its
type may be is refused from its header, before its body is buffered.

What is served is the handler's: it decides on the request, gets each request message, and
says when an operation is done. One operation runs at a time (we negotiate no asynchronous
window); a request that arrives meanwhile waits, and the connection is not read until it has
been served, so a connection holds at most one message and one PDU in memory. A C-CANCEL is
read and passed on at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from twisted.internet import protocol
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from fabricatord.dicom.ul import pdu
from fabricatord.dicom.ul.dimse import Assembler, Command, CommandField, DatasetSink, DimseError, Message, MessageLimits
from fabricatord.dicom.ul.dimse import fragments as message_fragments
from fabricatord.dicom.ul.negotiation import Negotiation, Refusal
from fabricatord.dicom.ul.pdu import AbortReason, PduType
from fabricatord.obs import metrics
from fabricatord.obs.logging import get_logger

log = get_logger(__name__)

ASSOCIATION_PDU_LIMIT = 256 * 1024
"""An A-ASSOCIATE-RQ proposing all 128 contexts with a dozen transfer syntaxes each, role
selection and extended negotiation is under 64 KiB; four times that is room for any real one."""
SHORT_PDU_LIMIT = 64
"""Release and abort PDUs are 4 bytes long; anything much longer is not one."""
P_DATA_SLACK = 1024
"""What a P-DATA-TF may exceed the maximum length we announced by: some senders count the PDV
headers, some do not."""
UNANNOUNCED_P_DATA_LIMIT = 256 * 1024 * 1024
"""With `[dicom] max_pdu = 0` (no limit announced) a single PDU still may not claim more."""
UNLIMITED_FRAGMENT = 1024 * 1024
"""The P-DATA-TF we send to a peer that announced no limit: smaller is always allowed."""


@dataclass(frozen=True)
class PduLimits:
    """How long a PDU of each type may be."""

    p_data: int

    @classmethod
    def of(cls, max_pdu: int) -> PduLimits:
        return cls(max_pdu + P_DATA_SLACK if max_pdu else UNANNOUNCED_P_DATA_LIMIT)

    def longest(self, kind: int) -> int | None:
        """The longest PDU of `kind` we read; None for a type that does not exist."""
        if kind == PduType.P_DATA_TF:
            return self.p_data
        if kind in (PduType.RELEASE_RQ, PduType.RELEASE_RP, PduType.ABORT):
            return SHORT_PDU_LIMIT
        if kind in (PduType.ASSOCIATE_RQ, PduType.ASSOCIATE_AC, PduType.ASSOCIATE_RJ):
            return ASSOCIATION_PDU_LIMIT
        return None


@dataclass(frozen=True)
class Timers:
    acse: float
    """ARTIM: how long we wait for the A-ASSOCIATE-RQ, and for the close after our last PDU."""
    network: float | None
    """How long an established association may say nothing while no operation runs."""


class Clock(Protocol):
    """The reactor's timers (`twisted.internet.task.Clock` in tests)."""

    def callLater(self, delay: float, callable: Any, *args: Any) -> Any: ...  # noqa: N802 (Twisted's name)


class State(Enum):
    AWAITING_REQUEST = "Sta2"
    ESTABLISHED = "Sta6"
    RELEASE_REQUESTED = "Sta8"
    CLOSING = "Sta13"


class Handler(Protocol):
    """What serves an association: the layer above the upper layer."""

    def requested(self, association: Association, request: pdu.AssociateRequest) -> Negotiation | Refusal:
        """Accept (a negotiation) or reject (a refusal) the A-ASSOCIATE-RQ."""

    def established(self, association: Association) -> None: ...

    def sink_for(self, association: Association, context_id: int, command: Command) -> tuple[DatasetSink, int] | None:
        """Where the dataset of the message `command` starts goes, and its limit; None: memory."""

    def received(self, association: Association, message: Message) -> None:
        """A request to serve; `association.done()` says when its operation is over."""

    def cancelled(self, association: Association, message: Message) -> None:
        """A C-CANCEL-RQ: the operation it names (Message ID Being Responded To) stops early."""

    def dropped(self, association: Association, message: Message) -> None:
        """A request that waited and will not be served (the association ended first): what its
        dataset sink kept must go."""

    def ended(self, association: Association, how: str) -> None:
        """The connection is gone: `how` the association ended (rejected, released, aborted,
        closed: the peer closed without either)."""


class Association(protocol.Protocol):
    """The acceptor side of one association on one connection."""

    def __init__(
        self, handler: Handler, limits: PduLimits, timers: Timers, clock: Clock, messages: MessageLimits
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.timers = timers
        self.clock = clock
        self.state = State.AWAITING_REQUEST
        self.negotiation: Negotiation | None = None
        self.request: pdu.AssociateRequest | None = None
        self.busy = False
        """An operation runs: requests wait, the connection is not read and not timed out."""
        self._ending = "closed"
        self._buffer = bytearray()
        self._waiting: deque[Message] = deque()
        self._release_after_operation = False
        self._timer: Any = None
        self._outstanding: dict[int, Deferred[Message | None]] = {}
        """Our own requests' message IDs, and who waits for each response."""
        self._assembler = Assembler(messages, self._sink_for)

    # -- the transport's side --------------------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        # A small PDU after another would wait ~40 ms for Nagle's algorithm and delayed ACKs.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self._arm(self.timers.acse)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.state is State.CLOSING:
            return
        self._buffer += data
        if self.state is State.ESTABLISHED:
            self._arm(None if self.busy else self.timers.network)
        while self._take_pdu():
            pass

    def _take_pdu(self) -> bool:
        """Handle the next whole PDU in the buffer; False when none is whole, or we stopped."""
        if self.state is State.CLOSING or len(self._buffer) < pdu.HEADER.size:
            return False
        kind, _, length = pdu.HEADER.unpack_from(self._buffer)
        longest = self.limits.longest(kind)
        if longest is None:
            self.abort("unknown_pdu", f"PDU type 0x{kind:02X}", AbortReason.UNRECOGNIZED_PDU)
            return False
        if length > longest:
            detail = f"PDU type 0x{kind:02X} of {length} bytes, limit {longest}"
            self.abort("pdu_too_long", detail, AbortReason.INVALID_PARAMETER)
            return False
        end = pdu.HEADER.size + length
        if len(self._buffer) < end:
            return False
        body = bytes(self._buffer[pdu.HEADER.size : end])
        del self._buffer[:end]
        self._received(kind, body)
        return True

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:  # noqa: N802
        self._disarm()
        self._assembler.discard()
        self._drop_waiting()
        if self.state in (State.ESTABLISHED, State.RELEASE_REQUESTED):
            self._ending = "aborted"  # the peer closed without a release or an abort: an A-P-ABORT
        self.state = State.CLOSING
        self.handler.ended(self, self._ending)
        # After `ended`: whoever waited for a response learns the association is over first.
        outstanding, self._outstanding = self._outstanding, {}
        for waiting in outstanding.values():
            waiting.callback(None)

    # -- the handler's side ----------------------------------------------------------------------

    @property
    def _wire(self) -> Any:
        """The transport, untyped: Twisted's zope interfaces do not type-check as classes."""
        return self.transport

    @property
    def peer_max_length(self) -> int:
        """The largest P-DATA-TF we may send."""
        announced = self.negotiation.peer_max_length if self.negotiation is not None else 0
        return announced or UNLIMITED_FRAGMENT

    def send(self, context_id: int, command: bytes, dataset: bytes | memoryview | None = None) -> None:
        """One message, fragmented to fit the peer's maximum length."""
        if self.state is State.CLOSING:
            return
        writes: list[bytes | memoryview] = []
        for control, piece in message_fragments(command, dataset, self.peer_max_length):
            writes.append(pdu.p_data_header(context_id, control, len(piece)))
            writes.append(bytes(piece))  # Twisted writes bytes only
        self._wire.writeSequence(writes)

    def send_fragment(self, context_id: int, control: int, data: bytes | memoryview) -> None:
        """One presentation data value in its own P-DATA-TF: a message streamed from a file,
        a fragment at a time, whose size the caller keeps within `peer_max_length`."""
        if self.state is State.CLOSING:
            return
        self._wire.writeSequence([pdu.p_data_header(context_id, control, len(data)), bytes(data)])

    def expect_response(self, message_id: int, timeout: float | None) -> Deferred[Message | None]:
        """The response to a request of ours with `message_id` (C-GET's C-STOREs travel on the
        association we accepted), or None when it did not come: the association ended, or
        `timeout` passed, which aborts the association as PS3.7 says a DIMSE timeout does."""
        if self.state is State.CLOSING:
            return succeed(None)  # the association ended while the request was being prepared
        waiting: Deferred[Message | None] = Deferred()
        self._outstanding[message_id] = waiting
        if timeout is not None:
            timer = self.clock.callLater(timeout, self._no_response, message_id)
            waiting.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
        return waiting

    def _no_response(self, message_id: int) -> None:
        waiting = self._outstanding.pop(message_id, None)
        if waiting is not None:
            log.warning("association aborted", why="dimse_timeout", message_id=message_id, address=self.address)
            self._close_with(
                pdu.encode(pdu.Abort(pdu.AbortSource.SERVICE_PROVIDER, AbortReason.NOT_SPECIFIED)), "aborted"
            )
            waiting.callback(None)

    def done(self) -> None:
        """The running operation has sent its last response: serve what waits, or the release."""
        self.busy = False
        if self.state is State.CLOSING:
            return
        if self._waiting:
            self._serve(self._waiting.popleft())
            return
        self._wire.resumeProducing()
        if self._release_after_operation:
            self._release()
            return
        self._arm(self.timers.network)

    def abort(
        self,
        reason: str,
        detail: str,
        abort_reason: AbortReason = AbortReason.UNEXPECTED_PDU,
        source: pdu.AbortSource = pdu.AbortSource.SERVICE_PROVIDER,
    ) -> None:
        """A-ABORT, counted and logged, and the connection closed: what the peer sends after
        cannot be trusted to frame, so none of it is read."""
        if self.state is State.CLOSING:
            return
        metrics.PROTOCOL_ERRORS.labels(reason).inc()
        log.warning("connection aborted", why=reason, detail=detail, address=self.address)
        self._close_with(pdu.encode(pdu.Abort(source, abort_reason)), "aborted")

    def _abort_as_user(self, reason: str, detail: str) -> None:
        """A-ABORT 0/0, as DCMTK and Orthanc answer a PDU the state does not allow before the
        association (PS3.8 AA-1), a PDV on a context never accepted, and an unsolicited response."""
        self.abort(reason, detail, AbortReason.NOT_SPECIFIED, pdu.AbortSource.SERVICE_USER)

    def shut_down(self) -> None:
        """A-ABORT because the daemon stops: nothing the peer did, so nothing is counted."""
        if self.state is not State.CLOSING:
            self._close_with(
                pdu.encode(pdu.Abort(pdu.AbortSource.SERVICE_PROVIDER, AbortReason.NOT_SPECIFIED)), "aborted"
            )

    @property
    def address(self) -> str:
        peer = self._wire.getPeer() if self.transport is not None else None
        host, port = getattr(peer, "host", ""), getattr(peer, "port", "")
        return f"{host}:{port}" if host else ""

    # -- the state machine -----------------------------------------------------------------------

    def _received(self, kind: int, body: bytes) -> None:
        try:
            if self.state is State.AWAITING_REQUEST:
                self._before_association(kind, body)
            elif kind == PduType.ABORT:
                self._aborted_by_peer()
            elif self.state is State.RELEASE_REQUESTED:
                self.abort("unexpected_pdu", f"PDU type 0x{kind:02X} after an A-RELEASE-RQ")
            elif kind == PduType.P_DATA_TF:
                self._data(body)
            elif kind == PduType.RELEASE_RQ:
                pdu.decode(kind, body)
                self._release_requested()
            else:
                self.abort("unexpected_pdu", f"PDU type 0x{kind:02X} in an established association")
        except pdu.PduError as exc:
            self.abort("undecodable_pdu", str(exc), exc.reason)
        except DimseError as exc:
            self.abort(exc.reason, str(exc))
        except Exception as exc:  # a sink that cannot be written, or a fault of ours: abort, never hang
            log.exception("pdu handling failed", error=str(exc), address=self.address)
            self.abort("exception", f"{type(exc).__name__}: {exc}")

    def _before_association(self, kind: int, body: bytes) -> None:
        if kind == PduType.ABORT:
            self._aborted_by_peer()
            return
        if kind != PduType.ASSOCIATE_RQ:
            self._abort_as_user("unexpected_pdu", f"PDU type 0x{kind:02X} before an A-ASSOCIATE-RQ")
            return
        request = pdu.decode(kind, body)
        assert isinstance(request, pdu.AssociateRequest)
        self.request = request
        answer = self.handler.requested(self, request)
        if isinstance(answer, Refusal):
            self._close_with(pdu.encode(answer.reject), "rejected")
            return
        self.negotiation = answer
        self._wire.write(pdu.encode(answer.accept))
        self.state = State.ESTABLISHED
        self._arm(self.timers.network)
        self.handler.established(self)

    def _data(self, body: bytes) -> None:
        assert self.negotiation is not None
        for value in pdu.pdvs(body):
            if value.context_id not in self.negotiation.contexts:
                self._abort_as_user(
                    "unknown_context", f"a PDV on presentation context {value.context_id}, not accepted"
                )
                return
            message = self._assembler.feed(value)
            if message is not None:
                self._message(message)
            if self.state is State.CLOSING:
                return

    def _message(self, message: Message) -> None:
        try:
            field = CommandField(message.field)
        except ValueError:
            # metric label "exception": what pynetdicom's thread died of before this layer
            self.abort("exception", f"Command Field 0x{message.field:04X} does not exist")
            return
        if field is CommandField.C_CANCEL_RQ:
            self.handler.cancelled(self, message)
            return
        if field.is_response:
            waiting = self._outstanding.pop(int(message.command.get("MessageIDBeingRespondedTo", -1)), None)
            if waiting is None:
                self._abort_as_user("unsolicited_response", f"{field.name} that no request of ours asked for")
                return
            waiting.callback(message)
            return
        if self.busy:
            self._waiting.append(message)
            self._wire.pauseProducing()
            return
        self._serve(message)

    def _serve(self, message: Message) -> None:
        self.busy = True
        self._disarm()
        self.handler.received(self, message)

    def _release_requested(self) -> None:
        if self.busy or self._waiting:
            self.state = State.RELEASE_REQUESTED
            self._release_after_operation = True
            return
        self._release()

    def _release(self) -> None:
        """A-RELEASE-RP, then wait for the requestor to close (Sta13, ARTIM)."""
        self._wire.write(pdu.encode(pdu.ReleaseResponse()))
        self.state = State.CLOSING
        self._ending = "released"
        self._arm(self.timers.acse)

    def _aborted_by_peer(self) -> None:
        self.state = State.CLOSING
        self._ending = "aborted"
        self._wire.loseConnection()

    def _drop_waiting(self) -> None:
        while self._waiting:
            self.handler.dropped(self, self._waiting.popleft())

    def _close_with(self, last: bytes, ending: str) -> None:
        self._assembler.discard()
        self._drop_waiting()
        self._wire.write(last)
        self.state = State.CLOSING
        self._ending = ending
        self._wire.loseConnection()

    def _sink_for(self, context_id: int, command: Command) -> tuple[DatasetSink, int] | None:
        return self.handler.sink_for(self, context_id, command)

    # -- timers ----------------------------------------------------------------------------------

    def _arm(self, seconds: float | None) -> None:
        self._disarm()
        if seconds is not None:
            self._timer = self.clock.callLater(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.state is State.ESTABLISHED and not self.busy:
            log.warning("association aborted", why="network_timeout", address=self.address)
            self._close_with(
                pdu.encode(pdu.Abort(pdu.AbortSource.SERVICE_PROVIDER, AbortReason.NOT_SPECIFIED)), "aborted"
            )
            return
        # ARTIM: no A-ASSOCIATE-RQ came, or the peer did not close after our last PDU.
        self.state = State.CLOSING
        self._wire.loseConnection()
