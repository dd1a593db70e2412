"""DICOM test data and exchanges the robustness tests share, over the raw client of wire.py."""

from __future__ import annotations

import struct
import zlib

from pydicom.dataset import Dataset

from tests.robustness.wire import (
    A_ASSOCIATE_AC,
    CT_IMAGE_STORAGE,
    Response,
    Wire,
    associate_rq,
    context,
    dataset,
    encode,
    store_rq,
)

DEFLATED_LE = "1.2.840.10008.1.2.1.99"
ROOT = "1.2.826.0.1.3680043.9.7433.70"
STUDY = f"{ROOT}.1"
SERIES = (f"{ROOT}.1.1", f"{ROOT}.1.2")


def instance(uid: str, sop_class: str = CT_IMAGE_STORAGE, series: str = SERIES[0], **values: object) -> Dataset:
    """A small CT instance of STUDY (no pixels unless given), exactly as written: nothing validated."""
    return dataset(
        SOPClassUID=sop_class,
        SOPInstanceUID=uid,
        PatientName="Robust^Rita",
        PatientID="MRN-R1",
        StudyInstanceUID=STUDY,
        SeriesInstanceUID=series,
        Modality="CT",
        **values,
    )


def store(
    wire: Wire, uid: str, data: bytes, sop_class: str = CT_IMAGE_STORAGE, context_id: int = 1, message_id: int = 1
) -> Response:
    """One C-STORE; its response (a closed connection or an abort fails the assertion)."""
    wire.request(context_id, store_rq(sop_class, uid, message_id), data)
    answer = wire.response()
    assert isinstance(answer, Response), answer
    return answer


def associated(port: int, *contexts: bytes) -> Wire:
    """An established association (CT Image Storage unless other contexts are given)."""
    wire = Wire(port)
    answer = wire.associate(associate_rq(contexts=list(contexts) or [context(1, CT_IMAGE_STORAGE)]))
    assert answer.kind == A_ASSOCIATE_AC, answer
    return wire


# Datasets no decoder should trust, in Implicit VR Little Endian unless said otherwise.
ITEM = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
ITEM_END = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
SEQUENCE_END = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
GARBAGE = b"\x08\x00\x16\x00\x99\x99"
LONG_ELEMENT = struct.pack("<HHL", 0x0010, 0x0030, 0x7FFFFFFF) + b"19"
"""Patient's Birth Date declaring 2 GiB, two bytes of it sent."""


def nested(levels: int) -> bytes:
    """(0008,1140) sequences, each the only element of the one item of the one above."""
    sequence = struct.pack("<HHL", 0x0008, 0x1140, 0xFFFFFFFF)
    return (sequence + ITEM) * levels + (ITEM_END + SEQUENCE_END) * levels


def empty_items(count: int) -> bytes:
    """A private sequence of `count` empty items (eight bytes each)."""
    empty = struct.pack("<HHL", 0xFFFE, 0xE000, 0)
    return struct.pack("<HHL", 0x0009, 0x1001, 0xFFFFFFFF) + empty * count + SEQUENCE_END


def deflated(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def deflate_bomb(uid: str, size: int = 64 * 2**20) -> bytes:
    """A Deflated Explicit VR Little Endian instance of `size` zeros of pixel data: about 64 KiB."""
    ds = instance(uid, Rows=8192, Columns=size // 8192, BitsAllocated=8, PixelData=bytes(size))
    return deflated(encode(ds, implicit=False))
