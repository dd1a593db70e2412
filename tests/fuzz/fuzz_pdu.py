"""Coverage-guided fuzz target (atheris) for the bytes a peer writes to an association we accept.

    .venv/bin/python tests/fuzz/fuzz_pdu.py -max_total_time=600 tests/fuzz/corpus/pdu

The input is a stream of PDUs, fed to the acceptor's protocol (`fabricatord.dicom.ul.protocol`)
in pieces of the sizes the input's first byte picks, as TCP would cut them, on a fake transport
and clock. The handler accepts what negotiation accepts and serves each request at once. The
properties: the protocol never raises, whatever the bytes; everything it writes is a PDU that
decodes; once it closes it writes nothing more; each message it hands on came on a context it
accepted; and the connection's end is told exactly once.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["fabricatord.dicom.ul"]):
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from fabricatord.dicom.ul import pdu
    from fabricatord.dicom.ul.dimse import MessageLimits
    from fabricatord.dicom.ul.negotiation import Negotiation, Policy, Refusal, negotiate, refusal
    from fabricatord.dicom.ul.protocol import Association, PduLimits, State, Timers
    from fabricatord.obs.logging import configure

SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
POLICY = Policy(
    "FABRICATORD",
    {"1.2.840.10008.1.1": SYNTAXES, "1.2.840.10008.5.1.4.1.2.2.1": SYNTAXES, "1.2.840.10008.5.1.4.1.1.2": SYNTAXES},
    {"1.2.840.10008.5.1.4.1.1.2"},
    16384,
    "1.2.3",
    "FUZZ",
)
configure("critical", "json", False)  # a warning per input would be most of the time spent
warnings.simplefilter("ignore")


class Handler:
    def __init__(self) -> None:
        self.endings: list[str] = []
        self.contexts: set[int] = set()

    def requested(self, association: Association, request: pdu.AssociateRequest) -> Negotiation | Refusal:
        answer = refusal(request, POLICY, None, False) or negotiate(request, POLICY)
        if isinstance(answer, Negotiation):
            self.contexts = set(answer.contexts)
        return answer

    def established(self, association: Association) -> None:
        pass

    def sink_for(self, association: Association, context_id: int, command: Any) -> None:
        return None

    def received(self, association: Association, message: Any) -> None:
        assert message.context_id in self.contexts, message.context_id
        association.done()

    def cancelled(self, association: Association, message: Any) -> None:
        assert message.context_id in self.contexts, message.context_id

    def ended(self, association: Association, how: str) -> None:
        self.endings.append(how)

    def dropped(self, association: Association, message: Any) -> None:
        assert message.context_id in self.contexts, message.context_id


def written(data: bytes) -> list[pdu.Pdu]:
    """Every PDU the protocol wrote; each must decode."""
    found = []
    while data:
        kind, _, length = pdu.HEADER.unpack_from(data)
        found.append(pdu.decode(kind, data[6 : 6 + length]))
        data = data[6 + length :]
    return found


def one_input(data: bytes) -> None:
    if not data:
        return
    piece, stream = 1 + data[0] % 64 * 97, data[1:]
    handler = Handler()
    association = Association(
        handler, PduLimits.of(16384), Timers(30, 60), Clock(), MessageLimits(command=4096, in_memory=65536)
    )
    transport = StringTransport()
    association.makeConnection(transport)
    closed_at = None
    for offset in range(0, len(stream), piece):
        association.dataReceived(stream[offset : offset + piece])  # the property: this never raises
        if association.state is State.CLOSING and closed_at is None:
            closed_at = len(transport.value())
    if closed_at is not None:
        assert len(transport.value()) == closed_at, "wrote after closing"
    written(transport.value())
    association.connectionLost()
    assert len(handler.endings) == 1, handler.endings


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
