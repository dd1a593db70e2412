"""DIMSE command sets and message assembly: command sets read and written as pydicom encodes
them, and a message put together from its fragments, within its limits."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom.dsutils import decode

from fabricatord.dicom.ul.dimse import (
    NO_DATASET,
    Assembler,
    CommandField,
    DimseError,
    MessageLimits,
    decode_command,
    encode_command,
    fragments,
)
from fabricatord.dicom.ul.pdu import Pdv

CT = "1.2.840.10008.5.1.4.1.1.2"


def implicit_little(ds: Dataset) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, True
    write_dataset(out, ds)
    return out.getvalue()


def pydicom_bytes(ds: Dataset) -> bytes:
    """A command set as pydicom writes it, Implicit VR Little Endian, group length first."""
    body = implicit_little(ds)
    length = Dataset()
    length.CommandGroupLength = len(body)
    return implicit_little(length) + body


def test_a_command_set_reads_as_pydicom_wrote_it() -> None:
    ds = Dataset()
    ds.AffectedSOPClassUID = CT
    ds.CommandField = 0x8001
    ds.MessageIDBeingRespondedTo = 7
    ds.CommandDataSetType = NO_DATASET
    ds.Status = 0xA900
    ds.OffendingElement = [0x00080018, 0x00100010]
    ds.ErrorComment = "the SOP Class is not the abstract syntax"
    ds.AffectedSOPInstanceUID = "1.2.3.4"
    command = decode_command(pydicom_bytes(ds))
    assert command == {
        "CommandGroupLength": len(pydicom_bytes(ds)) - 12,
        "AffectedSOPClassUID": CT,
        "CommandField": 0x8001,
        "MessageIDBeingRespondedTo": 7,
        "CommandDataSetType": NO_DATASET,
        "Status": 0xA900,
        "OffendingElement": [(0x0008, 0x0018), (0x0010, 0x0010)],
        "ErrorComment": "the SOP Class is not the abstract syntax",
        "AffectedSOPInstanceUID": "1.2.3.4",
    }
    assert encode_command(command) == pydicom_bytes(ds)


def test_a_pending_find_response_reads_back_in_pydicom() -> None:
    fields = {
        "AffectedSOPClassUID": "1.2.840.10008.5.1.4.31",
        "CommandField": CommandField.C_FIND_RSP,
        "MessageIDBeingRespondedTo": 7,
        "CommandDataSetType": 0x0001,
        "Status": 0xFF01,
    }
    encoded = encode_command(fields)
    command = decode(BytesIO(encoded), True, True)
    assert command.CommandGroupLength == len(encoded) - 12
    assert command.AffectedSOPClassUID == "1.2.840.10008.5.1.4.31"
    assert (command.CommandField, command.MessageIDBeingRespondedTo) == (0x8020, 7)
    assert (command.CommandDataSetType, command.Status) == (0x0001, 0xFF01)


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (b"\x00\x00\x00\x01\x02\x00", "header cut short"),
        (b"\x08\x00\x18\x00\x00\x00\x00\x00", "holds group 0000 only"),
        (b"\x00\x00\x00\x09\x04\x00\x00\x00\x00\x00\x00\x00", "is US but 4 bytes long"),
        (b"\x00\x00\x10\x01\x08\x00\x00\x00\x01\x00", "overruns"),
        (b"\x00\x00\x10\x01\x02\x00\x00\x00\x01\x00", "without Command Field"),
    ],
)
def test_a_command_set_that_does_not_read_says_why(data: bytes, said: str) -> None:
    with pytest.raises(DimseError) as error:
        decode_command(data)
    assert said in str(error.value)


def store_request(message_id: int = 1) -> bytes:
    return encode_command(
        {
            "AffectedSOPClassUID": CT,
            "CommandField": CommandField.C_STORE_RQ,
            "MessageID": message_id,
            "Priority": 0,
            "CommandDataSetType": 0x0000,
            "AffectedSOPInstanceUID": "1.2.3",
        }
    )


def values(command: bytes, dataset: bytes | None, max_pdu: int, context_id: int = 1) -> list[Pdv]:
    return [Pdv(context_id, control, bytes(piece)) for control, piece in fragments(command, dataset, max_pdu)]


def test_fragments_fit_the_pdu_and_mark_the_last_of_each_part() -> None:
    pieces = values(b"c" * 10, b"d" * 25, 16)
    assert [(p.control, len(p.data)) for p in pieces] == [(3, 10), (0, 10), (0, 10), (2, 5)]
    assert [(p.control, len(p.data)) for p in values(b"c" * 10, b"", 0)] == [(3, 10), (2, 0)]


class FileSink:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("wb")

    def write(self, data: memoryview) -> None:
        self.file.write(data)

    def close(self) -> Path:
        self.file.close()
        return self.path

    def discard(self) -> None:
        self.file.close()
        self.path.unlink()


def test_a_message_comes_whole_from_its_fragments_in_memory_or_in_a_sink(tmp_path: Path) -> None:
    in_memory = Assembler()
    pieces = values(store_request(), b"x" * 100, 40)
    assert [in_memory.feed(p) for p in pieces[:-1]] == [None] * (len(pieces) - 1)
    message = in_memory.feed(pieces[-1])
    assert message is not None and message.dataset == b"x" * 100 and message.field == CommandField.C_STORE_RQ
    assert message.has_dataset and message.command["AffectedSOPInstanceUID"] == "1.2.3"

    to_file = Assembler(sink_for=lambda _context, _command: (FileSink(tmp_path / "in"), 1000))
    for piece in values(store_request(2), b"y" * 100, 40):
        message = to_file.feed(piece)
    assert message is not None and message.dataset is None and message.stored == tmp_path / "in"
    assert (tmp_path / "in").read_bytes() == b"y" * 100
    echo = encode_command({"AffectedSOPClassUID": "1.2.840.10008.1.1", "CommandField": 0x30, "MessageID": 3,
                           "CommandDataSetType": NO_DATASET})  # fmt: skip
    (only,) = values(echo, None, 0)
    answer = to_file.feed(only)
    assert answer is not None and not answer.has_dataset and answer.command["MessageID"] == 3


def test_limits_and_order_are_kept_and_an_unfinished_dataset_is_removed(tmp_path: Path) -> None:
    small = Assembler(MessageLimits(command=64, in_memory=50))
    with pytest.raises(DimseError, match="command set over 64 bytes") as error:
        for piece in values(store_request() + b"\x00" * 64, None, 40):
            small.feed(piece)
    assert error.value.reason == "message_too_large"
    over = Assembler(MessageLimits(in_memory=50))
    with pytest.raises(DimseError, match="dataset over 50 bytes"):
        for piece in values(store_request(), b"z" * 60, 30):
            over.feed(piece)
    with pytest.raises(DimseError, match="before its command set"):
        Assembler().feed(Pdv(1, 0x02, b"data"))
    mixed = Assembler()
    first = values(store_request(), b"a" * 10, 0)
    mixed.feed(first[0])
    with pytest.raises(DimseError, match="on context 3 inside a message on context 1"):
        mixed.feed(Pdv(3, 0x02, b"a" * 10))
    again = Assembler()
    again.feed(first[0])
    with pytest.raises(DimseError, match="after the command set was complete"):
        again.feed(first[0])
    partial = Assembler(sink_for=lambda _context, _command: (FileSink(tmp_path / "part"), 1000))
    for piece in values(store_request(), b"p" * 100, 40)[:-1]:
        partial.feed(piece)
    assert (tmp_path / "part").exists()
    partial.discard()
    assert not (tmp_path / "part").exists()
