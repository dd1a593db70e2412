"""DIMSE messages (PS3.7 6, 9, 10, E): command sets to and from bytes, and the assembly of a
message from the presentation data values that carry it.

A command set is always Implicit VR Little Endian and holds a dozen elements of group 0000, so
it is read here directly rather than by pydicom. The dataset after it is not decoded at all:
it goes, as it arrives, to a sink the service chose (a file for a C-STORE) or to memory, each
with its own limit, counted before a byte is kept.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol

from fabricatord.dicom.ul.pdu import Pdv

_ELEMENT = struct.Struct("<HHL")
_US = struct.Struct("<H")
_UL = struct.Struct("<L")
NO_DATASET = 0x0101
"""Command Data Set Type when no dataset follows; any other value says one does."""


class CommandField(IntEnum):
    C_STORE_RQ = 0x0001
    C_STORE_RSP = 0x8001
    C_GET_RQ = 0x0010
    C_GET_RSP = 0x8010
    C_FIND_RQ = 0x0020
    C_FIND_RSP = 0x8020
    C_MOVE_RQ = 0x0021
    C_MOVE_RSP = 0x8021
    C_ECHO_RQ = 0x0030
    C_ECHO_RSP = 0x8030
    N_EVENT_REPORT_RQ = 0x0100
    N_EVENT_REPORT_RSP = 0x8100
    N_GET_RQ = 0x0110
    N_GET_RSP = 0x8110
    N_SET_RQ = 0x0120
    N_SET_RSP = 0x8120
    N_ACTION_RQ = 0x0130
    N_ACTION_RSP = 0x8130
    N_CREATE_RQ = 0x0140
    N_CREATE_RSP = 0x8140
    N_DELETE_RQ = 0x0150
    N_DELETE_RSP = 0x8150
    C_CANCEL_RQ = 0x0FFF

    @property
    def is_response(self) -> bool:
        return bool(self & 0x8000)


# PS3.7 E.1: the command elements, by element number in group 0000, with their VRs.
_COMMAND_ELEMENTS: dict[int, tuple[str, str]] = {
    0x0000: ("CommandGroupLength", "UL"),
    0x0002: ("AffectedSOPClassUID", "UI"),
    0x0003: ("RequestedSOPClassUID", "UI"),
    0x0100: ("CommandField", "US"),
    0x0110: ("MessageID", "US"),
    0x0120: ("MessageIDBeingRespondedTo", "US"),
    0x0600: ("MoveDestination", "AE"),
    0x0700: ("Priority", "US"),
    0x0800: ("CommandDataSetType", "US"),
    0x0900: ("Status", "US"),
    0x0901: ("OffendingElement", "AT"),
    0x0902: ("ErrorComment", "LO"),
    0x0903: ("ErrorID", "US"),
    0x1000: ("AffectedSOPInstanceUID", "UI"),
    0x1001: ("RequestedSOPInstanceUID", "UI"),
    0x1002: ("EventTypeID", "US"),
    0x1005: ("AttributeIdentifierList", "AT"),
    0x1008: ("ActionTypeID", "US"),
    0x1020: ("NumberOfRemainingSuboperations", "US"),
    0x1021: ("NumberOfCompletedSuboperations", "US"),
    0x1022: ("NumberOfFailedSuboperations", "US"),
    0x1023: ("NumberOfWarningSuboperations", "US"),
    0x1030: ("MoveOriginatorApplicationEntityTitle", "AE"),
    0x1031: ("MoveOriginatorMessageID", "US"),
}
_BY_KEYWORD = {keyword: (element, vr) for element, (keyword, vr) in _COMMAND_ELEMENTS.items()}


class DimseError(ValueError):
    """A message that cannot be assembled or read: the association is aborted."""

    def __init__(self, message: str, reason: str = "undecodable_message") -> None:
        super().__init__(message)
        self.reason = reason
        """The metric's reason label."""


Command = dict[str, Any]
"""A command set by keyword: str for UI, AE and LO, int for US and UL, a list of
(group, element) pairs for AT; elements of group 0000 we do not know, by their number."""


def decode_command(data: bytes | memoryview) -> Command:
    """A command set from its Implicit VR Little Endian bytes."""
    view = memoryview(data)
    command: Command = {}
    offset, end = 0, len(view)
    while offset < end:
        if offset + 8 > end:
            raise DimseError(f"a command element header cut short at byte {offset}")
        group, element, length = _ELEMENT.unpack_from(view, offset)
        offset += 8
        if group != 0x0000:
            raise DimseError(f"element ({group:04X},{element:04X}) in a command set, which holds group 0000 only")
        if offset + length > end:
            raise DimseError(f"command element (0000,{element:04X}) of {length} bytes overruns the command set")
        value = view[offset : offset + length]
        offset += length
        keyword, vr = _COMMAND_ELEMENTS.get(element, (f"0000{element:04X}", ""))
        command[keyword] = _read_value(vr, value, element)
    if "CommandField" not in command:
        raise DimseError("a command set without Command Field (0000,0100)")
    return command


def _read_value(vr: str, value: memoryview, element: int) -> Any:
    if vr in ("US", "UL"):
        size = 2 if vr == "US" else 4
        if len(value) != size:
            raise DimseError(f"command element (0000,{element:04X}) is {vr} but {len(value)} bytes long")
        return (_US if vr == "US" else _UL).unpack_from(value)[0]
    if vr == "AT":
        if len(value) % 4:
            raise DimseError(f"command element (0000,{element:04X}) is AT but {len(value)} bytes long")
        return [tuple(struct.unpack_from("<HH", value, i)) for i in range(0, len(value), 4)]
    if vr in ("UI", "AE", "LO"):
        return bytes(value).decode("ascii", "replace").rstrip("\x00").strip()
    return bytes(value)


def encode_command(fields: Mapping[str, Any]) -> bytes:
    """A command set's bytes: its elements in order, Command Group Length first. A value of
    None leaves its element out."""
    elements = []
    for keyword, value in fields.items():
        if value is None or keyword == "CommandGroupLength":
            continue
        element, vr = _BY_KEYWORD[keyword]
        elements.append((element, _value_bytes(vr, value)))
    body = b"".join(_ELEMENT.pack(0, element, len(data)) + data for element, data in sorted(elements))
    return _ELEMENT.pack(0, 0, 4) + _UL.pack(len(body)) + body


def _value_bytes(vr: str, value: Any) -> bytes:
    if vr == "US":
        return _US.pack(value)
    if vr == "UL":
        return _UL.pack(value)
    if vr == "AT":  # (group, element) pairs or tags as ints, as pydicom holds them
        tags = [value] if isinstance(value, int) else value
        pairs = [(tag >> 16, tag & 0xFFFF) if isinstance(tag, int) else tag for tag in tags]
        return b"".join(struct.pack("<HH", group, element) for group, element in pairs)
    data = str(value).encode("ascii", "replace")
    if len(data) % 2:
        data += b"\x00" if vr == "UI" else b" "
    return data


def fragments(
    command: bytes, dataset: bytes | memoryview | None, max_pdu: int
) -> Iterator[tuple[int, bytes | memoryview]]:
    """(control header, fragment) for one message, each fitting a P-DATA-TF of at most
    `max_pdu` bytes (0: no limit) as PS3.8 E.2 lays them out; views, never copies."""
    size = max_pdu - 6 if max_pdu else 0
    parts: list[tuple[bytes | memoryview, int]] = [(command, 0x01)]
    if dataset is not None:
        parts.append((dataset, 0x00))
    for data, kind in parts:
        view = memoryview(data)
        step = size or max(len(view), 1)
        pieces = [view[i : i + step] for i in range(0, len(view), step)] or [view]
        for number, piece in enumerate(pieces):
            yield kind | (0x02 if number == len(pieces) - 1 else 0x00), piece


class DatasetSink(Protocol):
    """Where a dataset goes as it arrives (a file for a C-STORE)."""

    def write(self, data: memoryview) -> None: ...

    def close(self) -> Any:
        """The dataset is complete: what the message carries as `stored`."""

    def discard(self) -> None:
        """The message will never complete: remove what was written."""


@dataclass(frozen=True)
class MessageLimits:
    command: int = 64 * 1024
    """A command set is a dozen elements."""
    in_memory: int = 16 * 1024 * 1024
    """A query identifier or an N-service dataset, held in memory."""


@dataclass
class Message:
    context_id: int
    command: Command
    dataset: bytes | None = None
    """An in-memory dataset; None when there is none or it went to a sink."""
    stored: Any = None
    """What the sink's close() returned."""

    @property
    def field(self) -> int:
        return int(self.command["CommandField"])

    @property
    def has_dataset(self) -> bool:
        return bool(self.command.get("CommandDataSetType", NO_DATASET) != NO_DATASET)


SinkFor = Callable[[int, Command], "tuple[DatasetSink, int] | None"]
"""Given a message's context and command: a sink and its byte limit, or None for memory."""


@dataclass
class Assembler:
    """Presentation data values in, one message out when its last fragment arrived."""

    limits: MessageLimits = field(default_factory=MessageLimits)
    sink_for: SinkFor = lambda _context, _command: None
    _context_id: int | None = None
    _command_parts: list[bytes] = field(default_factory=list)
    _command_size: int = 0
    _command: Command | None = None
    _data_parts: list[bytes] = field(default_factory=list)
    _data_size: int = 0
    _sink: DatasetSink | None = None
    _limit: int = 0

    def feed(self, value: Pdv) -> Message | None:
        """The message `value` completes, or None; DimseError when the values cannot make one."""
        if self._context_id is None:
            self._context_id = value.context_id
        elif value.context_id != self._context_id:
            raise DimseError(f"a fragment on context {value.context_id} inside a message on context {self._context_id}")
        if value.is_command:
            return self._command_fragment(value)
        return self._dataset_fragment(value)

    def _command_fragment(self, value: Pdv) -> Message | None:
        if self._command is not None:
            raise DimseError("a command fragment after the command set was complete")
        self._command_size += len(value.data)
        if self._command_size > self.limits.command:
            raise DimseError(f"a command set over {self.limits.command} bytes", "message_too_large")
        self._command_parts.append(bytes(value.data))
        if not value.is_last:
            return None
        command = decode_command(b"".join(self._command_parts))
        self._command_parts = []
        context_id = self._context_id
        assert context_id is not None
        if command.get("CommandDataSetType", NO_DATASET) == NO_DATASET:
            return self._complete(Message(context_id, command))
        self._command = command
        chosen = self.sink_for(context_id, command)
        if chosen is None:
            self._limit = self.limits.in_memory
        else:
            self._sink, self._limit = chosen
        return None

    def _dataset_fragment(self, value: Pdv) -> Message | None:
        if self._command is None:
            raise DimseError("a dataset fragment before its command set")
        self._data_size += len(value.data)
        if self._data_size > self._limit:
            raise DimseError(f"a dataset over {self._limit} bytes", "message_too_large")
        if self._sink is not None:
            self._sink.write(memoryview(value.data))
        else:
            self._data_parts.append(bytes(value.data))
        if not value.is_last:
            return None
        context_id = self._context_id
        assert context_id is not None
        if self._sink is not None:
            sink, self._sink = self._sink, None
            return self._complete(Message(context_id, self._command, stored=sink.close()))
        return self._complete(Message(context_id, self._command, dataset=b"".join(self._data_parts)))

    def _complete(self, message: Message) -> Message:
        self._context_id, self._command, self._command_size = None, None, 0
        self._data_parts, self._data_size, self._limit = [], 0, 0
        return message

    def discard(self) -> None:
        """The association ends inside a message: a dataset written to a sink is removed."""
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.discard()
        self._complete(Message(0, {}))
