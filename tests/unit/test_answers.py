"""C-FIND answers encoded by us: what a peer decodes must be what the index held."""

from __future__ import annotations

from io import BytesIO

import pytest
from pynetdicom.dsutils import decode

from fabricatord.dicom.answers import encode

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
