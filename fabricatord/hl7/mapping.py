"""From an order or patient message to what the worklist holds, through a field-mapping profile.

The default profile follows IHE Scheduled Workflow (RAD-4, RAD-13): IPC where the message has
it (OMI^O23), else OBR and ZDS (ORM^O01). A profile names other places per value, as a list of
alternatives; the first with a value wins. Only what the message says is read here: what it
lacks is filled in (or refused) by the workflow, which knows the counters and the policies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from fabricatord.config import Settings
from fabricatord.config.schema import Hl7Profile
from fabricatord.hl7.codec import ErrorCondition, Header, Hl7Error, Parsed, Segment, version_tuple

DEFAULT_FIELDS = {
    "patient_id": "PID-3.1",
    "issuer": "PID-3.4",
    "patient_name": "PID-5",
    "birth_date": "PID-7",
    "sex": "PID-8",
    "address": "PID-11",
    "phone": "PID-13",
    "placer_order_number": "ORC-2, OBR-2",
    "filler_order_number": "ORC-3, OBR-3",
    "accession_number": "IPC-1, OBR-18, OBR-3, ORC-3",
    "requested_procedure_id": "IPC-2, OBR-19",
    "study_instance_uid": "IPC-3, ZDS-1",
    "sps_id": "IPC-4, OBR-20",
    "modality": "IPC-5, OBR-24",
    "station_ae": "IPC-9",
    "station_name": "",
    "step_location": "",
    "start": "TQ1-7, ORC-7.4, OBR-27.4",
    "procedure_code": "OBR-44, OBR-4",
    "protocol_code": "IPC-6, OBR-4.4",
    "performing_physician": "OBR-34",
    "referring_physician": "PV1-8",
    "requesting_physician": "OBR-16, ORC-12",
    "priority": "TQ1-9, ORC-7.6, OBR-27.6",
    "admission_id": "PV1-19",
    "location": "PV1-3",
    "prior_patient_id": "MRG-1.1",
    "prior_issuer": "MRG-1.4",
}
"""Every value a profile can redirect, with the default profile's places."""

_PERSONS = {
    "patient_name": "XPN",
    "performing_physician": "XCN",
    "referring_physician": "XCN",
    "requesting_physician": "XCN",
}
SEGMENT_SINCE = {"IPC": (2, 5)}
"""Segments the default profile reads that not every version defines (IPC came with v2.5)."""
_PATH = re.compile(r"^([A-Z][A-Z0-9]{2})-(\d{1,3})(?:\.(\d{1,2}))?(?:\.(\d{1,2}))?$")
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_SEX = {"M": "M", "F": "F", "O": "O", "A": "O", "N": "O", "U": ""}
_PRIORITY = {"S": "STAT", "A": "HIGH", "R": "ROUTINE", "P": "ROUTINE", "C": "ROUTINE", "T": "MEDIUM"}


@dataclass(frozen=True)
class Place:
    segment: str
    field: int
    component: int = 0
    sub: int = 0

    def error(self, code: ErrorCondition, text: str, sequence: int = 1) -> Hl7Error:
        return Hl7Error(code, text, self.segment, sequence, self.field, self.component)


def parse_places(text: str) -> list[Place]:
    """`"IPC-1, OBR-18.1"` as places; ValueError names the one that is not SEG-FIELD[.COMPONENT[.SUB]]."""
    places = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        match = _PATH.match(part)
        if not match:
            raise ValueError(f"{part!r} is not SEG-FIELD[.COMPONENT[.SUBCOMPONENT]]")
        segment, number, component, sub = match.groups()
        places.append(Place(segment, int(number), int(component or 0), int(sub or 0)))
    return places


def profile_problems(settings: Settings) -> Iterator[tuple[str, str]]:
    """Config check (for the loader): every profile field is a known value at a readable place."""
    for index, profile in enumerate(settings.hl7.profiles):
        for name, text in profile.fields.items():
            where = f"hl7.profiles[{index}].fields.{name}"
            if name not in DEFAULT_FIELDS:
                yield where, f"unknown value (known: {', '.join(DEFAULT_FIELDS)})"
                continue
            try:
                parse_places(text)
            except ValueError as exc:
                yield where, str(exc)


def choose_profile(profiles: Iterable[Hl7Profile], head: Header) -> Hl7Profile:
    """The first profile whose `match` fits MSH-3/MSH-4; the default (IHE) profile otherwise."""
    for profile in profiles:
        wanted = profile.match
        if wanted.get("sending_application", head.sending_application) != head.sending_application:
            continue
        if wanted.get("sending_facility", head.sending_facility) != head.sending_facility:
            continue
        return profile
    return DEFAULT_PROFILE


DEFAULT_PROFILE = Hl7Profile(name="default")


@dataclass(frozen=True)
class PatientData:
    patient_id: str
    issuer: str
    name: str = ""
    birth_date: str = ""
    sex: str = ""
    address: str = ""
    phone: str = ""


@dataclass(frozen=True)
class ItemData:
    """One worklist item as the message states it; empty where the message is silent."""

    accession_number: str = ""
    requested_procedure_id: str = ""
    study_instance_uid: str = ""
    sps_id: str = ""
    modality: str = ""
    station_ae: str = ""
    station_name: str = ""
    step_location: str = ""
    start: datetime | None = None
    procedure_code: tuple[str, str, str] = ("", "", "")
    """Code value, coding scheme designator, code meaning."""
    protocol_code: tuple[str, str, str] = ("", "", "")
    performing_physician: str = ""
    priority: str = ""


@dataclass(frozen=True)
class OrderData:
    control: str
    """ORC-1, order control."""
    status: str
    """ORC-5, order status."""
    sequence: int
    """Which ORC of the message (for ERR locations)."""
    placer_order_number: str
    filler_order_number: str
    referring_physician: str
    requesting_physician: str
    admission_id: str
    location: str
    items: list[ItemData]


class Mapper:
    """Reads one message through one profile."""

    def __init__(self, parsed: Parsed, profile: Hl7Profile) -> None:
        self.parsed = parsed
        self.profile = profile
        self._places = _profile_places(profile)
        self._message_scope = parsed.first_segments()

    def _value(
        self, segment: Segment | None, number: int, component: int = 1, sub: int = 1, repetition: int = 1
    ) -> str:
        """A value as DICOM can hold it: a backslash (DICOM's value delimiter) becomes a slash."""
        return self.parsed.value(segment, number, component, sub, repetition).replace("\\", "/")

    def places(self, name: str) -> list[Place]:
        """Where this profile reads `name`, in order."""
        return self._places[name]

    def locate(self, name: str) -> Place | None:
        """Where an ERR about a missing `name` points: the first place whose segment the message
        has, else the first its version defines (a v2.3 sender knows no IPC), else the first."""
        places = self._places[name]
        present = self.parsed.first_segments()
        version = version_tuple(self.parsed.header.version)
        return (
            next((p for p in places if p.segment in present), None)
            or next((p for p in places if version >= SEGMENT_SINCE.get(p.segment, (2, 1))), None)
            or next(iter(places), None)
        )

    def _read(self, name: str, scope: dict[str, Segment]) -> tuple[str, Place | None]:
        """The first non-empty value of `name` in `scope`, with where it was found."""
        for place in self._places[name]:
            segment = scope.get(place.segment)
            if segment is None:
                continue
            if name in _PERSONS and not place.component:
                value = self._person(segment, place.field, _PERSONS[name])
            else:
                value = self._value(segment, place.field, place.component or 1, place.sub or 1)
            if value:
                return value, place
        return "", None

    def text(self, name: str, scope: dict[str, Segment] | None = None, limit: int = 0, sequence: int = 1) -> str:
        value, place = self._read(name, self._message_scope if scope is None else scope)
        if limit and place and len(value) > limit:
            raise place.error(
                ErrorCondition.DATA_TYPE_ERROR,
                f"{name.replace('_', ' ')} {value!r} is longer than {limit} characters",
                sequence,
            )
        return value

    def _person(self, segment: Segment, number: int, kind: str) -> str:
        """XPN, XCN or CNN (NDL component 1) repetitions as a DICOM PN, with A/I/P groups."""
        groups: dict[str, str] = {}
        for repetition in range(1, max(self.parsed.repetitions(segment, number), 1) + 1):

            def part(component: int, sub: int = 1, rep: int = repetition) -> str:
                return self._value(segment, number, component, sub, rep)

            if kind == "XPN":
                names = [part(1), part(2), part(3), part(5), part(4)]  # family given middle prefix suffix
                representation = part(8)
            elif part(1, 2):  # CNN: ID&family&given&middle&suffix&prefix in one component
                names = [part(1, 2), part(1, 3), part(1, 4), part(1, 6), part(1, 5)]
                representation = ""
            else:
                names = [part(2), part(3), part(4), part(6), part(5)]
                representation = part(9) if kind == "XCN" else ""
            name = "^".join(n.replace("^", " ").replace("=", " ") for n in names).rstrip("^")
            if name:
                groups.setdefault(representation if representation in ("I", "P") else "A", name)
        if not groups:
            return ""
        return "=".join([groups.get("A", ""), groups.get("I", ""), groups.get("P", "")]).rstrip("=")

    def patient(self) -> PatientData:
        """PID's patient; ERR 101 at PID-3 without an identifier."""
        patient_id = self.text("patient_id", limit=64)
        if not patient_id:
            raise Hl7Error(ErrorCondition.REQUIRED_FIELD_MISSING, "no patient identifier", "PID", 1, 3)
        birth = self.text("birth_date")
        if birth and not (len(birth) >= 8 and birth[:8].isdigit()):
            raise Hl7Error(ErrorCondition.DATA_TYPE_ERROR, f"birth date {birth!r} is not YYYYMMDD", "PID", 1, 7)
        sex = self.text("sex").upper()
        if sex and sex not in _SEX:
            raise Hl7Error(ErrorCondition.TABLE_VALUE_NOT_FOUND, f"sex {sex!r} is not in HL7 table 0001", "PID", 1, 8)
        return PatientData(
            patient_id=patient_id,
            issuer=self.text("issuer", limit=64),
            name=self.text("patient_name"),
            birth_date=birth[:8],
            sex=_SEX.get(sex, ""),
            address=self._address(),
            phone=self.text("phone")[:64],
        )

    def _address(self) -> str:
        places = self._places["address"]
        scope = self._message_scope
        for place in places:
            segment = scope.get(place.segment)
            if segment is None:
                continue
            if place.component:
                return self._value(segment, place.field, place.component)[:64]
            # XAD street^other^city^state^zip^country, as one line.
            parts = [self._value(segment, place.field, c) for c in (1, 2, 3, 4, 5, 6)]
            line = ", ".join(p for p in parts if p)
            if line:
                return line[:64]
        return ""

    def prior_patient(self) -> tuple[str, str]:
        """MRG-1: the identifier being merged away or changed."""
        prior = self.text("prior_patient_id", limit=64)
        if not prior:
            raise Hl7Error(ErrorCondition.REQUIRED_FIELD_MISSING, "no prior patient identifier", "MRG", 1, 1)
        return prior, self.text("prior_issuer", limit=64)

    def orders(self) -> list[OrderData]:
        """Each ORC group (ORC … up to the next ORC) as an order; an item per OBR, or per IPC."""
        groups: list[list[Segment]] = []
        for segment in self.parsed.segments:
            name = segment[0].strip()
            if name == "ORC" or (name == "OBR" and not groups):
                groups.append([])
            if groups:
                groups[-1].append(segment)
        if not groups:
            raise Hl7Error(ErrorCondition.REQUIRED_FIELD_MISSING, "the message holds no order (ORC)", "ORC")
        return [self._order(group, sequence) for sequence, group in enumerate(groups, start=1)]

    def _order(self, group: list[Segment], sequence: int) -> OrderData:
        group_scope = {**self._message_scope, **_first_of_each(group)}
        scopes = []
        for procedure in _split_at(group, "OBR"):
            procedure_scope = {**group_scope, **_first_of_each(procedure)}
            ipcs = [segment for segment in procedure if str(segment[0]).strip() == "IPC"]
            scopes += [{**procedure_scope, "IPC": ipc} for ipc in ipcs] or [procedure_scope]
        orc = group_scope.get("ORC")
        control = self._value(orc, 1).upper() if orc is not None else "NW"
        if not control:
            raise Hl7Error(ErrorCondition.REQUIRED_FIELD_MISSING, "no order control", "ORC", sequence, 1)
        return OrderData(
            control=control,
            status=self._value(orc, 5).upper() if orc is not None else "",
            sequence=sequence,
            placer_order_number=self.text("placer_order_number", group_scope, 64, sequence),
            filler_order_number=self.text("filler_order_number", group_scope, 64, sequence),
            referring_physician=self.text("referring_physician", group_scope),
            requesting_physician=self.text("requesting_physician", group_scope),
            admission_id=self.text("admission_id", group_scope, 64),
            location=self.text("location", group_scope)[:64],
            items=[self._item(scope, sequence) for scope in scopes],
        )

    def _item(self, scope: dict[str, Segment], sequence: int) -> ItemData:
        uid = self.text("study_instance_uid", scope, 64, sequence)
        if uid and not _UID.match(uid):
            _, place = self._read("study_instance_uid", scope)
            assert place is not None
            raise place.error(
                ErrorCondition.DATA_TYPE_ERROR, f"Study Instance UID {uid!r} is not a valid UID", sequence
            )
        return ItemData(
            accession_number=self.text("accession_number", scope, 16, sequence),
            requested_procedure_id=self.text("requested_procedure_id", scope, 16, sequence),
            study_instance_uid=uid,
            sps_id=self.text("sps_id", scope, 16, sequence),
            modality=self.text("modality", scope, 16, sequence).upper(),
            station_ae=self.text("station_ae", scope, 16, sequence),
            station_name=self.text("station_name", scope, 16, sequence),
            step_location=self.text("step_location", scope, 16, sequence),
            start=self._start(scope, sequence),
            procedure_code=self._code("procedure_code", scope),
            protocol_code=self._code("protocol_code", scope),
            performing_physician=self.text("performing_physician", scope),
            priority=_PRIORITY.get(self.text("priority", scope).upper()[:1], ""),
        )

    def _code(self, name: str, scope: dict[str, Segment]) -> tuple[str, str, str]:
        """CE/CWE identifier^text^coding system from the named component on (OBR-4.4: the alternate)."""
        for place in self._places[name]:
            segment = scope.get(place.segment)
            first = place.component or 1
            value, meaning, scheme = (self._value(segment, place.field, first + i) for i in range(3))
            if value or meaning:  # text without a code still describes the procedure
                return value[:16], scheme[:16], meaning[:64]
        return "", "", ""

    def _start(self, scope: dict[str, Segment], sequence: int) -> datetime | None:
        value, place = self._read("start", scope)
        if not value or place is None:
            return None
        parsed = parse_datetime(value)
        if parsed is None:
            raise place.error(ErrorCondition.DATA_TYPE_ERROR, f"start {value!r} is not an HL7 date-time", sequence)
        return parsed


_PLACES: dict[int, tuple[Hl7Profile, dict[str, list[Place]]]] = {}


def _profile_places(profile: Hl7Profile) -> dict[str, list[Place]]:
    """Every value's places under `profile`, parsed once per profile rather than per message
    (profiles hold tables, so they are not hashable: kept by identity, with the profile itself)."""
    cached = _PLACES.get(id(profile))
    if cached is None or cached[0] is not profile:
        places = {name: parse_places(profile.fields.get(name, default)) for name, default in DEFAULT_FIELDS.items()}
        cached = _PLACES[id(profile)] = (profile, places)
    return cached[1]


def parse_datetime(value: str) -> datetime | None:
    """HL7 DTM (YYYY[MM[DD[HH[MM[SS[.S…]]]]]][±ZZZZ]) as a naive local date-time; None if malformed."""
    digits = re.split(r"[+-]", value, maxsplit=1)[0].partition(".")[0]
    if not digits.isdigit() or len(digits) < 8 or len(digits) % 2:
        return None
    padded = (digits + "000000")[:14]
    try:
        return datetime.strptime(padded, "%Y%m%d%H%M%S")
    except ValueError:
        return None


def _first_of_each(segments: list[Segment]) -> dict[str, Segment]:
    scope: dict[str, Segment] = {}
    for segment in segments:
        scope.setdefault(str(segment[0]).strip(), segment)
    return scope


def _split_at(segments: list[Segment], name: str) -> list[list[Segment]]:
    """The ORC group cut before each OBR; what precedes the first OBR belongs to it."""
    parts: list[list[Segment]] = [[]]
    for segment in segments:
        if str(segment[0]).strip() == name and any(str(s[0]).strip() == name for s in parts[-1]):
            parts.append([])
        parts[-1].append(segment)
    return parts
