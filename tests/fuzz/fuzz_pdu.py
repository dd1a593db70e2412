"""Coverage-guided fuzz target (atheris) for the bytes a peer writes to an association we accept.

    .venv/bin/python tests/fuzz/fuzz_pdu.py -max_total_time=600 tests/fuzz/corpus/pdu

The input is a stream of PDUs, read by the guard's reader (`fabricatord.dicom.guard`) from a
socket that returns the input, as an accepted association reads them. Each PDU the reader passes
on is taken further the way the association would: an A-ASSOCIATE-RQ the guard did not refuse
is turned into pynetdicom's primitive, and each P-DATA-TF goes through the guard's message caps
into pynetdicom's DIMSE decoder. The properties: the reader never raises, whatever the bytes;
every PDU ends as one outcome (decoded, closed, invalid or hung up); and a request the guard
let through never crashes the association thread with what the guard promises to remove (even
or repeated context IDs, invalid AE titles).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["fabricatord.dicom.guard", "pynetdicom.pdu", "pynetdicom.pdu_items"]):
    from pynetdicom import AE
    from pynetdicom.association import Association

    from fabricatord.dicom import guard
    from fabricatord.obs.logging import configure

LIMITS = guard.Limits.of(16384, 1 << 20)
OUTCOMES = {"Evt3", "Evt4", "Evt6", "Evt10", "Evt12", "Evt13", "Evt16", "Evt17", "Evt19"}
APPLICATION = AE(ae_title="FUZZ")
configure("critical", "json", False)  # a warning per input would be most of the time spent
warnings.simplefilter("ignore")  # pydicom warns about every invalid UID it decodes


class BytesSocket:
    """What pynetdicom's AssociationSocket offers the reader, over a byte string."""

    def __init__(self, data: bytes) -> None:
        self.data, self.offset, self.closed = data, 0, False
        self.socket = None  # nothing to send an A-ABORT to

    def recv(self, count: int) -> bytearray:
        chunk = self.data[self.offset : self.offset + count]
        self.offset += len(chunk)
        return bytearray(chunk)

    def close(self) -> None:
        self.closed = True

    @property
    def remaining(self) -> int:
        return len(self.data) - self.offset


def association() -> Any:
    assoc = Association(APPLICATION, "acceptor")
    guard.guard(assoc, LIMITS)
    return assoc


def one_input(data: bytes) -> None:
    assoc = association()
    dul = assoc.dul
    sock = BytesSocket(data)
    dul.socket = sock
    while sock.remaining and not sock.closed:
        before = dul.event_queue.qsize()
        dul._read_pdu_data()  # the property: this never raises
        events = [dul.event_queue.get_nowait() for _ in range(dul.event_queue.qsize() - before)]
        assert sock.closed or (len(events) == 1 and events[0] in OUTCOMES), events
        if sock.closed or events[0] in ("Evt17", "Evt19"):
            break
        pdu = dul._recv_pdu.get_nowait()
        if events[0] == "Evt6" and getattr(assoc, "_fabricatord_refusal", None) is None:
            _negotiable(pdu)
        elif events[0] == "Evt10":
            _decode_p_data(assoc, pdu)


def _negotiable(pdu: Any) -> None:
    """A request the guard let through: pynetdicom may still refuse its content, but never for
    the context IDs or AE titles the guard vets."""
    try:
        pdu.to_primitive()
    except Exception as exc:  # pynetdicom's own refusal of some other content: an abort, caught
        message = str(exc)
        assert "context_id" not in message and "odd integer" not in message, message
        assert "AE title" not in message and "ae_title" not in message, message


def _decode_p_data(assoc: Any, pdu: Any) -> None:
    """The message caps see every P-DATA; what pynetdicom's decoder does with its content ends
    the association through the guarded thread, so only the caps' own code must not raise."""
    primitive = pdu.to_primitive()
    assoc.dimse.message = None
    try:
        assoc.dimse.receive_primitive(primitive)
    except Exception as exc:
        origin = _frames(exc)[-1].f_code.co_filename
        assert not origin.endswith("guard.py"), f"the guard raised: {exc!r}"


def _frames(exc: BaseException) -> list[Any]:
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
