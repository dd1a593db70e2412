"""Orthanc as the PACS under test: it queries fabricatord and C-MOVEs a study to itself, driven
through its REST API, as an administrator would click it."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import free_port, run_cli
from tests.integration.conftest import Daemon, Orthanc

pytestmark = pytest.mark.integration


def test_orthanc_queries_and_moves_a_study_out_of_fabricatord(
    start_daemon: Callable[..., Daemon], orthanc: Callable[[int, int], Orthanc], tmp_path: Path
) -> None:
    orthanc_port = free_port()
    # fabricatord knows Orthanc as a C-MOVE destination; Orthanc knows fabricatord as a modality.
    daemon = start_daemon(f'\n[[peers]]\nname = "orthanc"\nae_title = "ORTHANC"\nport = {orthanc_port}\n')
    pacs = orthanc(orthanc_port, daemon.port)
    out = run_cli(
        "generate",
        "--config",
        str(daemon.config),
        "--modality",
        "MR",
        "--images",
        "2",
        "--send",
        f"FABRICATORD@127.0.0.1:{daemon.port}",
    ).stdout
    study = re.search(r"Study Instance UID:\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    accession = re.search(r"Accession Number:\s+(\S+)", out).group(1)  # type: ignore[union-attr]

    assert pacs.call("/modalities/fabricatord/echo", {}) == {}
    query = pacs.call(
        "/modalities/fabricatord/query",
        {
            "Level": "Study",
            "Query": {
                "AccessionNumber": accession,
                "StudyInstanceUID": "",
                "ModalitiesInStudy": "",
                "NumberOfStudyRelatedInstances": "",
            },
        },
    )
    answers = pacs.call(f"/queries/{query['ID']}/answers?expand")
    assert len(answers) == 1
    tags = {v["Name"]: v["Value"] for v in answers[0].values()}
    assert tags["StudyInstanceUID"] == study and tags["NumberOfStudyRelatedInstances"] == "6"
    pacs.call(f"/queries/{query['ID']}/retrieve", "ORTHANC")  # Orthanc's C-MOVE to itself
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and pacs.call("/statistics")["CountInstances"] < 6:
        time.sleep(0.2)
    stats = pacs.call("/statistics")
    assert stats["CountStudies"] == 1 and stats["CountInstances"] == 6
    stored = pacs.call("/studies?expand")[0]
    assert stored["MainDicomTags"]["StudyInstanceUID"] == study
