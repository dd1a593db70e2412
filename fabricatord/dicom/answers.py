"""C-FIND answers encoded here, once, as bytes, with the pending response that carries each.

pynetdicom builds and encodes a command set `Dataset` for every response and encodes every
identifier through pydicom: about 1 ms per match on a 2-core machine, several times what DCMTK
and Orthanc spend (docs/upstream.md). A C-FIND's pending responses differ only in their
identifier, so their command set is encoded once per query here, and each identifier is
encoded straight from the index's values. Values are text, integers, lists of text, and
sequences of items made of the same. Little Endian only: the query contexts offer nothing else.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from functools import cache
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword

UTF8 = "ISO_IR 192"
_LONG_HEADER_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UR", "UT", "UN"}
_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)
Pairs = Sequence[tuple[str, Any]]
"""(keyword, value): str, int, None, a list of str (multi-valued) or, for a sequence, a list of Pairs."""


@cache
def _tag_and_vr(keyword: str) -> tuple[int, str]:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return tag, dictionary_VR(tag)


def needs_utf8(pairs: Pairs) -> bool:
    """Whether any text in `pairs`, items included, is beyond ASCII."""
    for _, value in pairs:
        if isinstance(value, str) and not value.isascii():
            return True
        if isinstance(value, list) and any(
            (isinstance(v, str) and not v.isascii()) or (not isinstance(v, str) and needs_utf8(v)) for v in value
        ):
            return True
    return False


def _value_bytes(vr: str, value: Any, implicit: bool, encoding: str) -> bytes:
    if value is None or value == "":
        return b""
    if vr == "SQ":
        items = []
        for item in value:
            body = _elements(item, implicit, encoding)
            items.append(_ITEM + struct.pack("<I", len(body)) + body)
        return b"".join(items)
    if vr == "US":
        return struct.pack("<H", int(value))
    if vr == "UL":
        return struct.pack("<L", int(value))
    text = "\\".join(value) if isinstance(value, list) else str(value)
    data = text.encode(encoding)
    if len(data) % 2:
        data += b"\0" if vr == "UI" else b" "
    return data


def _header(tag: int, vr: str, length: int, implicit: bool) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack("<I", length)
    if vr in _LONG_HEADER_VRS:
        return head + vr.encode() + b"\0\0" + struct.pack("<I", length)
    return head + vr.encode() + struct.pack("<H", length)


def _elements(pairs: Pairs, implicit: bool, encoding: str) -> bytes:
    """A sequence item's elements, in tag order as PS3.5 7.1 requires."""
    encoded = []
    for keyword, value in pairs:
        tag, vr = _tag_and_vr(keyword)
        data = _value_bytes(vr, value, implicit, encoding)
        encoded.append((tag, _header(tag, vr, len(data), implicit) + data))
    return b"".join(data for _, data in sorted(encoded))


def encode(pairs: Pairs, implicit: bool, charset: str = "") -> bytes:
    """An identifier in Implicit (or Explicit) VR Little Endian. Text beyond ASCII goes out in
    `charset` (a single-code Specific Character Set such as `ISO_IR 100`) when every value fits
    it, else in `ISO_IR 192`."""
    if not needs_utf8(pairs):
        return _elements(pairs, implicit, "ascii")
    codec = SINGLE_CODE_CHARSETS.get(charset)
    if codec is not None:
        try:
            return _elements([*pairs, ("SpecificCharacterSet", charset)], implicit, codec)
        except UnicodeEncodeError:
            pass
    return _elements([*pairs, ("SpecificCharacterSet", UTF8)], implicit, "utf-8")


SINGLE_CODE_CHARSETS = {
    "ISO_IR 100": "iso8859-1",
    "ISO_IR 101": "iso8859-2",
    "ISO_IR 109": "iso8859-3",
    "ISO_IR 110": "iso8859-4",
    "ISO_IR 144": "iso8859-5",
    "ISO_IR 127": "iso8859-6",
    "ISO_IR 126": "iso8859-7",
    "ISO_IR 138": "iso8859-8",
    "ISO_IR 148": "iso8859-9",
    "ISO_IR 203": "iso8859-15",
    "GB18030": "gb18030",
}
"""Specific Character Sets without code extensions, which one Python codec encodes whole."""
