"""The walk of a received dataset: what frames is read as pydicom reads it, what does not frame
or passes a limit is refused with the element named, and nothing is decoded on the way."""

from __future__ import annotations

import struct
import zlib
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from fabricatord.dicom.walk import Malformed, WalkLimits, read_received, walk

CT = "1.2.840.10008.5.1.4.1.1.2"
KEEP = frozenset({0x00080016, 0x00080018, 0x00100010, 0x00100020, 0x0020000D, 0x00080005})
ITEM = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
ITEM_END = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
SEQUENCE_END = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)


def instance() -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.9.7433.3.1"
    ds.PatientName = "Müller^Jörg"
    ds.PatientID = "PID-1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.9.7433.3"
    reference = Dataset()
    reference.ReferencedSOPClassUID = CT
    reference.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.9.7433.3.0"
    ds.ReferencedImageSequence = Sequence([reference, Dataset()])
    ds.Rows, ds.Columns, ds.BitsAllocated = 2, 2, 16
    ds.PixelData = bytes(8)
    return ds


def encoded(ds: Dataset, syntax: str) -> bytes:
    uid = UID(syntax)
    buffer = DicomBytesIO()
    buffer.is_little_endian = uid.is_little_endian
    buffer.is_implicit_VR = uid.is_implicit_VR
    write_dataset(buffer, ds)
    data = buffer.getvalue()
    if uid.is_deflated:
        packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = packer.compress(data) + packer.flush()
    return data


def walked(data: bytes, syntax: str = ImplicitVRLittleEndian, limits: WalkLimits | None = None) -> Dataset:
    found = walk(BytesIO(data), UID(syntax), KEEP, limits or WalkLimits())
    ds = Dataset()
    for tag, element in found.elements.items():
        ds[tag] = element
    return ds


@pytest.mark.parametrize(
    "syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]
)
def test_what_frames_is_kept_as_pydicom_reads_it(syntax: str) -> None:
    ds = walked(encoded(instance(), syntax), syntax)
    assert ds.SOPInstanceUID == "1.2.826.0.1.3680043.9.7433.3.1"
    assert str(ds.PatientName) == "Müller^Jörg"
    assert "ReferencedImageSequence" not in ds  # walked, not kept: only what was asked for


def test_a_received_file_is_read_with_its_file_meta(tmp_path: Path) -> None:
    ds = instance()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "in.dcm"
    ds.save_as(path, enforce_file_format=True)
    read = read_received(path, KEEP, WalkLimits())
    reference = dcmread(path, stop_before_pixels=True)
    assert read.file_meta == reference.file_meta
    assert read.SOPInstanceUID == reference.SOPInstanceUID
    assert read.PatientName == reference.PatientName


def test_a_private_sequence_of_undefined_length_is_walked_in_implicit_vr() -> None:
    """No dictionary knows a private tag's VR: items after it make it a sequence, as in pydicom."""
    header = encoded(instance(), ImplicitVRLittleEndian)
    pixel = header.rindex(struct.pack("<HH", 0x7FE0, 0x0010))
    private = struct.pack("<HHL", 0x0009, 0x0010, 4) + b"ACME" + struct.pack("<HHL", 0x0009, 0x1001, 0xFFFFFFFF)
    private += ITEM + struct.pack("<HHL", 0x0010, 0x0020, 2) + b"X1" + ITEM_END + SEQUENCE_END
    data = header[:pixel] + private + header[pixel:]
    found = walk(BytesIO(data), UID(ImplicitVRLittleEndian), KEEP, WalkLimits())
    assert found.depth == 1
    assert found.elements[0x00100020].value == b"PID-1 "  # the top-level one, not the item's


def test_encapsulated_pixel_data_is_walked_fragment_by_fragment() -> None:
    header = encoded(instance(), ExplicitVRLittleEndian)
    header = header[: header.rindex(struct.pack("<HH", 0x7FE0, 0x0010))]
    offsets = struct.pack("<HHL", 0xFFFE, 0xE000, 0)
    fragment = struct.pack("<HHL", 0xFFFE, 0xE000, 4) + b"\xff\xd8\xff\xd9"
    pixels = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + offsets + fragment * 3 + SEQUENCE_END
    found = walk(BytesIO(header + pixels), UID(RLELossless), KEEP, WalkLimits())
    assert found.elements[0x00080018].value.rstrip(b"\0") == b"1.2.826.0.1.3680043.9.7433.3.1"
    with pytest.raises(Malformed, match="ends inside the encapsulated pixel data"):
        walk(BytesIO(header + pixels[:-8]), UID(RLELossless), KEEP, WalkLimits())


def deep(levels: int) -> bytes:
    sequence = struct.pack("<HHL", 0x0008, 0x1140, 0xFFFFFFFF)
    return (sequence + ITEM) * levels + (ITEM_END + SEQUENCE_END) * levels


@pytest.mark.parametrize(
    ("tail", "problem"),
    [
        (struct.pack("<HHL", 0x0010, 0x0030, 0x7FFFFFFF) + b"19", r"\(0010,0030\) declares 2147483647 bytes"),
        (b"\x10\x00\x30", "ends inside an element's header"),
        (deep(10_000), r"nested deeper than 32, at \(0008,1140\)"),
        (struct.pack("<HHL", 0x0008, 0x1140, 0xFFFFFFFF) + ITEM + ITEM_END, "ends inside the sequence"),
        (struct.pack("<HHL", 0x0010, 0x0030, 0xFFFFFFFF), "undefined length, which its VR does not allow"),
        (struct.pack("<HHL", 0x0008, 0x1140, 8) + struct.pack("<HHL", 0x0010, 0x0020, 0), "where an item belongs"),
        (ITEM, "where a data element belongs"),
    ],
    ids=["length-7fffffff", "truncated-header", "10000-deep", "unended-sequence", "undefined-ds", "no-item", "stray"],
)
def test_what_does_not_frame_is_refused_naming_the_element(tail: bytes, problem: str) -> None:
    data = encoded(instance(), ImplicitVRLittleEndian)
    with pytest.raises(Malformed, match=problem):
        walked(data + tail)


def test_a_huge_number_of_items_is_refused_at_the_limit() -> None:
    sequence = struct.pack("<HHL", 0xFFF1, 0x0010, 0xFFFFFFFF) + (ITEM + ITEM_END) * 5_000 + SEQUENCE_END
    data = encoded(instance(), ImplicitVRLittleEndian) + sequence
    assert walked(data, limits=WalkLimits(elements=10_000)).SOPClassUID == CT
    with pytest.raises(Malformed, match="more than 1000 data elements and items"):
        walked(data, limits=WalkLimits(elements=1_000))


def test_a_deflate_bomb_is_refused_once_it_inflates_past_the_limit() -> None:
    ds = instance()
    ds.PixelData = bytes(64 * 2**20)
    ds.BitsAllocated, ds.Rows, ds.Columns = 8, 8192, 8192
    bomb = encoded(ds, DeflatedExplicitVRLittleEndian)
    assert len(bomb) < 128 * 1024
    with pytest.raises(Malformed, match="inflates beyond 1048576 bytes"):
        walked(bomb, DeflatedExplicitVRLittleEndian, WalkLimits(inflated=2**20))
    assert walk(BytesIO(bomb), UID(DeflatedExplicitVRLittleEndian), KEEP, WalkLimits()).count == 15


def test_a_deflated_stream_that_is_not_deflate_is_refused() -> None:
    with pytest.raises(Malformed, match="does not inflate"):
        walked(b"\xff" * 64, DeflatedExplicitVRLittleEndian)


def test_an_un_sequence_of_undefined_length_is_walked_in_implicit_vr() -> None:
    """PS3.5 6.2.2: a UN element of undefined length holds a sequence in implicit VR little endian."""
    items = ITEM + struct.pack("<HHL", 0x0008, 0x1150, 4) + b"1.23" + ITEM_END + SEQUENCE_END
    element = struct.pack("<HH2sHL", 0x0009, 0x1002, b"UN", 0, 0xFFFFFFFF) + items
    data = encoded(instance(), ExplicitVRLittleEndian)
    pixel = data.rindex(struct.pack("<HH", 0x7FE0, 0x0010))
    found = walk(BytesIO(data[:pixel] + element + data[pixel:]), UID(ExplicitVRLittleEndian), KEEP, WalkLimits())
    assert found.depth == 1


def explicit(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (explicit(0x0008, 0x0005, b"US", b"\x01\x00") + explicit(0x0010, 0x0010, b"PN", b"Doe^Jo"), "Doe^Jo"),
        (explicit(0x0008, 0x0005, b"CS", b"AB\x00C") + explicit(0x0010, 0x0010, b"PN", b"Doe^Jo"), "Doe^Jo"),
        (explicit(0x0010, 0x0010, b"LN", b"Doe^Jo"), "Doe^Jo"),
    ],
    ids=["charset-sent-as-us", "charset-with-a-nul", "unknown-vr"],
)
def test_what_the_fuzzer_found_is_read_not_raised_on(data: bytes, name: str) -> None:
    """tests/fuzz/corpus/dataset/found-*: pydicom raised reading each of these kept values; the
    walk keeps them with the dictionary's VR, and drops a character set that names nothing."""
    found = walk(BytesIO(data), UID(ExplicitVRLittleEndian), KEEP, WalkLimits())
    ds = Dataset()
    for tag, element in found.elements.items():
        ds[tag] = element
    assert str(ds.PatientName) == name


def test_a_vr_of_other_bytes_than_letters_is_read_as_implicit_vr() -> None:
    """A writer that switched to implicit VR inside an explicit dataset, as pydicom tolerates;
    bytes such as b"Z\\xa2" passed a range check and broke the decoding of the VR (tests/fuzz)."""
    implicit = struct.pack("<HHL", 0x0010, 0x0020, 4) + b"PID1"
    found = walk(BytesIO(implicit), UID(ExplicitVRLittleEndian), KEEP, WalkLimits())
    assert found.elements[0x00100020].value == b"PID1"
    with pytest.raises(Malformed):
        walk(
            BytesIO(struct.pack("<HH2sH", 0x0010, 0x0020, b"Z\xa2", 4) + b"PID1"),
            UID(ExplicitVRLittleEndian),
            KEEP,
            WalkLimits(),
        )
