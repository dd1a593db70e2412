from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset

from fabricatord.servers.dicom import _check_match, _Mismatch

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
    request = SimpleNamespace(AffectedSOPClassUID=CT, AffectedSOPInstanceUID="1.2.3")
    _check_match(request, dataset(CT, "1.2.3"))
    with pytest.raises(_Mismatch, match=problem):
        _check_match(request, ds)
