"""Query keys as DCMTK's `findscu -k` takes them, and the answers as plain values.

`Keyword`, `Keyword=value`, `(gggg,eeee)=value` or `gggg,eeee=value`, and a path into a
sequence (`ScheduledProcedureStepSequence[0].Modality=CT`): what users of DCMTK type already.
A key without `=` asks for the attribute to be returned (universal matching). A value is
checked against its VR as a matching value: wildcards, date and time ranges and lists of UIDs
pass, a lowercase code string or a 70-character LO does not, since no archive would match it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import MAX_VALUE_LEN, validate_value

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

_BELOW_STUDY: dict[str, str] = {
    **dict.fromkeys(
        [
            "SeriesInstanceUID",
            "SeriesNumber",
            "Modality",
            "SeriesDescription",
            "NumberOfSeriesRelatedInstances",
            "SeriesDate",
            "SeriesTime",
            "BodyPartExamined",
            "ProtocolName",
            "Laterality",
            "PerformedProcedureStepStartDate",
            "PerformedProcedureStepStartTime",
            "PerformedProcedureStepID",
            "RequestAttributesSequence",
            "OperatorsName",
            "PerformingPhysicianName",
            "StationName",
            "Manufacturer",
        ],
        "series",
    ),
    **dict.fromkeys(
        [
            "SOPInstanceUID",
            "SOPClassUID",
            "InstanceNumber",
            "ContentDate",
            "ContentTime",
            "AcquisitionDate",
            "AcquisitionTime",
            "AcquisitionNumber",
            "ImageType",
            "NumberOfFrames",
            "Rows",
            "Columns",
            "ImageComments",
        ],
        "image",
    ),
}
"""Common Study Root keys of the series and image levels (PS3.4 C.6.2.1); any other key is
taken for a study or patient key, where it belongs in a study query."""

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
        if item:
            raise BadKey(f"-k {text!r}: a sequence matching key holds one item, so its index is 0")
        last = number == len(steps) - 1
        if not last and _vr(tag) != "SQ":
            raise BadKey(f"-k {text!r}: {_label(tag)} is not a sequence, so nothing lies inside it")
        if item is not None and _vr(tag) != "SQ":
            raise BadKey(f"-k {text!r}: {_label(tag)} is not a sequence, so it has no items")
        path.append((tag, item))
    key = Key(text, tuple(path), value if has_value else None)
    if key.value:
        _convert(key.path[-1][0], key.value, text)
        _check_matching_value(key.path[-1][0], key.value, text)
    return key


def level_of(key: Key) -> str:
    """The query level `key` belongs to, as far as `_BELOW_STUDY` knows: study otherwise."""
    return _BELOW_STUDY.get(key.label if len(key.path) == 1 else _label(key.path[0][0]), "study")


def query_warnings(level: str, keys: Iterable[Key]) -> list[str]:
    """What makes a query at `level` answer less than its user expects, said before it is asked:
    a key of a lower level, and a series or image query without the unique keys above it
    (hierarchical archives such as DCMTK's dcmqrscp answer nothing without them)."""
    keys = list(keys)
    depth = LEVELS.index(level)
    warnings = [
        f"{key.label} is a {level_of(key)}-level key, which most archives ignore at {level} level "
        f"(--level {level_of(key)} asks there)"
        for key in keys
        if LEVELS.index(level_of(key)) > depth
    ]
    for unique, above in (("StudyInstanceUID", "series"), ("SeriesInstanceUID", "image")):
        if depth >= LEVELS.index(above) and not _single_value(keys, unique):
            warnings.append(
                f"at {level} level without -k {unique}=UID, a hierarchical archive (DCMTK's dcmqrscp) "
                "answers nothing; Orthanc searches everything"
            )
    return warnings


def selects(keys: Iterable[Key]) -> bool:
    """Whether any key narrows a query: a value other than empty or `*` (universal matching)."""
    return any(key.value and key.value.strip("*") for key in keys)


def _single_value(keys: list[Key], keyword: str) -> bool:
    return any(
        key.label == keyword and len(key.path) == 1 and key.value and not set("*?\\") & set(key.value) for key in keys
    )


def identifier(level: str, keys: Iterable[Key], defaults: Iterable[str] = ()) -> Dataset:
    """A Study Root identifier at `level`: the default keys returned, then each `-k` applied."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level.upper()
    for keyword in defaults:
        setattr(ds, keyword, None)
    keys = list(keys)
    if any(key.value and not key.value.isascii() for key in keys):
        ds.SpecificCharacterSet = "ISO_IR 192"  # the values go out as UTF-8, and the peer is told so
    for key in keys:
        target = ds
        for tag, _ in key.path[:-1]:
            if tag not in target or not target[tag].value:
                target.add_new(tag, "SQ", Sequence([Dataset()]))
            target = target[tag].value[0]
        tag, item = key.path[-1]
        vr = _vr(tag)
        if vr != "SQ":
            target.add_new(tag, vr, _convert(tag, key.value, key.text) if key.value else None)
        elif tag not in target or (item is not None and not target[tag].value):
            # `-k Seq` after `-k Seq[0].X=` keeps the item the earlier key made.
            target.add_new(tag, "SQ", Sequence([Dataset()] if item is not None else []))
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


def _check_matching_value(tag: BaseTag, value: str, text: str) -> None:
    """Each of a list's values against the VR; a wildcard value only for its length, a date or
    time range side by side."""
    vr = _vr(tag)
    for part in value.split("\\"):
        if set("*?") & set(part):
            sides = [] if len(part) <= MAX_VALUE_LEN.get(vr, len(part)) else [part]
        elif vr in ("DA", "TM") and "-" in part:
            sides = [side for side in part.split("-", 1) if side]
        elif vr == "DT" and "-" in part:
            sides = []  # a range, or a UTC offset: the archive reads it
        else:
            sides = [part]
        for side in sides:
            try:
                validate_value(vr, side, pydicom_config.RAISE)
            except ValueError as exc:
                reason = str(exc).split(" Please see", 1)[0]
                raise BadKey(f"-k {text!r}: {_label(tag)}: {reason}") from None


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
