"""Coverage-guided fuzz target (atheris) for what an MLLP sender puts in a frame.

    .venv/bin/python tests/fuzz/fuzz_hl7.py -max_total_time=600 tests/fuzz/corpus/hl7

Each input is one frame's bytes, handed to the listener's inbox (`fabricatord.workflow.hl7`)
with its database in a temporary data_dir, as the MLLP listener hands it. The property is the
one senders depend on: every frame that holds anything is answered, never dropped and never an
exception, with one frame back holding one ACK per message (AA, AE, AR, or in enhanced mode
CA, CE, CR) that names the message it answers: a second frame would be read as the answer to
the sender's next message. The only silence allowed is the one a sender asks for in enhanced mode:
MSH-15 and MSH-16 each NE, ER or SU (HL7 table 0155).
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["fabricatord.hl7", "fabricatord.workflow.hl7", "hl7"]):
    from fabricatord.config import load
    from fabricatord.db import open_database
    from fabricatord.hl7.codec import Header, decode, header, split
    from fabricatord.obs.logging import configure
    from fabricatord.workflow.hl7 import Inbox

FOLDER = Path(tempfile.mkdtemp(prefix="fabricatord-fuzz-hl7-"))
(FOLDER / "fabricatord.toml").write_text('[node]\ndata_dir = "data"\n[synth]\nacquisition = "manual"\n')
SETTINGS = load(FOLDER / "fabricatord.toml")
INBOX = Inbox(SETTINGS, open_database(SETTINGS.database_url))
SILENT = {"NE", "ER", "SU"}
CODES = {"AA", "AE", "AR", "CA", "CE", "CR"}
configure("critical", "json", False)
warnings.simplefilter("ignore")


def one_input(data: bytes) -> None:
    replies = INBOX.receive(data, "fuzz")
    decoded = decode(data, SETTINGS.hl7.default_charset)  # as the inbox reads the frame
    if not decoded.text.strip():
        assert replies == [], replies
        return
    heads = [header(message) for message in split(decoded.text).messages]
    if not replies:
        assert heads and all(_may_stay_silent(head) for head in heads), "a frame with content got no answer"
    assert len(replies) <= 1, f"one frame in, {len(replies)} frames out: the sender reads one ACK per frame"
    for reply in replies:
        text = reply.decode(decoded.charset.codec, errors="replace")
        codes = [_msa_code(segment) for segment in text.split("\r") if segment.startswith("MSA")]
        assert all(code in CODES for code in codes), text
        if text.startswith(("FHS", "BHS")):  # a batch: an ACK inside for each message that wants one
            assert len(codes) >= sum(not _may_stay_silent(head) for head in heads), text
        else:  # one ACK, or one for each message a frame without a batch envelope held
            assert 1 <= len(codes) <= len(heads), text


def _msa_code(segment: str) -> str:
    """MSA-1: two characters after the separator the ACK speaks (the one its message chose, which
    may even be a letter of the code)."""
    separator = segment[3:4]
    return segment[4:6] if segment[6:7] in (separator, "") else segment[4:]


def _may_stay_silent(head: Header) -> bool:
    """Enhanced mode that asks for no ACK in some outcome: both fields NE, ER or SU."""
    return head.accept_ack in SILENT and head.application_ack in SILENT | {""}


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
