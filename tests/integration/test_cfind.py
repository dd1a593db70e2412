"""C-FIND against the index, by DCMTK's findscu and pynetdicom, over loopback."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from tests.conftest import run_cli
from tests.integration.conftest import Daemon, findscu, halt, launch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, dict[str, str]]]:
    """A node holding three studies of two patients, sent by `generate --send` and confirmed by
    C-FIND; the tests of this module only query it, so they share it."""
    folder = tmp_path_factory.mktemp("archive")
    daemon = launch(folder, synth="seed = 42\n", env={"FABRICATORD__DICOM__MAX_FIND_RESULTS": "10"})
    try:
        node = f"FABRICATORD@127.0.0.1:{daemon.port}"
        studies: dict[str, str] = {}
        for name, args in (
            ("ct", ["--modality", "CT", "--images", "3"]),
            ("mr", ["--modality", "MR", "--images", "2", "--patient-id", "PID0000001"]),
            ("cr", ["--modality", "CR", "--rows", "256", "--columns", "200"]),
        ):
            out = run_cli(
                "generate", "--config", str(daemon.config), *args, "--out", str(folder / name), "--send", node
            ).stdout
            assert "Confirmed by C-FIND at FABRICATORD" in out
            studies[name] = re.search(r"Study Instance UID:\s+(\S+)", out).group(1)  # type: ignore[union-attr]
        yield daemon, studies
    finally:
        halt(daemon)


def test_study_level_matching_and_computed_keys(archive: tuple[Daemon, dict[str, str]], tmp_path: Path) -> None:
    daemon, studies = archive
    found = findscu(
        daemon,
        tmp_path,
        "-S",
        "QueryRetrieveLevel=STUDY",
        "PatientID=PID0000001",
        "StudyInstanceUID",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedInstances",
        "NumberOfStudyRelatedSeries",
        "AccessionNumber",
        "PatientName",
        "InstitutionName",
    )
    by_uid = {ds.StudyInstanceUID: ds for ds in found}
    assert set(by_uid) == {studies["ct"], studies["mr"]}
    assert by_uid[studies["ct"]].ModalitiesInStudy == "CT"
    assert by_uid[studies["ct"]].NumberOfStudyRelatedInstances == 3
    assert by_uid[studies["mr"]].NumberOfStudyRelatedSeries == 3
    assert by_uid[studies["mr"]].NumberOfStudyRelatedInstances == 6
    assert all(ds.AccessionNumber.startswith("20") and ds.InstitutionName == "" for ds in found)
    assert all(ds.RetrieveAETitle == "FABRICATORD" for ds in found)


def test_wildcards_ranges_and_lists(archive: tuple[Daemon, dict[str, str]], tmp_path: Path) -> None:
    daemon, studies = archive
    one = findscu(
        daemon,
        tmp_path,
        "-S",
        "QueryRetrieveLevel=STUDY",
        "StudyInstanceUID=" + studies["ct"],
        "PatientName",
        "StudyDate",
        "StudyTime",
    )[0]
    family = str(one.PatientName).split("^")[0]
    # Person names match case-insensitively, with * and ?
    pattern = family[:2].lower() + "*"
    by_name = findscu(daemon, tmp_path, "-S", "QueryRetrieveLevel=STUDY", f"PatientName={pattern}", "StudyInstanceUID")
    assert {studies["ct"], studies["mr"]} <= {ds.StudyInstanceUID for ds in by_name}
    date, time = one.StudyDate, one.StudyTime
    for value, expected in ((f"{date}-", 3), (f"-{date}", 3), ("19000101-19991231", 0), (date, 3)):
        found = findscu(daemon, tmp_path, "-S", "QueryRetrieveLevel=STUDY", f"StudyDate={value}", "StudyInstanceUID")
        assert len(found) == expected, value
    hour = time[:2]
    in_hour = findscu(
        daemon, tmp_path, "-S", "QueryRetrieveLevel=STUDY", f"StudyTime={hour}-{hour}", "StudyInstanceUID"
    )
    assert studies["ct"] in {ds.StudyInstanceUID for ds in in_hour}
    uid_list = "\\".join([studies["ct"], studies["cr"]])
    series = findscu(
        daemon,
        tmp_path,
        "-S",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={uid_list}",
        "SeriesInstanceUID",
        "Modality",
        "NumberOfSeriesRelatedInstances",
    )
    assert sorted(str(ds.Modality) for ds in series) == ["CR", "CT"]
    assert sorted(int(ds.NumberOfSeriesRelatedInstances) for ds in series) == [2, 3]
    by_modality = findscu(
        daemon, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "ModalitiesInStudy=MR\\CR", "StudyInstanceUID"
    )
    assert {ds.StudyInstanceUID for ds in by_modality} == {studies["mr"], studies["cr"]}


def test_patient_root_and_image_level(archive: tuple[Daemon, dict[str, str]], tmp_path: Path) -> None:
    daemon, studies = archive
    patients = findscu(
        daemon,
        tmp_path,
        "-P",
        "QueryRetrieveLevel=PATIENT",
        "PatientID",
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedInstances",
    )
    counts = {
        ds.PatientID: (int(ds.NumberOfPatientRelatedStudies), int(ds.NumberOfPatientRelatedInstances))
        for ds in patients
    }
    assert counts == {"PID0000001": (2, 9), "PID0000002": (1, 2)}
    images = findscu(
        daemon,
        tmp_path,
        "-P",
        "QueryRetrieveLevel=IMAGE",
        "PatientID=PID0000001",
        f"StudyInstanceUID={studies['ct']}",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "InstanceNumber",
    )
    assert sorted(int(ds.InstanceNumber) for ds in images) == [1, 2, 3]


def _find(daemon: Daemon, identifier: Dataset, model: str = "study") -> list[tuple[int, Dataset | None]]:
    from pynetdicom import AE
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        PatientRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelFind,
    )

    sop_class = (
        StudyRootQueryRetrieveInformationModelFind
        if model == "study"
        else (PatientRootQueryRetrieveInformationModelFind)
    )
    ae = AE(ae_title="PACS")
    ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="FABRICATORD")
    assert assoc.is_established
    try:
        return [(int(status.Status), found) for status, found in assoc.send_c_find(identifier, sop_class)]
    finally:
        assoc.release()


def test_statuses_unsupported_keys_too_many_and_bad_levels(archive: tuple[Daemon, dict[str, str]]) -> None:
    daemon, _ = archive
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.InstitutionName = "Somewhere"  # not indexed: universal, flagged
    answers = _find(daemon, query)
    assert [status for status, _ in answers] == [0xFF01] * 3 + [0x0000]
    images = Dataset()
    images.QueryRetrieveLevel = "IMAGE"
    images.SOPInstanceUID = ""
    too_many = _find(daemon, images)
    assert too_many[-1][0] == 0xA700 and len(too_many) == 1
    bad = Dataset()
    bad.QueryRetrieveLevel = "PATIENT"
    bad.PatientID = ""
    refused = _find(daemon, bad, model="study")
    assert refused[0][0] == 0xA900
    from pydicom import config

    config.settings.reading_validation_mode = config.settings.writing_validation_mode = config.IGNORE
    nonsense = Dataset()
    nonsense.QueryRetrieveLevel = "STUDY"
    nonsense.StudyDate = "2020-99"  # what a careless client sends
    assert _find(daemon, nonsense)[0][0] == 0xA900


def test_query_contexts_are_little_endian_and_answers_match_the_syntax(
    archive: tuple[Daemon, dict[str, str]],
) -> None:
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

    daemon, studies = archive
    ae = AE(ae_title="PACS")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, ExplicitVRBigEndian)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="FABRICATORD")
    assert assoc.is_established
    try:
        accepted = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts]
        assert accepted == [ExplicitVRLittleEndian]
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = studies["ct"]
        query.PatientName = ""
        query.NumberOfStudyRelatedInstances = ""
        answers = [found for _, found in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind) if found]
    finally:
        assoc.release()
    assert len(answers) == 1
    assert answers[0].StudyInstanceUID == studies["ct"] and answers[0].NumberOfStudyRelatedInstances == 3
