"""The whole department: an ORM over MLLP becomes a study in a real Orthanc, with the order's
identifiers and Request Attributes Sequence; routes survive an Orthanc that is down and a
fabricatord killed mid-send; a rule that matches nothing routes nothing."""

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

from tests.conftest import ROOT, free_port, need, run_cli, wait_for_echo, wait_for_port
from tests.integration.conftest import BOTH_BACKENDS, DCMTK_ENV, Daemon, orthanc_config
from tests.integration.test_acquisition import wait_for
from tests.integration.test_hl7_listener import frame_of, msa, order, send

pytestmark = pytest.mark.integration

IHE = ROOT / "tests" / "data" / "hl7" / "ihe_orm_o01_v251.hl7"
STUDY_UID = "1.2.826.0.1.3680043.10.999.1001"


class Orthanc:
    def __init__(self, tmp_path: Path, dicom_port: int) -> None:
        self.dicom_port = dicom_port
        self.http_port = free_port()
        self.folder = tmp_path / f"orthanc-{dicom_port}"
        self.folder.mkdir()
        # fabricatord is a known modality there, as a PACS administrator would register it: Orthanc
        # answers C-FIND (the delivery check) only to the modalities it knows.
        self.config = orthanc_config(
            self.folder,
            dicom_port,
            self.http_port,
            AuthenticationEnabled=False,
            DicomModalities={"fabricatord": ["FABRICATORD", "127.0.0.1", 104]},
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        self.process = subprocess.Popen(
            [need("Orthanc"), str(self.config)], env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_echo(self.dicom_port, "ORTHANC", timeout=60, process=self.process)  # type: ignore[arg-type]
        wait_for_port(self.http_port, process=self.process)  # type: ignore[arg-type]
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=60) as response:
            return json.loads(response.read())

    def instances_of(self, study_uid: str) -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/tools/find",
            data=json.dumps({"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}).encode(),
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return len(json.loads(response.read()))


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Callable[[int], Orthanc]]:
    made: list[Orthanc] = []

    def make(port: int) -> Orthanc:
        made.append(Orthanc(tmp_path, port))
        return made[-1]

    yield make
    for server in made:
        server.stop()


def routed_to_orthanc(port: int, match: str = '{ source = "generated" }') -> str:
    return (
        f'[[peers]]\nname = "orthanc"\nae_title = "ORTHANC"\nport = {port}\n'
        f'[[routes]]\nname = "to-orthanc"\nmatch = {match}\nto = ["orthanc"]\nverify = true\n'
    )


def route_jobs(daemon: Daemon) -> str:
    return run_cli("jobs", "list", "routes", "--config", str(daemon.config), "--limit", "500").stdout


def test_an_order_arrives_in_orthanc_as_a_study_that_carries_it(
    start_daemon: Callable[..., Daemon], orthanc: Callable[[int], Orthanc]
) -> None:
    port = free_port()
    pacs = orthanc(port).start()
    daemon = start_daemon(routed_to_orthanc(port), synth='acquisition = "immediate"\n')
    started = time.monotonic()
    assert msa(send(daemon, frame_of(IHE)))[0] == "AA"
    wait_for(lambda: _all_done(daemon))
    elapsed = time.monotonic() - started
    [study] = pacs.get("/studies?expand")
    assert study["MainDicomTags"]["StudyInstanceUID"] == STUDY_UID
    assert study["MainDicomTags"]["AccessionNumber"] == "ACC1001"
    instances = pacs.get(f"/studies/{study['ID']}/instances")
    assert len(instances) == route_jobs(daemon).count(" done ") > 0
    tags = pacs.get(f"/instances/{instances[0]['ID']}/tags?simplify")
    assert tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.2"
    request = tags["RequestAttributesSequence"][0]
    assert (request["RequestedProcedureID"], request["ScheduledProcedureStepID"]) == ("RP1001", "SPS1001")
    assert elapsed < 60
    wait_for(lambda: "verified at orthanc" in run_cli("trace", "ACC1001", "--config", str(daemon.config)).stdout)
    trace = run_cli("trace", "ACC1001", "--config", str(daemon.config)).stdout
    for step in ("HL7 ORM^O01 IHE0001 from EPIC: AA", "MPPS COMPLETED from CT01", "route job(s) to orthanc done"):
        assert step in trace
    assert trace.index("HL7 ORM^O01") < trace.index("MPPS COMPLETED") < trace.index("verified at orthanc")


def test_orthanc_down_then_up_gets_everything_after_retries(
    start_daemon: Callable[..., Daemon], orthanc: Callable[[int], Orthanc]
) -> None:
    port = free_port()
    pacs = orthanc(port)  # not started yet
    daemon = start_daemon(routed_to_orthanc(port), synth='acquisition = "immediate"\n')
    cr = order("R1", "NW", "SC", "ACCR1").replace(b"||||||CT", b"||||||CR")
    assert msa(send(daemon, cr))[0] == "AA"
    wait_for(lambda: _tried(daemon))
    assert "refused" in route_jobs(daemon) or "failed" in route_jobs(daemon) or "association" in route_jobs(daemon)
    pacs.start()
    wait_for(lambda: _all_done(daemon), seconds=90)
    jobs = route_jobs(daemon)
    assert jobs.count(" done ") == pacs.instances_of(_study_of(daemon, "ACCR1")) == 2  # a two-view CR


def _tried(daemon: Daemon) -> bool:
    """A job waits for its next attempt after at least one failed (backoff moves on quickly)."""
    return re.search(r" pending\s+tries [1-9]", route_jobs(daemon)) is not None


def _all_done(daemon: Daemon) -> bool:
    """Every route job of the study answered: none pending or being sent, and some done."""
    jobs = route_jobs(daemon)
    return " done " in jobs and " pending " not in jobs and " sending " not in jobs


def _study_of(daemon: Daemon, accession: str) -> str:
    return str(daemon.query("SELECT study_instance_uid FROM studies WHERE accession_number = ?", (accession,))[0][0])


@BOTH_BACKENDS
def test_kill_9_mid_routing_delivers_everything_once(
    start_daemon: Callable[..., Daemon], orthanc: Callable[[int], Orthanc]
) -> None:
    port = free_port()
    pacs = orthanc(port).start()
    crashing = start_daemon(
        routed_to_orthanc(port),
        synth='acquisition = "immediate"\n',
        env={"FABRICATORD_FAULTPOINT": "route.after_send:kill"},
    )
    assert msa(send(crashing, frame_of(IHE)))[0] == "AA"
    crashing.process.wait(timeout=90)  # killed right after the first send, before it was recorded
    daemon = start_daemon(routed_to_orthanc(port), synth='acquisition = "immediate"\n')
    wait_for(lambda: _all_done(daemon), seconds=90)
    stored = len(list((daemon.data_dir / "storage").rglob("*.dcm")))
    assert route_jobs(daemon).count(" done ") == stored == pacs.instances_of(STUDY_UID)  # each SOP Instance UID once


def test_a_rule_that_matches_nothing_routes_nothing(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(routed_to_orthanc(free_port(), '{ modality = "MG" }'), synth='acquisition = "immediate"\n')
    assert msa(send(daemon, order("N1", "NW", "SC", "ACCN1")))[0] == "AA"
    wait_for(lambda: " done " in run_cli("jobs", "list", "acquisitions", "--config", str(daemon.config)).stdout)
    time.sleep(1)
    assert route_jobs(daemon).strip() == ""


def test_jobs_can_be_shown_cancelled_and_retried(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(routed_to_orthanc(free_port()), synth='acquisition = "immediate"\n')  # nobody listens
    cr = order("J1", "NW", "SC", "ACCJ1").replace(b"||||||CT", b"||||||CR")
    assert msa(send(daemon, cr))[0] == "AA"
    wait_for(lambda: _tried(daemon))
    first = route_jobs(daemon).split()[0]
    config = ["--config", str(daemon.config)]
    shown = run_cli("jobs", "show", first, *config).stdout
    assert first in shown and _study_of(daemon, "ACCJ1") in shown
    assert "association with ORTHANC" in shown and "failed: cannot connect: connection refused" in shown
    # A job the router holds for a send attempt is not pending and cannot be canceled: under load
    # an attempt can coincide with the command, so it is repeated until it meets a pending job.
    wait_for(lambda: "1 job(s) canceled" in run_cli("jobs", "cancel", first, *config, check=False).stdout)
    assert f"{first:<7} route    orthanc      canceled" in route_jobs(daemon)
    assert f"1 job(s) due again now: {first}" in run_cli("jobs", "retry", first, *config).stdout
    # A job waiting out its backoff is due now too, and the command says which it touched.
    second = next(name for name in re.findall(r"^(r\d+) ", route_jobs(daemon), re.MULTILINE) if name != first)
    # It may not have had its first attempt yet (due now, left as it is): asked again until it waits.
    wait_for(
        lambda: f"1 job(s) due again now: {second}" in run_cli("jobs", "retry", second, *config, check=False).stdout
    )
    done = run_cli("jobs", "retry", "r999", *config, check=False)
    assert done.returncode == 1 and "0 job(s) due again now" in done.stdout and "r999: no such job" in done.stderr
    assert run_cli("jobs", "cancel", "x9", *config, check=False).returncode != 0
