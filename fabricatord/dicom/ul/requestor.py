"""An association we request, on a plain blocking socket in the calling thread: the requestor
side of PS3.8 for sending C-STOREs (a C-MOVE's sub-operations). It costs no thread of its own
and frames each stored file's bytes as they are read, where pynetdicom's requestor ran two
threads per association and handled every fragment in its state machine.

Only what a storage SCU needs: A-ASSOCIATE-RQ and its answer, C-STORE-RQ with its dataset in
P-DATA-TF no longer than the peer takes, the C-STORE-RSP, A-RELEASE, A-ABORT. A peer that
answers anything else, aborts, closes or stays silent past the timeout ends the association
(`AssociationLost`); what was not answered by then was not stored.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from fabricatord import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from fabricatord.dicom.ul import pdu
from fabricatord.dicom.ul.dimse import CommandField, decode_command, encode_command

OUR_MAX_LENGTH = 1024 * 1024
"""The longest P-DATA-TF we take: answers are a command set each."""
LONGEST_ANSWER = 16 * 1024 * 1024
"""A PDU from the peer longer than this ends the association: nothing it may send is that long."""
UNLIMITED_FRAGMENT = 1024 * 1024
"""A fragment's length when the peer announced no limit (maximum length 0)."""


class AssociationRefused(ConnectionError):
    """The peer rejected or aborted the association, or could not be reached. `permanent`: it
    would refuse the same request again (rejected-permanent, PS3.8 9.3.4)."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class AssociationLost(ConnectionError):
    """The association ended before the operation was answered."""


@dataclass(frozen=True)
class Accepted:
    """A presentation context the peer accepted."""

    id: int
    abstract_syntax: str
    transfer_syntax: str


@dataclass(frozen=True)
class Timeouts:
    connect: float
    acse: float
    dimse: float | None
    """None: wait for an answer as long as the peer takes."""


class Requestor:
    """One association we requested; not thread-safe: it belongs to the thread that opened it."""

    def __init__(self, connection: socket.socket, contexts: list[Accepted], peer_max_length: int) -> None:
        self._socket = connection
        self.contexts = contexts
        # PS3.8 9.3.1: the peer's maximum counts the PDV headers (6 bytes) too; 0 means no limit.
        self._fragment = max(peer_max_length - 6, 1) if peer_max_length else UNLIMITED_FRAGMENT
        self.established = True

    @classmethod
    def open(
        cls,
        host: str,
        port: int,
        called_ae: str,
        calling_ae: str,
        proposed: Iterable[tuple[str, list[str]]],
        timeouts: Timeouts,
        tls: ssl.SSLContext | None = None,
    ) -> Requestor:
        """Connect (with `tls`, and its handshake) and negotiate; AssociationRefused when the
        peer will not have it."""
        contexts = [
            pdu.PresentationContext(2 * number + 1, abstract, tuple(syntaxes))
            for number, (abstract, syntaxes) in enumerate(proposed)
        ]
        try:
            connection = socket.create_connection((host, port), timeout=timeouts.connect)
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise AssociationRefused(f"cannot connect: {reason[:1].lower()}{reason[1:]}") from exc
        if tls is not None:
            try:
                connection = tls.wrap_socket(connection, server_hostname=host)  # SNI; names are not checked
            except (OSError, ssl.SSLError) as exc:
                connection.close()
                # A certificate the peer or we refuse stays refused until someone changes one.
                permanent = isinstance(exc, ssl.SSLCertVerificationError) or "certificate" in str(exc).lower()
                raise AssociationRefused(f"TLS handshake failed: {exc}", permanent) from exc
        try:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection.settimeout(timeouts.acse)
            request = pdu.AssociateRequest(
                called_ae.encode("ascii"),
                calling_ae.encode("ascii"),
                pdu.APPLICATION_CONTEXT,
                contexts,
                pdu.UserInformation(
                    max_length=OUR_MAX_LENGTH,
                    implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                    implementation_version_name=IMPLEMENTATION_VERSION_NAME,
                ),
            )
            connection.sendall(pdu.encode(request))
            answer = _read(connection)
        except ssl.SSLError as exc:  # TLS 1.3: the peer refuses our certificate after the handshake
            connection.close()
            raise AssociationRefused(f"TLS refused: {exc}", "alert" in str(exc).lower()) from exc
        except (OSError, pdu.PduError, AssociationLost) as exc:
            connection.close()
            raise AssociationRefused(f"no answer to the association request: {exc}") from exc
        if isinstance(answer, pdu.AssociateReject):
            connection.close()
            permanent = answer.result == 1
            raise AssociationRefused(
                f"rejected {'permanently' if permanent else 'transiently'} "
                f"({answer.result}/{answer.source}/{answer.reason})",
                permanent,
            )
        if not isinstance(answer, pdu.AssociateAccept):
            connection.close()
            raise AssociationRefused(f"answered with {type(answer).__name__} instead of an A-ASSOCIATE-AC")
        proposed_by_id = {context.id: context for context in contexts}
        accepted = [
            Accepted(item.id, proposed_by_id[item.id].abstract_syntax, item.transfer_syntax)
            for item in answer.contexts
            if item.result == pdu.ContextResult.ACCEPTANCE and item.id in proposed_by_id
        ]
        connection.settimeout(timeouts.dimse)
        return cls(connection, accepted, answer.user.max_length or 0)

    def store(self, context_id: int, sop_class: str, sop_instance: str, message_id: int, source: Any) -> int:
        """One C-STORE of `source` (bytes, or an iterable of chunks) on context `context_id`; the
        status the peer answered. AssociationLost when it did not answer."""
        command = encode_command(
            {
                "AffectedSOPClassUID": sop_class,
                "CommandField": CommandField.C_STORE_RQ,
                "MessageID": message_id,
                "Priority": 0,
                "CommandDataSetType": 0x0000,
                "AffectedSOPInstanceUID": sop_instance,
            }
        )
        try:
            self._send(context_id, 0x01, [command])
            self._send(context_id, 0x00, [source] if isinstance(source, bytes) else source)
            answer = self._answer()
        except OSError as exc:
            self._close()
            raise AssociationLost(f"the association ended during a C-STORE: {exc.strerror or exc}") from exc
        if answer.get("MessageIDBeingRespondedTo") != message_id or answer.get("CommandField") != (
            CommandField.C_STORE_RSP
        ):
            self.abort()
            raise AssociationLost("the peer answered another message than our C-STORE")
        return int(answer.get("Status", 0xC000))

    def release(self) -> None:
        """A-RELEASE, waiting for the peer's answer (or the timeout), then the connection closed."""
        if not self.established:
            return
        with suppress(OSError, pdu.PduError):  # released or not, we are done with it
            self._socket.sendall(pdu.encode(pdu.ReleaseRequest()))
            while not isinstance(_read(self._socket), pdu.ReleaseResponse | pdu.Abort):
                pass
        self._close()

    def abort(self) -> None:
        if not self.established:
            return
        with suppress(OSError):
            self._socket.sendall(pdu.encode(pdu.Abort(0, 0)))
        self._close()

    def _close(self) -> None:
        self.established = False
        self._socket.close()

    def _send(self, context_id: int, kind: int, chunks: Iterable[bytes]) -> None:
        """A command (`kind` 0x01) or dataset (0x00) in fragments the peer takes, the last marked."""
        for piece, last in _fragments(chunks, self._fragment):
            control = kind | (0x02 if last else 0x00)
            self._socket.sendall(pdu.p_data_header(context_id, control, len(piece)) + piece)

    def _answer(self) -> dict[str, Any]:
        """The next command set the peer sends (a dataset it may add is read past)."""
        command = bytearray()
        while True:
            try:
                received = _read(self._socket)
            except pdu.PduError as exc:
                self.abort()
                raise AssociationLost(f"the peer sent a PDU that does not decode: {exc}") from exc
            if isinstance(received, pdu.PData):
                for value in received.values:
                    if value.is_command:
                        command += value.data
                        if value.is_last:
                            return decode_command(bytes(command))
                continue
            self._close()
            if isinstance(received, pdu.Abort):
                raise AssociationLost(f"the peer aborted (source {received.source}, reason {received.reason})")
            raise AssociationLost(f"the peer sent {type(received).__name__} during a C-STORE")


def _fragments(chunks: Iterable[bytes], size: int) -> Iterator[tuple[bytes | memoryview, bool]]:
    """`chunks` cut into pieces of `size` bytes at most (views, not copies), each with whether
    it is the last; an empty source is one empty last piece (a message must end)."""
    pending = b""
    for chunk in chunks:
        whole = pending + chunk if pending else chunk
        view = memoryview(whole)
        offset = 0
        while len(whole) - offset > size:
            yield view[offset : offset + size], False
            offset += size
        pending = whole[offset:]
    yield pending, True


def _read(connection: socket.socket) -> pdu.Pdu:
    header = _exactly(connection, pdu.HEADER.size)
    kind, _, length = pdu.HEADER.unpack(header)
    if length > LONGEST_ANSWER:
        raise pdu.PduError(f"a PDU of {length} bytes")
    return pdu.decode(kind, _exactly(connection, length))


def _exactly(connection: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        received = connection.recv(min(size - len(data), 1 << 20))
        if not received:
            raise AssociationLost("the peer closed the connection")
        data += received
    return bytes(data)
