"""`-k` as DCMTK reads it, checked as a matching value, and what a query at each level warns of."""

from __future__ import annotations

import pytest

from fabricatord.dicom.keys import BadKey, identifier, level_of, parse_key, query_warnings, selects


@pytest.mark.parametrize(
    "text",
    [
        "StudyDate=20200101-20201231",
        "StudyDate=-20201231",
        "StudyDate=2020*",
        "StudyTime=1200-1300",
        "Modality=CT\\MR",
        "PatientName=Müller*",
        "StudyInstanceUID=1.2.3\\1.2.4",
        "AcquisitionDateTime=20200101-20200202",
        "PatientID=*",
        "(0008,0050)=ACC1",
        "NumberOfFrames=2",
    ],
)
def test_matching_values_pass(text: str) -> None:
    assert parse_key(text).value is not None


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("Modality=ct", "Invalid value for VR CS: 'ct'"),
        ("StudyDate=2020-13", "Invalid value for VR DA"),
        ("StudyInstanceUID=1.2.x", "Invalid value for VR UI"),
        ("AccessionNumber=" + "A" * 17, "exceeds the maximum length of 16"),
        ("Rows=a", "Rows (US) takes numbers"),
        ("ScheduledProcedureStepSequence[1].Modality=CT", "its index is 0"),
        ("PatientName.Modality=CT", "PatientName is not a sequence"),
        ("NoSuchKeyword=1", "'NoSuchKeyword' is not a DICOM keyword"),
    ],
)
def test_a_value_no_archive_could_match_is_refused_saying_why(text: str, said: str) -> None:
    with pytest.raises(BadKey) as refused:
        parse_key(text)
    assert said in str(refused.value) and text.split("=", maxsplit=1)[0] in str(refused.value)


def test_a_non_ascii_value_goes_out_as_utf8_and_says_so() -> None:
    assert identifier("study", [parse_key("PatientName=Müller")]).SpecificCharacterSet == "ISO_IR 192"
    assert "SpecificCharacterSet" not in identifier("study", [parse_key("PatientName=Muller")])


def test_a_sequence_named_again_keeps_the_item_an_earlier_key_made() -> None:
    keys = [parse_key("ScheduledProcedureStepSequence[0].Modality=CT"), parse_key("ScheduledProcedureStepSequence")]
    items = identifier("study", keys).ScheduledProcedureStepSequence
    assert len(items) == 1 and items[0].Modality == "CT"
    assert len(identifier("study", [parse_key("ScheduledProcedureStepSequence")]).ScheduledProcedureStepSequence) == 0


def test_keys_below_the_query_level_and_missing_unique_keys_are_warned_of() -> None:
    assert level_of(parse_key("Modality=CT")) == "series" and level_of(parse_key("SOPClassUID")) == "image"
    assert level_of(parse_key("PatientSex")) == "study"
    (below,) = query_warnings("study", [parse_key("Modality=CT")])
    assert "Modality is a series-level key" in below and "--level series" in below
    assert query_warnings("series", [parse_key("StudyInstanceUID=1.2.3"), parse_key("Modality=CT")]) == []
    (wildcard,) = query_warnings("series", [parse_key("StudyInstanceUID=1.2.*")])
    assert "without -k StudyInstanceUID=UID" in wildcard and "dcmqrscp" in wildcard
    assert len(query_warnings("image", [])) == 2


def test_only_a_real_value_selects() -> None:
    assert not selects([parse_key("PatientID=*"), parse_key("StudyDate"), parse_key("AccessionNumber=")])
    assert selects([parse_key("PatientID=A*")])
