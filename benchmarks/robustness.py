"""The DICOM bad inputs of ROBUSTNESS.md, upper layer and DIMSE, sent to fabricatord and to the peers.

    .venv/bin/python benchmarks/robustness.py [--json OUT]

Each input is written byte by byte on a raw socket (tests/robustness/wire.py) to fabricatord,
to pynetdicom's own storescp (what fabricatord would answer without its guard), to DCMTK's
storescp and to Orthanc; the table shows what each answered within 5 s: an A-ASSOCIATE-RJ
(result/source/reason), an A-ABORT (source/reason), an A-ASSOCIATE-AC with the contexts it
accepted, a DIMSE status, a close, or nothing. The last row says whether each still answers
C-ECHO.
docs/robustness.md holds the table of a run, and tests/robustness/test_peers.py measures it again
in the suite.
"""

from __future__ import annotations

import argparse
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import peers
from benchmarks.report import RESULTS, finish, table
from benchmarks.report import start as start_report
from tests.robustness.dimse import (
    DEFLATED_LE,
    GARBAGE,
    LONG_ELEMENT,
    deflate_bomb,
    empty_items,
    instance,
    nested,
)
from tests.robustness.wire import (
    A_ASSOCIATE_AC,
    CT_IMAGE_STORAGE,
    IMPLICIT_LE,
    VERIFICATION,
    Answer,
    Response,
    Wire,
    associate_rq,
    command,
    context,
    echo_rq,
    encode,
    p_data,
    pdu,
    pdv,
    store_rq,
)

WAIT = 5.0
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
Case = Callable[[Wire, bytes], Answer | Response]


def _after_association(wire: Wire, called: bytes, data: bytes) -> Answer:
    wire.associate(associate_rq(called))
    wire.send(data)
    return wire.read()


def _command(field: int, **extra: object) -> bytes:
    return command(AffectedSOPClassUID=VERIFICATION, CommandField=field, CommandDataSetType=0x0101, **extra)


def _fragments_forever(wire: Wire, called: bytes) -> Answer:
    wire.associate(associate_rq(called, contexts=[context(1, CT_IMAGE_STORAGE)]))
    store = command(
        AffectedSOPClassUID=CT_IMAGE_STORAGE,
        CommandField=1,
        MessageID=1,
        Priority=0,
        CommandDataSetType=0,
        AffectedSOPInstanceUID="1.2.3.4",
    )
    wire.send(p_data(pdv(1, 3, store)))
    for _ in range(4096):  # 64 MiB of one dataset in PDUs every peer takes, never the last fragment
        wire.send(p_data(pdv(1, 0, bytes(16000))))
    return wire.read()


UID = "1.2.826.0.1.3680043.9.7433.70.90.1"


def _stored(data: bytes, syntax: str = IMPLICIT_LE, uid: str = UID, sop_class: str = CT_IMAGE_STORAGE) -> Case:
    """A C-STORE-RQ for `uid` of `sop_class` with `data`, on a CT Image Storage context in `syntax`."""

    def case(wire: Wire, called: bytes) -> Answer | Response:
        answer = wire.associate(associate_rq(called, contexts=[context(1, CT_IMAGE_STORAGE, syntax)]))
        if answer.kind != A_ASSOCIATE_AC or answer.accepted_contexts().get(1) != 0:
            return answer
        wire.request(1, store_rq(sop_class, uid), data, fragment=16000)  # within every peer's maximum PDU
        return wire.response()

    return case


def _instance(uid: str = UID, **values: object) -> bytes:
    return encode(instance(uid, **values))


CASES: dict[str, Case] = {
    "HTTP request": lambda w, _: (w.send(b"GET / HTTP/1.1\r\nHost: pacs\r\n\r\n"), w.read())[1],
    "A-ASSOCIATE-RQ declaring 2 GiB": lambda w, _: (w.send(struct.pack(">BBL", 1, 0, 2**31) + bytes(60000)), w.read())[
        1
    ],
    "unknown PDU type 0x09": lambda w, _: (w.send(pdu(0x09, bytes(4))), w.read())[1],
    "protocol version 2": lambda w, c: w.associate(associate_rq(c, version=2)),
    "no application context": lambda w, c: w.associate(associate_rq(c, application_context=None)),
    "wrong application context": lambda w, c: w.associate(associate_rq(c, application_context="1.2.3.4")),
    "blank calling AE": lambda w, c: w.associate(associate_rq(c, calling=b" " * 16)),
    "control character in calling AE": lambda w, c: w.associate(associate_rq(c, calling=b"ROB\x07ST")),
    "even context ID": lambda w, c: w.associate(associate_rq(c, contexts=[context(2, VERIFICATION)])),
    "repeated context ID": lambda w, c: w.associate(
        associate_rq(c, contexts=[context(1, VERIFICATION), context(1, CT_IMAGE_STORAGE)])
    ),
    "P-DATA before association": lambda w, _: (w.send(p_data(pdv(1, 3, echo_rq()))), w.read())[1],
    "A-RELEASE-RQ before association": lambda w, _: (w.send(pdu(5, bytes(4))), w.read())[1],
    "P-DATA on an unknown context ID": lambda w, c: _after_association(w, c, p_data(pdv(7, 3, echo_rq()))),
    "PDV length below 2": lambda w, c: _after_association(w, c, pdu(4, struct.pack(">L", 1) + b"\x01")),
    "PDV beyond its PDU": lambda w, c: _after_association(w, c, pdu(4, struct.pack(">LBB", 500, 1, 3) + bytes(10))),
    "unknown Command Field 0x0777": lambda w, c: _after_association(
        w, c, p_data(pdv(1, 3, _command(0x0777, MessageID=1)))
    ),
    "unsolicited C-ECHO-RSP": lambda w, c: _after_association(
        w, c, p_data(pdv(1, 3, _command(0x8030, MessageIDBeingRespondedTo=1, Status=0)))
    ),
    "64 MiB of fragments, none the last": _fragments_forever,
    "C-STORE: six bytes of garbage": _stored(GARBAGE),
    "C-STORE: an element declaring 0x7FFFFFFF bytes": _stored(_instance() + LONG_ELEMENT),
    "C-STORE: an empty dataset": _stored(b""),
    "C-STORE: sequences 10,000 deep": _stored(_instance() + nested(10_000)),
    "C-STORE: 2,000,001 empty items": _stored(_instance() + empty_items(2_000_001)),
    "C-STORE: deflated, 64 KiB inflating to 64 MiB": _stored(deflate_bomb(UID), syntax=DEFLATED_LE),
    "C-STORE: SOP Instance UID ../../tmp/x": _stored(_instance("../../tmp/x"), uid="../../tmp/x"),
    "C-STORE: dataset UID not the command's": _stored(_instance("1.2.826.0.1.3680043.9.7433.70.90.2")),
    "C-STORE: an MR instance on a CT context": _stored(
        encode(instance(UID, sop_class=MR_IMAGE_STORAGE)), sop_class=MR_IMAGE_STORAGE
    ),
}


def describe(answer: Answer | Response) -> str:
    """An answer as docs/robustness.md's table words it."""
    if isinstance(answer, Response):
        return f"0x{answer.status:04X}" + (" (stored)" if answer.status == 0 else "")
    if answer.kind is None:
        return "closed"
    if answer.kind == 3:
        return "RJ {}/{}/{}".format(*answer.reject)
    if answer.kind == 7:
        return "A-ABORT {}/{}".format(*answer.abort)
    if answer.kind == A_ASSOCIATE_AC:
        accepted = [cid for cid, result in answer.accepted_contexts().items() if result == 0]
        return f"AC, contexts {accepted}" if accepted else "AC, no context"
    return repr(answer)


def run(case: Case, server: peers.Server) -> str:
    try:
        with Wire(server.port, timeout=WAIT) as wire:
            return describe(case(wire, server.ae_title.encode()))
    except TimeoutError:
        return f"no answer in {WAIT:.0f} s"
    except ConnectionResetError:
        return "connection reset while sending"
    except OSError as exc:
        return f"connection error ({exc.strerror or exc})"


SERVERS: dict[str, Callable[[Path], peers.Server]] = {
    "fabricatord": peers.fabricatord,
    "pynetdicom storescp": lambda work: peers.pynetdicom_storescp(work, None),
    "DCMTK storescp": peers.storescp,
    "Orthanc": peers.orthanc,
}


def answers_of(server: peers.Server) -> dict[str, str]:
    """What `server` answers to every case, and whether it still answers C-ECHO afterwards."""
    answers = {label: run(case, server) for label, case in CASES.items()}
    answers["C-ECHO afterwards"] = "answered" if peers.echo(server.port, server.ae_title) else "no answer"
    return answers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    for tool in ("storescp", "Orthanc"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (scripts/test installs the peers)", file=sys.stderr)
            return 69
    start_report()
    answers: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="fabricatord-robustness-") as folder:
        for name, make in SERVERS.items():
            work = Path(folder) / name.replace(" ", "-")
            work.mkdir()
            server = make(work)
            try:
                answers[name] = answers_of(server)
            finally:
                server.stop()
    labels = [*CASES, "C-ECHO afterwards"]
    table(
        "Answers to bad input",
        ["input", *answers],
        [[label, *(a[label] for a in answers.values())] for label in labels],
    )
    RESULTS["answers"] = answers
    finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
