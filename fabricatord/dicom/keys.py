"""Query keys as DCMTK's `findscu -k` takes them, and the answers as plain values.

`Keyword`, `Keyword=value`, `(gggg,eeee)=value` or `gggg,eeee=value`, and a path into a
sequence (`ScheduledProcedureStepSequence[0].Modality=CT`): what users of DCMTK type already.
A key without `=` asks for the attribute to be returned (universal matching).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

LEVELS = ("study", "series", "image")
DEFAULT_KEYS: dict[str, tuple[str, ...]] = {
    "study": (
        "StudyDate",
        "PatientName",
        "PatientID",
        "AccessionNumber",
        "ModalitiesInStudy",
        "StudyDescription",
        "NumberOfStudyRelatedInstances",
        "StudyInstanceUID",
    ),
    "series": (
        "StudyInstanceUID",
        "SeriesNumber",
        "Modality",
        "SeriesDescription",
        "NumberOfSeriesRelatedInstances",
        "SeriesInstanceUID",
    ),
    "image": ("StudyInstanceUID", "SeriesInstanceUID", "InstanceNumber", "SOPClassUID", "SOPInstanceUID"),
}
"""What `fabricatord find` asks for at each level besides the keys it is given."""

_STEP = re.compile(
    r"^(?:\((?P<p>[0-9A-Fa-f]{4},[0-9A-Fa-f]{4})\)|(?P<t>[0-9A-Fa-f]{4},[0-9A-Fa-f]{4})|(?P<k>[A-Za-z][A-Za-z0-9]*))"
    r"(?:\[(?P<i>\d+)\])?$"
)
_NUMERIC = {"US": int, "SS": int, "UL": int, "SL": int, "UV": int, "SV": int, "FL": float, "FD": float}
_OMITTED = {"QueryRetrieveLevel", "SpecificCharacterSet"}


class BadKey(ValueError):
    """A `-k` that names no attribute, or a value its VR cannot hold; the text says which."""


@dataclass(frozen=True)
class Key:
    """One `-k`: the path of tags (through sequence items) and the value, None to only return it."""

    text: str
    path: tuple[tuple[BaseTag, int | None], ...]
    value: str | None

    @property
    def label(self) -> str:
        """The column name: the keyword of the last tag, or its number when it has none."""
        return _label(self.path[-1][0])


def parse_key(text: str) -> Key:
    """`-k` as DCMTK reads it; BadKey says what is wrong with it."""
    name, has_value, value = text.partition("=")
    steps = name.strip().split(".")
    path: list[tuple[BaseTag, int | None]] = []
    for number, step in enumerate(steps):
        match = _STEP.match(step.strip())
        if match is None:
            raise BadKey(f"-k {text!r}: {step!r} is neither a keyword nor (gggg,eeee)")
        if match["k"]:
            tag_number = tag_for_keyword(match["k"])
            if tag_number is None:
                raise BadKey(f"-k {text!r}: {match['k']!r} is not a DICOM keyword")
            tag = Tag(tag_number)
        else:
            tag = Tag(*(int(part, 16) for part in (match["p"] or match["t"]).split(",")))
        item = int(match["i"]) if match["i"] is not None else None
        last = number == len(steps) - 1
        if not last and _vr(tag) != "SQ":
            raise BadKey(f"-k {text!r}: {_label(tag)} is not a sequence, so nothing lies inside it")
        if item is not None and _vr(tag) != "SQ":
            raise BadKey(f"-k {text!r}: {_label(tag)} is not a sequence, so it has no items")
        path.append((tag, item))
    key = Key(text, tuple(path), value if has_value else None)
    if key.value:
        _convert(key.path[-1][0], key.value, text)
    return key


def identifier(level: str, keys: Iterable[Key], defaults: Iterable[str] = ()) -> Dataset:
    """A Study Root identifier at `level`: the default keys returned, then each `-k` applied."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level.upper()
    for keyword in defaults:
        setattr(ds, keyword, None)
    for key in keys:
        target = ds
        for tag, item in key.path[:-1]:
            if tag not in target or not target[tag].value:
                target.add_new(tag, "SQ", Sequence([Dataset()]))
            items = target[tag].value
            index = item or 0
            while len(items) <= index:
                items.append(Dataset())
            target = items[index]
        tag, item = key.path[-1]
        vr = _vr(tag)
        if vr == "SQ":
            target.add_new(tag, "SQ", Sequence([Dataset()] if item is not None else []))
        else:
            target.add_new(tag, vr, _convert(tag, key.value, key.text) if key.value else None)
    return ds


def plain(ds: Dataset) -> dict[str, Any]:
    """An answer as keyword → value: a string, a list for several values, a list of objects for
    a sequence; the level and character set left out."""
    values: dict[str, Any] = {}
    for element in ds:
        label = _label(element.tag)
        if label in _OMITTED:
            continue
        if element.VR == "SQ":
            values[label] = [plain(item) for item in element.value]
        elif isinstance(element.value, MultiValue):
            values[label] = [_text(v) for v in element.value]
        else:
            values[label] = _text(element.value)
    return values


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _label(tag: BaseTag) -> str:
    return keyword_for_tag(tag) or f"{tag.group:04X}{tag.element:04X}"


def _vr(tag: BaseTag) -> str:
    try:
        vr: str = dictionary_VR(tag)
    except KeyError:
        raise BadKey(f"{_label(tag)} is not in the DICOM dictionary, so its VR is unknown") from None
    return vr.split(" or ", maxsplit=1)[0]


def _convert(tag: BaseTag, value: str, text: str) -> Any:
    """A typed value for numeric VRs (DCMTK accepts `-k NumberOfFrames=2`); strings stay strings."""
    vr = _vr(tag)
    if vr == "SQ":
        raise BadKey(f"-k {text!r}: a sequence takes no value; name an attribute inside it")
    convert = _NUMERIC.get(vr)
    if convert is None:
        return value
    try:
        parts = [convert(part) for part in value.split("\\")]
    except ValueError:
        raise BadKey(f"-k {text!r}: {_label(tag)} ({vr}) takes numbers") from None
    return parts[0] if len(parts) == 1 else parts
