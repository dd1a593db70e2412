"""Walk an encoded dataset without decoding it: check that it frames, within limits, and keep
the top-level elements a caller asks for.

A peer's dataset is read before anything trusts it. pydicom decodes a whole header into objects,
follows sequences by recursion, inflates a deflated dataset in memory and reads whatever length
an element declares: a deflate bomb, a sequence nested ten thousand deep, a million empty items
or an element declaring 2 GiB cost memory or a crash before a single check ran. Here the bytes
are walked once, streaming (a value is skipped by seeking, a deflated stream inflated a chunk at
a time), against limits on nesting, on elements and items, and on inflated size; what is kept is
a handful of short top-level values. Anything that does not frame is `Malformed`, with the
element and the offset named for the Error Comment.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom._dicom_dict import DicomDictionary
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
# PS3.5 7.1.2: these VRs carry a 32-bit length after two reserved bytes in explicit VR.
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_KEPT_VALUE_LIMIT = 64 * 1024
"""The longest value kept: the elements asked for are UIDs, names, dates and codes."""
SPECIFIC_CHARACTER_SET = 0x00080005
_CHARSET_NAMES = re.compile(rb"[A-Z0-9 _\\]*")
"""What a Specific Character Set (CS, backslash-separated) may hold."""
_CHUNK = 1 << 16
EXPLICIT_LE = "1.2.840.10008.1.2.1"


class Malformed(ValueError):
    """The dataset does not frame as its transfer syntax says, or passes a limit."""


@dataclass(frozen=True)
class WalkLimits:
    """How deep sequences nest, how many elements and items a dataset holds, how far it inflates.

    No IOD nests sequences a dozen deep; a large RT Structure Set or a segmentation with
    per-frame functional groups holds a few hundred thousand elements and items; the walk costs
    about a second per million of them."""

    depth: int = 32
    elements: int = 2_000_000
    inflated: int = 4 * 2**30


@dataclass
class Walked:
    """What the walk kept: the top-level elements asked for, and how much it saw."""

    elements: dict[BaseTag, RawDataElement]
    count: int
    depth: int


def read_received(path: Path, keep: frozenset[int], limits: WalkLimits) -> Dataset:
    """A received Part 10 file's file meta and the top-level elements in `keep`, as a Dataset
    (decoded lazily by pydicom), after the whole file was walked and found sound."""
    with path.open("rb") as stream:
        meta = _file_meta(stream)
        syntax = UID(str(meta.get("TransferSyntaxUID", EXPLICIT_LE)))
        walked = walk(stream, syntax, keep, limits)
    ds = dataset_of(walked, syntax)
    ds.file_meta = meta
    return ds


def _file_meta(stream: BinaryIO) -> FileMetaDataset:
    """The file meta group (PS3.10 7.1), walked like the rest; the stream is left at the dataset."""
    head = stream.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise Malformed("not a Part 10 file: no DICM prefix and file meta group length")
    length = struct.unpack("<L", head[140:144])[0]
    group = head[132:] + (stream.read(length) if length <= _KEPT_VALUE_LIMIT else b"")
    if len(group) != 12 + length:
        raise Malformed(f"the file meta group declares {length} bytes")
    walker = _Walker(_Seekable(io.BytesIO(group)), False, True, None, WalkLimits())
    walker.dataset(len(group), 0, top=True)
    return FileMetaDataset(dict(sorted(walker.kept.items())))


def dataset_of(walked: Walked, syntax: UID) -> Dataset:
    """The kept elements as a pydicom Dataset that knows the encoding they were read in."""
    ds = Dataset(dict(sorted(walked.elements.items())))
    ds.set_original_encoding(*_encoding(syntax))
    return ds


def walk(source: BinaryIO, syntax: UID, keep: frozenset[int], limits: WalkLimits) -> Walked:
    """Walk the dataset in `source` from where it stands to its end, as encoded in `syntax`,
    keeping the top-level elements in `keep`. Raises `Malformed`."""
    stream: _Stream
    if UID(syntax).is_deflated:
        stream, size = _Inflating(source, limits.inflated), None
    else:
        start = source.tell()
        size = source.seek(0, io.SEEK_END) - start
        source.seek(start)
        stream = _Seekable(source)
    walker = _Walker(stream, *_encoding(syntax), keep, limits)
    walker.dataset(size, 0, top=True)
    return Walked(walker.kept, walker.count, walker.deepest)


def _encoding(syntax: UID) -> tuple[bool, bool]:
    if syntax.is_transfer_syntax:
        return bool(syntax.is_implicit_VR), bool(syntax.is_little_endian)
    return False, True  # a private syntax: explicit VR little endian, as PS3.5 A.4 encapsulates


class _Stream:
    """Bytes read in order; `position` counts from the dataset's first byte."""

    position: int = 0

    def read(self, count: int) -> bytes:
        raise NotImplementedError

    def peek(self, count: int) -> bytes:
        raise NotImplementedError

    def skip(self, count: int) -> None:
        raise NotImplementedError


class _Seekable(_Stream):
    """A file or an in-memory identifier: values are skipped by seeking. The caller checks a
    skip against the end first, since seeking past the end of a file succeeds."""

    def __init__(self, source: BinaryIO) -> None:
        self._source = source

    def read(self, count: int) -> bytes:
        data = self._source.read(count)
        self.position += len(data)
        return data

    def peek(self, count: int) -> bytes:
        data = self._source.read(count)
        self._source.seek(-len(data), io.SEEK_CUR)
        return data

    def skip(self, count: int) -> None:
        self._source.seek(count, io.SEEK_CUR)
        self.position += count


class _Inflating(_Stream):
    """A deflated dataset (PS3.5 A.5), inflated a chunk at a time and never past `limit` bytes:
    its end is where the stream ends."""

    def __init__(self, source: BinaryIO, limit: int) -> None:
        self._source = source
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buffer = bytearray()
        self._limit = limit
        self._produced = 0
        self._exhausted = False

    def read(self, count: int) -> bytes:
        data = self.peek(count)
        del self._buffer[: len(data)]
        self.position += len(data)
        return data

    def peek(self, count: int) -> bytes:
        while len(self._buffer) < count and self._fill():
            pass
        return bytes(self._buffer[:count])

    def skip(self, count: int) -> None:
        while count > 0:
            if not self._buffer and not self._fill():
                raise Malformed(f"the deflated dataset ends {count} bytes before its last value does")
            taken = min(count, len(self._buffer))
            del self._buffer[:taken]
            self.position += taken
            count -= taken

    def _fill(self) -> bool:
        """Inflate more into the buffer; False at the end of the stream."""
        while not self._exhausted:
            pending = self._inflater.unconsumed_tail or self._source.read(_CHUNK)
            if not pending:
                self._exhausted = True
                self._take(self._inflater.flush())
                return bool(self._buffer)
            try:
                data = self._inflater.decompress(pending, _CHUNK)
            except zlib.error as exc:
                raise Malformed(f"the deflated dataset does not inflate: {exc}") from exc
            self._exhausted = self._inflater.eof
            if data:
                self._take(data)
                return True
        return False

    def _take(self, data: bytes) -> None:
        self._produced += len(data)
        if self._produced > self._limit:
            raise Malformed(f"the deflated dataset inflates beyond {self._limit} bytes")
        self._buffer += data


def _name(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Walker:
    """One walk: the encoding (which a UN sequence switches to implicit VR little endian for
    its items, PS3.5 6.2.2), the count against the limits, and what is kept."""

    def __init__(
        self, stream: _Stream, implicit: bool, little: bool, keep: frozenset[int] | None, limits: WalkLimits
    ) -> None:
        """`keep`: the top-level tags to keep, or None for all of them (the file meta group)."""
        self._stream = stream
        self._keep = keep
        self._limits = limits
        self.kept: dict[BaseTag, RawDataElement] = {}
        self.count = 0
        self.deepest = 0
        self._encode(implicit, little)

    def _encode(self, implicit: bool, little: bool) -> None:
        self._implicit, self._little = implicit, little
        order = "<" if little else ">"
        self._header = struct.Struct(order + "HHL")
        self._explicit = struct.Struct(order + "HH2sH")
        self._long = struct.Struct(order + "L")

    def dataset(self, end: int | None, depth: int, top: bool = False) -> None:
        """Elements up to `end` (a position), or up to an item delimiter (`end` None: an item
        of undefined length), or to the end of a deflated stream (`end` None at the top)."""
        stream = self._stream
        while end is None or stream.position < end:
            at = stream.position
            head = stream.read(8)
            if not head and top:
                return
            if len(head) < 8:
                raise Malformed(f"the dataset ends inside an element's header at offset {at}")
            group, element, length = self._header.unpack(head)
            tag = group << 16 | element
            if group == 0xFFFE:
                # An item's delimiter ends an item of undefined length; some writers also end
                # one of defined length with it, counted in its length.
                if tag == ITEM_END and not top and (end is None or stream.position == end):
                    return
                raise Malformed(f"{_name(tag)} where a data element belongs, offset {at}")
            vr = b""
            if not self._implicit:
                _, _, vr, short = self._explicit.unpack(head)
                if vr in _LONG_VRS:
                    extra = stream.read(4)
                    if len(extra) < 4:
                        raise Malformed(f"the dataset ends inside an element's header at offset {at}")
                    length = self._long.unpack(extra)[0]
                elif vr.isalpha() and vr.isupper():  # two letters A–Z, as every VR is
                    length = short
                else:  # a writer that switched to implicit VR, as pydicom tolerates
                    vr = b""
            self._counted(at)
            known = vr.decode("ascii") if vr else _dictionary_vr(tag)
            if length == UNDEFINED:
                if known == "UN":
                    self._un_sequence(tag, depth)
                elif known == "SQ" or (known is None and stream.peek(4) == _item_tag(self._little)):
                    self.sequence(tag, None, depth)
                elif tag == PIXEL_DATA:
                    self._fragments()
                else:
                    raise Malformed(f"{_name(tag)} has an undefined length, which its VR does not allow")
                continue
            self._fits(tag, length, end, at)
            if known == "SQ":
                self.sequence(tag, stream.position + length, depth)
            elif top and (self._keep is None or tag in self._keep):
                self._keep_value(tag, length, at)
            else:
                stream.skip(length)
        if end is not None and stream.position != end:
            raise Malformed(f"an element runs past the end of its item, offset {stream.position}")

    def sequence(self, tag: int, end: int | None, depth: int) -> None:
        if depth + 1 > self._limits.depth:
            raise Malformed(f"sequences nested deeper than {self._limits.depth}, at {_name(tag)}")
        self.deepest = max(self.deepest, depth + 1)
        stream = self._stream
        while end is None or stream.position < end:
            item, length, at = self._item(f"the sequence {_name(tag)}")
            if item == SEQUENCE_END and end is None:
                return
            if item != ITEM:
                raise Malformed(f"{_name(item)} in the sequence {_name(tag)} where an item belongs, offset {at}")
            self._counted(at)
            if length == UNDEFINED:
                self.dataset(None, depth + 1)
            else:
                self._fits(item, length, end, at)
                self.dataset(stream.position + length, depth + 1)
        if end is not None and stream.position != end:
            raise Malformed(f"an item runs past the end of the sequence {_name(tag)}, offset {stream.position}")

    def _un_sequence(self, tag: int, depth: int) -> None:
        implicit, little = self._implicit, self._little
        self._encode(True, True)
        try:
            self.sequence(tag, None, depth)
        finally:
            self._encode(implicit, little)

    def _fragments(self) -> None:
        """Encapsulated pixel data: items of defined length up to the sequence delimiter."""
        stream = self._stream
        while True:
            tag, length, at = self._item("the encapsulated pixel data")
            if tag == SEQUENCE_END:
                return
            if tag != ITEM or length == UNDEFINED:
                raise Malformed(f"{_name(tag)} in the encapsulated pixel data, offset {at}")
            self._counted(at)
            stream.skip(length)

    def _item(self, inside: str) -> tuple[int, int, int]:
        """(tag, length, offset) of the next item or delimiter, in `inside`."""
        at = self._stream.position
        head = self._stream.read(8)
        if len(head) < 8:
            raise Malformed(f"the dataset ends inside {inside} at offset {at}")
        group, element, length = self._header.unpack(head)
        return group << 16 | element, length, at

    def _counted(self, at: int) -> None:
        self.count += 1
        if self.count > self._limits.elements:
            raise Malformed(f"more than {self._limits.elements} data elements and items (offset {at})")

    def _fits(self, tag: int, length: int, end: int | None, at: int) -> None:
        if end is not None and self._stream.position + length > end:
            raise Malformed(
                f"{_name(tag)} declares {length} bytes at offset {at}; {end - self._stream.position} remain"
            )

    def _keep_value(self, tag: int, length: int, at: int) -> None:
        if length > _KEPT_VALUE_LIMIT:
            raise Malformed(f"{_name(tag)} is {length} bytes long at offset {at}")
        value = self._stream.read(length)
        if len(value) < length:
            raise Malformed(f"{_name(tag)} declares {length} bytes at offset {at}; the dataset ends first")
        if tag == SPECIFIC_CHARACTER_SET and not _CHARSET_NAMES.fullmatch(value.rstrip(b" \x00")):
            return  # not names at all (a NUL inside made pydicom raise, tests/fuzz): the default repertoire
        # The VR comes from pydicom's dictionary, whatever the peer wrote: an unknown VR, or a
        # Specific Character Set sent as US, made pydicom raise when the value was read (tests/fuzz).
        self.kept[BaseTag(tag)] = RawDataElement(BaseTag(tag), None, length, value, at, self._implicit, self._little)


def _item_tag(little: bool) -> bytes:
    return struct.pack("<HH" if little else ">HH", 0xFFFE, 0xE000)


def _dictionary_vr(tag: int) -> str | None:
    entry = DicomDictionary.get(tag)
    if entry is not None:
        return str(entry[0])
    if tag >> 16 & 1:  # a private tag: no dictionary knows its VR
        return None
    try:
        return str(dictionary_VR(tag))  # repeating groups such as (60xx,3000)
    except KeyError:
        return None
