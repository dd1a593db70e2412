"""The peer table of docs/robustness.md, measured again: fabricatord, pynetdicom's storescp,
DCMTK's storescp and Orthanc each get every DICOM bad input of benchmarks/robustness.py, and
must answer what the table says they answer (one of them, where a cell names several). A
changed peer, or a changed fabricatord, fails here until the table says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.robustness import SERVERS, answers_of
from tests.conftest import ROOT, need

TABLE_HEADING = "## DICOM: what each peer answers to the same bytes"


def documented() -> dict[str, dict[str, str]]:
    """Peer → input → answer, from the first table under TABLE_HEADING."""
    text = (ROOT / "docs" / "robustness.md").read_text().split(TABLE_HEADING, 1)[1]
    rows = [line for line in text.splitlines() if line.startswith("|")]
    lines = iter(rows)
    header = [cell.strip() for cell in next(lines).strip("|").split("|")]
    next(lines)  # the |---| line
    table: dict[str, dict[str, str]] = {peer: {} for peer in header[1:]}
    for line in lines:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) != len(header):
            break  # the end of the table
        for peer, answer in zip(header[1:], cells[1:], strict=True):
            table[peer][cells[0]] = answer
    return table


@pytest.mark.parametrize("peer", list(SERVERS))
def test_each_peer_answers_what_the_documented_table_says(peer: str, tmp_path: Path) -> None:
    need({"DCMTK storescp": "storescp", "Orthanc": "Orthanc"}.get(peer, "python3"))
    server = SERVERS[peer](tmp_path)
    try:
        answers = answers_of(server)
    finally:
        server.stop()
    table = documented()[peer]
    assert answers.keys() == table.keys()
    # A cell may name the answers a peer gives by turns ("A or B"): pynetdicom's state machine
    # does not always answer the same bytes the same way.
    differing = {label: (answer, table[label]) for label, answer in answers.items()
                 if answer not in table[label].split(" or ")}  # fmt: skip
    assert not differing, differing
