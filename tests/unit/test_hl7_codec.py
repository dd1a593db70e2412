"""The HL7 codec, ACK builder and field mapping, one function at a time."""

from __future__ import annotations

import itertools
from datetime import datetime
from pathlib import Path
from typing import Any

import hl7
import hl7.util
import pytest

from fabricatord.config.schema import Hl7Profile
from fabricatord.hl7.ack import acknowledgment, answer_code, batch_acknowledgment
from fabricatord.hl7.codec import ErrorCondition, Hl7Error, Parsed, decode, header, split
from fabricatord.hl7.mapping import Mapper, choose_profile, parse_datetime, parse_places

IHE_ORM = (
    "MSH|^~\\&|RIS|NORTH|FAB|FAB|20261124||ORM^O01^ORM_O01|C1|P|2.5.1\r"
    "PID|1||P1^^^HOSP^MR~X9^^^OTHER||Doe^John^Q^Jr^Dr||19800101|F|||1 Main St^^Springfield^IL^62701||555-0100\r"
    "PV1|1|O|WARD^12^B|||||D1^Referrer^Rita|||||||||||V77\r"
    "ORC|NW|PO1|FO1||SC||^^^20261124081500^^S\r"
    "OBR|1|PO1|FO1|CTH^CT Head\\T\\Neck^LOCAL^P1^Head protocol^LOCAL||||||||||||R1^Requester^Ron|"
    "|ACC1|RP1|SPS1||||CT|||^^^20261124081500^^S|||||||&Tech&Tina\r"
    "ZDS|1.2.840.99.1^FAB^Application^DICOM\r"
    "ZZZ|ignored"
)
OMI = (
    "MSH|^~\\&|EHR|SOUTH|FAB|FAB|20261124||OMI^O23^OMI_O23|C2|P|2.5\r"
    "PID|1||P2^^^HOSP||Roe^Jane\r"
    "ORC|NW|PO2|FO2||SC\r"
    "TQ1|1||||||20261125090000||A\r"
    "OBR|1|PO2|FO2|MRK^MR Knee^LOCAL\r"
    "IPC|ACC2|RP2|1.2.3.4|SPS2a|MR|MRK1^Knee T1^LOCAL|||MR01\r"
    "IPC|ACC2|RP2|1.2.3.4|SPS2b|MR|MRK2^Knee T2^LOCAL|||MR02"
)


def test_decode_reads_msh_18_before_decoding_and_joins_lf_separated_segments() -> None:
    raw = "MSH|^~\\&|A|B|C|D|2026||ADT^A08|1|P|2.5|||||| 8859/1\nPID|1||X||Müller^Jürgen\n".encode("latin-1")
    raw = raw.replace(b"| 8859/1", b"|8859/1")
    decoded = decode(raw, "iso-8859-1")
    assert decoded.charset.dicom == "ISO_IR 100"
    assert decoded.text.split("\r")[1] == "PID|1||X||Müller^Jürgen"


def test_decode_without_msh_18_takes_utf8_when_valid_else_the_default() -> None:
    assert decode("MSH|^~\\&|A|||||||ADT^A08|1|P|2.5\rPID|||Zoë".encode(), "iso-8859-1").charset.dicom == "ISO_IR 192"
    fallback = decode("MSH|^~\\&|A|||||||ADT^A08|1|P|2.5\rPID|||Zoë".encode("latin-1"), "iso-8859-1")
    assert fallback.text.endswith("Zoë") and fallback.charset.codec == "iso8859-1"


def test_an_unknown_charset_is_a_content_error_at_msh_18() -> None:
    decoded = decode(b"MSH|^~\\&|A|B|C|D|2026||ADT^A08|1|P|2.5||||||KLINGON", "iso-8859-1")
    assert decoded.charset_error is not None
    assert (decoded.charset_error.code, decoded.charset_error.location) == (103, "MSH-18")
    assert decoded.charset_error.acknowledgment == "AE"


def test_split_keeps_every_message_of_a_batch_and_its_header() -> None:
    batch = split("FHS|^~\\&|S\rBHS|^~\\&|S|F|R|G\rMSH|^~\\&|1\rPID|1\rMSH|^~\\&|2\rBTS|2\rFTS|1")
    assert batch.messages == ["MSH|^~\\&|1\rPID|1", "MSH|^~\\&|2"]
    assert batch.batch_header.startswith("BHS") and batch.file_header.startswith("FHS")


def test_a_segment_before_msh_makes_one_message_whose_msh_is_misplaced() -> None:
    frame = split("PID|1||X\rMSH|^~\\&|S|F|R|RF|2026||ADT^A08|C7|P|2.5.1\rPV1|1")
    assert frame.messages == ["PID|1||X\rMSH|^~\\&|S|F|R|RF|2026||ADT^A08|C7|P|2.5.1\rPV1|1"]
    head = header(frame.messages[0])
    assert (head.misplaced, head.control_id, head.sending_application) == (True, "C7", "S")
    assert not header("MSH|^~\\&|S|F|R|RF|2026||ADT^A08|C8|P|2.5.1").misplaced


def test_header_unescapes_and_tolerates_a_truncated_msh() -> None:
    head = header("MSH|^~\\&|A\\F\\B|FAC|R|RF|2026||ORM^O01|X\\S\\1|T|2.3|||AL|NE||8859/1")
    assert (head.sending_application, head.control_id, head.trigger) == ("A|B", "X^1", "O01")
    assert (head.processing_id, head.version, head.accept_ack, head.charset) == ("T", "2.3", "AL", "8859/1")
    assert header("MSH|^~\\&|A").message_type == ""
    assert header("garbage").control_id == ""


def test_parsed_refuses_a_message_without_msh_with_error_100() -> None:
    with pytest.raises(Hl7Error) as caught:
        Parsed("PID|1||X")
    assert (caught.value.code, caught.value.acknowledgment) == (100, "AR")


def test_ack_err_layout_follows_the_version() -> None:
    error = Hl7Error(101, "no accession number", "OBR", 2, 18)
    old = acknowledgment(header(IHE_ORM.replace("2.5.1", "2.3")), "AE", [error], "K1", datetime(2026, 1, 2), "FAB")
    new = acknowledgment(header(IHE_ORM), "AE", [error], "K2", datetime(2026, 1, 2), "FAB")
    assert old.split("\r") == [
        "MSH|^~\\&|FAB|FAB|RIS|NORTH|20260102000000||ACK^O01|K1|P|2.3",
        "MSA|AE|C1|no accession number",
        "ERR|OBR^2^18^101&no accession number&HL70357",
    ]
    assert new.split("\r")[1:] == [
        "MSA|AE|C1",
        "ERR||OBR^2^18|101^Required field missing^HL70357|E||||no accession number",
    ]
    assert new.split("\r")[0].split("|")[8] == "ACK^O01^ACK"


def test_batch_ack_swaps_the_envelope_and_counts_the_acks() -> None:
    reply = batch_acknowledgment(["MSH|a", "MSH|b"], "BHS|^~\\&|S|F|R|G|2026||||B7", "", datetime(2026, 1, 2))
    lines = reply.split("\r")
    assert lines[0].startswith("BHS|^~\\&|R|G|S|F|20260102000000") and lines[0].endswith("|B7")
    assert lines[1:] == ["MSH|a", "MSH|b", "BTS|2"]


def test_the_ihe_profile_reads_an_orm_field_by_field() -> None:
    mapper = Mapper(Parsed(IHE_ORM), Hl7Profile(name="default"))
    patient = mapper.patient()
    assert (patient.patient_id, patient.issuer, patient.name) == ("P1", "HOSP", "Doe^John^Q^Dr^Jr")
    assert (patient.birth_date, patient.sex, patient.phone) == ("19800101", "F", "555-0100")
    assert patient.address == "1 Main St, Springfield, IL, 62701"
    [order] = mapper.orders()
    assert (order.control, order.status, order.placer_order_number, order.filler_order_number) == (
        "NW",
        "SC",
        "PO1",
        "FO1",
    )
    assert (order.referring_physician, order.requesting_physician) == ("Referrer^Rita", "Requester^Ron")
    assert (order.admission_id, order.location) == ("V77", "WARD")
    [item] = order.items
    assert (item.accession_number, item.requested_procedure_id, item.sps_id) == ("ACC1", "RP1", "SPS1")
    assert (item.study_instance_uid, item.modality, item.priority) == ("1.2.840.99.1", "CT", "STAT")
    assert item.start == datetime(2026, 11, 24, 8, 15)
    assert item.procedure_code == ("CTH", "LOCAL", "CT Head&Neck")
    assert item.protocol_code == ("P1", "LOCAL", "Head protocol")
    assert item.performing_physician == "Tech^Tina"


def test_an_omi_makes_one_item_per_ipc_with_tq1_timing() -> None:
    [order] = Mapper(Parsed(OMI), Hl7Profile()).orders()
    assert [(i.sps_id, i.station_ae, i.protocol_code[0]) for i in order.items] == [
        ("SPS2a", "MR01", "MRK1"),
        ("SPS2b", "MR02", "MRK2"),
    ]
    assert {i.start for i in order.items} == {datetime(2026, 11, 25, 9, 0)}
    assert {i.priority for i in order.items} == {"HIGH"}
    assert order.items[0].study_instance_uid == "1.2.3.4"


def test_a_profile_redirects_fields_and_is_chosen_by_sender() -> None:
    legacy = Hl7Profile(
        name="legacy", match={"sending_application": "RIS"}, fields={"accession_number": "ORC-3", "modality": "OBR-4.1"}
    )
    other = Hl7Profile(name="other", match={"sending_facility": "ELSEWHERE"})
    assert choose_profile([other, legacy], header(IHE_ORM)).name == "legacy"
    assert choose_profile([other], header(IHE_ORM)).name == "default"
    [order] = Mapper(Parsed(IHE_ORM), legacy).orders()
    assert (order.items[0].accession_number, order.items[0].modality) == ("FO1", "CTH")


def test_ideographic_and_phonetic_repetitions_become_pn_groups() -> None:
    text = IHE_ORM.replace("Doe^John^Q^Jr^Dr", "Yamada^Tarou^^^^^L^A~山田^太郎^^^^^L^I~やまだ^たろう^^^^^L^P").replace(
        "2.5.1", "2.5.1||||||UNICODE UTF-8"
    )
    assert Mapper(Parsed(text), Hl7Profile()).patient().name == "Yamada^Tarou=山田^太郎=やまだ^たろう"


@pytest.mark.parametrize(
    ("field", "value", "code", "where"),
    [
        ("PID|1||P1^^^HOSP^MR~X9^^^OTHER|", "PID|1|||", 101, "PID-3"),
        ("1.2.840.99.1^FAB", "1.2.x^FAB", 102, "ZDS-1"),
        ("|ACC1|", "|ACCESSION-NUMBER-TOO-LONG|", 102, "OBR-18"),
        ("^^^20261124081500^^S|||", "^^^tomorrow^^S|||", 102, "OBR-27.4"),
    ],
)
def test_content_errors_name_their_field(field: str, value: str, code: int, where: str) -> None:
    text = IHE_ORM.replace("ORC|NW|PO1|FO1||SC||^^^20261124081500^^S", "ORC|NW|PO1|FO1||SC").replace(field, value, 1)
    mapper = Mapper(Parsed(text), Hl7Profile())
    with pytest.raises(Hl7Error) as caught:
        mapper.patient()
        mapper.orders()
    assert (caught.value.code, caught.value.location, caught.value.acknowledgment) == (code, where, "AE")


def test_places_and_datetimes_parse_strictly() -> None:
    assert [(p.segment, p.field, p.component) for p in parse_places("IPC-1, OBR-18.2")] == [
        ("IPC", 1, 0),
        ("OBR", 18, 2),
    ]
    with pytest.raises(ValueError, match="OBR18"):
        parse_places("OBR18")
    assert parse_datetime("202611240815+0100") == datetime(2026, 11, 24, 8, 15)
    assert parse_datetime("20261124") == datetime(2026, 11, 24)
    assert parse_datetime("2026112") is None and parse_datetime("20261340") is None


@pytest.mark.parametrize(
    ("version", "segments", "where"),
    [
        ("2.3", "", "OBR-24"),  # v2.3 has no IPC: the ERR points where such a sender keeps the modality
        ("2.5.1", "", "IPC-5"),  # a version with IPC: the IHE place comes first
        ("2.3", "OBR|1|PO1|FO1|X^Y^LOCAL\r", "OBR-24"),
        ("2.5.1", "OBR|1|PO1|FO1|X^Y^LOCAL\r", "OBR-24"),  # the message has OBR and no IPC
    ],
)
def test_an_error_points_to_a_place_the_message_version_has(version: str, segments: str, where: str) -> None:
    text = f"MSH|^~\\&|RIS|N|FAB|FAB|20261124||ORM^O01|C9|P|{version}\rPID|1||P9\rORC|NW|PO1|FO1||SC\r{segments}"
    place = Mapper(Parsed(text.rstrip("\r")), Hl7Profile()).locate("modality")
    assert place is not None and f"{place.segment}-{place.field}" == where


@pytest.mark.parametrize(
    ("accept", "application", "outcome", "answered"),
    [
        ("", "", "AA", "AA"),  # original mode: the ACK
        ("", "", "AR", "AR"),
        ("AL", "NE", "AA", "CA"),  # enhanced: the commit ACK
        ("AL", "AL", "AE", "CE"),
        ("NE", "AL", "AA", "AA"),  # no commit ACK wanted: the application ACK
        ("NE", "NE", "AA", None),  # nothing wanted
        ("ER", "NE", "AA", None),  # errors only, and this is none
        ("ER", "NE", "AR", "CR"),
        ("SU", "ER", "AE", "AE"),
        ("XX", "NE", "AA", "CA"),  # outside table 0155: as AL
    ],
)
def test_which_acknowledgment_answers_an_outcome(
    accept: str, application: str, outcome: str, answered: str | None
) -> None:
    head = header(f"MSH|^~\\&|RIS|H|FAB|H|20261202||ORM^O01|1|P|2.5.1|||{accept}|{application}\r")
    assert answer_code(head, outcome) == answered


def test_table_0357_codes_decide_ae_or_ar() -> None:
    assert Hl7Error(ErrorCondition.REQUIRED_FIELD_MISSING, "x").acknowledgment == "AE"
    assert Hl7Error(ErrorCondition.APPLICATION_RECORD_LOCKED, "x").acknowledgment == "AR"
    assert ErrorCondition(204) is ErrorCondition.UNKNOWN_KEY_IDENTIFIER


CORPUS = sorted((Path(__file__).parents[1] / "data" / "hl7").glob("*.hl7"))


def _oracle(message: hl7.Message, segment: int, number: int, component: int, sub: int, repetition: int) -> str:
    """What python-hl7's containers hold at that position, unescaped and stripped (MSH-1 and
    MSH-2, the separators, as they stand)."""
    fields = message[segment]
    if number >= len(fields):
        return ""
    path = (repetition, component, sub)
    if str(fields[0]) == "MSH" and number <= 2:
        return str(fields[number]) if path == (1, 1, 1) else ""
    node: Any = fields[number]
    for depth, index in enumerate(path):
        if isinstance(node, str):
            return _clean(message, node) if all(i == 1 for i in path[depth:]) else ""
        if index > len(node):
            return ""
        node = node[index - 1]
    while not isinstance(node, str):
        node = node[0] if node else ""
    return _clean(message, node)


def _clean(message: hl7.Message, value: str) -> str:
    return str(hl7.util.unescape(message, value) if message.esc in value else value).strip()


ODD = [
    "MSH#$%*@#RIS#H#FAB#H#20261202##ORM$O01#7#P#2.4\rPID#1##A1$$$H@X%A2##Doe$Jo*F*hn\r\rOBR#1#P1*T*\r",
    "MSH|^~\\&|RIS|H|FAB|H|20261202||ORM^O01|8|P|2.5.1\rPID|1||^^^&1.2&ISO~||  Doe ^ John  |\r\rZZZ\r",
    "MSH|^~\\&|RIS|H\rNTE|1||a\\E\\b\\H\\c\\N\\d\\X41\\e~f^g&h&i|\r",
]


@pytest.mark.parametrize(
    "text",
    [*CORPUS, *ODD],
    ids=lambda item: item.name if isinstance(item, Path) else f"odd{ODD.index(item)}",
)
def test_field_access_reads_what_python_hl7_parses(text: Path | str) -> None:
    """Every position of every corpus message (and of some odd ones), repetitions, components and
    subcomponents, reads as python-hl7 (which no longer parses our messages) reads it."""
    if isinstance(text, Path):
        text = decode(text.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r"), "ISO_IR 100").text
    ours, theirs = Parsed(text), hl7.parse(text)
    assert len(ours.segments) == len(theirs)
    compared = 0
    for position, segment in enumerate(ours.segments):
        assert segment[0] == str(theirs[position][0])
        for number in range(len(segment) + 1):
            for repetition, component, sub in itertools.product((1, 2, 3), (1, 2, 3, 5), (1, 2)):
                expected = _oracle(theirs, position, number, component, sub, repetition)
                assert ours.value(segment, number, component, sub, repetition) == expected, (segment[0], number)
                compared += bool(expected)
            field = theirs[position][number] if number < len(theirs[position]) else ""
            if not isinstance(field, str):  # a segment without fields is a bare string to python-hl7
                assert ours.repetitions(segment, number) == (len(field) if str(field) else 0)
    assert compared > (30 if len(ours.segments) > 4 else 5)
