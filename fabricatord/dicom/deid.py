"""De-identification by PS3.15 Annex E: the Basic Application Level Confidentiality Profile and
the options the standard names, with every removed or replaced attribute kept for
re-identification.

The profile's table (which attribute is removed, emptied, given a dummy value or a new UID)
is Kitware's dicom-anonymizer's, kept up to date with the standard; the options' columns it
lacks are here, and so are the actions: replacements are derived from a keyed hash (HMAC) of
the original, so that the same original always gets the same replacement across a study and
on every resend, and nothing of the original can be read from it without the key.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any, Literal

from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as annex_e  # type: ignore[import-untyped]
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag, Tag

Dates = Literal["remove", "keep", "shift"]

# Table E.1-1's option columns, for the attributes this daemon's peers send (the table has
# hundreds; these are the ones whose option changes what we do).
DEVICE_IDENTITY = frozenset(
    Tag(t)
    for t in (
        0x00081010,  # Station Name
        0x00181000,  # Device Serial Number
        0x00181002,  # Device UID
        0x0018700A,  # Detector ID
        0x00181004,  # Plate ID
        0x00181005,  # Generator ID
        0x00181007,  # Cassette ID
        0x00181008,  # Gantry ID
        0x0018100A,  # UDI Sequence
        0x00081090,  # Manufacturer's Model Name (kept by the profile; listed for clarity)
    )
)
DESCRIPTORS = frozenset(
    Tag(t)
    for t in (
        0x00081030,  # Study Description
        0x0008103E,  # Series Description
        0x00181030,  # Protocol Name
        0x00204000,  # Image Comments
        0x00321060,  # Requested Procedure Description
        0x00400254,  # Performed Procedure Step Description
        0x00081080,  # Admitting Diagnoses Description
        0x00400007,  # Scheduled Procedure Step Description
        0x00081040,  # Institutional Department Name
    )
)
TEMPORAL_VRS = frozenset({"DA", "DT", "TM"})
_BIRTH = frozenset((Tag(0x00100030), Tag(0x00100032)))
"""Birth date and time: as the profile says whatever the dates option (they identify more than
they date a study)."""

_REMOVE, _EMPTY, _DUMMY, _UID, _CLEAN = "X", "Z", "D", "U", "C"


def _actions() -> tuple[dict[BaseTag, str], list[tuple[int, int, int, str]]]:
    """The profile's action for each attribute (X/Z: emptied, so that an IOD that needs the
    attribute present still has it; X/D, X/Z/D and Z/D: a dummy), and the rules for repeating
    groups (curves 50xx, overlays 60xx) as (tag, mask, action)."""
    table: dict[BaseTag, str] = {}
    masked: list[tuple[int, int, int, str]] = []
    for name, action in (
        ("X_TAGS", _REMOVE),
        ("X_Z_TAGS", _EMPTY),
        ("X_D_TAGS", _DUMMY),
        ("X_Z_D_TAGS", _DUMMY),
        ("Z_TAGS", _EMPTY),
        ("Z_D_TAGS", _DUMMY),
        ("D_TAGS", _DUMMY),
        ("U_TAGS", _UID),
        ("X_Z_U_STAR_TAGS", _UID),
    ):
        for entry in getattr(annex_e, name):
            if len(entry) == 2:
                table[Tag(*entry)] = action
            else:
                group, element, group_mask, element_mask = entry
                masked.append(((group << 16) | element, (group_mask << 16) | element_mask, 0, action))
    return table, masked


ACTIONS, MASKED = _actions()


@dataclass(frozen=True)
class Options:
    """The Annex E options a proxy uses, as the standard names them."""

    retain_uids: bool = False
    dates: Dates = "remove"
    """`remove`: the profile's; `keep`: Retain Longitudinal Temporal Information with Full
    Dates; `shift`: … with Modified Dates (one offset per patient)."""
    retain_device_identity: bool = False
    clean_descriptors: bool = False
    clean_pixel_data: bool = False

    def method_codes(self) -> list[Any]:
        """CID 7050 codes for (0012,0064), the profile first."""
        used = [codes.DCM.BasicApplicationConfidentialityProfile]
        if self.retain_uids:
            used.append(codes.DCM.RetainUidsOption)
        if self.dates == "keep":
            used.append(codes.DCM.RetainLongitudinalTemporalInformationFullDatesOption)
        elif self.dates == "shift":
            used.append(codes.DCM.RetainLongitudinalTemporalInformationModifiedDatesOption)
        if self.retain_device_identity:
            used.append(codes.DCM.RetainDeviceIdentityOption)
        if self.clean_descriptors:
            used.append(codes.DCM.CleanDescriptorsOption)
        if self.clean_pixel_data:
            used.append(codes.DCM.CleanPixelDataOption)
        return used


@dataclass
class Change:
    """One attribute as it was before de-identification, as DICOM JSON (PS3.18 F.2)."""

    path: str
    """Its place: `00100010`, or inside a sequence `00081140[0].00081155`."""
    action: str
    """`removed`, `emptied`, `replaced`."""
    original: dict[str, Any] = field(default_factory=dict)


class Deidentifier:
    """De-identifies datasets in place with one key; the same original always gets the same
    replacement."""

    def __init__(self, key: bytes, options: Options) -> None:
        self._key = key
        self.options = options
        self._identifying: list[str] = []
        """The instance's identifying values, for Clean Descriptors."""

    def keyed(self, kind: str, value: str) -> bytes:
        """The HMAC-SHA256 of an original value: what replaces it is derived from this."""
        return hmac.new(self._key, f"{kind}\x00{value}".encode(), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """A UID under 2.25 (PS3.5 B.2) from the original's keyed hash: consistent, unreadable."""
        return f"2.25.{int.from_bytes(self.keyed('uid', original)[:16], 'big')}"

    def pseudonym(self, kind: str, original: str, length: int = 12) -> str:
        return self.keyed(kind, original).hex()[:length].upper()

    def shift(self, patient: str) -> timedelta:
        """How far this patient's dates move back: 1 to 3,650 days, the same for every study."""
        return timedelta(days=1 + int.from_bytes(self.keyed("shift", patient)[:4], "big") % 3650)

    def apply(self, ds: Dataset) -> list[Change]:
        """De-identify `ds` in place; what was removed or replaced, to keep encrypted."""
        changes: list[Change] = []
        patient = str(ds.get("PatientID", ""))
        self._identifying = _identifying(ds)
        self._walk(ds, "", changes, self.shift(patient))
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "fabricatord: PS3.15 Annex E Basic Profile"
        ds.DeidentificationMethodCodeSequence = Sequence([_coded(code) for code in self.options.method_codes()])
        if self.options.dates == "shift":
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
        elif self.options.dates == "keep":
            ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
        else:
            ds.LongitudinalTemporalInformationModified = "REMOVED"
        return changes

    def _walk(self, ds: Dataset, prefix: str, changes: list[Change], shift: timedelta) -> None:
        """Elements are replaced, never changed in place: a dataset may share them (and its
        sequences' items) with others, as a series' instances do when they are generated."""
        for listed in list(ds):
            element = _own(ds, listed)
            tag = element.tag
            path = f"{prefix}{int(tag):08X}"
            if tag.is_private:
                changes.append(Change(path, "removed", element.to_json_dict(None, 0)))
                del ds[tag]
                continue
            action = self._action(element)
            if action is None:
                if element.VR == "SQ":
                    for index, item in enumerate(element.value):
                        self._walk(item, f"{path}[{index}].", changes, shift)
                continue
            original = element.to_json_dict(None, 0)
            if action == _REMOVE:
                del ds[tag]
                changes.append(Change(path, "removed", original))
            elif action == _EMPTY or element.value in (None, "", b""):
                if element.value not in (None, "", b"") or element.VR == "SQ":
                    ds[tag] = DataElement(tag, element.VR, Sequence() if element.VR == "SQ" else None)
                    changes.append(Change(path, "emptied", original))
            elif element.VR == "SQ":  # U or D on a sequence: its items de-identified one by one
                for index, item in enumerate(element.value):
                    self._walk(item, f"{path}[{index}].", changes, shift)
            elif action == _UID:
                ds[tag] = DataElement(tag, "UI", _uids(element.value, self.uid))
                changes.append(Change(path, "replaced", original))
            elif action == _CLEAN:
                cleaned = _cleaned(str(element.value), self._identifying)
                if cleaned != str(element.value):
                    ds[tag] = DataElement(tag, element.VR, cleaned)
                    changes.append(Change(path, "replaced", original))
            elif action == "shift":
                ds[tag] = DataElement(tag, element.VR, _shifted(element.VR, element.value, shift))
                changes.append(Change(path, "replaced", original))
            else:
                ds[tag] = DataElement(tag, element.VR, self._dummy(element))
                changes.append(Change(path, "replaced", original))

    def query_keys(self, identifier: Dataset) -> Dataset | None:
        """A C-FIND identifier as it must reach the backend, which holds de-identified data:
        each matching value replaced as the stored one was (UIDs, pseudonyms; dates shifted by
        the queried patient's offset); None when no stored instance could match (a value for an
        attribute the profile removes or empties, a wildcard over a pseudonym, a shifted date
        without the Patient ID that says how far)."""
        out = Dataset()
        patient = str(identifier.get("PatientID", "") or "")
        for element in identifier:
            value = element.value
            if element.tag.is_private:
                continue  # nothing private reaches the backend, nor is held there
            if element.VR == "SQ" and value:
                return None  # a sequence matching key (Other Patient IDs …): its values are not held
            if element.VR == "SQ" or value in (None, "", b"") or element.tag in _QUERY_CONTROL:
                out.add(element)
                continue
            action = self._action(element)
            if action is None:
                out.add(element)
            elif action == _UID:
                out.add(DataElement(element.tag, "UI", _uids(value, self.uid)))
            elif action == "shift":
                if not patient or "*" in patient or "?" in patient:
                    return None
                out.add(
                    DataElement(element.tag, element.VR, _shifted_range(element.VR, str(value), self.shift(patient)))
                )
            elif action == _DUMMY and not any(c in str(value) for c in "*?\\"):
                out.add(DataElement(element.tag, element.VR, self._dummy(element)))
            else:
                return None
        return out

    def _action(self, element: DataElement) -> str | None:
        options = self.options
        tag = element.tag
        if element.VR in TEMPORAL_VRS and options.dates != "remove" and tag not in _BIRTH:
            # Modified Dates move the days; times of day stay as they are.
            return None if options.dates == "keep" or element.VR == "TM" else "shift"
        if tag in DEVICE_IDENTITY and options.retain_device_identity:
            return None
        if tag in DESCRIPTORS and options.clean_descriptors:
            return _CLEAN
        action = ACTIONS.get(tag) or next((a for base, mask, _, a in MASKED if int(tag) & mask == base), None)
        if action == _UID and options.retain_uids:
            return None
        if element.VR == "UI" and tag not in _KEPT_UIDS and not options.retain_uids:
            return _UID  # every UID that names an instance, listed in the table or not
        return action

    def _dummy(self, element: DataElement) -> Any:
        """A value of the element's VR that says nothing of the original: a keyed pseudonym for
        names and identifiers (the same patient keeps the same one), a constant otherwise."""
        vr, text = element.VR, str(element.value)
        if vr == "PN":
            return f"ANONYMOUS^{self.pseudonym('name', text, 8)}"
        if vr in _TEXT_VRS:
            return self.pseudonym(f"text{int(element.tag)}", text, 16)
        if vr == "UI":
            return _uids(element.value, self.uid)
        if vr == "SQ":
            return Sequence()
        return _DUMMIES.get(vr)


# UIDs that name a kind of thing, not an instance: never replaced.
_KEPT_UIDS = frozenset(
    Tag(t)
    for t in (
        0x00020002,  # Media Storage SOP Class UID
        0x00020010,  # Transfer Syntax UID
        0x00020012,  # Implementation Class UID
        0x00080016,  # SOP Class UID
        0x00081150,  # Referenced SOP Class UID
        0x0008010C,  # Coding Scheme UID
        0x00080118,  # Mapping Resource UID
        0x00041510,  # Referenced SOP Class UID in File
        0x00041512,  # Referenced Transfer Syntax UID in File
        0x00080062,  # SOP Classes in Study
        0x0008001A,  # Related General SOP Class UID
        0x0008001B,  # Original Specialized SOP Class UID
    )
)


_TEXT_VRS = frozenset({"LO", "SH", "CS", "LT", "ST", "UT", "UC", "AE"})
_DUMMIES: dict[str, Any] = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "IS": "0",
    "DS": "0",
    **dict.fromkeys(("US", "SS", "UL", "SL", "FL", "FD"), 0),
}


def _identifying(ds: Dataset) -> list[str]:
    """What names the patient or the order in free text: name parts, IDs, accession, birth date."""
    found = [str(part) for part in str(ds.get("PatientName", "") or "").replace("^", " ").split() if len(part) > 1]
    for keyword in ("PatientID", "AccessionNumber", "PatientBirthDate", "OtherPatientIDs", "StudyID"):
        value = ds.get(keyword)
        if value:
            found.extend(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]) if len(str(v)) > 1)
    return sorted(set(found), key=len, reverse=True)


def _cleaned(text: str, identifying: list[str]) -> str:
    """Clean Descriptors: a description with every identifying value in it masked."""
    import re

    for value in identifying:
        text = re.sub(re.escape(value), "*" * len(value), text, flags=re.IGNORECASE)
    return text


def _own(ds: Dataset, element: DataElement) -> DataElement:
    """A sequence with items of its own, to change without touching a dataset it is shared with."""
    if element.VR != "SQ" or not element.value:
        return element
    owned = DataElement(element.tag, "SQ", Sequence([copy.deepcopy(item) for item in element.value]))
    ds[element.tag] = owned
    return owned


_QUERY_CONTROL = frozenset(Tag(t) for t in (0x00080052, 0x00080005))  # Query/Retrieve Level, character set


def _shifted_range(vr: str, value: str, shift: timedelta) -> str:
    """A date or a date range (`A-B`, `A-`, `-B`) shifted as stored dates were."""
    return "-".join(str(_shifted(vr, part, shift)) if part else "" for part in value.split("-"))


def _uids(value: Any, replace: Any) -> Any:
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, str)):
        return [replace(str(v)) for v in value]
    return replace(str(value)) if value else value


def _shifted(vr: str, value: Any, shift: timedelta) -> Any:
    """A date moved back by the patient's shift; times stay (Modified Dates shift days)."""
    if vr == "TM" or not value:
        return value
    text = str(value)
    try:
        day = date(int(text[:4]), int(text[4:6]), int(text[6:8])) - shift
    except ValueError:
        return "19000101" if vr == "DA" else "19000101000000"
    return day.strftime("%Y%m%d") + (text[8:] if vr == "DT" else "")


def _coded(code: Any) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
    return item


FIGURE_SHARE = 0.3
"""A row with an unbroken run of this share of its pixels off the background is the figure's:
text, however dense, leaves gaps between its characters."""


class CannotClean(ValueError):
    """The pixels are not laid out as our templates draw them: their text cannot be found."""


def _longest_runs(rows: Any) -> Any:
    """Each row's longest run of True."""
    import numpy as np

    padded = np.pad(rows.astype(np.int8), ((0, 0), (1, 1)))
    edges = np.diff(padded, axis=1)
    longest = np.zeros(rows.shape[0], dtype=np.int64)
    for row in range(rows.shape[0]):
        starts = np.flatnonzero(edges[row] == 1)
        if starts.size:
            ends = np.flatnonzero(edges[row] == -1)
            longest[row] = int((ends - starts).max())
    return longest


def clean_burned_in_text(ds: Dataset) -> None:
    """Clean Pixel Data for the images our templates draw: every line of text lies above the
    figure (the outline of the body), on the background. Each frame's rows above the first row
    that is mostly figure are set to the background (the value of its top left pixel, where a
    margin keeps text away), the pixels stored uncompressed, Burned In Annotation set to NO.
    Anything else (no such row) raises CannotClean: the proxy then refuses the instance."""
    from pydicom.uid import ExplicitVRLittleEndian

    pixels = ds.pixel_array.copy()  # colour comes out RGB, interleaved: said so below
    frames = pixels if int(ds.get("NumberOfFrames", 1) or 1) > 1 else pixels[None, ...]
    for frame in frames:
        background = frame[0, 0].copy()
        differs = frame != background
        if differs.ndim == 3:  # colour: a pixel differs where any sample does
            differs = differs.any(axis=2)
        busy = _longest_runs(differs) >= FIGURE_SHARE * differs.shape[1]
        if not busy.any():
            raise CannotClean("no figure below the text: not an image our templates drew")
        frame[: int(busy.argmax())] = background
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if int(ds.get("SamplesPerPixel", 1) or 1) == 3:
        ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB" if ds.BitsAllocated <= 8 else "OW"
    ds.BurnedInAnnotation = "NO"
