"""The acceptor's state machine on Twisted's StringTransport and a fake clock: every PDU in
every state, the timers, and one operation at a time with the connection paused meanwhile."""

from __future__ import annotations

import struct

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from fabricatord.dicom.ul import pdu
from fabricatord.dicom.ul.dimse import (
    NO_DATASET,
    Command,
    CommandField,
    DatasetSink,
    Message,
    MessageLimits,
    encode_command,
    fragments,
)
from fabricatord.dicom.ul.negotiation import Negotiation, Policy, Refusal, negotiate, refusal
from fabricatord.dicom.ul.pdu import AbortReason, PresentationContext, UserInformation
from fabricatord.dicom.ul.protocol import Association, PduLimits, State, Timers
from fabricatord.obs import metrics

VERIFICATION, IMPLICIT = "1.2.840.10008.1.1", "1.2.840.10008.1.2"
POLICY = Policy("FABRICATORD", {VERIFICATION: (IMPLICIT,)}, (), 16384, "1.2.3", "TEST")


class Recorder:
    """A handler that accepts what negotiation accepts and remembers what it was given."""

    def __init__(self) -> None:
        self.full = False
        self.messages: list[Message] = []
        self.cancels: list[Message] = []
        self.endings: list[str] = []
        self.drops: list[Message] = []
        self.established_count = 0

    def requested(self, association: Association, request: pdu.AssociateRequest) -> Negotiation | Refusal:
        return refusal(request, POLICY, None, self.full) or negotiate(request, POLICY)

    def established(self, association: Association) -> None:
        self.established_count += 1

    def sink_for(self, association: Association, context_id: int, command: Command) -> tuple[DatasetSink, int] | None:
        return None

    def received(self, association: Association, message: Message) -> None:
        self.messages.append(message)

    def cancelled(self, association: Association, message: Message) -> None:
        self.cancels.append(message)

    def ended(self, association: Association, how: str) -> None:
        self.endings.append(how)

    def dropped(self, association: Association, message: Message) -> None:
        self.drops.append(message)


class Connection:
    def __init__(self, max_pdu: int = 16384) -> None:
        self.handler = Recorder()
        self.clock = Clock()
        self.association = Association(
            self.handler, PduLimits.of(max_pdu), Timers(acse=30, network=60), self.clock, MessageLimits()
        )
        self.transport = StringTransport()
        self.association.makeConnection(self.transport)

    def send(self, data: bytes, piecewise: bool = False) -> None:
        if piecewise:
            for index in range(len(data)):
                self.association.dataReceived(data[index : index + 1])
        else:
            self.association.dataReceived(data)

    def answers(self) -> list[pdu.Pdu]:
        """The PDUs written since the last call."""
        data, found = self.transport.value(), []
        self.transport.clear()
        while data:
            kind, _, length = pdu.HEADER.unpack_from(data)
            found.append(pdu.decode(kind, data[6 : 6 + length]))
            data = data[6 + length :]
        return found

    def close(self) -> None:
        self.association.connectionLost()


def associate_rq(called: bytes = b"FABRICATORD", max_length: int = 16384) -> bytes:
    request = pdu.AssociateRequest(
        called.ljust(16),
        b"MODALITY".ljust(16),
        pdu.APPLICATION_CONTEXT,
        [PresentationContext(1, VERIFICATION, (IMPLICIT,))],
        UserInformation(max_length=max_length),
    )
    return pdu.encode(request)


def command(field: int, message_id: int = 1, **more: object) -> bytes:
    fields = {"AffectedSOPClassUID": VERIFICATION, "CommandField": field, "MessageID": message_id}
    fields.update(more)
    fields.setdefault("CommandDataSetType", NO_DATASET)
    return encode_command(fields)


def message(data: bytes, context_id: int = 1) -> bytes:
    return b"".join(pdu.p_data_header(context_id, c, len(p)) + bytes(p) for c, p in fragments(data, None, 0))


def echo(message_id: int = 1) -> bytes:
    return message(command(CommandField.C_ECHO_RQ, message_id))


@pytest.fixture
def established() -> Connection:
    connection = Connection()
    connection.send(associate_rq())
    (accept,) = connection.answers()
    assert isinstance(accept, pdu.AssociateAccept)
    return connection


def test_an_association_serves_a_request_and_releases(established: Connection) -> None:
    assert established.handler.established_count == 1 and established.association.state is State.ESTABLISHED
    established.send(echo(5), piecewise=True)
    (request,) = established.handler.messages
    assert request.field == CommandField.C_ECHO_RQ and request.command["MessageID"] == 5
    answer = command(CommandField.C_ECHO_RSP, MessageIDBeingRespondedTo=5, Status=0, MessageID=None)
    established.association.send(1, answer)
    established.association.done()
    (data,) = established.answers()
    assert isinstance(data, pdu.PData) and bytes(data.values[0].data) == answer
    established.send(pdu.encode(pdu.ReleaseRequest()))
    assert established.answers() == [pdu.ReleaseResponse()]
    assert not established.transport.disconnecting  # the requestor closes after our A-RELEASE-RP
    established.close()
    assert established.handler.endings == ["released"]


def test_a_release_asked_for_during_an_operation_waits_for_it(established: Connection) -> None:
    established.send(echo() + pdu.encode(pdu.ReleaseRequest()))
    assert established.answers() == [] and established.association.state is State.RELEASE_REQUESTED
    established.association.done()
    assert established.answers() == [pdu.ReleaseResponse()]


def test_one_operation_at_a_time_and_the_connection_waits_meanwhile(established: Connection) -> None:
    established.send(echo(1) + echo(2))
    assert [m.command["MessageID"] for m in established.handler.messages] == [1]
    assert established.transport.producerState == "paused"
    cancel = message(command(CommandField.C_CANCEL_RQ, MessageIDBeingRespondedTo=1, MessageID=None))
    established.send(cancel)
    assert [m.command["MessageIDBeingRespondedTo"] for m in established.handler.cancels] == [1]
    established.association.done()
    assert [m.command["MessageID"] for m in established.handler.messages] == [1, 2]
    established.association.done()
    assert established.transport.producerState == "producing"


def test_a_request_that_waited_and_will_never_be_served_is_handed_back(established: Connection) -> None:
    established.send(echo(1) + echo(2))
    established.close()
    assert [m.command["MessageID"] for m in established.handler.drops] == [2]


def test_a_refused_request_is_rejected_and_closed() -> None:
    connection = Connection()
    connection.send(associate_rq(called=b"SOMEONE"))
    assert connection.answers() == [pdu.AssociateReject(1, 1, 7)]
    assert connection.transport.disconnecting
    connection.close()
    assert connection.handler.endings == ["rejected"] and connection.handler.established_count == 0


@pytest.mark.parametrize(
    ("data", "answer"),
    [
        (pdu.HEADER.pack(0x04, 0, 0x7FFFFFFF), pdu.Abort(2, AbortReason.INVALID_PARAMETER)),
        (pdu.HEADER.pack(0x01, 0, 300 * 1024), pdu.Abort(2, AbortReason.INVALID_PARAMETER)),
        (b"GET / HTTP/1.1\r\n", pdu.Abort(2, AbortReason.UNRECOGNIZED_PDU)),
        (echo(), pdu.Abort(0, 0)),
        (pdu.encode(pdu.ReleaseRequest()), pdu.Abort(0, 0)),
        (pdu.HEADER.pack(0x01, 0, 10) + bytes(10), pdu.Abort(2, AbortReason.INVALID_PARAMETER)),
    ],
    ids=["2-gib-p-data", "huge-request", "http", "p-data-first", "release-first", "short-request"],
)
def test_what_cannot_start_an_association_is_aborted_from_its_header(data: bytes, answer: pdu.Abort) -> None:
    """The answers of docs/robustness.md's peer table: a PDU before the request is A-ABORT 0/0
    (PS3.8 AA-1), as DCMTK and Orthanc answer it."""
    connection = Connection()
    connection.send(data)
    assert connection.answers() == [answer]
    assert connection.transport.disconnecting and connection.association.state is State.CLOSING
    connection.send(associate_rq())
    assert connection.answers() == []  # nothing more is read


@pytest.mark.parametrize(
    ("data", "reason", "answer"),
    [
        (pdu.HEADER.pack(0x04, 0, 10) + struct.pack(">LBB", 500, 1, 3) + bytes(4), "undecodable_pdu", pdu.Abort(2, 0)),
        (pdu.HEADER.pack(0x04, 0, 5) + struct.pack(">LB", 1, 1), "undecodable_pdu", pdu.Abort(2, 2)),
        (message(b"\x00\x00\x00\x01\x02\x00"), "undecodable_message", pdu.Abort(2, 2)),
        (message(command(CommandField.C_ECHO_RQ), context_id=3), "unknown_context", pdu.Abort(0, 0)),
        (message(command(0x0777)), "exception", pdu.Abort(2, 2)),
        (message(command(CommandField.C_ECHO_RSP, Status=0)), "unsolicited_response", pdu.Abort(0, 0)),
        (associate_rq(), "unexpected_pdu", pdu.Abort(2, 2)),
    ],
    ids=[
        "pdv-beyond-its-pdu",
        "pdv-below-2",
        "command-cut",
        "unknown-context",
        "unknown-command",
        "unsolicited-response",
        "second-request",
    ],
)
def test_what_an_established_association_cannot_mean_is_aborted(
    established: Connection, data: bytes, reason: str, answer: pdu.Abort
) -> None:
    before = metrics.PROTOCOL_ERRORS.labels(reason)._value.get()
    established.send(data)
    assert established.answers() == [answer]
    assert metrics.PROTOCOL_ERRORS.labels(reason)._value.get() == before + 1
    established.close()
    assert established.handler.endings == ["aborted"] and established.handler.messages == []


def test_the_timers(established: Connection) -> None:
    silent = Connection()
    silent.clock.advance(29)
    assert not silent.transport.disconnecting
    silent.clock.advance(2)
    assert silent.transport.disconnecting and silent.answers() == []  # ARTIM: closed without a word
    established.send(echo())
    established.clock.advance(600)  # an operation runs: the network timeout waits
    assert established.answers() == []
    established.association.done()
    established.clock.advance(59)
    established.send(echo(2))
    established.association.done()
    established.clock.advance(59)
    assert established.answers() == []
    established.clock.advance(2)
    assert established.answers() == [pdu.Abort(2, AbortReason.NOT_SPECIFIED)] and established.transport.disconnecting


def test_a_peer_abort_or_close_ends_the_association(established: Connection) -> None:
    established.send(pdu.encode(pdu.Abort(0, 0)))
    assert established.transport.disconnecting and established.answers() == []
    established.close()
    closed = Connection()
    closed.send(associate_rq())
    closed.close()
    assert established.handler.endings == ["aborted"] and closed.handler.endings == ["aborted"]


def test_messages_go_out_in_pdus_the_peer_can_take() -> None:
    connection = Connection()
    connection.send(associate_rq(max_length=1000))
    connection.answers()
    connection.association.send(1, command(CommandField.C_ECHO_RSP, Status=0), b"d" * 2500)
    sizes = []
    data = connection.transport.value()
    while data:
        _, _, length = pdu.HEADER.unpack_from(data)
        sizes.append(length)
        data = data[6 + length :]
    assert max(sizes) <= 1000 and sum(s - 6 for s in sizes[1:]) == 2500
