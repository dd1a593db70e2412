"""The HL7 / MLLP bad inputs of ROBUSTNESS.md, written byte by byte on a raw socket: framing
that is split, pipelined, noisy, unfinished or oversized; content that earns AE or AR with the
ERR code HL7 v2 §2.9.2 prescribes; charsets, batches, resends and enhanced mode. Each gets its
exact answer (ACK code, ERR code and location), and the oracles O1–O6 hold afterwards."""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import time

import pytest

from tests.robustness.conftest import Node
from tests.robustness.mllp import END, START, Link, framed, message, order

HL7_SETTINGS = 'max_message_bytes = 4194304\nidle_timeout = "3s"\n'
MESSAGES = "fabricatord_hl7_messages_total"
REFUSED = "fabricatord_hl7_frames_refused_total"


def steps(node: Node, accession: str) -> list[tuple[str, str]]:
    """(SPS ID, status) of the steps of the order with this accession number."""
    with sqlite3.connect(node.daemon.data_dir / "fabricatord.sqlite") as connection:
        return list(
            connection.execute(
                "SELECT s.sps_id, s.status FROM scheduled_steps s JOIN requested_procedures p ON s.procedure_pk = p.id "
                "JOIN orders o ON p.order_pk = o.id WHERE o.accession_number = ? ORDER BY s.id",
                (accession,),
            )
        )


def logged(node: Node, control_id: str) -> list[dict[str, object]]:
    """The daemon's JSON log lines about the message with this MSH-10."""
    lines = []
    for line in node.daemon.log.read_text().splitlines():
        if line.startswith("{") and f'"control_id": "{control_id}"' in line:
            lines.append(json.loads(line))
    return lines


def assert_refused_once(node: Node, control_id: str, code: int) -> None:
    """O5 for a refused message: one log line naming it with its error code."""
    refusals = [line for line in logged(node, control_id) if line["event"] == "hl7 message refused"]
    assert [line["error"] for line in refusals] == [code], logged(node, control_id)


def test_a_frame_split_over_three_writes_gets_one_ack(node: Node) -> None:
    data = framed(order("SPLIT1", "ACCSPLIT1"))
    with Link(node.daemon.hl7_port) as link:
        for part in (data[:20], data[20:90], data[90:]):
            link.send(part)
            time.sleep(0.2)
        acks = link.frames(1)
        assert [(a.code, a.control_id) for a in acks] == [("AA", "SPLIT1")]
        assert link.silent_for(0.5)
    assert steps(node, "ACCSPLIT1") == [("ACCSPLIT1.1", "SCHEDULED")]
    node.check()


def test_pipelined_frames_are_answered_in_order(node: Node) -> None:
    with Link(node.daemon.hl7_port) as link:
        link.send(framed(*(order(f"PIPE{i}", f"ACCPIPE{i}") for i in range(20))))
        assert [a.control_id for a in link.frames(20)] == [f"PIPE{i}" for i in range(20)]
    node.check()


def test_noise_empty_frames_fs_without_cr_and_lf_separators_are_tolerated(node: Node) -> None:
    lf = order("NOISE2", "ACCNOISE2").replace(b"\r", b"\n")
    crlf = order("NOISE3", "ACCNOISE3").replace(b"\r", b"\r\n")
    with Link(node.daemon.hl7_port) as link:
        link.send(b"\r\n\x00noise" + START + END + START + order("NOISE1", "ACCNOISE1") + b"\x1c")  # no CR after FS
        link.send(framed(lf, crlf))
        assert [(a.code, a.control_id) for a in link.frames(3)] == [
            ("AA", "NOISE1"),
            ("AA", "NOISE2"),
            ("AA", "NOISE3"),
        ]
        assert link.silent_for(0.5)  # the empty frame got no answer
    assert all(steps(node, f"ACCNOISE{i}") for i in (1, 2, 3))
    node.check()


def test_an_unfinished_frame_then_a_close_keeps_nothing_and_gets_no_ack(node: Node) -> None:
    before = node.counter(REFUSED, reason="unfinished")
    with Link(node.daemon.hl7_port) as link:
        link.send(START + order("HALF1", "ACCHALF1"))
    time.sleep(0.5)
    assert steps(node, "ACCHALF1") == []
    node.check("unfinished", before, REFUSED)


def test_an_unfinished_frame_then_silence_is_closed_at_the_idle_timeout(node: Node) -> None:
    with Link(node.daemon.hl7_port) as link:
        link.send(START + order("HALF2", "ACCHALF2"))
        started = time.monotonic()
        assert link.closed_within(10)
        assert 2.5 < time.monotonic() - started < 8  # idle_timeout = 3 s
        assert link.frames(1) == []
    assert steps(node, "ACCHALF2") == []
    node.check("idle", 0, REFUSED)


@pytest.mark.parametrize("ended", [True, False], ids=["ended-past-the-cap", "never-ended"])
def test_a_frame_over_max_message_bytes_is_ar_207_then_closed_with_memory_bounded(node: Node, ended: bool) -> None:
    before, rss = node.counter(REFUSED, reason="oversized"), node.rss()
    big = order(f"BIG{int(ended)}", f"ACCBIG{int(ended)}") + b"\rNTE|1||" + b"x" * (6 * 2**20)
    with Link(node.daemon.hl7_port) as link:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it stops reading at the cap
            link.send(START + big + (END if ended else b""))
        acks = link.frames(1)
        assert [(a.code, a.control_id) for a in acks] == [("AR", f"BIG{int(ended)}")]
        assert acks[0].errors[0].startswith("ERR|||207^") and "max_message_bytes" in acks[0].errors[0]
        assert link.closed_within(5)
    assert node.rss() - rss < 16 * 2**20
    assert steps(node, f"ACCBIG{int(ended)}") == []
    node.check("oversized", before, REFUSED)


BAD: list[tuple[bytes, str, str]] = [
    # AE: the content is wrong; the sender must fix it.
    (message("BAD101", "PID|1", "ORC|NW|P|F||SC", "OBR|1|P|F||||||||||||||A101|||||||CT"), "AE", "ERR||PID^1^3|101^"),
    (order("BAD102", "ACC-FAR-TOO-LONG-FOR-SH"), "AE", "ERR||OBR^1^18|102^"),
    (order("BAD103", "ACCBAD103", control="ZZ"), "AE", "ERR||ORC^1^1|103^"),
    (order("BAD204", "ACCUNKNOWN204", control="CA", status=""), "AE", "ERR||ORC^1^2|204^"),
    (message("BAD103C", "PID|1||X", kind="ADT^A08", msh="||||||KLINGON"), "AE", "ERR||MSH^1^18|103^"),
    # AR: not about the content; the sender may resend it unchanged.
    (b"PID|1||X\rMSH|^~\\&|ROBUST|TESTFAC|||20261124||ADT^A08|BAD100|P|2.5.1", "AR", "ERR||MSH^1|100^"),
    (b"\x00\xff\xfe binary garbage \x01\x02", "AR", "ERR||MSH^1^9|100^"),
    (message("BAD200", "PID|1||X", kind="QRY^A19"), "AR", "ERR||MSH^1^9|200^"),
    (message("BAD201", "PID|1||X", kind="ADT^A99"), "AR", "ERR||MSH^1^9^1^2|201^"),
    (message("BAD202", "PID|1||X", kind="ADT^A08").replace(b"|P|2.5.1", b"|X|2.5.1"), "AR", "ERR||MSH^1^11|202^"),
    (message("BAD203", "PID|1||X", kind="ADT^A08", version="2.1"), "AR", "ERR|MSH^1^12^203&"),
    # v2.3 and v2.4 carry the error in ERR-1; v2.5 and later in ERR-2, ERR-3 and ERR-4.
    (
        message("BAD101V", "PID|1", "ORC|NW|P|F||SC", "OBR|1|P|F|||||||||||||A1V|||||||CT", version="2.3"),
        "AE",
        "ERR|PID^1^3^101&",
    ),
]


@pytest.mark.parametrize(
    ("frame", "code", "err"),
    BAD,
    ids=[
        "101-required",
        "102-data-type",
        "103-table-value",
        "204-unknown-key",
        "103-charset",
        "100-msh-not-first",
        "100-garbage",
        "200-type",
        "201-event",
        "202-processing-id",
        "203-version",
        "101-in-v2.3",
    ],
)
def test_bad_content_gets_the_ack_code_and_err_hl7_prescribes_and_the_connection_stays(
    node: Node, frame: bytes, code: str, err: str
) -> None:
    before = node.counter(MESSAGES, type="unknown", ack=code) + _counted(node, code)
    with Link(node.daemon.hl7_port) as link:
        ack = link.ack(frame)
        assert ack.code == code and ack.errors and ack.errors[0].startswith(err), ack.text
        assert link.ack(order(f"AFTER-{ack.control_id}", f"ACCAFTER{len(frame)}")).code == "AA"  # connection kept
    assert node.counter(MESSAGES, type="unknown", ack=code) + _counted(node, code) > before
    if ack.control_id:
        expected = re.search(r"(\d{3})[&^]", err)
        assert expected is not None
        assert_refused_once(node, ack.control_id, int(expected.group(1)))
    node.check()


def test_a_duplicate_key_is_ae_205(node: Node) -> None:
    with Link(node.daemon.hl7_port) as link:
        assert link.ack(message("DUP1", "PID|1||MRN-A^^^TESTHOSP||A^A", kind="ADT^A08")).code == "AA"
        assert link.ack(message("DUP2", "PID|1||MRN-B^^^TESTHOSP||B^B", kind="ADT^A08")).code == "AA"
        change = message("DUP3", "PID|1||MRN-B^^^TESTHOSP||A^A", "MRG|MRN-A^^^TESTHOSP", kind="ADT^A47")
        ack = link.ack(change)
    assert (ack.code, ack.errors[0][:16]) == ("AE", "ERR||PID^1^3|205")
    assert_refused_once(node, "DUP3", 205)
    node.check()


def test_a_message_in_latin_1_without_msh18_is_read_with_the_default_charset(node: Node) -> None:
    latin = order("CS1", "ACCCS1", name="Müller^Jörg").decode().encode("latin-1")
    with Link(node.daemon.hl7_port) as link:
        assert link.ack(latin).code == "AA"
    assert _patient_name(node, "MRN-ACCCS1") == "Müller^Jörg"
    node.check()


def test_a_declared_msh18_is_honoured(node: Node) -> None:
    declared = order("CS2", "ACCCS2", name="Śliwa^Łucja", msh="||||||8859/2").decode().encode("iso-8859-2")
    with Link(node.daemon.hl7_port) as link:
        assert link.ack(declared).code == "AA"
    assert _patient_name(node, "MRN-ACCCS2") == "Śliwa^Łucja"
    node.check()


def test_nw_for_an_order_that_exists_is_an_update(node: Node) -> None:
    with Link(node.daemon.hl7_port) as link:
        assert link.ack(order("NW1", "ACCNW1")).code == "AA"
        assert link.ack(order("NW2", "ACCNW1", name="Robust^Renamed")).code == "AA"
    assert steps(node, "ACCNW1") == [("ACCNW1.1", "SCHEDULED")]
    assert _patient_name(node, "MRN-ACCNW1") == "Robust^Renamed"
    accepted = [line for line in logged(node, "NW2") if line["event"] == "hl7 message accepted"]
    assert len(accepted) == 1 and "updated" in str(accepted[0]["detail"])
    node.check()


def test_a_batch_is_answered_message_by_message_as_a_batch(node: Node) -> None:
    batch = b"\r".join(
        [
            b"FHS|^~\\&|ROBUST|TESTFAC|FABRICATORD|RAD|20261124||||F1",
            b"BHS|^~\\&|ROBUST|TESTFAC|FABRICATORD|RAD|20261124||||B1",
            order("BAT1", "ACCBAT1"),
            message("BAT2", "PID|1||X", kind="ADT^A99"),
            order("BAT3", "ACCBAT3"),
            b"BTS|3",
            b"FTS|1",
        ]
    )
    with Link(node.daemon.hl7_port) as link:
        reply = link.ack(batch)
    lines = reply.segments
    assert lines[0].startswith("FHS|") and lines[1].startswith("BHS|") and lines[-2:] == ["BTS|3", "FTS|1"]
    assert [line.split("|")[1:3] for line in lines if line.startswith("MSA")] == [
        ["AA", "BAT1"],
        ["AR", "BAT2"],
        ["AA", "BAT3"],
    ]
    assert steps(node, "ACCBAT1") and steps(node, "ACCBAT3")
    node.check()


@pytest.mark.parametrize(
    "first", [order("SAME1", "ACCSAME1"), order("SAME2", "ACCUNKNOWN2", control="CA", status="")], ids=["aa", "ae"]
)
def test_a_resend_gets_the_first_ack_and_no_second_effect(node: Node, first: bytes) -> None:
    with Link(node.daemon.hl7_port) as link:
        one = link.ack(first)
        two = link.ack(first)
    assert two.text == one.text  # the same MSA and ERR, even the ACK's own control ID
    accession = first.split(b"|PO-")[1].split(b"|")[0].decode()
    assert len(steps(node, accession)) == (1 if one.code == "AA" else 0)
    node.check()


def test_enhanced_mode_gets_one_commit_ack_and_no_application_ack(node: Node) -> None:
    enhanced = order("ENH1", "ACCENH1", msh="|||AL|NE")
    with Link(node.daemon.hl7_port) as link:
        ack = link.ack(enhanced)
        assert (ack.code, ack.control_id) == ("CA", "ENH1")
        assert link.silent_for(1.0)
    assert steps(node, "ACCENH1") == [("ACCENH1.1", "SCHEDULED")]
    node.check()


def test_sql_and_script_looking_content_and_a_megabyte_field_are_kept_verbatim(node: Node) -> None:
    name = "O'Brien\\T\\Co^Robert'); DROP TABLE patients;--"
    sql = order("SQL1", "ACCSQL1", name=name) + b"\rNTE|1||<script>alert('x')</script>" + b"y" * 2**20
    with Link(node.daemon.hl7_port) as link:
        assert link.ack(sql).code == "AA"
    with sqlite3.connect(node.daemon.data_dir / "fabricatord.sqlite") as connection:
        (raw,) = connection.execute("SELECT raw FROM hl7_messages WHERE control_id = 'SQL1'").fetchone()
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert raw == sql
    assert "patients" in tables
    assert _patient_name(node, "MRN-ACCSQL1") == "O'Brien&Co^Robert'); DROP TABLE patients;--"
    node.check()


def _counted(node: Node, code: str) -> float:
    """Refused messages of every type with this ACK code."""
    return sum(
        node.counter(MESSAGES, type=kind, ack=code) for kind in ("ORM^O01", "ADT^A08", "ADT^A99", "QRY^A19", "ADT^A47")
    )


def _patient_name(node: Node, patient_id: str) -> str:
    with sqlite3.connect(node.daemon.data_dir / "fabricatord.sqlite") as connection:
        row = connection.execute("SELECT name FROM patients WHERE patient_id = ?", (patient_id,)).fetchone()
    assert row is not None, patient_id
    return str(row[0])
