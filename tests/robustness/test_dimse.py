"""The DIMSE bad inputs of ROBUSTNESS.md, written byte by byte on a raw socket: datasets that do
not decode, frame, fit their limits or match their command; duplicates; queries and retrieves
that cannot be answered as asked. Each gets its exact status and Error Comment, leaves no file
and no row, and the oracles O1–O6 hold afterwards."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.integration.conftest import halt
from tests.robustness.conftest import Node, start_node
from tests.robustness.dimse import (
    DEFLATED_LE,
    GARBAGE,
    LONG_ELEMENT,
    ROOT,
    SERIES,
    STUDY,
    associated,
    deflate_bomb,
    empty_items,
    instance,
    nested,
    store,
)
from tests.robustness.wire import (
    CT_IMAGE_STORAGE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    Response,
    command,
    context,
    dataset,
    decode,
    encode,
)

# 40 MiB takes two million empty items (the walk's limit); deflate bombs inflate past it.
DICOM_SETTINGS = 'max_dataset_size = "40MiB"\nmax_find_results = 300\nnetwork_timeout = "5s"\n'
UNREACHABLE_PORT = free_port()
EXTRA_SETTINGS = f'[[peers]]\nname = "gone"\nae_title = "GONE"\nhost = "127.0.0.1"\nport = {UNREACHABLE_PORT}\n'
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
STUDY_FIND, STUDY_MOVE, STUDY_GET = (f"1.2.840.10008.5.1.4.1.2.2.{n}" for n in (1, 2, 3))
MWL_FIND, MPPS = "1.2.840.10008.5.1.4.31", "1.2.840.10008.3.1.2.3.3"
FAILURES = "fabricatord_storage_write_failures_total"


@pytest.fixture(scope="module")
def archive(node: Node) -> Iterator[Node]:
    """320 instances in one study: 250 in one series, 70 in another."""
    with associated(node.daemon.port) as wire:
        for n in range(320):
            uid = f"{ROOT}.1.{1 if n < 250 else 2}.{n}"
            answer = store(
                wire, uid, encode(instance(uid, series=SERIES[n >= 250], InstanceNumber=n)), message_id=n + 1
            )
            assert answer.status == 0x0000, answer.comment
    yield node


UNDECODABLE: list[tuple[bytes, str, str]] = [
    (GARBAGE, IMPLICIT_LE, "ends inside an element's header"),
    (encode(instance(f"{ROOT}.9.2")) + LONG_ELEMENT, IMPLICIT_LE, "declares 2147483647 bytes"),
    (encode(instance(f"{ROOT}.9.3")) + nested(10_000), IMPLICIT_LE, "nested deeper than 32"),
    (
        encode(instance(f"{ROOT}.9.4")) + empty_items(2_000_001),
        IMPLICIT_LE,
        "more than 2000000 data elements and items",
    ),
    (b"\xff" * 4096, DEFLATED_LE, "does not inflate"),
    (deflate_bomb(f"{ROOT}.9.6"), DEFLATED_LE, "inflates beyond 41943040 bytes"),
]


@pytest.mark.parametrize(
    ("data", "syntax", "comment"),
    UNDECODABLE,
    ids=["garbage", "length-7fffffff", "10000-deep", "2-million-items", "not-deflate", "deflate-bomb"],
)
def test_a_dataset_that_does_not_decode_is_refused_c000(node: Node, data: bytes, syntax: str, comment: str) -> None:
    before, rows = node.counter(FAILURES, reason="malformed"), node.daemon.rows()
    with associated(node.daemon.port, context(1, CT_IMAGE_STORAGE, syntax)) as wire:
        answer = store(wire, f"{ROOT}.9.1", data)
    assert answer.status == 0xC000
    assert comment in answer.comment
    assert node.daemon.rows() == rows
    node.check("malformed", before, FAILURES)


MISMATCHES: list[tuple[str, bytes, str]] = [
    (f"{ROOT}.8.1", b"", "SOP Instance UID missing or not a UID"),
    (f"{ROOT}.8.2", encode(instance(f"{ROOT}.8.2", sop_class="")), "SOP Class UID missing or not a UID"),
    ("../../../tmp/x", encode(instance("../../../tmp/x")), "SOP Instance UID missing or not a UID"),
    (f"{ROOT}.8.4", encode(instance(f"{ROOT}.8.5")), "SOP Instance UID differs from the command's"),
    (
        f"{ROOT}.8.6",
        encode(instance(f"{ROOT}.8.6", sop_class=MR_IMAGE_STORAGE)),
        "SOP Class UID differs from the command's",
    ),
]


@pytest.mark.parametrize(
    ("uid", "data", "comment"),
    MISMATCHES,
    ids=["empty-dataset", "no-sop-class", "not-a-uid", "other-instance-uid", "other-sop-class"],
)
def test_a_dataset_that_is_not_what_its_command_says_is_refused_a900(
    node: Node, uid: str, data: bytes, comment: str
) -> None:
    before, rows = node.counter(FAILURES, reason="mismatch"), node.daemon.rows()
    with associated(node.daemon.port) as wire:
        answer = store(wire, uid, data)
    assert (answer.status, answer.comment) == (0xA900, comment)
    assert node.daemon.rows() == rows
    assert not list(Path("/tmp").glob("x*.dcm"))
    node.check("mismatch", before, FAILURES)


@pytest.mark.parametrize("sop_class", [MR_IMAGE_STORAGE, "1.2.840.10008.1.1"], ids=["mr-on-ct", "verification-on-ct"])
def test_a_request_for_another_sop_class_than_its_context_is_refused_a900(
    node: Node, counted: Callable[[str], float], sop_class: str
) -> None:
    """pynetdicom picks the service by the command's SOP Class: it stored an MR image sent on a
    CT context, and a C-STORE naming Verification."""
    before, rows = counted("wrong_context"), node.daemon.rows()
    uid = f"{ROOT}.7.1"
    with associated(node.daemon.port) as wire:
        answer = store(wire, uid, encode(instance(uid, sop_class=sop_class)), sop_class=sop_class)
    assert (answer.status, answer.comment) == (0xA900, "the SOP Class is not the abstract syntax of context 1")
    assert node.daemon.rows() == rows
    node.check("wrong_context", before)


def test_odd_vrs_and_character_sets_the_fuzzer_found_are_stored_not_crashed_on(node: Node) -> None:
    """tests/fuzz/corpus/dataset/found-*: a Specific Character Set sent as US and a Patient's Name
    sent with a VR no standard defines made pydicom raise while the header was read (0xC000
    "cannot store the dataset"); they are kept as sent and indexed."""
    uid = f"{ROOT}.10.1"

    def element(group: int, number: int, vr: bytes, value: bytes) -> bytes:
        value += b"\0" if len(value) % 2 else b""
        return struct.pack("<HH2sH", group, number, vr, len(value)) + value

    data = b"".join(
        [
            element(0x0008, 0x0005, b"US", b"\x01\x00"),
            element(0x0008, 0x0016, b"UI", CT_IMAGE_STORAGE.encode()),
            element(0x0008, 0x0018, b"UI", uid.encode()),
            element(0x0010, 0x0010, b"LN", b"Odd^Otto"),
            element(0x0020, 0x000D, b"UI", STUDY.encode()),
            element(0x0020, 0x000E, b"UI", SERIES[0].encode()),
        ]
    )
    with associated(node.daemon.port, context(1, CT_IMAGE_STORAGE, EXPLICIT_LE)) as wire:
        assert store(wire, uid, data).status == 0x0000
    assert uid in node.daemon.rows()
    node.check()


def test_a_duplicate_is_kept_once_identical_or_not(node: Node) -> None:
    """`duplicates = keep` (the default): the same instance again is success and changes
    nothing; different content under the same SOP Instance UID is success, the first stays."""
    uid = f"{ROOT}.6.1"
    first = encode(instance(uid, InstanceNumber=1))
    with associated(node.daemon.port) as wire:
        assert store(wire, uid, first).status == 0x0000
        path, size = node.daemon.rows()[uid]
        kept = (node.daemon.data_dir / "storage" / path).read_bytes()
        assert store(wire, uid, first, message_id=2).status == 0x0000
        assert store(wire, uid, encode(instance(uid, InstanceNumber=2)), message_id=3).status == 0x0000
    assert node.daemon.rows()[uid] == (path, size)
    assert (node.daemon.data_dir / "storage" / path).read_bytes() == kept
    node.check()


def test_a_duplicate_overwrites_with_the_overwrite_policy(tmp_path: Path) -> None:
    other = start_node(tmp_path, 'duplicates = "overwrite"\n')
    try:
        uid = f"{ROOT}.6.2"
        with associated(other.daemon.port) as wire:
            assert store(wire, uid, encode(instance(uid, InstanceNumber=1))).status == 0x0000
            assert store(wire, uid, encode(instance(uid, InstanceNumber=2)), message_id=2).status == 0x0000
        rows = other.daemon.rows()
        assert list(rows) == [uid]
        stored = (other.daemon.data_dir / "storage" / rows[uid][0]).read_bytes()
        assert encode(instance(uid, InstanceNumber=2)) in stored
        other.check()
    finally:
        halt(other.daemon)


def find(node: Node, identifier: bytes, sop_class: str = STUDY_FIND, cancel_after: int | None = None) -> list[Response]:
    """A C-FIND on its own association: every response, pending ones first. With `cancel_after`,
    a C-CANCEL goes out once that many pending responses came."""
    responses: list[Response] = []
    with associated(node.daemon.port, context(1, sop_class)) as wire:
        wire.request(
            1,
            command(AffectedSOPClassUID=sop_class, CommandField=0x0020, MessageID=7, Priority=0, CommandDataSetType=0),
            identifier,
        )
        while True:
            answer = wire.response()
            assert isinstance(answer, Response), answer
            responses.append(answer)
            if answer.status not in (0xFF00, 0xFF01):
                return responses
            if len(responses) == cancel_after:
                wire.request(1, command(CommandField=0x0FFF, MessageIDBeingRespondedTo=7, CommandDataSetType=0x0101))


def query(level: str, **keys: str) -> bytes:
    return encode(dataset(QueryRetrieveLevel=level, **keys))


def test_a_query_at_a_wrong_level_is_refused_a900(archive: Node) -> None:
    responses = find(archive, query("WARD", StudyInstanceUID=STUDY))
    assert [r.status for r in responses] == [0xA900]
    assert "Query/Retrieve Level 'WARD'" in responses[0].comment
    responses = find(archive, query("PATIENT", PatientID=""))  # Study Root has no PATIENT level
    assert [r.status for r in responses] == [0xA900]
    archive.check()


@pytest.mark.parametrize("sop_class", [STUDY_FIND, MWL_FIND], ids=["c-find", "worklist"])
@pytest.mark.parametrize(
    ("identifier", "comment"),
    [
        (b"\x08\x00\x52\x00\x99\x99", "ends inside an element's header"),
        (query("STUDY") + nested(5_000), "nested deeper than 32"),
    ],
    ids=["garbage", "5000-deep"],
)
def test_an_identifier_that_does_not_decode_is_refused_c000(
    archive: Node, counted: Callable[[str], float], sop_class: str, identifier: bytes, comment: str
) -> None:
    """pydicom read the garbage as an empty identifier, which the worklist answered as a
    universal query; the nested one died of recursion."""
    before = counted("malformed")
    responses = find(archive, identifier, sop_class)
    assert [r.status for r in responses] == [0xC000]
    assert comment in responses[0].comment
    archive.check("malformed", before)


def test_a_key_we_do_not_match_on_is_universal_and_flagged_ff01(archive: Node) -> None:
    responses = find(archive, query("SERIES", StudyInstanceUID=STUDY, SeriesInstanceUID="", InstitutionName="Nowhere"))
    assert [r.status for r in responses] == [0xFF01, 0xFF01, 0x0000]
    answers = [decode(r.data) for r in responses[:-1]]
    assert sorted(a.SeriesInstanceUID for a in answers) == list(SERIES)
    assert all(a.InstitutionName == "" for a in answers)  # a return key we do not hold comes back empty
    archive.check()


def test_more_matches_than_max_find_results_is_refused_a700(archive: Node) -> None:
    responses = find(archive, query("IMAGE", StudyInstanceUID=STUDY, SOPInstanceUID=""))
    assert [(r.status, r.comment) for r in responses] == [(0xA700, "more than 300 matches; narrow the query")]
    archive.check()


def test_a_c_cancel_ends_the_answers_fe00(archive: Node) -> None:
    responses = find(archive, query("IMAGE", SeriesInstanceUID=SERIES[0], SOPInstanceUID=""), cancel_after=1)
    assert responses[-1].status == 0xFE00
    assert len(responses) - 1 < 250
    archive.check()


def retrieve(node: Node, request: bytes, sop_class: str, *contexts: bytes) -> list[Response]:
    responses: list[Response] = []
    with associated(node.daemon.port, context(1, sop_class), *contexts) as wire:
        wire.request(1, request, query("SERIES", StudyInstanceUID=STUDY, SeriesInstanceUID=SERIES[1]))
        while True:
            answer = wire.response()
            assert isinstance(answer, Response), answer
            responses.append(answer)
            if answer.status != 0xFF00:
                return responses


def move_rq(destination: str) -> bytes:
    return command(
        AffectedSOPClassUID=STUDY_MOVE,
        CommandField=0x0021,
        MessageID=1,
        Priority=0,
        CommandDataSetType=0,
        MoveDestination=destination,
    )


def test_a_move_to_an_unknown_ae_is_refused_a801(archive: Node) -> None:
    responses = retrieve(archive, move_rq("NOBODY"), STUDY_MOVE)
    assert [r.status for r in responses] == [0xA801]
    archive.check()


def test_a_move_to_a_destination_that_does_not_answer_fails_every_sub_operation(archive: Node) -> None:
    """pynetdicom answered 0xA801 (unknown) for a known destination it could not reach."""
    responses = retrieve(archive, move_rq("GONE"), STUDY_MOVE)
    final = responses[-1]
    assert [r.status for r in responses] == [0xA702]
    assert (final.command.NumberOfFailedSuboperations, final.command.NumberOfCompletedSuboperations) == (70, 0)
    assert final.comment == "gone did not accept an association"
    assert len(decode(final.data).FailedSOPInstanceUIDList) == 70
    archive.check()


def test_a_get_without_scp_role_selection_is_refused_a702(archive: Node) -> None:
    get = command(AffectedSOPClassUID=STUDY_GET, CommandField=0x0010, MessageID=1, Priority=0, CommandDataSetType=0)
    responses = retrieve(archive, get, STUDY_GET, context(3, CT_IMAGE_STORAGE))  # no SCP/SCU role selection item
    final = responses[-1]
    assert [r.status for r in responses] == [0xA702]
    assert final.comment == "no Storage context with the SCP role was negotiated"
    assert final.command.NumberOfFailedSuboperations == 70
    archive.check()


def test_an_mpps_dataset_that_does_not_decode_is_refused_0110(archive: Node, counted: Callable[[str], float]) -> None:
    before = counted("malformed")
    create = command(
        AffectedSOPClassUID=MPPS,
        CommandField=0x0140,
        MessageID=1,
        CommandDataSetType=0,
        AffectedSOPInstanceUID=f"{ROOT}.5.1",
    )
    with associated(archive.daemon.port, context(1, MPPS, EXPLICIT_LE)) as wire:
        wire.request(1, create, nested(5_000))
        answer = wire.response()
    assert isinstance(answer, Response), answer
    assert (answer.status, answer.comment) == (0x0110, "sequences nested deeper than 32, at (0008,1140)")
    archive.check("malformed", before)
