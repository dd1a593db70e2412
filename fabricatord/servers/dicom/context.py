"""What a DICOM service is given and what it answers with.

A service is a plain function of a `Request` that returns its final `Response`; pending
responses go out through `Request.pending` as they are made. Services run on a worker thread
of the node's bounded pool, never on the reactor: they may block on the database and the disk.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from pydicom.uid import UID

from fabricatord.config import PeerSettings, Settings
from fabricatord.dicom.ul.dimse import Message
from fabricatord.dicom.ul.negotiation import AcceptedContext, Negotiation
from fabricatord.obs.logging import get_logger

if TYPE_CHECKING:
    from fabricatord.servers.dicom.node import Parts

log = get_logger(__name__)

MAX_ERROR_COMMENT = 64
"""Error Comment is an LO."""


class Status(IntEnum):
    """The DIMSE statuses our services answer with (PS3.4, PS3.7 C)."""

    SUCCESS = 0x0000
    PENDING = 0xFF00
    PENDING_UNSUPPORTED_KEYS = 0xFF01
    CANCEL = 0xFE00
    SUBOPERATIONS_WARNING = 0xB000
    OUT_OF_RESOURCES = 0xA700
    TOO_MANY_MATCHES = 0xA701
    """Out of resources: unable to calculate the number of matches (PS3.4 C.4.2.1.5)."""
    SUBOPERATIONS_REFUSED = 0xA702
    MOVE_DESTINATION_UNKNOWN = 0xA801
    DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    NOT_AUTHORIZED = 0x0124
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NO_SUCH_SOP_CLASS = 0x0118
    NO_SUCH_SOP_INSTANCE = 0x0112
    UNRECOGNIZED_OPERATION = 0x0211
    PROCESSING_FAILURE = 0x0110


@dataclass
class Response:
    """One response: its status, an Error Comment, an identifier already encoded in the
    context's transfer syntax, and any other command elements (counts, instance UIDs)."""

    status: int
    comment: str = ""
    identifier: bytes | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    then: Callable[[], None] | None = None
    """Run on the reactor once this final response is written (a report that follows it)."""


@dataclass
class Served:
    """What the audit trail and the logs know of one association while it lasts."""

    number: str
    calling_ae: str
    called_ae: str
    address: str
    started: float
    peer: PeerSettings | None = None
    """The `[[peers]]` entry of the calling AE title, if it is one."""
    stored: int = 0
    bytes: int = 0
    operation: str = ""
    operation_started: float = 0.0
    operation_bytes: int = 0
    answers: int = 0
    detail: str = ""
    refused: bool = False
    """The running operation was denied by the peer's `[[peers]]` entry (counted `refused`)."""
    negotiation: Negotiation | None = None
    _message_ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def next_message_id(self) -> int:
        """A Message ID for a request of ours on this association (C-GET's C-STOREs)."""
        return next(self._message_ids) % 0x10000 or next(self._message_ids)

    @property
    def peer_label(self) -> str:
        """A bounded metric label: the `[[peers]]` name, or `other`."""
        return self.peer.name if self.peer is not None else "other"


@dataclass
class Request:
    """One request being served."""

    parts: Parts
    settings: Settings
    served: Served
    message: Message
    context: AcceptedContext
    pending: Callable[[Response], None]
    """Send a pending response now (from the worker thread; it waits while the peer is slow)."""
    cancelled: threading.Event
    notify: Callable[[dict[str, Any], bytes, Callable[[Message | None], None]], None]
    """From the reactor: send a request of ours on this request's context (a Storage Commitment
    report) without waiting: (command fields, dataset, told the response on a worker thread,
    None when none came or the association is no longer open for requests)."""
    sub_request: Callable[[int, int, bytes, Any], Message | None] | None = None
    """Send a request of our own on this association (C-GET's C-STOREs) and wait for its
    response: (context ID, message ID, command set, dataset source) → the response, None if
    none came."""

    @property
    def command(self) -> dict[str, Any]:
        return self.message.command

    @property
    def sop_class(self) -> str:
        return str(self.command.get("AffectedSOPClassUID") or self.command.get("RequestedSOPClassUID") or "")

    @property
    def implicit(self) -> bool:
        return self.context.transfer_syntax == "1.2.840.10008.1.2"

    @property
    def encoding(self) -> tuple[bool, bool, bool]:
        """(implicit VR, little endian, deflated) of the context's transfer syntax."""
        syntax = UID(self.context.transfer_syntax)
        return bool(syntax.is_implicit_VR), bool(syntax.is_little_endian), bool(syntax.is_deflated)

    def refused(self, service: str) -> bool:
        """Whether the calling peer's `[[peers]]` entry denies it `service`; a refusal is
        logged here, once for every service, and counted `refused` with the response."""
        peer = self.served.peer
        if peer is None or getattr(peer, PERMISSIONS[service]):
            return False
        log.warning("operation not allowed for this peer", service=service)
        self.served.refused = True
        return True


PERMISSIONS = {
    "C-ECHO": "allow_echo",
    "C-STORE": "allow_store",
    "C-FIND": "allow_find",
    "MWL": "allow_find_worklist",
    "C-MOVE": "allow_move",
    "C-GET": "allow_get",
    "MPPS": "allow_mpps",
    "STORAGE-COMMITMENT": "allow_storage_commitment",
}
"""What each service needs of a `[[peers]]` entry, as Orthanc's AllowEcho/Store/Find/FindWorklist/Move/Get."""
