"""The DICOM upper layer's bad inputs from ROBUSTNESS.md, written byte by byte on a raw socket:
the exact answer (A-ASSOCIATE-RJ reason, A-ABORT source and reason, or a close), then O1–O6."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

import pytest

from tests.robustness.conftest import Node
from tests.robustness.wire import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_RELEASE_RP,
    CT_IMAGE_STORAGE,
    P_DATA_TF,
    VERIFICATION,
    Wire,
    associate_rq,
    command,
    context,
    echo_rq,
    p_data,
    pdu,
    pdv,
)

PROVIDER = 2  # A-ABORT source: the service provider (PS3.8 9.3.8)
UNRECOGNIZED_PDU, UNEXPECTED_PDU, INVALID_PARAMETER = 1, 2, 6
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
REFUSED = "fabricatord_associations_refused_total"
TLS_CLIENT_HELLO = bytes.fromhex("160301020001000" + "1fc0303") + bytes(64)


def associated(node: Node, *contexts: bytes) -> Wire:
    wire = Wire(node.daemon.port)
    answer = wire.associate(associate_rq(contexts=list(contexts) or None))
    assert answer.kind == A_ASSOCIATE_AC, answer
    return wire


@pytest.mark.parametrize(
    "payload",
    [b"GET / HTTP/1.1\r\nHost: pacs\r\n\r\n", TLS_CLIENT_HELLO, bytes(range(255, 0, -1))],
    ids=["http", "tls", "garbage"],
)
def test_what_is_not_dicom_is_aborted_at_once(node: Node, counted: Callable[[str], float], payload: bytes) -> None:
    before = counted("unknown_pdu") + counted("pdu_too_long")
    with Wire(node.daemon.port) as wire:
        started = time.monotonic()
        wire.send(payload)
        answer = wire.read()
        assert answer.kind in (A_ABORT, None), answer
        assert wire.closed_within(1.0)
        assert time.monotonic() - started < 1.0
    assert counted("unknown_pdu") + counted("pdu_too_long") > before
    node.check()


def test_a_declared_length_of_2_gib_is_refused_before_anything_is_buffered(
    node: Node, counted: Callable[[str], float]
) -> None:
    before = counted("pdu_too_long")
    rss = node.rss()
    with Wire(node.daemon.port) as wire:
        wire.send(struct.pack(">BBL", 0x01, 0, 2**31) + bytes(60000))
        assert wire.read().abort == (PROVIDER, INVALID_PARAMETER)
        assert wire.closed_within(1.0)
    assert node.rss() - rss < 8 * 2**20
    node.check("pdu_too_long", before)


def test_a_p_data_beyond_the_announced_maximum_is_aborted(node: Node, counted: Callable[[str], float]) -> None:
    before = counted("pdu_too_long")
    with associated(node) as wire:
        wire.send(struct.pack(">BBL", P_DATA_TF, 0, 1048576 + 4096) + bytes(1000))
        assert wire.read().abort == (PROVIDER, INVALID_PARAMETER)
    node.check("pdu_too_long", before)


def test_an_unknown_pdu_type_is_aborted(node: Node, counted: Callable[[str], float]) -> None:
    before = counted("unknown_pdu")
    with Wire(node.daemon.port) as wire:
        wire.send(pdu(0x09, bytes(4)))
        assert wire.read().abort == (PROVIDER, UNRECOGNIZED_PDU)
    node.check("unknown_pdu", before)


def test_a_wrong_protocol_version_is_rejected_1_2_2(node: Node) -> None:
    with Wire(node.daemon.port) as wire:
        assert wire.associate(associate_rq(version=2)).reject == (1, 2, 2)
    node.check()


@pytest.mark.parametrize(
    ("request_pdu", "reject", "reason"),
    [
        (associate_rq(calling=b" " * 16), (1, 1, 3), "calling_ae"),
        (associate_rq(calling=b"ROBUST\x07"), (1, 1, 3), "calling_ae"),
        (associate_rq(calling=b"ROB\\UST"), (1, 1, 3), "calling_ae"),
        (associate_rq(called=b"FABRI\x00CATORD"), (1, 1, 7), "called_ae"),
        (associate_rq(called=b""), (1, 1, 7), "called_ae"),
        (associate_rq(application_context=None), (1, 1, 2), "application_context"),
        (associate_rq(application_context="1.2.840.10008.3.1.1.2"), (1, 1, 2), "application_context"),
    ],
    ids=[
        "blank-calling",
        "bell-in-calling",
        "backslash-in-calling",
        "nul-in-called",
        "blank-called",
        "no-context",
        "wrong-context",
    ],
)
def test_a_request_that_is_not_valid_is_rejected_with_the_standard_reason(
    node: Node, request_pdu: bytes, reject: tuple[int, int, int], reason: str
) -> None:
    before = node.counter(REFUSED, reason=reason)
    with Wire(node.daemon.port) as wire:
        assert wire.associate(request_pdu).reject == reject
        assert wire.closed_within(2.0)
    node.check(reason, before, REFUSED)


@pytest.mark.parametrize(
    ("contexts", "answered"),
    [
        ([context(2, VERIFICATION)], {}),
        ([context(2, VERIFICATION), context(3, VERIFICATION)], {3: 0}),
        ([context(1, VERIFICATION), context(1, CT_IMAGE_STORAGE), context(3, VERIFICATION)], {1: 0, 3: 0}),
    ],
    ids=["even", "even-and-odd", "repeated"],
)
def test_even_or_repeated_context_ids_are_left_unanswered_and_the_rest_works(
    node: Node, counted: Callable[[str], float], contexts: list[bytes], answered: dict[int, int]
) -> None:
    before = counted("bad_context_id")
    with Wire(node.daemon.port) as wire:
        answer = wire.associate(associate_rq(contexts=contexts))
        assert answer.accepted_contexts() == answered
        if answered:
            wire.send(p_data(pdv(max(answered), 3, echo_rq())))
            assert wire.read().kind == P_DATA_TF
        wire.send(pdu(0x05, bytes(4)))
        assert wire.read().kind == A_RELEASE_RP
    node.check("bad_context_id", before)


@pytest.mark.parametrize(
    "first",
    [p_data(pdv(1, 3, echo_rq())), pdu(0x05, bytes(4))],
    ids=["p-data", "a-release-rq"],
)
def test_a_pdu_before_the_association_is_aborted(node: Node, first: bytes) -> None:
    with Wire(node.daemon.port) as wire:
        wire.send(first)
        assert wire.read().kind == A_ABORT
        assert wire.closed_within(2.0)
    node.check()


@pytest.mark.parametrize(
    "data",
    [
        p_data(pdv(7, 3, echo_rq())),
        pdu(P_DATA_TF, struct.pack(">L", 1) + b"\x01"),
        pdu(P_DATA_TF, struct.pack(">LBB", 500, 1, 3) + bytes(10)),
    ],
    ids=["unknown-context", "pdv-shorter-than-2", "pdv-beyond-its-pdu"],
)
def test_a_p_data_that_cannot_be_meant_is_aborted(node: Node, data: bytes) -> None:
    with associated(node) as wire:
        wire.send(data)
        assert wire.read().kind == A_ABORT
        assert wire.closed_within(2.0)
    node.check()


def test_unknown_command_fields_are_aborted_and_never_take_a_slot(node: Node, counted: Callable[[str], float]) -> None:
    """pynetdicom's thread dies on each without an answer and keeps its slot: 25 of them (more
    than max_associations) would lock out everyone after them."""
    before = counted("exception")
    unknown = command(AffectedSOPClassUID=VERIFICATION, CommandField=0x0777, MessageID=1, CommandDataSetType=0x0101)
    for _ in range(25):
        with associated(node) as wire:
            wire.send(p_data(pdv(1, 3, unknown)))
            assert wire.read().abort == (PROVIDER, UNEXPECTED_PDU)
            assert wire.closed_within(2.0)
    assert counted("exception") >= before + 25
    node.check("exception", before)


def test_an_unsolicited_response_is_aborted(node: Node, counted: Callable[[str], float]) -> None:
    before = counted("unsolicited_response")
    response = command(
        AffectedSOPClassUID=VERIFICATION,
        CommandField=0x8030,
        MessageIDBeingRespondedTo=1,
        CommandDataSetType=0x0101,
        Status=0,
    )
    with associated(node) as wire:
        wire.send(p_data(pdv(1, 3, response)))
        assert wire.read().kind == A_ABORT
    node.check("unsolicited_response", before)


def test_a_command_that_never_ends_is_aborted_at_64_kib(node: Node, counted: Callable[[str], float]) -> None:
    before = counted("message_too_large")
    with associated(node) as wire:
        for _ in range(5):
            wire.send(p_data(pdv(1, 1, bytes(16000))))  # command fragments, never the last
        assert wire.read().kind == A_ABORT
    node.check("message_too_large", before)


def test_a_query_identifier_that_never_ends_is_aborted_at_16_mib(node: Node, counted: Callable[[str], float]) -> None:
    before = counted("message_too_large")
    find = command(
        AffectedSOPClassUID=STUDY_ROOT_FIND, CommandField=0x0020, MessageID=1, Priority=0, CommandDataSetType=0
    )
    with associated(node, context(1, STUDY_ROOT_FIND)) as wire:
        wire.send(p_data(pdv(1, 3, find)))
        _send_until_answered(wire, pdv(1, 0, bytes(1 << 20)), 40)
        assert wire.read().kind == A_ABORT
    node.check("message_too_large", before)


def test_a_c_store_dataset_above_max_dataset_size_is_aborted_and_leaves_no_file(
    node: Node, counted: Callable[[str], float]
) -> None:
    """The node under test has `max_dataset_size = "1MiB"`; the part received went to a file in
    data_dir/tmp, which must be gone (O3) and never indexed (O2)."""
    before = counted("message_too_large")
    rows = node.daemon.rows()
    store = command(
        AffectedSOPClassUID=CT_IMAGE_STORAGE,
        CommandField=0x0001,
        MessageID=1,
        Priority=0,
        CommandDataSetType=0,
        AffectedSOPInstanceUID="1.2.826.0.1.3680043.9.7433.99.1",
    )
    with associated(node, context(1, CT_IMAGE_STORAGE)) as wire:
        wire.send(p_data(pdv(1, 3, store)))
        _send_until_answered(wire, pdv(1, 0, bytes(256 * 1024)), 20)
        assert wire.read().kind == A_ABORT
    assert node.daemon.rows() == rows
    node.check("message_too_large", before)


def test_a_silent_connection_is_closed_at_the_acse_timeout(node: Node) -> None:
    with Wire(node.daemon.port) as wire:
        started = time.monotonic()
        assert wire.closed_within(10.0)
        assert 2.5 < time.monotonic() - started < 8.0  # acse_timeout = 3 s
    node.check()


def test_an_idle_association_is_aborted_at_the_network_timeout(node: Node) -> None:
    with associated(node) as wire:
        started = time.monotonic()
        assert wire.read().kind == A_ABORT
        assert 2.5 < time.monotonic() - started < 8.0  # network_timeout = 3 s
    node.check()


def _send_until_answered(wire: Wire, data: bytes, times: int) -> None:
    """Send `data` up to `times` PDUs long; stop early when the node has aborted and closed."""
    for _ in range(times):
        try:
            wire.send(p_data(data))
        except (BrokenPipeError, ConnectionResetError):
            return
        wire.sock.setblocking(False)
        try:
            if wire.sock.recv(1, socket.MSG_PEEK):
                return
        except BlockingIOError:
            pass
        finally:
            wire.sock.setblocking(True)
            wire.sock.settimeout(10)


def test_more_associations_than_allowed_are_rejected_2_3_2_at_once(node: Node) -> None:
    held = [associated(node) for _ in range(20)]  # [dicom] max_associations, the default
    try:
        with Wire(node.daemon.port) as wire:
            started = time.monotonic()
            assert wire.associate(associate_rq()).reject == (2, 3, 2)
            assert time.monotonic() - started < 1.0
    finally:
        for wire in held:
            wire.send(pdu(0x05, bytes(4)))
            assert wire.read().kind == A_RELEASE_RP
            wire.sock.close()
    node.check()


def test_a_presentation_context_item_inside_user_information_is_ignored(node: Node) -> None:
    """Found by tests/fuzz/fuzz_pdu.py: pynetdicom took an AC's context item (0x21, ID 0) in the
    user information of an RQ as a context of the request, and its thread died on the ID."""
    stray = bytes.fromhex("2100000400004000")
    request = associate_rq(contexts=[context(1, VERIFICATION)])
    user = request.rindex(b"\x50\x00")
    length = struct.unpack(">H", request[user + 2 : user + 4])[0] + len(stray)
    request = request[:user] + struct.pack(">BBH", 0x50, 0, length) + request[user + 4 :] + stray
    request = pdu(0x01, request[6:])
    with Wire(node.daemon.port) as wire:
        assert wire.associate(request).accepted_contexts() == {1: 0}
        wire.send(pdu(0x05, bytes(4)))
        assert wire.read().kind == A_RELEASE_RP
    node.check()
