"""PS3.15 Annex E de-identification: what leaves, what is replaced and with what, per option."""

from __future__ import annotations

from pydicom.dataset import Dataset

from fabricatord.dicom.deid import Deidentifier, Options
from tests.helpers import study

KEY = bytes(range(32))


def values(ds: Dataset) -> set[str]:
    """Every text value anywhere in the dataset, sequences included."""
    found: set[str] = set()
    for element in ds.iterall():
        if element.VR in ("OB", "OW", "OF", "OD", "UN", "SQ") or element.value is None:
            continue
        for value in element.value if element.VM > 1 else [element.value]:
            found.add(str(value))
    return found


def test_the_basic_profile_leaves_no_identifying_value_and_marks_what_it_did() -> None:
    ds = study("CT", images=1)[0]
    originals = {
        str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber, ds.StudyInstanceUID,
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.StudyDate, str(ds.InstitutionName), ds.StudyDescription,
    }  # fmt: skip
    changes = Deidentifier(KEY, Options()).apply(ds)
    assert not originals & values(ds)
    assert ds.PatientIdentityRemoved == "YES"
    assert [item.CodeValue for item in ds.DeidentificationMethodCodeSequence] == ["113100"]
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert {change.path for change in changes} >= {"00100010", "00100020", "0020000D", "00080018"}
    assert all(change.original for change in changes)  # each kept as DICOM JSON


def test_replacements_are_the_same_across_a_study_and_on_every_resend() -> None:
    first, second = study("CT", images=2)
    again = study("CT", images=2)[0]
    deid = Deidentifier(KEY, Options())
    for ds in (first, second, again):
        deid.apply(ds)
    assert first.StudyInstanceUID == second.StudyInstanceUID == again.StudyInstanceUID
    assert first.SOPInstanceUID == again.SOPInstanceUID != second.SOPInstanceUID
    assert first.PatientID == second.PatientID
    other = study("CT", images=1)[0]
    Deidentifier(bytes(32), Options()).apply(other)  # another key: other replacements
    assert other.StudyInstanceUID != first.StudyInstanceUID


def test_options_keep_what_they_name_and_say_so() -> None:
    ds = study("CT", images=1)[0]
    uid, date, description = ds.StudyInstanceUID, ds.StudyDate, ds.StudyDescription
    options = Options(retain_uids=True, dates="keep", retain_device_identity=True, clean_descriptors=True)
    Deidentifier(KEY, options).apply(ds)
    assert (ds.StudyInstanceUID, ds.StudyDate, ds.StudyDescription) == (uid, date, description)
    assert ds.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert [item.CodeValue for item in ds.DeidentificationMethodCodeSequence] == [
        "113100", "113110", "113106", "113109", "113105",
    ]  # fmt: skip
    shifted = study("CT", images=1)[0]
    Deidentifier(KEY, Options(dates="shift")).apply(shifted)
    assert shifted.StudyDate < date and shifted.LongitudinalTemporalInformationModified == "MODIFIED"
    assert "113107" in [item.CodeValue for item in shifted.DeidentificationMethodCodeSequence]


def test_inside_sequences_names_privates_and_every_instance_uid_go_too() -> None:
    ds = study("CT", images=1)[0]
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5"
    item.PatientName = "Hidden^Name"
    item.add_new(0x00090010, "LO", "ACME")
    item.add_new(0x00091001, "LO", "secret")
    ds.ReferencedImageSequence = [item]
    ds.ConcatenationUID = "1.2.3.4.6"
    ds.add_new(0x00209161, "UI", "1.2.3.4.6")
    ds.PatientBirthTime = "101010"
    ds.add_new(0x0020930E, "UI", "1.2.3.4.7")  # a UID the profile's table may not name: replaced too
    Deidentifier(KEY, Options(dates="shift")).apply(ds)
    nested = ds.ReferencedImageSequence[0]
    assert nested.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # a class: kept
    assert nested.ReferencedSOPInstanceUID != "1.2.3.4.5"
    assert not nested.get("PatientName")
    assert not [e for e in nested if e.tag.is_private]
    assert not {"1.2.3.4.5", "1.2.3.4.6", "1.2.3.4.7", "Hidden^Name", "secret", "101010"} & values(ds)


def test_clean_descriptors_masks_identifying_values_in_descriptions() -> None:
    ds = study("CT", images=1)[0]
    surname = str(ds.PatientName).split("^")[0]
    ds.StudyDescription = f"CT CHEST for {surname} {ds.PatientID}"
    Deidentifier(KEY, Options(clean_descriptors=True)).apply(ds)
    assert ds.StudyDescription.startswith("CT CHEST for ")
    assert surname not in ds.StudyDescription and "PID0000001" not in ds.StudyDescription


def test_query_keys_carry_nothing_that_could_identify() -> None:
    deid = Deidentifier(KEY, Options(dates="shift"))
    query = Dataset()
    query.QueryRetrieveLevel, query.PatientID, query.StudyInstanceUID = "STUDY", "PID0000001", ""
    query.add_new(0x00091001, "LO", "secret")
    keys = deid.query_keys(query)
    assert keys is not None and keys.PatientID != "PID0000001" and not [e for e in keys if e.tag.is_private]
    other = Dataset()
    other.QueryRetrieveLevel = "STUDY"
    id_item = Dataset()
    id_item.PatientID = "MRN-REAL"
    other.OtherPatientIDsSequence = [id_item]
    assert deid.query_keys(other) is None  # a value nothing de-identified holds: no match, nothing asked
