from __future__ import annotations

from types import SimpleNamespace

from pydicom.dataset import Dataset

from fabricatord.servers.dicom import _mismatch

CT = "1.2.840.10008.5.1.4.1.1.2"


def dataset(sop_class: str, sop_instance: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    return ds


def test_the_dataset_must_be_what_the_command_announced() -> None:
    request = SimpleNamespace(AffectedSOPClassUID=CT, AffectedSOPInstanceUID="1.2.3")
    assert _mismatch(request, dataset(CT, "1.2.3")) == ""
    assert _mismatch(request, dataset(CT, "1.2.4")) == "SOP Instance UID differs from the command's"
    assert (
        _mismatch(request, dataset("1.2.840.10008.5.1.4.1.1.7", "1.2.3")) == "SOP Class UID differs from the command's"
    )
    assert _mismatch(request, Dataset()) == "SOP Instance UID missing or not a UID"
