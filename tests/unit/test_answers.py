"""C-FIND answers encoded by us: what a peer decodes must be what the index held."""

from __future__ import annotations

from io import BytesIO

import pytest
from pynetdicom.dsutils import decode

from fabricatord.dicom.answers import encode, find_response_command, fragments

PAIRS = [
    ("QueryRetrieveLevel", "STUDY"),
    ("PatientName", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    ("PatientID", "P1"),
    ("StudyInstanceUID", "1.2.3"),  # odd length: padded with NUL
    ("NumberOfStudyRelatedInstances", 12),
    ("ModalitiesInStudy", ["CT", "MR"]),
    ("PatientWeight", None),
    ("ReferencedStudySequence", []),
    (
        "ScheduledProcedureStepSequence",
        [
            [
                ("ScheduledStationAETitle", "CT01"),
                ("Modality", "CT"),
                (
                    "ScheduledProtocolCodeSequence",
                    [[("CodeValue", "X1"), ("CodingSchemeDesignator", "99L"), ("CodeMeaning", "Kopf")]],
                ),
            ]
        ],
    ),
]


@pytest.mark.parametrize("implicit", [True, False])
def test_round_trip(implicit: bool) -> None:
    answer = decode(BytesIO(encode(PAIRS, implicit)), implicit, True)
    assert answer.SpecificCharacterSet == "ISO_IR 192"
    assert str(answer.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert answer.StudyInstanceUID == "1.2.3"
    assert answer.NumberOfStudyRelatedInstances == 12
    assert list(answer.ModalitiesInStudy) == ["CT", "MR"]
    assert "PatientWeight" in answer and answer.PatientWeight is None
    assert len(answer.ReferencedStudySequence) == 0
    step = answer.ScheduledProcedureStepSequence[0]
    assert (step.Modality, step.ScheduledStationAETitle) == ("CT", "CT01")
    assert step.ScheduledProtocolCodeSequence[0].CodeMeaning == "Kopf"
    assert [element.tag for element in step] == sorted(element.tag for element in step)


def test_ascii_answers_name_no_character_set() -> None:
    answer = decode(BytesIO(encode([("PatientID", "P1")], implicit=True)), True, True)
    assert "SpecificCharacterSet" not in answer and answer.PatientID == "P1"


def test_pending_response_command_set() -> None:
    command = decode(BytesIO(find_response_command("1.2.840.10008.5.1.4.31", 7, 0xFF01)), True, True)
    assert command.CommandGroupLength == len(find_response_command("1.2.840.10008.5.1.4.31", 7, 0xFF01)) - 12
    assert command.AffectedSOPClassUID == "1.2.840.10008.5.1.4.31"
    assert (command.CommandField, command.MessageIDBeingRespondedTo) == (0x8020, 7)
    assert (command.CommandDataSetType, command.Status) == (0x0001, 0xFF01)


def test_fragments_fit_the_peers_pdu_and_say_which_is_last() -> None:
    command, identifier = b"C" * 30, b"D" * 25
    values = fragments(command, identifier, max_pdu=16)  # 10 bytes per fragment
    assert [v[0] for v in values] == [1, 1, 3, 0, 0, 2]
    assert b"".join(v[1:] for v in values[:3]) == command and b"".join(v[1:] for v in values[3:]) == identifier
    assert all(len(v) - 1 <= 10 for v in values)
    assert [v[0] for v in fragments(command, identifier, max_pdu=0)] == [3, 2]
