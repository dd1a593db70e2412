"""A raw DICOM upper-layer client: writes exactly the bytes a test asks for (well-formed or not)
and reads back what the peer answered, without any toolkit smoothing either side."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from io import BytesIO
from typing import Self

from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF = 0x01, 0x02, 0x03, 0x04
A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x05, 0x06, 0x07


def pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBL", kind, 0, len(body)) + body


def item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def uid(value: str) -> bytes:
    """A UID as the upper layer carries it: no padding (PS3.8 9.3.2.2)."""
    return value.encode("ascii")


def context(context_id: int, abstract: str, *syntaxes: str) -> bytes:
    sub_items = item(0x30, uid(abstract)) + b"".join(item(0x40, uid(s)) for s in syntaxes or (IMPLICIT_LE,))
    return item(0x20, bytes([context_id, 0, 0, 0]) + sub_items)


def associate_rq(
    called: bytes = b"FABRICATORD",
    calling: bytes = b"ROBUST",
    *,
    version: int = 1,
    application_context: str | None = APPLICATION_CONTEXT,
    contexts: list[bytes] | None = None,
    max_length: int = 16384,
) -> bytes:
    """An A-ASSOCIATE-RQ; every field a test may want wrong is a parameter."""
    header = struct.pack(">HH", version, 0) + called.ljust(16)[:16] + calling.ljust(16)[:16] + bytes(32)
    variable = item(0x10, uid(application_context)) if application_context is not None else b""
    variable += b"".join(contexts if contexts is not None else [context(1, VERIFICATION)])
    user = item(0x51, struct.pack(">L", max_length)) + item(0x52, uid("1.2.826.0.1.3680043.9.7433.1"))
    return pdu(A_ASSOCIATE_RQ, header + variable + item(0x50, user))


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    """One presentation data value item: control bit 0 = command, bit 1 = last fragment."""
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def p_data(*values: bytes) -> bytes:
    return pdu(P_DATA_TF, b"".join(values))


def dataset(**elements: object) -> Dataset:
    """A dataset from keyword=value, as given: a raw client validates nothing it sends."""
    ds = Dataset()
    for keyword, value in elements.items():
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        ds[tag] = DataElement(tag, dictionary_VR(tag), value, validation_mode=config.IGNORE)
    return ds


def command(**elements: object) -> bytes:
    """A command set in Implicit VR Little Endian with its group length, from keyword=value."""
    encoded = encode(dataset(**elements))
    return struct.pack("<HHLL", 0, 0, 4, len(encoded)) + encoded


def encode(ds: Dataset, implicit: bool = True) -> bytes:
    """A dataset as a peer puts it on the wire: Implicit or Explicit VR Little Endian, no meta."""
    buffer = BytesIO()
    fp = DicomFileLike(buffer)
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return buffer.getvalue()


def decode(data: bytes) -> Dataset:
    """A command set or an Implicit VR Little Endian dataset read back."""
    return read_dataset(BytesIO(data), is_implicit_VR=True, is_little_endian=True)


def store_rq(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    return command(
        AffectedSOPClassUID=sop_class,
        CommandField=0x0001,
        MessageID=message_id,
        Priority=0,
        CommandDataSetType=0,
        AffectedSOPInstanceUID=sop_instance,
    )


def echo_rq(message_id: int = 1) -> bytes:
    return command(
        AffectedSOPClassUID=VERIFICATION, CommandField=0x0030, MessageID=message_id, CommandDataSetType=0x0101
    )


@dataclass
class Response:
    """One DIMSE message the peer sent: its command set and the encoded dataset, if any."""

    command: Dataset
    data: bytes = b""

    @property
    def status(self) -> int:
        return int(self.command.Status)

    @property
    def comment(self) -> str:
        return str(self.command.get("ErrorComment", ""))


@dataclass
class Answer:
    """What the peer sent back: one PDU, or nothing before it closed."""

    kind: int | None
    body: bytes = b""

    @property
    def reject(self) -> tuple[int, int, int]:
        """(result, source, reason) of an A-ASSOCIATE-RJ."""
        assert self.kind == A_ASSOCIATE_RJ, f"expected A-ASSOCIATE-RJ, got {self}"
        return self.body[1], self.body[2], self.body[3]

    @property
    def abort(self) -> tuple[int, int]:
        """(source, reason) of an A-ABORT."""
        assert self.kind == A_ABORT, f"expected A-ABORT, got {self}"
        return self.body[2], self.body[3]

    def accepted_contexts(self) -> dict[int, int]:
        """Context ID → result of the presentation context items of an A-ASSOCIATE-AC."""
        assert self.kind == A_ASSOCIATE_AC, f"expected A-ASSOCIATE-AC, got {self}"
        results, offset = {}, 68
        while offset + 4 <= len(self.body):
            kind, length = self.body[offset], struct.unpack(">H", self.body[offset + 2 : offset + 4])[0]
            if kind == 0x21:
                results[self.body[offset + 4]] = self.body[offset + 6]
            offset += 4 + length
        return results

    def __repr__(self) -> str:
        names = {1: "A-ASSOCIATE-RQ", 2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 4: "P-DATA-TF", 5: "A-RELEASE-RQ"}
        names |= {6: "A-RELEASE-RP", 7: "A-ABORT", None: "closed"}  # type: ignore[dict-item]
        return f"<{names.get(self.kind, hex(self.kind or 0))} {self.body[:16].hex()}>"


class Connection:
    """One TCP connection to a listener of the daemon on loopback."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def closed_within(self, seconds: float) -> bool:
        """True if the listener closes the connection (after anything it sent) within `seconds`."""
        self.sock.settimeout(seconds)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            pass
        return True


class Wire(Connection):
    """One TCP connection to a DICOM node."""

    def read(self) -> Answer:
        """The next PDU, or `Answer(None)` if the peer closed (or reset) first."""
        try:
            header = self._exactly(6)
            if header is None:
                return Answer(None)
            kind, _, length = struct.unpack(">BBL", header)
            body = self._exactly(length)
            return Answer(kind, body or b"")
        except ConnectionResetError:
            return Answer(None)

    def request(self, context_id: int, command_set: bytes, dataset: bytes | None = None, fragment: int = 65536) -> None:
        """A DIMSE request: the command, then the dataset (empty allowed) in fragments of at most
        `fragment` bytes, one PDU each."""
        values = [pdv(context_id, 3, command_set)]
        if dataset is not None:
            chunks = [dataset[at : at + fragment] for at in range(0, len(dataset), fragment)] or [b""]
            values += [pdv(context_id, 2 if n == len(chunks) - 1 else 0, c) for n, c in enumerate(chunks)]
        self.send(b"".join(p_data(value) for value in values))

    def response(self) -> Response | Answer:
        """The next DIMSE message, or the PDU that came instead (an A-ABORT, a close)."""
        command_set, data = bytearray(), bytearray()
        message: Dataset | None = None
        while True:
            answer = self.read()
            if answer.kind != P_DATA_TF:
                return answer
            body, offset = answer.body, 0
            while offset + 6 <= len(body):
                length = struct.unpack(">L", body[offset : offset + 4])[0]
                control, value = body[offset + 5], body[offset + 6 : offset + 4 + length]
                offset += 4 + length
                if control & 1:
                    command_set += value
                    if control & 2:
                        message = decode(bytes(command_set))
                        if message.get("CommandDataSetType", 0x0101) == 0x0101:
                            return Response(message)
                else:
                    data += value
                    if control & 2 and message is not None:
                        return Response(message, bytes(data))

    def associate(self, request: bytes | None = None) -> Answer:
        self.send(request or associate_rq())
        return self.read()

    def _exactly(self, count: int) -> bytes | None:
        data = bytearray()
        while len(data) < count:
            chunk = self.sock.recv(min(count - len(data), 1 << 20))
            if not chunk:
                return None if not data else bytes(data)
            data += chunk
        return bytes(data)
