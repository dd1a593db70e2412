"""Modality Worklist C-FIND, asked by DCMTK's `findscu -W` and pynetdicom, over loopback."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from tests.conftest import run_cli
from tests.integration.conftest import BOTH_BACKENDS, Daemon, findscu

pytestmark = pytest.mark.integration

PEERS = """
[[peers]]
name = "ct-scanner"
ae_title = "CT01"
[[peers]]
name = "no-worklist"
ae_title = "NOWL"
allow_find_worklist = false
"""
SPS = "ScheduledProcedureStepSequence[0]"


def schedule(daemon: Daemon, *args: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """`fabricatord worklist add` as a user runs it; the SPS ID, accession and patient it made."""
    on_its_database = {"FABRICATORD__NODE__DATABASE": daemon.database_url} if daemon.database_url else {}
    out = run_cli(
        "worklist", "add", "--config", str(daemon.config), *args, env={**on_its_database, **(env or {})}
    ).stdout
    found = re.match(r"(\S+)\s+accession (\S+)\s+\S+ at \S+\s+\S+ \S+\s+(\S+) (\S+)", out)
    assert found, out
    return dict(zip(("sps_id", "accession", "patient_id", "patient_name"), found.groups(), strict=True))


def worklist_findscu(daemon: Daemon, tmp_path: Path, calling: str, *keys: str) -> list[Dataset]:
    return findscu(daemon, tmp_path, "-W", *keys, calling=calling)


def _worklist_find(daemon: Daemon, identifier: Dataset, calling: str = "CT01") -> list[tuple[int, Dataset | None]]:
    from pynetdicom import AE
    from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]

    ae = AE(ae_title=calling)
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="FABRICATORD")
    assert assoc.is_established
    try:
        return [
            (int(status.Status), found)
            for status, found in assoc.send_c_find(identifier, ModalityWorklistInformationFind)
        ]
    finally:
        assoc.release()


@pytest.fixture
def scheduled(start_daemon: Callable[..., Daemon]) -> tuple[Daemon, list[dict[str, str]]]:
    """Five steps on three stations over two days; the last one already COMPLETED."""
    daemon = start_daemon(PEERS)
    items = [
        schedule(
            daemon, "--modality", "CT", "--station", "CT01", "--start", "2026-11-20T08:00", "--referring", "Ref^A"
        ),
        schedule(daemon, "--modality", "CT", "--station", "CT01", "--start", "2026-11-20T17:30"),
        schedule(daemon, "--modality", "CT", "--station", "CT01", "--start", "2026-11-21T09:00"),
        schedule(daemon, "--modality", "MR", "--station", "MR01", "--start", "2026-11-20T10:00"),
        schedule(daemon, "--modality", "CT", "--station", "CT02", "--start", "2026-11-21T12:00"),
    ]
    # What MPPS will do later.
    daemon.query("UPDATE scheduled_steps SET status = 'COMPLETED' WHERE sps_id = ?", (items[4]["sps_id"],))
    return daemon, items


def _sps_ids(found: list[Dataset]) -> list[str]:
    return [ds.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID for ds in found]


@BOTH_BACKENDS
def test_matching_keys_by_findscu(scheduled: tuple[Daemon, list[dict[str, str]]], tmp_path: Path) -> None:
    daemon, items = scheduled
    ids = [item["sps_id"] for item in items]

    def find(*keys: str) -> list[Dataset]:
        return worklist_findscu(daemon, tmp_path, "CT01", *keys, f"{SPS}.ScheduledProcedureStepID")

    assert _sps_ids(find(f"{SPS}.ScheduledStationAETitle=CT01")) == ids[:3]  # by start time
    assert _sps_ids(find(f"{SPS}.Modality=MR")) == [ids[3]]
    # Date and time ranges are one range: from the 20th at 12:00 to the 21st at 10:00.
    combined = find(
        f"{SPS}.ScheduledProcedureStepStartDate=20261120-20261121",
        f"{SPS}.ScheduledProcedureStepStartTime=1200-1000",
    )
    assert _sps_ids(combined) == [ids[1], ids[2]]
    morning = find(
        f"{SPS}.ScheduledProcedureStepStartDate=20261120", f"{SPS}.ScheduledProcedureStepStartTime=0700-0900"
    )
    assert _sps_ids(morning) == [ids[0]]
    assert _sps_ids(find(f"AccessionNumber={items[2]['accession']}")) == [ids[2]]
    assert _sps_ids(find(f"PatientID={items[3]['patient_id']}")) == [ids[3]]
    initial = items[0]["patient_name"][:2]
    by_name = find(f"PatientName={initial}*")
    assert ids[0] in _sps_ids(by_name)
    assert all(str(ds.PatientName).lower().startswith(initial.lower()) for ds in by_name)
    assert _sps_ids(find("ReferringPhysicianName=Ref^A")) == [ids[0]]
    # A completed step is off the worklist unless the query asks for that status.
    assert ids[4] not in _sps_ids(find(f"{SPS}.ScheduledStationAETitle="))
    assert _sps_ids(find(f"{SPS}.ScheduledProcedureStepStatus=COMPLETED")) == [ids[4]]


def test_return_keys(scheduled: tuple[Daemon, list[dict[str, str]]], tmp_path: Path) -> None:
    daemon, items = scheduled
    found = worklist_findscu(
        daemon,
        tmp_path,
        "CT01",
        f"AccessionNumber={items[0]['accession']}",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "PatientWeight",
        "StudyInstanceUID",
        "RequestedProcedureID",
        "RequestedProcedureDescription",
        "ReferringPhysicianName",
        f"{SPS}.ScheduledStationAETitle",
        f"{SPS}.ScheduledProcedureStepStartDate",
        f"{SPS}.ScheduledProcedureStepStartTime",
        f"{SPS}.Modality",
        f"{SPS}.ScheduledProcedureStepDescription",
        f"{SPS}.ScheduledPerformingPhysicianName",
    )
    assert len(found) == 1
    answer = found[0]
    assert answer.PatientName == items[0]["patient_name"]
    assert answer.PatientSex in ("M", "F", "O") and len(answer.PatientBirthDate) == 8
    assert "PatientWeight" in answer and answer.PatientWeight in (None, "")  # type 2, not held: empty
    assert answer.StudyInstanceUID.startswith("2.25.")
    assert answer.RequestedProcedureID.startswith("RP")
    assert answer.ReferringPhysicianName == "Ref^A"
    step = answer.ScheduledProcedureStepSequence[0]
    assert (step.ScheduledStationAETitle, step.ScheduledProcedureStepStartDate, step.Modality) == (
        "CT01",
        "20261120",
        "CT",
    )
    assert step.ScheduledProcedureStepStartTime.startswith("0800")
    assert step.ScheduledProcedureStepDescription
    assert "ScheduledPerformingPhysicianName" in step
    assert "ScheduledProcedureStepID" not in step  # not asked for, not returned
    # An empty sequence asks for the whole item.
    whole = worklist_findscu(
        daemon, tmp_path, "CT01", f"AccessionNumber={items[0]['accession']}", "ScheduledProcedureStepSequence"
    )
    assert whole[0].ScheduledProcedureStepSequence[0].ScheduledProcedureStepID == items[0]["sps_id"]


def test_fetches_are_recorded_and_audited(scheduled: tuple[Daemon, list[dict[str, str]]], tmp_path: Path) -> None:
    daemon, items = scheduled
    worklist_findscu(daemon, tmp_path, "CT01", f"{SPS}.ScheduledStationAETitle=CT01")
    listing = run_cli("worklist", "list", "--config", str(daemon.config)).stdout
    lines = {line.split()[0]: line for line in listing.splitlines()}
    assert all(lines[item["sps_id"]].endswith("fetched by CT01") for item in items[:3])
    assert "fetched by" not in lines[items[3]["sps_id"]]
    assert items[4]["sps_id"] not in lines  # completed: not listed by default
    assert items[4]["sps_id"] in run_cli("worklist", "list", "--all", "--config", str(daemon.config)).stdout
    deadline = time.monotonic() + 10
    while True:  # the trail is written in batches, twice a second
        audit = run_cli("audit", "--operation", "MWL", "--config", str(daemon.config)).stdout
        if "CT01" in audit or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    mwl = [line for line in audit.splitlines() if " MWL " in line]
    assert mwl and "0x0000" in mwl[-1] and "CT01" in mwl[-1]
    assert re.search(r"0x0000\s+3\s", mwl[-1]), mwl[-1]  # three items answered
    associations = run_cli("audit", "--operation", "ASSOCIATION", "--config", str(daemon.config)).stdout
    assert "released" in associations


@BOTH_BACKENDS
def test_statuses(scheduled: tuple[Daemon, list[dict[str, str]]]) -> None:
    daemon, _ = scheduled
    query = Dataset()
    query.PatientName = ""
    query.PatientWeight = "70"  # not a key we match on: universal, flagged
    step = Dataset()
    step.ScheduledStationAETitle = "CT01"
    query.ScheduledProcedureStepSequence = [step]
    answers = _worklist_find(daemon, query)
    assert [status for status, _ in answers] == [0xFF01] * 3 + [0x0000]
    assert _worklist_find(daemon, query, calling="NOWL")[0][0] == 0x0124
    from pydicom import config

    config.settings.reading_validation_mode = config.settings.writing_validation_mode = config.IGNORE
    bad = Dataset()
    bad_step = Dataset()
    bad_step.ScheduledProcedureStepStartDate = "2026-11"
    bad_step.ScheduledProcedureStepStartTime = "0800-0900"
    bad.ScheduledProcedureStepSequence = [bad_step]
    assert _worklist_find(daemon, bad)[0][0] == 0xA900


def test_filter_by_calling_ae_and_character_set(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = start_daemon(PEERS, dicom_extra="worklist_filter_by_calling_ae = true\n")
    ct = schedule(daemon, "--modality", "CT", "--station", "CT01")
    schedule(daemon, "--modality", "MR", "--station", "MR01")
    japanese = schedule(daemon, "--modality", "CT", "--station", "CT01", env={"FABRICATORD__SYNTH__LOCALE": "ja_JP"})
    # No station in the query: the calling AE stands in for it.
    found = worklist_findscu(
        daemon, tmp_path, "CT01", f"{SPS}.ScheduledProcedureStepID", "PatientName", "AccessionNumber"
    )
    assert _sps_ids(found) == [ct["sps_id"], japanese["sps_id"]]
    wide = next(ds for ds in found if ds.AccessionNumber == japanese["accession"])
    assert wide.SpecificCharacterSet == "ISO_IR 192"
    assert "=" in str(wide.PatientName) and not str(wide.PatientName).isascii()
    # A station in the query wins over the calling AE.
    assert len(worklist_findscu(daemon, tmp_path, "CT01", f"{SPS}.ScheduledStationAETitle=MR01")) == 1
