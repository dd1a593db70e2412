"""C-FIND answers made of elements encoded here, once, as raw bytes.

pydicom writes a raw element as it is when a dataset's original encoding is the one being
written (`Dataset.set_original_encoding`). An answer built here costs pynetdicom a join of
bytes instead of a conversion, validation and encode per element, which was the larger part of
answering each match. Values are those the index holds: text, integers, lists of text, and
sequences of items made of the same.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from functools import cache
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

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


def build(pairs: Pairs, implicit: bool) -> Dataset:
    """An answer for a presentation context with implicit (or explicit) VR Little Endian."""
    wide = needs_utf8(pairs)
    encoding = "utf-8" if wide else "ascii"
    answer = Dataset()
    for keyword, value in [*pairs, ("SpecificCharacterSet", UTF8)] if wide else pairs:
        tag, vr = _tag_and_vr(keyword)
        data = _value_bytes(vr, value, implicit, encoding)
        answer[tag] = RawDataElement(BaseTag(tag), vr, len(data), data, 0, implicit, True)
    answer.set_original_encoding(implicit, True, ["utf_8"] if wide else "iso8859")
    return answer
