"""The MLLP listener of `fabricatord serve`, driven over loopback by python-hl7's MLLP client
(not ours), by `fabricatord hl7 send` and by raw sockets, with every worklist item checked by
DCMTK's `findscu -W`."""

from __future__ import annotations

import socket
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hl7.client import MLLPClient
from pydicom.dataset import Dataset

from tests.conftest import ROOT, run_cli
from tests.integration.conftest import Daemon, findscu

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
    with sqlite3.connect(daemon.data_dir / "fabricatord.sqlite") as connection:
        return list(
            connection.execute(
                "SELECT o.accession_number, s.sps_id, s.status FROM scheduled_steps s "
                "JOIN requested_procedures p ON s.procedure_pk = p.id JOIN orders o ON p.order_pk = o.id "
                "ORDER BY s.id"
            )
        )


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


@pytest.mark.parametrize(
    ("frame", "code", "err"),
    [
        (message("E1", "PID|1||X", kind="QRY^A19"), "AR", "ERR||MSH^1^9|200^Unsupported message type"),
        (message("E2", "PID|1||X", kind="ADT^A99"), "AR", "ERR||MSH^1^9^1^2|201^Unsupported event code"),
        (message("E3", "PID|1||X", kind="ADT^A08", version="2.1"), "AR", "ERR|MSH^1^12^203&"),
        (message("E4", "PID|1", "ORC|NW|P|F||SC", "OBR|1|P|F||||||||||||||A|||||||CT"), "AE", "ERR||PID^1^3|101^"),
        (b"\x00\xffbinary garbage\x01", "AR", "ERR||MSH^1^9|100^Segment sequence error"),
        (message("E6", "PID|1||X", kind="ADT^A08", version="2.5.1||||||KLINGON"), "AE", "ERR||MSH^1^18|103^"),
    ],
)
def test_bad_messages_get_the_ack_code_and_err_hl7_prescribes(
    start_daemon: Callable[..., Daemon], frame: bytes, code: str, err: str
) -> None:
    daemon = start_daemon()
    with socket.create_connection(("127.0.0.1", daemon.hl7_port), timeout=30) as connection:
        connection.sendall(b"\x0b" + frame + b"\x1c\r")
        ack = _read_frames(connection, 1)[0]
        got, _, errors = msa(ack)
        assert got == code and errors and errors[0].startswith(err), ack
        # The connection stays open for the next message.
        connection.sendall(b"\x0b" + order("OK1", "NW", "SC", "ACCOK") + b"\x1c\r")
        assert msa(_read_frames(connection, 1)[0])[0] == "AA"


def _read_frames(connection: socket.socket, count: int) -> list[str]:
    data = b""
    while data.count(b"\x1c") < count:
        chunk = connection.recv(65536)
        if not chunk:
            break
        data += chunk
    return [part.strip(b"\x0b\r").decode() for part in data.split(b"\x1c")[:count]]


def test_framing_is_tolerant_pipelined_and_bounded(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(hl7_extra='max_message_bytes = 4000\nidle_timeout = "2s"\n')
    with socket.create_connection(("127.0.0.1", daemon.hl7_port), timeout=30) as connection:
        # Noise before VT, an empty frame, a frame split over three writes, FS without CR.
        first = order("F1", "NW", "SC", "ACCF1")
        connection.sendall(b"\r\nnoise\x0b\x1c\r" + b"\x0b" + first[:40])
        time.sleep(0.2)
        connection.sendall(first[40:90])
        time.sleep(0.2)
        connection.sendall(first[90:] + b"\x1c")
        assert msa(_read_frames(connection, 1)[0])[:2] == ("AA", "F1")
        # Three pipelined frames in one write: three ACKs, in order.
        connection.sendall(b"".join(b"\x0b" + order(f"P{i}", "NW", "SC", f"ACCP{i}") + b"\x1c\r" for i in range(3)))
        assert [msa(ack)[1] for ack in _read_frames(connection, 3)] == ["P0", "P1", "P2"]
    # Over max_message_bytes: AR, then the connection is closed.
    with socket.create_connection(("127.0.0.1", daemon.hl7_port), timeout=30) as connection:
        big = order("BIG", "NW", "SC", "ACCBIG") + b"\rNTE|1||" + b"x" * 5000
        connection.sendall(b"\x0b" + big + b"\x1c\r")
        code, control_id, errors = msa(_read_frames(connection, 1)[0])
        assert (code, control_id) == ("AR", "BIG") and "max_message_bytes" in errors[0]
        assert connection.recv(100) == b""
    # A frame left unfinished, then a close: nothing kept. A silent connection: closed at the idle timeout.
    with socket.create_connection(("127.0.0.1", daemon.hl7_port), timeout=30) as connection:
        connection.sendall(b"\x0b" + order("HALF", "NW", "SC", "ACCHALF"))
    with socket.create_connection(("127.0.0.1", daemon.hl7_port), timeout=30) as connection:
        started = time.monotonic()
        assert connection.recv(100) == b""
        assert 1.5 < time.monotonic() - started < 10
    assert [accession for accession, *_ in steps(daemon)] == ["ACCF1", "ACCP0", "ACCP1", "ACCP2"]


def test_a_batch_is_answered_message_by_message_in_a_batch(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon()
    batch = b"\r".join(
        [
            b"FHS|^~\\&|TESTRIS|TESTFAC|FABRICATORD|RAD|20261124||||F1",
            b"BHS|^~\\&|TESTRIS|TESTFAC|FABRICATORD|RAD|20261124||||B1",
            order("B1", "NW", "SC", "ACCB1"),
            message("B2", "PID|1||X", kind="ADT^A99"),
            order("B3", "NW", "SC", "ACCB3"),
            b"BTS|3",
            b"FTS|1",
        ]
    )
    reply = send(daemon, batch)
    lines = reply.split("\r")
    assert lines[0].startswith("FHS|^~\\&|FABRICATORD|RAD|TESTRIS|TESTFAC") and lines[1].startswith("BHS|")
    assert [line.split("|")[1:3] for line in lines if line.startswith("MSA")] == [
        ["AA", "B1"],
        ["AR", "B2"],
        ["AA", "B3"],
    ]
    assert lines[-2:] == ["BTS|3", "FTS|1"]
    assert [accession for accession, *_ in steps(daemon)] == ["ACCB1", "ACCB3"]


def test_enhanced_mode_gets_a_commit_ack(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon()
    enhanced = order("H1", "NW", "SC", "ACCH1").replace(b"|P|2.5.1", b"|P|2.5.1|||AL|NE", 1)
    assert msa(send(daemon, enhanced))[:2] == ("CA", "H1")


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


@pytest.mark.parametrize(("point", "kept"), [("hl7.before_commit", False), ("hl7.after_commit", True)])
def test_kill_9_never_acknowledges_what_it_lost(
    start_daemon: Callable[..., Daemon], tmp_path: Path, point: str, kept: bool
) -> None:
    crashing = start_daemon(env={"FABRICATORD_FAULTPOINT": f"{point}:kill"})
    with socket.create_connection(("127.0.0.1", crashing.hl7_port), timeout=30) as connection:
        connection.sendall(b"\x0b" + order("K1", "NW", "SC", "ACCK1") + b"\x1c\r")
        assert connection.recv(100) == b""  # no ACK: the process died first
    crashing.process.wait(timeout=30)
    daemon = start_daemon()  # same data_dir
    assert len(worklist(daemon, tmp_path, "AccessionNumber=ACCK1")) == (1 if kept else 0)
    # The sender resends what it never saw acknowledged: AA, and exactly one item.
    assert msa(send(daemon, order("K1", "NW", "SC", "ACCK1")))[0] == "AA"
    assert len(worklist(daemon, tmp_path, "AccessionNumber=ACCK1")) == 1


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


def test_pipelined_bursts_from_several_senders_are_answered_in_order(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon()
    senders, each = 5, 100

    def burst(sender: int) -> list[str]:
        frames = b"".join(
            b"\x0b" + order(f"S{sender}-{i}", "NW", "SC", f"ACC{sender}X{i}") + b"\x1c\r" for i in range(each)
        )
        with socket.create_connection(("127.0.0.1", daemon.hl7_port), timeout=60) as connection:
            connection.sendall(frames)
            return [msa(ack)[0] + " " + msa(ack)[1] for ack in _read_frames(connection, each)]

    with ThreadPoolExecutor(senders) as pool:
        answered = list(pool.map(burst, range(senders)))
    for sender, acks in enumerate(answered):
        assert acks == [f"AA S{sender}-{i}" for i in range(each)]
    assert len(steps(daemon)) == senders * each


def test_a_locked_database_is_ar_206_and_the_resend_succeeds(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon()
    blocker = sqlite3.connect(daemon.data_dir / "fabricatord.sqlite", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # held past the daemon's 10 s busy timeout
        code, _, errors = msa(send(daemon, order("LK1", "NW", "SC", "ACCLK1")))
        assert code == "AR" and errors[0].startswith("ERR|||206^Application record locked")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert msa(send(daemon, order("LK1", "NW", "SC", "ACCLK1")))[0] == "AA"
    assert steps(daemon) == [("ACCLK1", "ACCLK1.1", "SCHEDULED")]
