"""The simulated modality: an HL7 order becomes a study in fabricatord that carries the order,
with MPPS reported to our own SCP and the worklist step gone, by every acquisition policy."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import ROOT, need, run_cli
from tests.integration.conftest import BOTH_BACKENDS, Daemon, findscu
from tests.integration.test_hl7_listener import frame_of, msa, order, send, steps

pytestmark = pytest.mark.integration

IHE = ROOT / "tests" / "data" / "hl7" / "ihe_orm_o01_v251.hl7"
STUDY_UID = "1.2.826.0.1.3680043.10.999.1001"


def wait_for(check: Callable[[], bool], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s")
        time.sleep(0.2)


def stored(daemon: Daemon) -> list[Path]:
    return sorted((daemon.data_dir / "storage").rglob("*.dcm"))


def acquisitions(daemon: Daemon) -> str:
    return run_cli("jobs", "list", "acquisitions", "--config", str(daemon.config)).stdout


@BOTH_BACKENDS
def test_an_order_becomes_a_study_that_carries_it(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = start_daemon(synth='acquisition = "immediate"\n')
    assert msa(send(daemon, frame_of(IHE)))[0] == "AA"
    wait_for(lambda: " done " in acquisitions(daemon))
    [study] = findscu(
        daemon, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "AccessionNumber=ACC1001", "StudyInstanceUID",
        "NumberOfStudyRelatedInstances", "StudyID",
    )  # fmt: skip
    assert (study.StudyInstanceUID, study.StudyID) == (STUDY_UID, "RP1001")
    files = stored(daemon)
    assert int(study.NumberOfStudyRelatedInstances) == len(files) > 0
    image = dcmread(files[0])
    assert image.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage, from OBR-24 = CT
    assert (image.AccessionNumber, str(image.PatientName), image.PatientID) == (
        "ACC1001",
        "Sellers^Thomas^J",
        "MRN1001",
    )
    assert (str(image.ReferringPhysicianName), str(image.PerformingPhysicianName)) == ("House^Gregory", "Chase^Robert")
    assert image.StudyDescription == "CT Head without contrast"
    assert image.ProcedureCodeSequence[0].CodeValue == "CTHEAD"
    request = image.RequestAttributesSequence[0]
    assert (request.RequestedProcedureID, request.ScheduledProcedureStepID) == ("RP1001", "SPS1001")
    assert request.ScheduledProtocolCodeSequence[0].CodeValue == "CTH1"
    mpps_uid = image.ReferencedPerformedProcedureStepSequence[0].ReferencedSOPInstanceUID
    listed = run_cli("mpps", "--config", str(daemon.config)).stdout
    assert "COMPLETED" in listed and mpps_uid in listed and "SPS1001" in listed
    assert steps(daemon) == [("ACC1001", "SPS1001", "COMPLETED")]  # off the worklist
    check = subprocess.run([need("dciodvfy"), str(files[0])], capture_output=True, text=True, timeout=60)
    assert "Error" not in check.stdout + check.stderr


def test_manual_and_on_query_wait_for_their_trigger(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = start_daemon(synth='acquisition = "manual"\n[synth.modality.MR]\nacquisition = "on_query"\n')
    assert msa(send(daemon, order("M1", "NW", "SC", "ACCM1")))[0] == "AA"  # a CT: manual
    mr = order("M2", "NW", "SC", "ACCM2").replace(b"||||||CT", b"||||||MR")
    assert msa(send(daemon, mr))[0] == "AA"  # an MR: on_query
    time.sleep(2)
    assert stored(daemon) == [] and acquisitions(daemon).count(" waiting ") == 2
    findscu(daemon, tmp_path, "-W", "AccessionNumber=ACCM2", calling="MR01")  # the MR's modality fetches it
    wait_for(lambda: "ACCM2" in str(steps(daemon)) and ("ACCM2", "ACCM2.1", "COMPLETED") in steps(daemon))
    assert ("ACCM1", "ACCM1.1", "SCHEDULED") in steps(daemon)
    out = run_cli("acquire", "ACCM1", "--config", str(daemon.config)).stdout
    assert "1 acquisition(s) due now" in out
    wait_for(lambda: ("ACCM1", "ACCM1.1", "COMPLETED") in steps(daemon))


def test_a_cancel_stops_a_pending_acquisition(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(synth='acquisition = "delay"\nacquisition_delay = "20s"\n')
    assert msa(send(daemon, order("C1", "NW", "SC", "ACCC1")))[0] == "AA"
    assert " pending " in acquisitions(daemon)
    assert msa(send(daemon, order("C2", "CA", "", "ACCC1")))[0] == "AA"
    assert " canceled " in acquisitions(daemon)


@BOTH_BACKENDS
def test_kill_9_mid_acquisition_makes_the_study_once(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    crashing = start_daemon(
        synth='acquisition = "immediate"\n', env={"FABRICATORD_FAULTPOINT": "acquire.after_store:kill"}
    )
    assert msa(send(crashing, frame_of(IHE)))[0] == "AA"
    crashing.process.wait(timeout=60)
    first = {p.name for p in stored(crashing)}
    assert first
    daemon = start_daemon(synth='acquisition = "immediate"\n')  # same data_dir: the job runs again
    wait_for(lambda: " done " in acquisitions(daemon))
    assert {p.name for p in stored(daemon)} == first  # the same instances, each once
    assert steps(daemon) == [("ACC1001", "SPS1001", "COMPLETED")]


def test_an_update_before_acquisition_changes_what_is_made(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(synth='acquisition = "manual"\nprocedure_templates = { XRCHEST = "DX" }\n')
    assert msa(send(daemon, order("U1", "NW", "SC", "ACCU1")))[0] == "AA"  # a CT abdomen
    update = order("U2", "XO", "SC", "ACCU1").replace(b"CTABD^CT Abdomen^LOCAL", b"XRCHEST^Chest two views^LOCAL")
    assert msa(send(daemon, update))[0] == "AA"
    run_cli("acquire", "ACCU1", "--config", str(daemon.config))
    wait_for(lambda: " done " in acquisitions(daemon))
    images = [dcmread(path) for path in stored(daemon)]
    assert {image.StudyDescription for image in images} == {"Chest two views"}
    assert {image.SOPClassUID for image in images} == {"1.2.840.10008.5.1.4.1.1.1.1"}  # DX, by the procedure code
