"""A raw MLLP client: writes exactly the bytes a test asks for (framed or not) and reads back
the frames the listener answered, without a library smoothing either side."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from tests.robustness.wire import Connection

START, END = b"\x0b", b"\x1c\r"


def framed(*messages: bytes) -> bytes:
    return b"".join(START + message + END for message in messages)


def message(control_id: str, *segments: str, kind: str = "ORM^O01", version: str = "2.5.1", msh: str = "") -> bytes:
    """An HL7 message from ROBUST at TESTFAC; `msh` is appended to MSH-12 (MSH-13 onwards)."""
    header = f"MSH|^~\\&|ROBUST|TESTFAC|FABRICATORD|RAD|20261124090000||{kind}|{control_id}|P|{version}{msh}"
    return "\r".join([header, *segments]).encode()


def order(
    control_id: str, accession: str, control: str = "NW", name: str = "Robust^Rita", status: str = "SC", **options: str
) -> bytes:
    """An ORM^O01 for one CT abdomen; ORC-1 `control`, ORC-5 `status`."""
    return message(
        control_id,
        f"PID|1||MRN-{accession}^^^TESTHOSP||{name}||19800101|F",
        f"ORC|{control}|PO-{accession}|FO-{accession}||{status}||^^^20261124090000^^R",
        f"OBR|1|PO-{accession}|FO-{accession}|CTABD^CT Abdomen^LOCAL||||||||||||||{accession}||||||CT",
        **options,
    )


@dataclass(frozen=True)
class Ack:
    """What one answered frame says: MSA-1, MSA-2, and its ERR segments."""

    text: str

    @property
    def segments(self) -> list[str]:
        return self.text.split("\r")

    @property
    def code(self) -> str:
        return self._msa(1)

    @property
    def control_id(self) -> str:
        return self._msa(2)

    @property
    def errors(self) -> list[str]:
        return [s for s in self.segments if s.startswith("ERR")]

    def _msa(self, field: int) -> str:
        return next(s for s in self.segments if s.startswith("MSA")).split(self.text[3])[field]


class Link(Connection):
    """One TCP connection to the MLLP listener."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        super().__init__(port, timeout)
        self._pending = b""

    def frames(self, count: int, encoding: str = "utf-8") -> list[Ack]:
        """The next `count` frames; fewer if the listener closes first."""
        found: list[Ack] = []
        while len(found) < count:
            end = self._pending.find(b"\x1c")
            if end >= 0:
                body = self._pending[:end]
                self._pending = self._pending[end + 1 :].lstrip(b"\r")
                found.append(Ack(body[body.find(START) + 1 :].decode(encoding, errors="replace").strip("\r")))
                continue
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self._pending += chunk
        return found

    def ack(self, data: bytes) -> Ack:
        """Send one framed message, read its one answer."""
        self.send(framed(data))
        answered = self.frames(1)
        assert answered, "the listener closed without an answer"
        return answered[0]

    def silent_for(self, seconds: float) -> bool:
        """True if nothing arrives, and the connection stays open, for `seconds`."""
        if self._pending:
            return False
        self.sock.settimeout(seconds)
        try:
            self.sock.recv(1, socket.MSG_PEEK)  # a byte, or b"" for a close: not silent
            return False
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(30)
