"""The MLLP listener of `fabricatord serve`, driven over loopback by python-hl7's MLLP client
(not ours), by `fabricatord hl7 send` and by raw sockets, with every worklist item checked by
DCMTK's `findscu -W`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hl7.client import MLLPClient
from pydicom.dataset import Dataset

from tests.conftest import ROOT, run_cli
from tests.integration.conftest import BOTH_BACKENDS, Daemon, findscu

pytestmark = pytest.mark.integration

CORPUS = ROOT / "tests" / "data" / "hl7"
SPS = "ScheduledProcedureStepSequence[0]"
RETURN_KEYS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "RequestedProcedurePriority",
    "ReferringPhysicianName",
    "RequestingPhysician",
    "AdmissionID",
    "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest",
    f"{SPS}.Modality",
    f"{SPS}.ScheduledProcedureStepID",
    f"{SPS}.ScheduledStationAETitle",
    f"{SPS}.ScheduledProcedureStepStartDate",
    f"{SPS}.ScheduledProcedureStepStartTime",
    f"{SPS}.ScheduledPerformingPhysicianName",
    f"{SPS}.ScheduledProcedureStepDescription",
    f"{SPS}.ScheduledProcedureStepStatus",
)


def frame_of(path: Path) -> bytes:
    """A corpus file as one message with CR separators (files may use LF or CRLF), bytes kept."""
    data = path.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    return data.rstrip(b"\r")


def send(daemon: Daemon, message: bytes) -> str:
    """One message through python-hl7's MLLP client; the ACK as text."""
    with MLLPClient("127.0.0.1", daemon.hl7_port) as client:
        client.socket.settimeout(30)
        reply = client.send_message(message)
    return reply.decode("utf-8", errors="replace").strip("\x0b\x1c\r")


def msa(ack: str) -> tuple[str, str, list[str]]:
    """MSA-1, MSA-2 and the ERR segments of an ACK."""
    segments = ack.split("\r")
    fields = next(s for s in segments if s.startswith("MSA")).split("|")
    return fields[1], fields[2], [s for s in segments if s.startswith("ERR")]


def worklist(daemon: Daemon, tmp_path: Path, *keys: str) -> list[Dataset]:
    asked = {key.split("=")[0] for key in keys}
    return findscu(daemon, tmp_path, "-W", *keys, *(k for k in RETURN_KEYS if k not in asked))


def steps(daemon: Daemon) -> list[tuple[str, str, str]]:
    return [
        (str(accession), str(sps), str(status))
        for accession, sps, status in daemon.query(
            "SELECT o.accession_number, s.sps_id, s.status FROM scheduled_steps s "
            "JOIN requested_procedures p ON s.procedure_pk = p.id JOIN orders o ON p.order_pk = o.id "
            "ORDER BY s.id"
        )
    ]


def message(control_id: str, *segments: str, kind: str = "ORM^O01", version: str = "2.5.1") -> bytes:
    msh = f"MSH|^~\\&|TESTRIS|TESTFAC|FABRICATORD|RAD|20261124090000||{kind}|{control_id}|P|{version}"
    return "\r".join([msh, *segments]).encode()


def order(control_id: str, control: str, status: str, accession: str, start: str = "20261124090000") -> bytes:
    return message(
        control_id,
        "PID|1||MRN9009^^^TESTHOSP||Tester^Tina||19800101|F",
        f"ORC|{control}|PO-{accession}|FO-{accession}||{status}||^^^{start}^^R",
        f"OBR|1|PO-{accession}|FO-{accession}|CTABD^CT Abdomen^LOCAL||||||||||||||{accession}||||||CT",
    )


@BOTH_BACKENDS
def test_a_corpus_of_real_dialects_lands_on_the_worklist_field_by_field(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = start_daemon()
    for path in sorted(CORPUS.glob("*.hl7")):
        code, _, errors = msa(send(daemon, frame_of(path)))
        assert (code, errors) == ("AA", []), path.name

    [ihe] = worklist(daemon, tmp_path, "AccessionNumber=ACC1001")
    assert (ihe.PatientID, ihe.IssuerOfPatientID, str(ihe.PatientName)) == ("MRN1001", "NORTHHOSP", "Sellers^Thomas^J")
    assert (ihe.PatientBirthDate, ihe.PatientSex, ihe.AdmissionID) == ("19691113", "M", "VN5001")
    assert ihe.StudyInstanceUID == "1.2.826.0.1.3680043.10.999.1001"
    assert (ihe.RequestedProcedureID, ihe.RequestedProcedureDescription) == ("RP1001", "CT Head without contrast")
    assert (str(ihe.ReferringPhysicianName), str(ihe.RequestingPhysician)) == ("House^Gregory", "Cuddy^Lisa")
    assert (ihe.PlacerOrderNumberImagingServiceRequest, ihe.FillerOrderNumberImagingServiceRequest) == (
        "PO1001",
        "FO1001",
    )
    step = ihe.ScheduledProcedureStepSequence[0]
    assert (step.Modality, step.ScheduledProcedureStepID, step.ScheduledProcedureStepStatus) == (
        "CT",
        "SPS1001",
        "SCHEDULED",
    )
    assert (step.ScheduledProcedureStepStartDate, step.ScheduledProcedureStepStartTime) == ("20261124", "081500")
    assert (str(step.ScheduledPerformingPhysicianName), step.ScheduledProcedureStepDescription) == (
        "Chase^Robert",
        "Head routine",
    )

    # v2.3 with LF separators, the accession only in OBR-3, no IDs and no ZDS: the defaults fill in.
    [plain] = worklist(daemon, tmp_path, "AccessionNumber=ACC2002")
    step = plain.ScheduledProcedureStepSequence[0]
    assert (plain.RequestedProcedureID, step.ScheduledProcedureStepID, step.Modality) == (
        "ACC2002",
        "ACC2002.1",
        "DX",
    )
    assert plain.StudyInstanceUID.startswith("2.25.") and plain.RequestedProcedurePriority == "STAT"

    # OMI^O23: one item per IPC, with its own station, sharing the requested procedure.
    omi = worklist(daemon, tmp_path, "AccessionNumber=ACC3003")
    assert sorted(
        (
            ds.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID,
            ds.ScheduledProcedureStepSequence[0].ScheduledStationAETitle,
        )
        for ds in omi
    ) == [("SPS3003A", "MR01"), ("SPS3003B", "MR02")]
    assert {ds.StudyInstanceUID for ds in omi} == {"1.2.826.0.1.3680043.10.999.3003"}
    assert {ds.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime for ds in omi} == {"090000"}

    # Escapes undone; a backslash (DICOM's delimiter) becomes a slash; Z-segments ignored.
    [escaped] = worklist(daemon, tmp_path, "AccessionNumber=ACC4004")
    assert str(escaped.PatientName) == "O'Brien&Sons^Mary"
    assert escaped.RequestedProcedureDescription == "US Abdomen|Pelvis^Renal / Bladder"

    # MSH-18 carried into Specific Character Set.
    [utf8] = worklist(daemon, tmp_path, "AccessionNumber=ACC5005")
    assert utf8.SpecificCharacterSet == "ISO_IR 192"
    assert str(utf8.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    [latin1] = worklist(daemon, tmp_path, "AccessionNumber=ACC6006")
    assert (latin1.SpecificCharacterSet, str(latin1.PatientName)) == ("ISO_IR 100", "Müller^Jürgen")


def test_order_control_moves_the_steps(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = start_daemon()
    assert msa(send(daemon, order("L1", "NW", "SC", "ACCL1")))[0] == "AA"
    assert msa(send(daemon, order("L2", "XO", "SC", "ACCL1", start="20261126143000")))[0] == "AA"
    [moved] = worklist(daemon, tmp_path, "AccessionNumber=ACCL1")
    step = moved.ScheduledProcedureStepSequence[0]
    assert (step.ScheduledProcedureStepStartDate, step.ScheduledProcedureStepStartTime) == ("20261126", "143000")
    assert steps(daemon) == [("ACCL1", "ACCL1.1", "SCHEDULED")]  # updated in place, not a second item

    assert msa(send(daemon, order("L3", "SC", "IP", "ACCL1")))[0] == "AA"
    assert worklist(daemon, tmp_path, "AccessionNumber=ACCL1") == []  # STARTED is no longer actionable
    [started] = worklist(daemon, tmp_path, "AccessionNumber=ACCL1", f"{SPS}.ScheduledProcedureStepStatus=STARTED")
    assert started.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus == "STARTED"

    assert msa(send(daemon, order("L4", "NW", "", "ACCL2")))[0] == "AA"
    assert msa(send(daemon, order("L5", "CA", "", "ACCL2")))[0] == "AA"
    assert msa(send(daemon, order("L6", "NW", "", "ACCL3")))[0] == "AA"
    assert msa(send(daemon, order("L7", "DC", "", "ACCL3")))[0] == "AA"
    assert msa(send(daemon, order("L8", "NW", "SC", "ACCL4")))[0] == "AA"
    assert msa(send(daemon, order("L9", "XO", "CM", "ACCL4")))[0] == "AA"
    assert [status for *_, status in steps(daemon)] == ["STARTED", "CANCELED", "DISCONTINUED", "COMPLETED"]
    # The trace finds every message that touched the order, by key: made, moved, started.
    trace = run_cli("trace", "ACCL1", "--config", str(daemon.config)).stdout
    assert all(f"ORM^O01 {control_id} " in trace for control_id in ("L1", "L2", "L3")) and " L4 " not in trace

    code, control_id, errors = msa(send(daemon, order("L10", "CA", "", "NEVERSEEN")))
    assert (code, control_id) == ("AE", "L10")
    assert errors == ["ERR||ORC^1^2|204^Unknown key identifier^HL70357|E||||order control CA for an unknown order"]
    code, _, errors = msa(send(daemon, order("L11", "SC", "ZZ", "ACCL1")))
    assert code == "AE" and errors[0].startswith("ERR||ORC^1^1|103^Table value not found")
    assert len(steps(daemon)) == 4


def test_adt_updates_merges_and_arrivals(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = start_daemon()
    assert msa(send(daemon, order("A1", "NW", "SC", "ACCA1", start="20261124090000")))[0] == "AA"
    update = message(
        "A2", "EVN|A08|20261124", "PID|1||MRN9009^^^TESTHOSP||Tester-Smith^Tina^M||19800102|F", kind="ADT^A08"
    )
    assert msa(send(daemon, update))[0] == "AA"
    [item] = worklist(daemon, tmp_path, "AccessionNumber=ACCA1")
    assert (str(item.PatientName), item.PatientBirthDate) == ("Tester-Smith^Tina^M", "19800102")

    arrival = message("A3", "EVN|A10|20261124085500|||||20261124085500", "PID|1||MRN9009^^^TESTHOSP", kind="ADT^A10")
    assert msa(send(daemon, arrival))[0] == "AA"
    [arrived] = worklist(daemon, tmp_path, "AccessionNumber=ACCA1")
    assert arrived.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus == "ARRIVED"

    merge = message(
        "A4",
        "EVN|A40|20261124",
        "PID|1||MRN8008^^^TESTHOSP||Tester^Tina||19800102|F",
        "MRG|MRN9009^^^TESTHOSP",
        kind="ADT^A40",
    )
    assert msa(send(daemon, merge))[0] == "AA"
    [merged] = worklist(daemon, tmp_path, "AccessionNumber=ACCA1")
    assert merged.PatientID == "MRN8008"
    assert worklist(daemon, tmp_path, "PatientID=MRN9009") == []

    change = message("A5", "EVN|A47|20261124", "PID|1||MRN7007^^^TESTHOSP", "MRG|MRN8008^^^TESTHOSP", kind="ADT^A47")
    assert msa(send(daemon, change))[0] == "AA"
    assert worklist(daemon, tmp_path, "AccessionNumber=ACCA1")[0].PatientID == "MRN7007"

    code, _, errors = msa(send(daemon, message("A6", "PID|1||MRN1^^^TESTHOSP", "MRG|GONE^^^TESTHOSP", kind="ADT^A40")))
    assert code == "AE" and errors[0].startswith("ERR||MRG^1^1|204^")


@BOTH_BACKENDS
def test_a_resend_gets_the_same_ack_and_changes_nothing(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon()
    first = send(daemon, order("D1", "NW", "SC", "ACCD1"))
    again = send(daemon, order("D1", "NW", "SC", "ACCD1"))
    assert msa(first)[0] == "AA" and again == first
    refused = send(daemon, order("D2", "CA", "", "UNKNOWN"))
    assert send(daemon, order("D2", "CA", "", "UNKNOWN")) == refused
    assert steps(daemon) == [("ACCD1", "ACCD1.1", "SCHEDULED")]
    log = run_cli("hl7", "log", "--config", str(daemon.config)).stdout
    assert log.count(" D1 ") == 2 and "resend of a settled message: nothing changed" in log
    assert "204 ORC-2: order control CA for an unknown order" in log


def test_an_oru_completes_its_order(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon()
    assert msa(send(daemon, order("R1", "NW", "SC", "ACCR1")))[0] == "AA"
    result = message(
        "R2",
        "PID|1||MRN9009^^^TESTHOSP",
        "OBR|1|PO-ACCR1|FO-ACCR1|CTABD^CT Abdomen^LOCAL",
        "OBX|1|TX|GDT^Report||No findings.",
        kind="ORU^R01",
    )
    assert msa(send(daemon, result))[0] == "AA"
    assert steps(daemon) == [("ACCR1", "ACCR1.1", "COMPLETED")]


def test_hl7_tools_preview_and_send_through_the_listener(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = start_daemon()
    preview = run_cli("hl7", "preview", "--config", str(daemon.config), str(CORPUS / "omi_o23_two_ipc_v25.hl7"))
    assert "OMI^O23 through profile default: patient MRN3003 (EASTHOSP) Nakamura^Ken" in preview.stdout
    assert "step SPS3003A MR station MR01 at 20261125 090000 Knee sagittal" in preview.stdout
    assert steps(daemon) == []  # a preview keeps nothing
    files = [str(CORPUS / "plain_orm_o01_v23_lf.hl7"), str(CORPUS / "escapes_orm_o01_v24_crlf.hl7")]
    sent = run_cli("hl7", "send", f"127.0.0.1:{daemon.hl7_port}", *files)
    assert sent.stdout.count(": AA ") == 2
    made = run_cli(
        "hl7", "orm", "--config", str(daemon.config), "--modality", "MR", "--send", f"127.0.0.1:{daemon.hl7_port}"
    )
    assert ": AA " in made.stdout
    assert len(steps(daemon)) == 3


def test_an_err_names_a_field_the_message_version_has(start_daemon: Callable[..., Daemon]) -> None:
    """A v2.3 order without OBR lacks a modality: the ERR points at OBR-24, where a v2.3 sender
    puts it, not at IPC-5 (IPC came with v2.5); a v2.5.1 one without IPC or OBR gets IPC-5."""
    daemon = start_daemon()
    for version, where in (("2.3", "OBR^1^24"), ("2.5.1", "IPC^1^5")):
        ack = send(daemon, message(f"V{version}", "PID|1||MRN1||Doe^J", "ORC|NW|PO1|FO1||SC", version=version))
        code, _, errors = msa(ack)
        assert code == "AE" and len(errors) == 1 and where in errors[0], ack
