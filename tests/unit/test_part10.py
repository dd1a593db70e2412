from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread, dcmwrite

from fabricatord.dicom.part10 import Part10Encoder, encode_plain
from tests.helpers import study


@pytest.mark.parametrize("transfer_syntax", ["explicit", "implicit", "rle", "jpegls-lossless"])
@pytest.mark.parametrize("modality", ["CT", "MG", "US"])
def test_cached_encoding_is_byte_identical_to_pydicom(modality: str, transfer_syntax: str) -> None:
    encoder = Part10Encoder()
    for ds in study(modality, images=3, transfer_syntax=transfer_syntax):
        ds.preamble = bytes(128)
        reference = BytesIO()
        dcmwrite(reference, ds, enforce_file_format=True)
        assert encoder.encode(ds) == reference.getvalue()


def test_a_changed_shared_element_is_encoded_again() -> None:
    encoder = Part10Encoder()
    first, second = study("CT", images=2)
    encoder.encode(first)
    second.PatientName = "Changed^Name"  # mutates the element object both datasets share
    again = dcmread(BytesIO(encoder.encode(second)))
    assert str(again.PatientName) == "Changed^Name"


def test_preamble_is_always_zero() -> None:
    ds = study("SC", images=1)[0]
    ds.preamble = b"MZ" + b"\x90" * 126  # an executable header a peer slipped in
    for data in (Part10Encoder().encode(ds), encode_plain(ds)):
        assert data[:128] == bytes(128) and data[128:132] == b"DICM"
