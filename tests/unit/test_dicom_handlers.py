from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info

from fabricatord import IMPLEMENTATION_CLASS_UID
from fabricatord.servers.dicom.node import outcome
from fabricatord.servers.dicom.retrieve import Progress
from fabricatord.servers.dicom.store import _check_match, _Mismatch, file_meta

CT = "1.2.840.10008.5.1.4.1.1.2"


def dataset(sop_class: str, sop_instance: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    return ds


@pytest.mark.parametrize(
    ("ds", "problem"),
    [
        (dataset(CT, "1.2.4"), "SOP Instance UID differs from the command's"),
        (dataset("1.2.840.10008.5.1.4.1.1.7", "1.2.3"), "SOP Class UID differs from the command's"),
        (Dataset(), "SOP Instance UID missing or not a UID"),
        (dataset("", "1.2.3"), "SOP Class UID missing or not a UID"),
    ],
)
def test_the_dataset_must_be_what_the_command_announced(ds: Dataset, problem: str) -> None:
    command = {"AffectedSOPClassUID": CT, "AffectedSOPInstanceUID": "1.2.3"}
    _check_match(command, dataset(CT, "1.2.3"))
    with pytest.raises(_Mismatch, match=problem):
        _check_match(command, ds)


def test_a_received_file_starts_with_a_file_meta_pydicom_reads(tmp_path: Path) -> None:
    path = tmp_path / "received.dcm"
    path.write_bytes(
        file_meta(CT, "1.2.3", "1.2.840.10008.1.2.1") + b"\x08\x00\x16\x00UI\x1a\x00" + CT.encode() + b"\x00"
    )
    meta = read_file_meta_info(path)
    assert meta.MediaStorageSOPClassUID == CT and meta.MediaStorageSOPInstanceUID == "1.2.3"
    assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert dcmread(path).SOPClassUID == CT


@pytest.mark.parametrize(
    ("completed", "warnings", "failed", "status"),
    [(3, 0, 0, 0x0000), (2, 1, 0, 0xB000), (1, 0, 2, 0xB000), (0, 0, 3, 0xA702), (0, 0, 0, 0x0000)],
)
def test_a_retrieve_ends_as_ps3_4_says(completed: int, warnings: int, failed: int, status: int) -> None:
    progress = Progress(completed + warnings + failed, completed, warnings, [f"1.2.{n}" for n in range(failed)])
    final = progress.final((True, True, False))
    assert final.status == status
    assert (
        final.fields["NumberOfFailedSuboperations"] == failed and final.fields["NumberOfRemainingSuboperations"] is None
    )
    assert (final.identifier is not None) == bool(failed)
    cancelled = Progress(5, 1).final((True, True, False), cancelled_at=1)
    assert cancelled.status == 0xFE00 and cancelled.fields["NumberOfRemainingSuboperations"] == 4


@pytest.mark.parametrize(
    ("status", "refused", "counted"),
    [
        (0x0000, False, "success"),
        (0xB000, False, "success"),  # a C-MOVE with failed sub-operations was still performed
        (0x0107, False, "success"),
        (0xFE00, False, "cancel"),
        (0xA702, False, "failure"),
        (0xC000, False, "failure"),
        (0x0211, False, "failure"),  # refused before any service ran: counted too
        (0x0124, True, "refused"),
        (0xA801, True, "refused"),  # a C-MOVE a [[peers]] permission denies
    ],
)
def test_a_final_response_is_counted_by_its_status(status: int, refused: bool, counted: str) -> None:
    assert outcome(status, refused) == counted
