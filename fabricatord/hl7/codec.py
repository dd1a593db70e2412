"""HL7 v2 messages off the wire: character sets, segment separators, batches, parsing with
python-hl7, typed errors with their location (HL7 v2 table 0357) and field access that unescapes.

The charset is read from MSH-18 in the raw bytes before anything is decoded, because decoding
depends on it; a message without MSH-18 is UTF-8 when it is valid UTF-8 and the configured
default charset otherwise, so that a sender is always answered.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field, replace
from enum import IntEnum

from hl7.containers import Message
from hl7.util import unescape


class ErrorCondition(IntEnum):
    """HL7 table 0357, message error condition codes: what ERR-3 (ERR-1.4 before v2.5) carries."""

    MESSAGE_ACCEPTED = 0
    SEGMENT_SEQUENCE_ERROR = 100
    REQUIRED_FIELD_MISSING = 101
    DATA_TYPE_ERROR = 102
    TABLE_VALUE_NOT_FOUND = 103
    UNSUPPORTED_MESSAGE_TYPE = 200
    UNSUPPORTED_EVENT_CODE = 201
    UNSUPPORTED_PROCESSING_ID = 202
    UNSUPPORTED_VERSION_ID = 203
    UNKNOWN_KEY_IDENTIFIER = 204
    DUPLICATE_KEY_IDENTIFIER = 205
    APPLICATION_RECORD_LOCKED = 206
    APPLICATION_INTERNAL_ERROR = 207


CONTENT_ERRORS = frozenset(
    {
        ErrorCondition.REQUIRED_FIELD_MISSING,
        ErrorCondition.DATA_TYPE_ERROR,
        ErrorCondition.TABLE_VALUE_NOT_FOUND,
        ErrorCondition.UNKNOWN_KEY_IDENTIFIER,
        ErrorCondition.DUPLICATE_KEY_IDENTIFIER,
    }
)
"""HL7 v2 §2.9.2: errors in the content (AE, the sender must fix the message); every other code
is not about the content (AR, the sender may resend it unchanged)."""

ERROR_TEXTS = {
    ErrorCondition.MESSAGE_ACCEPTED: "Message accepted",
    ErrorCondition.SEGMENT_SEQUENCE_ERROR: "Segment sequence error",
    ErrorCondition.REQUIRED_FIELD_MISSING: "Required field missing",
    ErrorCondition.DATA_TYPE_ERROR: "Data type error",
    ErrorCondition.TABLE_VALUE_NOT_FOUND: "Table value not found",
    ErrorCondition.UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    ErrorCondition.UNSUPPORTED_EVENT_CODE: "Unsupported event code",
    ErrorCondition.UNSUPPORTED_PROCESSING_ID: "Unsupported processing id",
    ErrorCondition.UNSUPPORTED_VERSION_ID: "Unsupported version id",
    ErrorCondition.UNKNOWN_KEY_IDENTIFIER: "Unknown key identifier",
    ErrorCondition.DUPLICATE_KEY_IDENTIFIER: "Duplicate key identifier",
    ErrorCondition.APPLICATION_RECORD_LOCKED: "Application record locked",
    ErrorCondition.APPLICATION_INTERNAL_ERROR: "Application internal error",
}

VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2")
PROCESSING_IDS = ("P", "D", "T")


@dataclass(frozen=True)
class Charset:
    """An HL7 table 0211 character set: how to decode it and how DICOM names it."""

    hl7_name: str
    codec: str
    dicom: str
    """Specific Character Set (0008,0005); empty for the default repertoire (ASCII)."""


_CHARSETS = [
    Charset("ASCII", "ascii", ""),
    Charset("ISO IR6", "ascii", ""),
    Charset("8859/1", "iso8859-1", "ISO_IR 100"),
    Charset("ISO IR100", "iso8859-1", "ISO_IR 100"),
    Charset("8859/2", "iso8859-2", "ISO_IR 101"),
    Charset("8859/3", "iso8859-3", "ISO_IR 109"),
    Charset("8859/4", "iso8859-4", "ISO_IR 110"),
    Charset("8859/5", "iso8859-5", "ISO_IR 144"),
    Charset("8859/6", "iso8859-6", "ISO_IR 127"),
    Charset("8859/7", "iso8859-7", "ISO_IR 126"),
    Charset("8859/8", "iso8859-8", "ISO_IR 138"),
    Charset("8859/9", "iso8859-9", "ISO_IR 148"),
    Charset("8859/15", "iso8859-15", "ISO_IR 203"),
    Charset("UNICODE UTF-8", "utf-8", "ISO_IR 192"),
    Charset("GB 18030-2000", "gb18030", "GB18030"),
    Charset("KS X 1001", "euc_kr", "ISO 2022 IR 149"),
    Charset("ISO IR87", "iso2022_jp", "ISO 2022 IR 87"),
    Charset("BIG-5", "big5", "ISO_IR 192"),
]
CHARSETS = {charset.hl7_name: charset for charset in _CHARSETS}
UTF8 = CHARSETS["UNICODE UTF-8"]


def default(codec: str) -> Charset:
    """The table 0211 charset a Python codec name stands for (`latin-1` is `8859/1`)."""
    name = codecs.lookup(codec).name
    known = next((c for c in _CHARSETS if codecs.lookup(c.codec).name == name), None)
    return known or Charset(codec, name, "ISO_IR 192")


@dataclass
class Hl7Error(Exception):
    """A message we answer with AE or AR; the location says where, as ERR does."""

    code: ErrorCondition
    text: str
    segment: str = ""
    sequence: int = 1
    field: int = 0
    component: int = 0

    def __str__(self) -> str:
        where = self.location
        return f"{where}: {self.text}" if where else self.text

    @property
    def acknowledgment(self) -> str:
        return "AE" if self.code in CONTENT_ERRORS else "AR"

    @property
    def location(self) -> str:
        if not self.segment:
            return ""
        place = f"{self.segment}-{self.field}" if self.field else self.segment
        return f"{place}.{self.component}" if self.component else place


@dataclass(frozen=True)
class Decoded:
    """One frame as text with CR segment separators, and the charset it was decoded with."""

    text: str
    charset: Charset
    charset_error: Hl7Error | None = None
    """MSH-18 names a charset we do not know; the text was decoded as Latin-1 to answer it."""


_SEGMENT_BREAK = re.compile(rb"\r\n|\n|\r")


def _declared_charset(raw: bytes) -> str:
    """MSH-18's first repetition, read from the bytes (table 0211 names are ASCII)."""
    for segment in _SEGMENT_BREAK.split(raw):
        line = segment.lstrip()
        if line[:3] == b"MSH" and len(line) > 8:
            separator = line[3:4]
            fields = line.split(separator)
            if len(fields) > 17:
                repetition = fields[1][1:2] or b"~"
                return fields[17].split(repetition)[0].decode("ascii", "replace").strip()
            return ""
    return ""


def decode(raw: bytes, default_charset: str) -> Decoded:
    """The frame as text: MSH-18 honoured, else UTF-8 when valid, else `default_charset`."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    declared = _declared_charset(raw)
    error: Hl7Error | None = None
    if declared:
        charset = CHARSETS.get(declared.upper())
        if charset is None:
            error = Hl7Error(ErrorCondition.TABLE_VALUE_NOT_FOUND, f"unknown character set {declared!r}", "MSH", 1, 18)
            charset = CHARSETS["8859/1"]
    else:
        try:
            raw.decode("utf-8")
            charset = UTF8 if not raw.isascii() else CHARSETS["ASCII"]
        except UnicodeDecodeError:
            charset = default(default_charset)
    text = raw.decode(charset.codec, errors="replace")
    lines = [line for line in re.split(r"\r\n|\n|\r", text) if line.strip()]
    return Decoded("\r".join(line.lstrip() if i == 0 else line for i, line in enumerate(lines)), charset, error)


@dataclass
class Batch:
    """A frame's messages, with the envelope (FHS/BHS … BTS/FTS) they came in, if any."""

    messages: list[str] = field(default_factory=list)
    file_header: str = ""
    batch_header: str = ""


def split(text: str) -> Batch:
    """The messages of a frame: one, or several in a batch (HL7 v2 §2.10.3)."""
    batch = Batch()
    current: list[str] = []
    for segment in text.split("\r"):
        kind = segment[:3]
        if kind in ("FHS", "BHS"):
            if kind == "FHS":
                batch.file_header = segment
            else:
                batch.batch_header = segment
            continue
        if kind in ("BTS", "FTS") and (batch.batch_header or batch.file_header):
            continue  # a trailer without its header is content: it is answered AR 100 (tests/fuzz)
        # A segment before the frame's MSH is no message of its own: the frame is one message
        # whose MSH is misplaced, answered once (AR 100), not an ACK for each part.
        if kind == "MSH" and current and current[0].startswith("MSH"):
            batch.messages.append("\r".join(current))
            current = []
        current.append(segment)
    if current:
        batch.messages.append("\r".join(current))
    return batch


def version_tuple(version: str) -> tuple[int, ...]:
    """MSH-12 as numbers to compare; an unreadable one counts as 2.5."""
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return (2, 5)


@dataclass(frozen=True)
class Header:
    """What an acknowledgement needs of MSH, read even from a message we cannot otherwise use."""

    field_separator: str = "|"
    encoding_characters: str = "^~\\&"
    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    message_type: str = ""
    trigger: str = ""
    control_id: str = ""
    processing_id: str = "P"
    version: str = "2.5.1"
    accept_ack: str = ""
    application_ack: str = ""
    charset: str = ""
    misplaced: bool = False
    """MSH is not the message's first segment."""


def header(message: str) -> Header:
    """MSH as far as it goes; the defaults stand in for what is missing. An MSH after other
    segments is read, so that its AR names the message, and marked misplaced."""
    if not message.startswith("MSH") and "\rMSH" in message:
        return replace(header(message[message.index("\rMSH") + 1 :]), misplaced=True)
    if not message.startswith("MSH") or len(message) < 8 or message[3] in "\r\n":
        return Header()  # no MSH, or one that ends before its field separator (found by tests/fuzz)
    separator = message[3]
    fields = message.split("\r", 1)[0].split(separator)
    encoding = fields[1] if len(fields) > 1 and len(fields[1]) >= 2 else "^~\\&"
    encoding += "^~\\&"[len(encoding) :]  # MSH-2 may omit the escape and subcomponent characters
    component = encoding[0]

    def at(number: int, part: int = 0) -> str:
        """Component `part` (counted from 0) of MSH-`number`; empty when absent."""
        value = fields[number - 1] if number - 1 < len(fields) else ""
        return [*value.split(component), ""][part]

    def unescaped(number: int) -> str:
        return unescape_text(at(number).split(encoding[1])[0], separator, encoding)

    return Header(
        field_separator=separator,
        encoding_characters=encoding,
        sending_application=unescaped(3),
        sending_facility=unescaped(4),
        receiving_application=unescaped(5),
        receiving_facility=unescaped(6),
        message_type=at(9),
        trigger=at(9, 1),
        control_id=unescaped(10),
        processing_id=at(11) or "P",
        version=at(12) or "2.5.1",
        accept_ack=at(15),
        application_ack=at(16),
        charset=at(18),
    )


def unescape_text(value: str, separator: str = "|", encoding: str = "^~\\&") -> str:
    r"""\F\ \S\ \T\ \R\ \E\ back to their characters (enough for MSH, before python-hl7 parses)."""
    if len(encoding) < 3 or encoding[2] not in value:
        return value
    escape = encoding[2]
    table = {"F": separator, "S": encoding[0], "R": encoding[1], "E": escape, "T": encoding[3:4]}
    return re.sub(re.escape(escape) + r"([FSRET])" + re.escape(escape), lambda match: table[match.group(1)], value)


def escape(value: str, separator: str = "|", encoding: str = "^~\\&") -> str:
    """Text with the encoding characters escaped (HL7 v2 §2.7)."""
    escape_character = encoding[2]
    table = {escape_character: "E", separator: "F", encoding[0]: "S", encoding[1]: "R", encoding[3:4] or "&": "T"}
    return "".join(
        f"{escape_character}{table[character]}{escape_character}" if character in table else character
        for character in value
    )


Segment = list[str]
"""A segment's fields as sent, escapes and all: [name, field 1, field 2, …]; for MSH, field 1 is
the field separator and field 2 the encoding characters, as HL7 numbers them."""


class Parsed:
    """A message split into segments and fields, with field access by HL7 position, unescaped,
    never raising for absence. Repetitions, components and subcomponents are split when read:
    python-hl7 built every container of a message up front, and that cost more than the rest of
    taking an order."""

    def __init__(self, text: str) -> None:
        if not text.startswith("MSH"):
            raise Hl7Error(
                ErrorCondition.SEGMENT_SEQUENCE_ERROR, "the message does not start with an MSH segment", "MSH"
            )
        text = text.strip()
        separator = text[3:4]
        encoding = text[4 : text.find(separator, 4)] if separator else ""
        self._repetition = encoding[1:2] or "~"
        self._component = encoding[0:1] or "^"
        self._sub = encoding[3:4] or "&"
        self.esc = encoding[2:3] or "\\"
        if len({"\r", separator, self._repetition, self._component, self._sub}) < 5:
            raise Hl7Error(ErrorCondition.SEGMENT_SEQUENCE_ERROR, "unreadable message: its separators repeat", "MSH")
        # python-hl7's unescape, which knows every escape of HL7 v2 §2.7, reads the separators here.
        self._escaping = Message(
            "\r", [], esc=self.esc, separators="\r" + separator + self._repetition + self._component + self._sub
        )
        self.header = header(text)
        self.segments: list[Segment] = []
        self._first: dict[str, Segment] = {}
        for line in text.split("\r"):
            if line[:3] == "MSH" and line[3:4] == separator:
                fields = ["MSH", separator, *line[4:].split(separator)]
            else:
                fields = line.split(separator)
            self.segments.append(fields)
            self._first.setdefault(fields[0].strip(), fields)

    def first_segments(self) -> dict[str, Segment]:
        return self._first

    def has(self, name: str) -> bool:
        return name in self._first

    def value(self, segment: Segment | None, number: int, component: int = 1, sub: int = 1, repetition: int = 1) -> str:
        """One (sub)component, unescaped; empty when absent."""
        if segment is None or number >= len(segment):
            return ""
        field = segment[number]
        if segment[0] == "MSH" and number <= 2:
            return field if (component, sub, repetition) == (1, 1, 1) else ""
        for index, separator in ((repetition, self._repetition), (component, self._component), (sub, self._sub)):
            if separator in field:
                parts = field.split(separator)
                if index > len(parts):
                    return ""
                field = parts[index - 1]
            elif index != 1:
                return ""
        if self.esc in field:
            field = unescape(self._escaping, field)
        return field.strip()

    def repetitions(self, segment: Segment | None, number: int) -> int:
        if segment is None or number >= len(segment) or not segment[number]:
            return 0
        if segment[0] == "MSH" and number <= 2:  # the separators: one value each
            return 1
        return segment[number].count(self._repetition) + 1
