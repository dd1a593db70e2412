from __future__ import annotations

import re
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import config, dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from fabricatord.config.values import show_size
from fabricatord.db import InstanceIndex, open_database
from fabricatord.dicom.part10 import Part10Encoder
from fabricatord.dicom.storage import (
    INDEXED_TAGS,
    InstanceWriter,
    InvalidInstance,
    OutOfSpace,
    index_entry,
    relative_path,
)
from fabricatord.dicom.walk import WalkLimits, read_received
from tests.helpers import study


def writer_for(url: str, tmp_path: Path, duplicates: str = "keep", layout: str = "study/series") -> InstanceWriter:
    return InstanceWriter(
        InstanceIndex(open_database(url)),
        tmp_path / "storage",
        tmp_path / "tmp",
        layout,
        duplicates,
    )  # type: ignore[arg-type]


def test_layouts_use_only_uids_and_digits() -> None:
    ds = study("CT", images=1)[0]
    study_uid, series_uid, sop_uid = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    assert relative_path(ds, "study/series") == f"{study_uid}/{series_uid}/{sop_uid}.dcm"
    assert relative_path(ds, "flat") == f"{sop_uid}.dcm"
    assert relative_path(ds, "date") == f"2026/11/23/{study_uid}/{series_uid}/{sop_uid}.dcm"
    patient = relative_path(ds, "patient")
    assert patient.startswith("P") and ds.PatientID not in patient and patient.endswith(f"{series_uid}/{sop_uid}.dcm")


@pytest.mark.parametrize("bad", ["../../../../tmp/evil", "1.2.3/4", "1.2.03", "1.2.840." + "1" * 70])
def test_a_uid_that_is_not_a_uid_never_becomes_a_path(bad: str, tmp_path: Path) -> None:
    ds = study("CT", images=1)[0]
    # What a peer can send: pydicom reads it without complaint.
    ds["SOPInstanceUID"] = DataElement(0x00080018, "UI", bad, validation_mode=config.IGNORE)
    with pytest.raises(InvalidInstance, match="SOPInstanceUID"):
        relative_path(ds, "study/series")


def test_write_index_and_read_back(database_url: str, tmp_path: Path) -> None:
    writer = writer_for(database_url, tmp_path)
    datasets = study("CT", images=5)
    results = list(writer.write_many(datasets, "generated"))
    assert [r.outcome for r in results] == ["new"] * 5
    for ds, result in zip(datasets, results, strict=True):
        assert result.path.is_file() and result.path.stat().st_size == result.size
        assert dcmread(result.path).SOPInstanceUID == ds.SOPInstanceUID
    index = InstanceIndex(open_database(database_url))
    summary = index.study_summary(datasets[0].StudyInstanceUID)
    assert summary is not None and (summary.series, summary.instances) == (1, 5)
    assert summary.size == sum(r.size for r in results)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_duplicates_keep_overwrite_identical(database_url: str, tmp_path: Path) -> None:
    keep = writer_for(database_url, tmp_path, "keep")
    ds = study("CT", images=1)[0]
    first = keep.write(ds, "received", "MODALITY")
    assert keep.write(ds, "received").outcome == "identical"
    original = first.path.read_bytes()
    ds.PatientName = "Other^Content"
    assert keep.write(ds, "received").outcome == "kept"
    assert first.path.read_bytes() == original
    overwrite = writer_for(database_url, tmp_path, "overwrite")
    result = overwrite.write(ds, "received")
    assert result.outcome == "overwritten"
    assert str(dcmread(result.path).PatientName) == "Other^Content"
    stored = InstanceIndex(open_database(database_url)).lookup([ds.SOPInstanceUID])[ds.SOPInstanceUID]
    assert stored.size == result.path.stat().st_size
    assert overwrite.write(ds, "received").outcome == "identical"


def test_recovery_settles_intents_and_sweeps_tmp(database_url: str, tmp_path: Path) -> None:
    writer = writer_for(database_url, tmp_path)
    index = InstanceIndex(open_database(database_url))
    ds = study("CT", images=1)[0]
    # What a crash between the rename and the index commit leaves behind:
    orphan = tmp_path / "storage" / relative_path(ds, "study/series")
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"half a story")
    index.add_intents([(ds.SOPInstanceUID, relative_path(ds, "study/series"))])
    (tmp_path / "tmp" / "leftover.part").write_bytes(b"x")
    report = writer.recover()
    assert (report.temporary_files_removed, report.orphans_removed) == (1, 1)
    assert not orphan.exists() and index.intents() == []
    assert writer.write(ds, "generated").outcome == "new"


def test_quota_and_watermark_refuse_without_leaving_anything(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    index = InstanceIndex(open_database(url))
    first, second, third = study("CT", images=3)
    size = len(Part10Encoder().encode(first))
    quota = 2 * size + size // 2
    writer = InstanceWriter(index, tmp_path / "storage", tmp_path / "tmp", quota_bytes=quota)
    assert writer.write(first, "received").outcome == "new"
    assert writer.write(second, "received").outcome == "new"
    used = index.total_size()
    # What the refusal says is true: the bytes used, the quota, what the instance needs.
    needs = len(Part10Encoder().encode(third))
    told = f"storage quota reached: {show_size(used)} of {show_size(quota)} used; needs {show_size(needs)}"
    assert len(told) <= 64  # an Error Comment holds 64 characters
    with pytest.raises(OutOfSpace, match=re.escape(told)):
        writer.write(third, "received")
    # A new writer reads what is used from the index.
    again = InstanceWriter(index, tmp_path / "storage", tmp_path / "tmp", quota_bytes=2 * size + size // 2)
    with pytest.raises(OutOfSpace, match="quota"):
        again.write(third, "received")
    full = InstanceWriter(index, tmp_path / "storage", tmp_path / "tmp", min_free_bytes=2**60)
    with pytest.raises(OutOfSpace, match="watermark"):
        full.write(third, "received")
    assert list((tmp_path / "tmp").iterdir()) == [] and len(index.lookup([third.SOPInstanceUID])) == 0


def test_a_deleted_study_frees_its_quota_and_can_be_stored_again(tmp_path: Path) -> None:
    index = InstanceIndex(open_database(f"sqlite:///{tmp_path / 'd.sqlite'}"))
    first, second = study("CT", images=2)
    size = len(Part10Encoder().encode(first))
    writer = InstanceWriter(index, tmp_path / "storage", tmp_path / "tmp", quota_bytes=2 * size + size // 2)
    assert writer.write(first, "received").outcome == "new"
    assert writer.write(second, "received").outcome == "new"
    stored_bytes = index.total_size()
    deleted = writer.delete_study(first.StudyInstanceUID)
    assert deleted is not None and (deleted.files, deleted.bytes) == (2, stored_bytes)
    assert index.intents() == []  # the deletion's intents settled with it
    assert writer.delete_study(first.StudyInstanceUID) is None
    assert list((tmp_path / "storage").iterdir()) == []  # the folders it left empty are gone
    # The bytes it counted are free again, and its folders are made again, durably.
    assert writer.write(first, "received").outcome == "new"
    assert (tmp_path / "storage" / relative_path(first, "study/series")).is_file()
    assert index.lookup([first.SOPInstanceUID])


def test_received_files_adopted_at_once_share_commits_and_a_duplicate_is_stored_once(
    database_url: str, tmp_path: Path
) -> None:
    """Eight associations' C-STOREs at the same moment, two of them the same instance: every file
    linked and indexed, the duplicate answered as identical, nothing left in tmp."""
    writer = writer_for(database_url, tmp_path)
    datasets = study("CT", images=7)
    datasets.append(datasets[0])
    encoder = Part10Encoder()
    received = []
    for number, ds in enumerate(datasets):
        path = tmp_path / "tmp" / f"received-{number}.dcm"
        path.write_bytes(encoder.encode(ds))
        received.append((path, dcmread(path, stop_before_pixels=True)))
    outcomes: list[str] = []
    start = threading.Barrier(len(received))

    def adopt(path: Path, header: Dataset) -> None:
        start.wait()
        outcomes.append(writer.adopt(path, header, "received", "MODALITY").outcome)

    threads = [threading.Thread(target=adopt, args=pair) for pair in received]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes) == ["identical"] + ["new"] * 7
    index = InstanceIndex(open_database(database_url))
    stored = index.study_instances(datasets[0].StudyInstanceUID)
    assert len(stored) == 7
    for instance in stored:
        assert dcmread(tmp_path / "storage" / instance.path).SOPInstanceUID == instance.sop_instance_uid
    files = list((tmp_path / "storage").rglob("*.dcm"))
    assert len(files) == 7 and list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize(
    ("charset", "name", "description"),
    [
        ("", "Doe^John", "CT HEAD"),
        ("ISO_IR 100", "Müller^Jürgen", "Schädel  "),
        ("ISO_IR 192", "Ωμέγα^Δέλτα=Omega^Delta", "头部 CT"),
        (["ISO 2022 IR 6", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎", "Head"),
        ("ISO_IR 192", "Doe^John\\Roe^Richard", "two names"),
    ],
)
def test_a_received_header_indexes_as_pydicom_reads_it(
    charset: str, name: str, description: str, tmp_path: Path
) -> None:
    """Index text is decoded from the walked bytes, not through pydicom's conversion: the two agree."""
    ds = study("CT", images=1)[0]
    if charset:
        ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.StudyDescription = description
    ds.SeriesNumber = "7 "
    path = tmp_path / "received.dcm"
    path.write_bytes(Part10Encoder().encode(ds))
    walked = read_received(path, INDEXED_TAGS, WalkLimits())
    converted = dcmread(path)
    assert index_entry(walked, "x", 1, "", "received", "AE") == replace(
        index_entry(converted, "x", 1, "", "received", "AE"),
        patient_name=str(converted.PatientName) if "\\" not in name else name,
    )
    assert index_entry(walked, "x", 1, "", "received", "AE").patient_name == name
    assert index_entry(walked, "x", 1, "", "received", "AE").series_number == 7
