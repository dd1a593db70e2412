"""Checks and parsers of single values, shared by the loader and the layers that read them."""

from __future__ import annotations

import codecs
import ipaddress
import re
from collections.abc import Callable
from typing import Any

# PS3.5 6.2: AE is at most 16 characters of the default repertoire, no backslash or control chars.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
# PS3.5 9.1: UID components are digits without leading zeros, separated by dots.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


_NODE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def check_node_name(value: object) -> str | None:
    if value == "" or (isinstance(value, str) and _NODE_NAME.fullmatch(value)):
        return None
    return "letters, digits, '.', '_' and '-', at most 64 (or empty: the host name)"


def is_valid_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and _UID.fullmatch(value) is not None


def parse_duration(text: str) -> float:
    """`"30s"`, `"2m"`, `"500ms"`, `"30d"` or a bare number of seconds → seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (expected e.g. 30s, 2m, 500ms, 30d)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def parse_duration_range(text: str) -> tuple[float, float]:
    """`"30s"` → (30, 30); `"10s-60s"` → (10, 60)."""
    low, sep, high = text.partition("-")
    first = parse_duration(low)
    last = parse_duration(high) if sep else first
    if last < first:
        raise ValueError(f"range {text!r} ends before it starts")
    return first, last


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$")
_UNIT_BYTES = {
    None: 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}


def parse_size(text: str) -> int:
    """`"50GiB"`, `"500MB"`, `"0"` → bytes."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (expected e.g. 500MB, 50GiB, 0)")
    return int(float(match.group(1)) * _UNIT_BYTES[match.group(2)])


def show_size(size: float) -> str:
    """Bytes as people read them: `812 B`, `1.5 KiB`, `60.2 MiB`, `4.0 GiB`."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def check_networks(value: Any) -> str | None:
    try:
        for item in value:
            ipaddress.ip_network(item, strict=False)
    except (TypeError, ValueError):
        return "IP addresses or networks such as 127.0.0.1 or 10.0.0.0/8"
    return None


def check_ae_title(value: Any) -> str | None:
    if not isinstance(value, str) or not _AE_TITLE.match(value) or not value.strip():
        return "an AE title: 1 to 16 printable ASCII characters, no backslash, not blank"
    return None


def check_uid_root(value: Any) -> str | None:
    if not isinstance(value, str) or not is_valid_uid(value) or len(value) > 40:
        return "a UID root: digits and dots such as 2.25 or 1.2.826.0.1.3680043.10.999, at most 40 characters"
    return None


def check_port(value: Any) -> str | None:
    if not isinstance(value, int) or not 0 <= value <= 65535:
        return "a TCP port from 0 to 65535 (0 picks a free one)"
    return None


def check_positive(value: Any) -> str | None:
    if not isinstance(value, int) or value < 1:
        return "a whole number of at least 1"
    return None


def check_host(value: Any) -> str | None:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        return "a host name or IP address"
    return None


def check_codec(value: Any) -> str | None:
    try:
        codecs.lookup(str(value))
    except LookupError:
        return "a character set Python knows, such as iso-8859-1, cp1252 or utf-8"
    return None


def _parsable(parser: Callable[[str], object], expected: str) -> Callable[[Any], str | None]:
    """A check that a value parses; the complaint says what was expected."""

    def check(value: Any) -> str | None:
        try:
            parser(str(value))
        except ValueError:
            return expected
        return None

    return check


check_size = _parsable(parse_size, "a size such as 500MB, 50GiB or 0")
check_duration = _parsable(parse_duration, "a duration such as 30s, 2m or 500ms")
check_duration_range = _parsable(
    parse_duration_range, "a duration, or a range such as 10s-60s that ends after it starts"
)


def check_uri(value: object) -> str | None:
    """An identifier system: an absolute URI, as FHIR's `Identifier.system` must be."""
    if not isinstance(value, str) or not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$", value):
        return "an absolute URI such as urn:oid:1.2.3 or https://hospital.example/mrn"
    return None
