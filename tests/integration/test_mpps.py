"""Modality Performed Procedure Step SCP: a modality (pynetdicom as the SCU) reports a step
IN PROGRESS, then COMPLETED or DISCONTINUED, and the worklist follows; the state rules of
PS3.4 F refuse what may not happen."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.conftest import run_cli
from tests.integration.conftest import Daemon, findscu
from tests.integration.test_worklist import schedule

pytestmark = pytest.mark.integration

MPPS = "1.2.840.10008.3.1.2.3.3"
SPS = "ScheduledProcedureStepSequence[0]"


@contextmanager
def modality(daemon: Daemon, calling: str = "CT01") -> Iterator[Any]:
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.add_requested_context(MPPS)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="FABRICATORD")
    assert assoc.is_established
    try:
        yield assoc
    finally:
        assoc.release()


def in_progress(item: dict[str, str]) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "CT01"
    ds.PerformedProcedureStepStartDate = "20261123"
    ds.PerformedProcedureStepStartTime = "101500"
    ds.Modality = "CT"
    ds.PatientID = item["patient_id"]
    step = Dataset()
    step.AccessionNumber = item["accession"]
    step.ScheduledProcedureStepID = item["sps_id"]
    step.StudyInstanceUID = item["study_uid"]
    ds.ScheduledStepAttributesSequence = [step]
    return ds


def final(status: str, end: bool = True) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    if end:
        ds.PerformedProcedureStepEndDate = "20261123"
        ds.PerformedProcedureStepEndTime = "102000"
    return ds


def status_of(daemon: Daemon, tmp_path: Path, accession: str) -> str:
    [found] = findscu(
        daemon,
        tmp_path,
        "-W",
        f"AccessionNumber={accession}",
        f"{SPS}.ScheduledProcedureStepStatus=SCHEDULED\\STARTED\\COMPLETED\\DISCONTINUED",
        calling="CT01",
    )
    return str(found.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus)


def scheduled_item(daemon: Daemon, tmp_path: Path) -> dict[str, str]:
    item = schedule(daemon, "--modality", "CT", "--station", "CT01")
    [found] = findscu(
        daemon, tmp_path, "-W", f"AccessionNumber={item['accession']}", "StudyInstanceUID", calling="CT01"
    )
    return {**item, "study_uid": str(found.StudyInstanceUID)}


def test_a_performed_step_moves_its_worklist_item(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = start_daemon()
    first, second = scheduled_item(daemon, tmp_path), scheduled_item(daemon, tmp_path)
    done, stopped = generate_uid(), generate_uid()
    with modality(daemon) as assoc:
        status, attributes = assoc.send_n_create(in_progress(first), MPPS, done)
        assert status.Status == 0x0000 and attributes.PerformedProcedureStepStatus == "IN PROGRESS"
        assert assoc.send_n_create(in_progress(second), MPPS, stopped)[0].Status == 0x0000
    assert status_of(daemon, tmp_path, first["accession"]) == "STARTED"
    with modality(daemon) as assoc:
        status, attributes = assoc.send_n_set(final("COMPLETED"), MPPS, done)
        assert status.Status == 0x0000 and attributes.PerformedProcedureStepEndTime == "102000"
        assert assoc.send_n_set(final("DISCONTINUED"), MPPS, stopped)[0].Status == 0x0000
    assert status_of(daemon, tmp_path, first["accession"]) == "COMPLETED"
    assert status_of(daemon, tmp_path, second["accession"]) == "DISCONTINUED"
    listed = run_cli("mpps", "--config", str(daemon.config)).stdout
    assert "COMPLETED     CT01" in listed and first["accession"] in listed and first["sps_id"] in listed
    assert "N-SET" in run_cli("audit", "--config", str(daemon.config), "--operation", "N-SET").stdout


def test_the_state_rules_refuse_what_may_not_happen(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = start_daemon()
    item = scheduled_item(daemon, tmp_path)
    uid = generate_uid()
    with modality(daemon) as assoc:
        not_in_progress = in_progress(item)
        not_in_progress.PerformedProcedureStepStatus = "COMPLETED"
        status, _ = assoc.send_n_create(not_in_progress, MPPS, generate_uid())
        assert status.Status == 0x0106
        incomplete = in_progress(item)
        del incomplete.Modality
        status, _ = assoc.send_n_create(incomplete, MPPS, generate_uid())
        assert status.Status == 0x0120 and "Modality" in status.ErrorComment
        assert assoc.send_n_create(in_progress(item), MPPS, uid)[0].Status == 0x0000
        assert assoc.send_n_create(in_progress(item), MPPS, uid)[0].Status == 0x0111  # duplicate
        assert assoc.send_n_set(final("COMPLETED"), MPPS, generate_uid())[0].Status == 0x0112  # unknown
        assert assoc.send_n_set(final("COMPLETED", end=False), MPPS, uid)[0].Status == 0x0121
        assert assoc.send_n_set(final("COMPLETED"), MPPS, uid)[0].Status == 0x0000
        status, _ = assoc.send_n_set(final("DISCONTINUED"), MPPS, uid)
        assert status.Status == 0x0110 and "no longer" in status.ErrorComment
    assert status_of(daemon, tmp_path, item["accession"]) == "COMPLETED"


def test_a_peer_without_allow_mpps_is_refused(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = start_daemon('[[peers]]\nname = "ct"\nae_title = "CT01"\nallow_mpps = false\n')
    item = scheduled_item(daemon, tmp_path)
    with modality(daemon) as assoc:
        assert assoc.send_n_create(in_progress(item), MPPS, generate_uid())[0].Status == 0x0124
    assert status_of(daemon, tmp_path, item["accession"]) == "SCHEDULED"
