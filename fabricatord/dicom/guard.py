"""The guard around pynetdicom's association machinery for the associations we accept.

Whatever a broken or hostile peer writes must end in a standard answer (an A-ASSOCIATE-RJ or an
A-ABORT), a log line, a counted reason and a freed slot: never a hung thread, unbounded
buffering, or a crash that leaves the connection open. pynetdicom 3.0.4 reads any PDU length a
header declares, raises in the association thread on an even presentation context ID or an
unknown command, ignores unsolicited responses, buffers an endless message, and accepts a wrong
application context. `guard()` is installed on each association as its connection opens,
before either of its threads runs; docs/upstream.md has the report for each of these.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA

from fabricatord.dicom.ul import pdu
from fabricatord.dicom.ul.protocol import PduLimits
from fabricatord.dicom.walk import Malformed, WalkLimits, walk
from fabricatord.obs import metrics
from fabricatord.obs.logging import get_logger

log = get_logger(__name__)

APPLICATION_CONTEXT = pdu.APPLICATION_CONTEXT.encode()
A_ASSOCIATE_RQ = pdu.PduType.ASSOCIATE_RQ
# A command set is a dozen elements; a query identifier or an N-CREATE/N-SET dataset is held in
# memory. C-STORE datasets go to a file and are bounded by `max_dataset_size` instead.
COMMAND_LIMIT = 64 * 1024
IN_MEMORY_DATASET_LIMIT = 16 * 1024 * 1024
C_STORE_RQ = 0x0001
# PS3.8 9.3.8: A-ABORT from the service provider, and its reasons.
_PROVIDER = 2
_UNRECOGNIZED_PDU, _UNEXPECTED_PDU, _INVALID_PARAMETER = 1, 2, 6
# The AE title characters PS3.5 6.2 allows: printable ASCII without backslash.
_AE_TITLE = re.compile(rb"[ -\[\]-~]{16}")
_REFUSAL = "_fabricatord_refusal"
# What a request on a context of another SOP Class is answered with: PS3.4's "does not match
# SOP Class" for the composite services, "SOP Class not supported" for C-ECHO (PS3.7 C.3.5);
# the normalized services get "no such SOP Class" (0x0118).
_WRONG_CONTEXT = {C_STORE: 0xA900, C_FIND: 0xA900, C_GET: 0xA900, C_MOVE: 0xA900, C_ECHO: 0x0122}
# An identifier that cannot be read: "unable to process" (PS3.4 C.4); "processing failure"
# (0x0110) for the normalized services.
_MALFORMED = {C_FIND: 0xC000, C_GET: 0xC000, C_MOVE: 0xC000}


@dataclass(frozen=True)
class Limits:
    """How much one PDU and one DIMSE message may be."""

    p_data: int
    dataset: int
    walk: WalkLimits
    """How deep, how many and how far inflated a dataset we read may be."""

    @classmethod
    def of(cls, max_pdu: int, max_dataset_size: int) -> Limits:
        """A deflated dataset may inflate to what we would accept uncompressed."""
        return cls(PduLimits.of(max_pdu).p_data, max_dataset_size, WalkLimits(inflated=max_dataset_size))

    def pdu(self, kind: int) -> int | None:
        """The longest PDU of `kind` we read; None for a type that does not exist."""
        return PduLimits(self.p_data).longest(kind)


def guard(assoc: Any, limits: Limits) -> None:
    """Install every guard on one accepted association (from an EVT_CONN_OPEN handler)."""
    dul = assoc.dul
    dul._read_pdu_data = lambda: _read_pdu(dul, limits)
    dul._target = _caught(dul._target, assoc, "the DUL thread")
    assoc._target = _caught(assoc._target, assoc, "the association thread")
    _cap_messages(assoc, limits)
    _vet_requests(assoc, limits.walk)


def refuse(assoc: Any, reject: tuple[int, int, int], why: str) -> None:
    """Have `refuse_vetted` answer this association's request with A-ASSOCIATE-RJ `reject`
    (result, source, reason); `why` starts with the metric's reason label, then a colon. The
    first refusal found stands."""
    if getattr(assoc, _REFUSAL, None) is None:
        setattr(assoc, _REFUSAL, (reject, why))


def refuse_vetted(event: Any) -> None:
    """EVT_REQUESTED: reject an A-ASSOCIATE-RQ the reader found wrong, with the standard reason,
    the way pynetdicom rejects one for an unknown calling AE."""
    assoc = event.assoc
    refusal: tuple[tuple[int, int, int], str] | None = getattr(assoc, _REFUSAL, None)
    if refusal is None:
        return
    (result, source, reason), why = refusal
    metrics.ASSOCIATIONS_REFUSED.labels(why.split(":")[0]).inc()
    log.warning("association request refused", why=why, reject=f"{result}/{source}/{reason}", address=_address(assoc))
    assoc.acse.send_reject(result, source, reason)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


def _read_pdu(dul: Any, limits: Limits) -> None:
    """pynetdicom's PDU reader, with the length checked before anything is buffered and the
    A-ASSOCIATE-RQ vetted before it is decoded."""
    sock = dul.socket
    try:
        header = sock.recv(6)
        if len(header) < 6:
            _closed(dul)
            return
        kind, _, length = struct.unpack(">BBL", header)
        limit = limits.pdu(kind)
        if limit is None:
            _hang_up(dul, "unknown_pdu", f"PDU type 0x{kind:02X}", _UNRECOGNIZED_PDU)
            return
        if length > limit:
            _hang_up(dul, "pdu_too_long", f"PDU type 0x{kind:02X} of {length} bytes, limit {limit}", _INVALID_PARAMETER)
            return
        body = sock.recv(length)
    except OSError:
        dul.event_queue.put("Evt17")
        return
    if len(body) != length:
        dul.event_queue.put("Evt17")
        return
    if kind == A_ASSOCIATE_RQ:
        body = _vet_request(dul.assoc, bytes(body))
    try:
        pdu, event = dul._decode_pdu(header + body)
    except Exception as exc:  # pynetdicom's own answer to an undecodable PDU: Evt19, an A-P-ABORT
        log.warning(
            "connection aborted",
            why="undecodable_pdu",
            pdu_type=f"0x{kind:02X}",
            error=str(exc),
            address=_address(dul.assoc),
        )
        metrics.PROTOCOL_ERRORS.labels("undecodable_pdu").inc()
        dul.event_queue.put("Evt19")
        return
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)


def _vet_request(assoc: Any, body: bytes) -> bytes:
    """Check what pynetdicom does not (application context, AE title characters) and drop what
    would crash it (even or repeated context IDs, an AC's context items), so that `refuse_vetted` can answer with the
    standard reason. Returns the body pynetdicom may decode: a flagged title is replaced, since
    its decoder raises on one instead of rejecting it."""
    if len(body) < 68:
        return body
    called, calling = body[4:20], body[20:36]
    refusal: tuple[tuple[int, int, int], str] | None = None
    if not _AE_TITLE.fullmatch(calling) or not calling.strip():
        refusal = ((1, 1, 3), f"calling_ae: {calling!r} is not an AE title")
        calling = b"INVALID".ljust(16)
    if not _AE_TITLE.fullmatch(called) or not called.strip():
        refusal = refusal or ((1, 1, 7), f"called_ae: {called!r} is not an AE title")
        called = b"INVALID".ljust(16)
    kept, seen, dropped = [], set(), []
    application_context = None
    for kind, value, raw in _items(body[68:]):
        if kind == 0x10:
            application_context = value
        if kind in (0x20, 0x21) and value:  # 0x21 is an AC's item; pynetdicom reads it in an RQ too
            context_id = value[0]
            if kind == 0x21 or context_id % 2 == 0 or context_id in seen:
                dropped.append(context_id)
                continue
            seen.add(context_id)
        # User information holds only its own sub-items (0x51–0x5F).
        kept.append(_user_information(value) if kind == 0x50 else raw)
    if application_context != APPLICATION_CONTEXT:
        name = "missing" if application_context is None else repr(application_context)
        refusal = refusal or ((1, 1, 2), f"application_context: {name}")
    if dropped:
        metrics.PROTOCOL_ERRORS.labels("bad_context_id").inc()
        log.warning(
            "presentation contexts left unanswered",
            why="bad_context_id",
            context_ids=dropped,
            address=_address(assoc),
        )
    if refusal is not None:
        refuse(assoc, *refusal)
    return body[:4] + called + calling + body[36:68] + b"".join(kept)


def _user_information(value: bytes) -> bytes:
    """The user information item without sub-items of other kinds: pynetdicom takes a
    presentation context item found there as one of the request's (found by tests/fuzz)."""
    sub_items = b"".join(raw for kind, _, raw in _items(value) if kind == -1 or 0x51 <= kind <= 0x5F)
    return struct.pack(">BBH", 0x50, 0, len(sub_items)) + sub_items


def _items(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """The variable items of an A-ASSOCIATE-RQ as (type, value, whole item); an item that
    overruns the PDU ends the list, and pynetdicom's decoder judges what is left."""
    items, offset = [], 0
    while offset + 4 <= len(data):
        length = struct.unpack(">H", data[offset + 2 : offset + 4])[0]
        end = offset + 4 + length
        if end > len(data):
            items.append((-1, b"", data[offset:]))
            break
        items.append((data[offset], data[offset + 4 : end], data[offset:end]))
        offset = end
    return items


def _closed(dul: Any) -> None:
    """The peer closed the connection (Evt17). Before its A-ASSOCIATE-RQ, the association's
    thread waits for one until the ACSE timeout, holding a slot: woken now, a burst of silent
    connections cannot lock everyone else out for that long."""
    dul.event_queue.put("Evt17")
    if dul.state_machine.current_state == "Sta2":
        dul.to_user_queue.put(None)


def _hang_up(dul: Any, reason: str, detail: str, abort_reason: int) -> None:
    """Answer with an A-ABORT and close at once, reading nothing more: the rest of what the peer
    sends cannot be trusted to frame. A thread still waiting for the A-ASSOCIATE-RQ is woken."""
    metrics.PROTOCOL_ERRORS.labels(reason).inc()
    log.warning("connection aborted", why=reason, detail=detail, address=_address(dul.assoc))
    _send_abort(dul, abort_reason)
    dul.socket.close()  # Evt17: the state machine ends the association
    if dul.state_machine.current_state == "Sta2":
        dul.to_user_queue.put(None)  # the acceptor waits for a request: None ends it at once


def _send_abort(dul: Any, reason: int) -> None:
    abort = A_ABORT_RQ()
    abort.source = _PROVIDER
    abort.reason_diagnostic = reason
    raw = getattr(dul.socket, "socket", None)
    if raw is not None:
        with contextlib.suppress(OSError):  # the peer is gone already
            raw.sendall(abort.encode())


def _caught(target: Callable[[], None], assoc: Any, thread: str) -> Callable[[], None]:
    """A thread target that cannot die silently: an exception aborts the association, closes the
    connection and is counted, so the slot is free at once (pynetdicom's thread would die with
    the connection open and the slot taken until the peer gives up)."""

    def run() -> None:
        try:
            target()
        except Exception as exc:
            metrics.PROTOCOL_ERRORS.labels("exception").inc()
            log.exception(
                "association aborted", why="exception", thread=thread, error=str(exc), address=_address(assoc)
            )
            dul = assoc.dul
            _send_abort(dul, _UNEXPECTED_PDU)
            if dul.state_machine.current_state == "Sta2":
                dul.to_user_queue.put(None)  # the association thread waits for a request: end it
            assoc.is_aborted, assoc.is_established, assoc._kill = True, False, True
            dul.kill_dul()
            raw = getattr(dul.socket, "socket", None)
            if raw is not None:
                with contextlib.suppress(OSError):
                    raw.shutdown(socket.SHUT_RDWR)
                raw.close()
            evt.trigger(assoc, evt.EVT_ABORTED, {})

    return run


def _cap_messages(assoc: Any, limits: Limits) -> None:
    """Count the bytes of the DIMSE message being received and abort (Evt19, as pynetdicom does
    for an undecodable message) when a command, an in-memory dataset or a C-STORE dataset is
    larger than it may be; nothing more of it is read, and the part of a C-STORE dataset in
    data_dir/tmp is removed when the connection closes, as after any abort."""
    dimse = assoc.dimse
    receive = dimse.receive_primitive
    sizes = {"command": 0, "dataset": 0}
    over = False

    def receive_primitive(primitive: P_DATA) -> None:
        nonlocal over
        if over:
            return
        if dimse.message is None:
            sizes["command"] = sizes["dataset"] = 0
        for _context_id, value in primitive.presentation_data_value_list:
            sizes["command" if value[0] & 1 else "dataset"] += len(value) - 1
        message = dimse.message
        is_store = message is not None and _command_field(message) == C_STORE_RQ
        limit = limits.dataset if is_store else IN_MEMORY_DATASET_LIMIT
        if sizes["command"] > COMMAND_LIMIT or sizes["dataset"] > limit:
            over = True
            what = "command" if sizes["command"] > COMMAND_LIMIT else "dataset"
            metrics.PROTOCOL_ERRORS.labels("message_too_large").inc()
            log.warning(
                "association aborted",
                why="message_too_large",
                part=what,
                limit=COMMAND_LIMIT if what == "command" else limit,
                address=_address(assoc),
            )
            assoc.dul.event_queue.put("Evt19")  # what was received goes with the association
            return
        receive(primitive)

    dimse.receive_primitive = receive_primitive


def _command_field(message: Any) -> int | None:
    command = getattr(message, "command_set", None)
    return getattr(command, "CommandField", None) if command is not None else None


def _vet_requests(assoc: Any, limits: WalkLimits) -> None:
    """Before a request reaches its service:
    - a DIMSE response nobody asked for (we are the SCP; a C-GET's sub-operation responses are
      read by the C-GET itself) means the peer's state is not ours: abort, as DCMTK does;
    - a request whose SOP Class is not the abstract syntax of its presentation context gets a
      failure status: pynetdicom picks the service by the request's SOP Class, and would store
      an MR image on a CT context;
    - an identifier or N-service dataset that does not frame, or nests or counts past the
      limits, gets a failure status before pydicom decodes it (leniently: garbage read as an
      empty identifier, a universal query), or recurses until it raises."""
    serve = assoc._serve_request

    def serve_request(msg: Any, context_id: int) -> None:
        if not msg.is_valid_request and not assoc._sent_release:
            metrics.PROTOCOL_ERRORS.labels("unsolicited_response").inc()
            log.warning(
                "association aborted", why="unsolicited_response", message=msg.msg_type, address=_address(assoc)
            )
            assoc.abort()
            return
        context = assoc._accepted_cx.get(context_id)
        if context is None or not msg.is_valid_request:
            serve(msg, context_id)  # pynetdicom aborts for an unknown context
            return
        sop_class = str(getattr(msg, "AffectedSOPClassUID", None) or getattr(msg, "RequestedSOPClassUID", ""))
        if sop_class != str(context.abstract_syntax):
            comment = f"the SOP Class is not the abstract syntax of context {context_id}"
            status = _WRONG_CONTEXT.get(type(msg), 0x0118)
            _refuse_request(assoc, msg, context_id, sop_class, status, comment, "wrong_context")
            return
        problem = _malformed(msg, context.transfer_syntax[0], limits)
        if problem:
            status = _MALFORMED.get(type(msg), 0x0110)
            _refuse_request(assoc, msg, context_id, sop_class, status, problem, "malformed")
            return
        serve(msg, context_id)

    assoc._serve_request = serve_request


def _malformed(msg: Any, syntax: str, limits: WalkLimits) -> str:
    """Why the request's in-memory dataset cannot be read, or ''."""
    data = msg._dataset_variant
    if not isinstance(data, BytesIO) or isinstance(msg, C_STORE):  # a C-STORE's goes to a file
        return ""
    data.seek(0)
    try:
        walk(data, UID(syntax), frozenset(), limits)
    except Malformed as exc:
        return str(exc)
    finally:
        data.seek(0)
    return ""


def _refuse_request(assoc: Any, msg: Any, context_id: int, sop_class: str, status: int, comment: str, why: str) -> None:
    """Answer a request with a failure status and an Error Comment instead of serving it."""
    metrics.PROTOCOL_ERRORS.labels(why).inc()
    log.warning(
        "request refused",
        why=why,
        message=msg.msg_type,
        status=f"0x{status:04X}",
        reason=comment,
        address=_address(assoc),
    )
    received = getattr(msg, "_dataset_file", None)
    if received is not None:  # a C-STORE's dataset, which pynetdicom wrote to data_dir/tmp
        received.close()
        with contextlib.suppress(OSError):
            os.unlink(received.name)
    response = type(msg)()
    try:
        response.MessageIDBeingRespondedTo = msg.MessageID
        response.AffectedSOPClassUID = sop_class
        if isinstance(msg, C_STORE):
            response.AffectedSOPInstanceUID = msg.AffectedSOPInstanceUID
        response.Status = status
        response.ErrorComment = comment[:64]
        assoc.dimse.send_msg(response, context_id)
    except (ValueError, TypeError, AttributeError):  # a request too broken to answer in kind
        assoc.abort()


def _address(assoc: Any) -> str:
    try:
        host, port = assoc.dul.socket.socket.getpeername()[:2]
    except (AttributeError, OSError):
        return ""
    return f"{host}:{port}"
