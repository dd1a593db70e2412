"""Coverage-guided fuzz target (atheris) for what an MLLP sender puts in a frame.

    .venv/bin/python tests/fuzz/fuzz_hl7.py -max_total_time=600 tests/fuzz/corpus/hl7

Each input is one frame's bytes, handed to the listener's inbox (`fabricatord.workflow.hl7`)
with its database in a temporary data_dir, as the MLLP listener hands it. The property is the
one senders depend on: every frame that holds anything is answered, never dropped and never an
exception, with one ACK per message (AA, AE, AR, or in enhanced mode CA, CE, CR) that names
the message it answers. The only silence allowed is the one a sender asks for in enhanced mode:
MSH-15 and MSH-16 each NE, ER or SU (HL7 table 0155).
"""

from __future__ import annotations

import re
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
CODES = "AA|AE|AR|CA|CE|CR"
configure("critical", "json", False)
warnings.simplefilter("ignore")


def one_input(data: bytes) -> None:
    replies = INBOX.receive(data, "fuzz")
    if not data.decode("latin-1").strip():
        assert replies == [], replies
        return
    if not replies:
        heads = [header(text) for text in split(decode(data, SETTINGS.hl7.default_charset).text).messages]
        assert heads and all(_may_stay_silent(head) for head in heads), "a frame with content got no answer"
    for reply in replies:
        text = reply.decode("latin-1")
        separator = re.escape(text[3])  # the ACK speaks with the separator the message chose
        acks = len(re.findall(f"(?:^|\r)MSA{separator}(?:{CODES}){separator}", text))
        if text.startswith(("FHS", "BHS")):  # a batch: an ACK inside for each message that wants one
            heads = [header(message) for message in split(decode(data, SETTINGS.hl7.default_charset).text).messages]
            acks = len(re.findall("(?:^|\r)MSA", text))  # each ACK in it has its message's separator
            assert acks >= sum(not _may_stay_silent(head) for head in heads), text
        else:
            assert acks == 1, text


def _may_stay_silent(head: Header) -> bool:
    """Enhanced mode that asks for no ACK in some outcome: both fields NE, ER or SU."""
    return head.accept_ack in SILENT and head.application_ack in SILENT | {""}


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
