"""Stored files on their way out again (C-MOVE, C-GET, routing, `fabricatord send`): the
dataset's bytes as they lie on disk when the receiver took the file's transfer syntax, re-encoded
between the little-endian syntaxes when it took only the other, and which accepted presentation
context carries them.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread
from pynetdicom.dsutils import encode

LITTLE_ENDIAN = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})
"""The syntaxes a stored file may be converted between for a receiver that declined its own."""
CHUNK = 1024 * 1024
"""How much of a stored file is read at a time when it is sent."""


class Context(Protocol):
    """An accepted presentation context, ours or the peer's."""

    @property
    def id(self) -> int: ...
    @property
    def abstract_syntax(self) -> str: ...
    @property
    def transfer_syntax(self) -> str: ...


@dataclass(frozen=True)
class StoredDataset:
    """The dataset part of a stored file: what goes on the wire when its syntax was accepted."""

    path: Path
    offset: int
    size: int

    def chunks(self) -> Iterator[bytes]:
        with self.path.open("rb") as stream:
            stream.seek(self.offset)
            left = self.size
            while left > 0:
                chunk = stream.read(min(CHUNK, left))
                if not chunk:
                    raise OSError(f"{self.path} ended {left} bytes early")
                left -= len(chunk)
                yield chunk


def stored_dataset(path: Path) -> StoredDataset:
    """Where a stored file's dataset starts: after the preamble, DICM and the file meta group,
    whose length its first element gives (PS3.10 7.1); read, not parsed."""
    with path.open("rb") as stream:
        head = stream.read(144)
        size = os.fstat(stream.fileno()).st_size
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise ValueError(f"{path.name} is not a Part 10 file with a file meta group length")
    offset = 144 + struct.unpack("<L", head[140:144])[0]
    return StoredDataset(path, offset, size - offset)


def converted(path: Path, syntax: str) -> bytes:
    """The dataset re-encoded in a little-endian syntax the receiver accepted."""
    ds = dcmread(path)
    implicit = syntax == "1.2.840.10008.1.2"
    data = encode(ds, implicit, True)
    if data is None:
        raise ValueError(f"cannot encode {path.name} for transfer syntax {syntax}")
    return bytes(data)


def outgoing(
    contexts: Iterable[Any], sop_class: str, syntax: str, path: Path
) -> tuple[Any, StoredDataset | bytes] | None:
    """The context a stored file goes on and what to send on it: as stored on a context of its
    own syntax, else converted for a little-endian one; None when neither was accepted (a
    compressed file the receiver declined). OSError or ValueError when the file cannot be read."""
    candidates = [c for c in contexts if c.abstract_syntax == sop_class]
    same = next((c for c in candidates if c.transfer_syntax == syntax), None)
    if same is not None:
        return same, stored_dataset(path)
    convertible = next((c for c in candidates if c.transfer_syntax in LITTLE_ENDIAN), None)
    if syntax not in LITTLE_ENDIAN or convertible is None:
        return None
    return convertible, converted(path, convertible.transfer_syntax)
