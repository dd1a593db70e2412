"""Orthanc as the PACS under test: it queries fabricatord and C-MOVEs a study to itself, driven
through its REST API, as an administrator would click it."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, need, run_cli, wait_for_echo, wait_for_port
from tests.integration.conftest import DCMTK_ENV, Daemon, orthanc_config

pytestmark = pytest.mark.integration


class Orthanc:
    def __init__(self, dicom_port: int, http_port: int) -> None:
        self.dicom_port = dicom_port
        self.http = f"http://127.0.0.1:{http_port}"

    def call(self, path: str, body: Any = None) -> Any:
        data = None if body is None else (body if isinstance(body, str) else json.dumps(body)).encode()
        request = urllib.request.Request(self.http + path, data=data, method="POST" if data is not None else "GET")
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read() or b"null")


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Callable[[int, int], Orthanc]]:
    processes: list[subprocess.Popen[bytes]] = []

    def start(dicom_port: int, fabricatord_port: int) -> Orthanc:
        http_port = free_port()
        config = orthanc_config(
            tmp_path,
            dicom_port,
            http_port,
            AuthenticationEnabled=False,
            DicomModalities={"fabricatord": ["FABRICATORD", "127.0.0.1", fabricatord_port]},
        )
        process = subprocess.Popen(
            [need("Orthanc"), str(config)], env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        processes.append(process)
        wait_for_echo(dicom_port, "ORTHANC", timeout=60, process=process)  # type: ignore[arg-type]
        wait_for_port(http_port, process=process)  # type: ignore[arg-type]
        return Orthanc(dicom_port, http_port)

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=20)


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
